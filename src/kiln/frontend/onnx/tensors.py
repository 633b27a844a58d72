"""ONNX tensors and types to kiln: element types, TensorProto payloads (with external data), TypeProto."""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, TypeProto, numpy_helper

from kiln.ir import symbolic as sym
from kiln.ir.convert import from_numpy
from kiln.ir.dtype import DType
from kiln.ir.graph import Constant, OptionalType, SequenceType, TensorType, ValueType
from kiln.utils.errors import ModelLoadError, UnsupportedError

_P = TensorProto
ONNX_TO_DTYPE: dict[int, DType] = {
    _P.FLOAT: DType.FLOAT32, _P.UINT8: DType.UINT8, _P.INT8: DType.INT8, _P.UINT16: DType.UINT16,
    _P.INT16: DType.INT16, _P.INT32: DType.INT32, _P.INT64: DType.INT64, _P.STRING: DType.STRING,
    _P.BOOL: DType.BOOL, _P.FLOAT16: DType.FLOAT16, _P.DOUBLE: DType.FLOAT64, _P.UINT32: DType.UINT32,
    _P.UINT64: DType.UINT64, _P.COMPLEX64: DType.COMPLEX64, _P.COMPLEX128: DType.COMPLEX128,
    _P.BFLOAT16: DType.BFLOAT16, _P.FLOAT8E4M3FN: DType.FLOAT8_E4M3FN, _P.FLOAT8E4M3FNUZ: DType.FLOAT8_E4M3FNUZ,
    _P.FLOAT8E5M2: DType.FLOAT8_E5M2, _P.FLOAT8E5M2FNUZ: DType.FLOAT8_E5M2FNUZ, _P.UINT4: DType.UINT4,
    _P.INT4: DType.INT4,
}
for _name, _dt in [("FLOAT4E2M1", DType.FLOAT4_E2M1), ("FLOAT8E8M0", DType.FLOAT8_E8M0), ("UINT2", DType.UINT2),
                   ("INT2", DType.INT2), ("FLOAT6E2M3", DType.FLOAT6_E2M3), ("FLOAT6E3M2", DType.FLOAT6_E3M2)]:
    if hasattr(_P, _name):  # newer onnx releases only
        ONNX_TO_DTYPE[getattr(_P, _name)] = _dt
DTYPE_TO_ONNX: dict[DType, int] = {v: k for k, v in ONNX_TO_DTYPE.items()}


def dtype_from_onnx(elem_type: int, what: str = "tensor") -> DType:
    dt = ONNX_TO_DTYPE.get(elem_type)
    if dt is None:
        name = TensorProto.DataType.Name(elem_type) if elem_type in TensorProto.DataType.values() else elem_type
        raise UnsupportedError(f"{what}: element type {name} is not supported")
    return dt


def dtype_to_onnx(dt: DType) -> int:
    return DTYPE_TO_ONNX[dt]


def read_tensor(t: TensorProto, base_dir: str | None) -> tuple[Constant, DType]:
    """A TensorProto's payload as kiln storage, reading external data from base_dir with clear errors."""
    dtype = dtype_from_onnx(t.data_type, f"tensor '{t.name}'")
    if t.data_location == TensorProto.EXTERNAL:
        t = _with_external_data(t, base_dir)
    try:
        arr = numpy_helper.to_array(t)
    except Exception as e:
        raise ModelLoadError(f"tensor '{t.name}' cannot be decoded: {e}") from e
    return from_numpy(arr, dtype)


def _with_external_data(t: TensorProto, base_dir: str | None) -> TensorProto:
    info = {e.key: e.value for e in t.external_data}
    location = info.get("location")
    if not location:
        raise ModelLoadError(f"tensor '{t.name}' is stored externally but names no file")
    if base_dir is None:
        raise ModelLoadError(
            f"tensor '{t.name}' is stored in the external file '{location}', but the model was given as bytes",
            hint="load it from its path so kiln can find the data file next to it",
        )
    path = os.path.normpath(os.path.join(base_dir, location))
    root = os.path.normpath(base_dir)
    if os.path.isabs(location) or os.path.commonpath([root, path]) != root:
        raise ModelLoadError(f"tensor '{t.name}': external data path '{location}' points outside the model folder")
    if not os.path.isfile(path):
        raise ModelLoadError(
            f"tensor '{t.name}': external data file '{location}' not found (looked in {base_dir})",
            hint="keep the data file next to the .onnx file, under the name the model gives",
        )
    offset = int(info.get("offset", 0))
    length = int(info["length"]) if "length" in info else None
    size = os.path.getsize(path)
    if offset > size or (length is not None and offset + length > size):
        raise ModelLoadError(
            f"tensor '{t.name}': external data file '{location}' is too short "
            f"({size} bytes, the tensor needs bytes {offset}..{offset + (length or 0)})",
            hint="the data file is truncated or belongs to another model",
        )
    with open(path, "rb") as f:
        f.seek(offset)
        raw = f.read() if length is None else f.read(length)
    out = TensorProto()
    out.CopyFrom(t)
    del out.external_data[:]
    out.data_location = TensorProto.DEFAULT
    out.raw_data = raw
    return out


def type_from_onnx(tp: TypeProto, fresh: Callable[[], str], what: str) -> ValueType:
    """A TypeProto as a kiln type. Unnamed unknown dims become fresh symbols."""
    kind = tp.WhichOneof("value")
    if kind == "tensor_type":
        tt = tp.tensor_type
        dtype = dtype_from_onnx(tt.elem_type, what)
        if not tt.HasField("shape"):
            return TensorType(dtype, None)
        dims: list[sym.Dim] = []
        for d in tt.shape.dim:
            if d.HasField("dim_value") and d.dim_value >= 0:
                dims.append(int(d.dim_value))
            elif d.HasField("dim_param") and d.dim_param:
                dims.append(sym.sanitize(d.dim_param))
            else:
                dims.append(fresh())
        return TensorType(dtype, tuple(dims))
    if kind == "sequence_type":
        return SequenceType(type_from_onnx(tp.sequence_type.elem_type, fresh, what))
    if kind == "optional_type":
        return OptionalType(type_from_onnx(tp.optional_type.elem_type, fresh, what))
    if kind == "sparse_tensor_type":
        raise UnsupportedError(f"{what}: sparse tensor values are not supported")
    if kind == "map_type":
        raise UnsupportedError(f"{what}: map values (ai.onnx.ml) are not supported")
    raise UnsupportedError(f"{what}: its type is not given")


def type_to_onnx(t: ValueType) -> TypeProto:
    """The inverse of type_from_onnx (symbolic dims become dim_params)."""
    if isinstance(t, SequenceType):
        return onnx.helper.make_sequence_type_proto(type_to_onnx(t.elem))
    if isinstance(t, OptionalType):
        return onnx.helper.make_optional_type_proto(type_to_onnx(t.elem))
    shape = None if t.shape is None else list(t.shape)
    return onnx.helper.make_tensor_type_proto(dtype_to_onnx(t.dtype), shape)


def sparse_to_dense(sp: onnx.SparseTensorProto, base_dir: str | None) -> tuple[Constant, DType]:
    values, dtype = read_tensor(sp.values, base_dir)
    idx, _ = read_tensor(sp.indices, base_dir)
    dims = list(sp.dims)
    dense = np.zeros(int(np.prod(dims)), dtype=dtype.torch_numpy if dtype is not DType.STRING else object)
    vals = np.asarray(values if isinstance(values, np.ndarray) else values.numpy())
    ind = np.asarray(idx.numpy() if not isinstance(idx, np.ndarray) else idx).astype(np.int64)
    if ind.ndim == 2:  # [NNZ, rank] coordinates
        ind = np.ravel_multi_index(tuple(ind.T), dims)
    dense[ind.reshape(-1)] = vals.reshape(-1)
    return from_numpy(dense.reshape(dims), dtype) if dtype is not DType.STRING else (dense.reshape(dims), dtype)
