"""Element types. `DType` is kiln's own enum; each maps to a torch storage dtype and a numpy dtype.

Types torch cannot compute on directly are stored in a wider torch dtype that holds every value exactly:
sub-byte integers (int4/uint4/int2/uint2) in int8/uint8, sub-byte floats (float4/float6) and float8 e8m0 in
float32. Their value *range* is enforced where they are produced (Cast, QuantizeLinear), so every op sees
exactly the values the narrow type can hold. Strings live in numpy object arrays (torch has no strings).
"""

from __future__ import annotations

import enum
from typing import Any

import ml_dtypes
import numpy as np
import torch

TorchDType = torch.dtype  # the class below has a `torch` property, which shadows the module in its body


class DType(enum.Enum):
    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"
    FLOAT64 = "float64"
    FLOAT8_E4M3FN = "float8_e4m3fn"
    FLOAT8_E4M3FNUZ = "float8_e4m3fnuz"
    FLOAT8_E5M2 = "float8_e5m2"
    FLOAT8_E5M2FNUZ = "float8_e5m2fnuz"
    FLOAT8_E8M0 = "float8_e8m0"
    FLOAT4_E2M1 = "float4_e2m1"
    FLOAT6_E2M3 = "float6_e2m3"
    FLOAT6_E3M2 = "float6_e3m2"
    INT2 = "int2"
    UINT2 = "uint2"
    INT4 = "int4"
    UINT4 = "uint4"
    INT8 = "int8"
    UINT8 = "uint8"
    INT16 = "int16"
    UINT16 = "uint16"
    INT32 = "int32"
    UINT32 = "uint32"
    INT64 = "int64"
    UINT64 = "uint64"
    BOOL = "bool"
    COMPLEX64 = "complex64"
    COMPLEX128 = "complex128"
    STRING = "string"

    def __repr__(self) -> str:
        return f"DType.{self.name}"

    def __str__(self) -> str:
        return self.value

    # --- classification -------------------------------------------------------------------------------

    @property
    def is_float(self) -> bool:
        return self in _FLOATS

    @property
    def is_int(self) -> bool:
        return self in _INTS

    @property
    def is_signed(self) -> bool:
        return self in _SIGNED

    @property
    def is_complex(self) -> bool:
        return self in (DType.COMPLEX64, DType.COMPLEX128)

    @property
    def is_narrow(self) -> bool:
        """Stored in a wider torch dtype than its own (see the module docstring)."""
        return self in _NARROW

    @property
    def bits(self) -> int:
        return _BITS[self]

    @property
    def itemsize(self) -> float:
        """Bytes per element (fractional for sub-byte types)."""
        return _BITS[self] / 8

    # --- conversions ----------------------------------------------------------------------------------

    @property
    def torch(self) -> TorchDType:
        """The torch dtype values of this type are stored in."""
        if self is DType.STRING:
            raise TypeError("strings have no torch dtype (they are kept as numpy object arrays)")
        return _TORCH[self]

    @property
    def numpy(self) -> np.dtype:
        return _NUMPY[self]

    @property
    def torch_numpy(self) -> np.dtype:
        """The numpy dtype matching this type's torch storage (differs from `numpy` for narrow types)."""
        return np.dtype(str(self.torch).replace("torch.", ""))

    @staticmethod
    def from_torch(dt: TorchDType) -> DType:
        try:
            return _FROM_TORCH[dt]
        except KeyError:
            raise TypeError(f"no kiln dtype for torch dtype {dt}") from None

    @staticmethod
    def from_numpy(dt: Any) -> DType:
        dt = np.dtype(dt)
        if dt.kind in "OUS":
            return DType.STRING
        try:
            return _FROM_NUMPY[dt]
        except KeyError:
            raise TypeError(f"no kiln dtype for numpy dtype {dt}") from None

    @staticmethod
    def parse(name: str) -> DType:
        """From a name such as 'fp16', 'float16', 'half', 'int8'."""
        key = name.strip().lower()
        key = _ALIASES.get(key, key)
        try:
            return DType(key)
        except ValueError:
            raise ValueError(f"unknown dtype '{name}'") from None


D = DType
_FLOATS = frozenset({
    D.FLOAT32, D.FLOAT16, D.BFLOAT16, D.FLOAT64, D.FLOAT8_E4M3FN, D.FLOAT8_E4M3FNUZ, D.FLOAT8_E5M2,
    D.FLOAT8_E5M2FNUZ, D.FLOAT8_E8M0, D.FLOAT4_E2M1, D.FLOAT6_E2M3, D.FLOAT6_E3M2,
})
_SIGNED_INTS = frozenset({D.INT2, D.INT4, D.INT8, D.INT16, D.INT32, D.INT64})
_INTS = _SIGNED_INTS | {D.UINT2, D.UINT4, D.UINT8, D.UINT16, D.UINT32, D.UINT64}
_SIGNED = _SIGNED_INTS | _FLOATS | {D.COMPLEX64, D.COMPLEX128}
_NARROW = frozenset({D.INT2, D.UINT2, D.INT4, D.UINT4, D.FLOAT4_E2M1, D.FLOAT6_E2M3, D.FLOAT6_E3M2, D.FLOAT8_E8M0})
_BITS = {
    D.FLOAT32: 32, D.FLOAT16: 16, D.BFLOAT16: 16, D.FLOAT64: 64, D.FLOAT8_E4M3FN: 8, D.FLOAT8_E4M3FNUZ: 8,
    D.FLOAT8_E5M2: 8, D.FLOAT8_E5M2FNUZ: 8, D.FLOAT8_E8M0: 8, D.FLOAT4_E2M1: 4, D.FLOAT6_E2M3: 6,
    D.FLOAT6_E3M2: 6, D.INT2: 2, D.UINT2: 2, D.INT4: 4, D.UINT4: 4, D.INT8: 8, D.UINT8: 8, D.INT16: 16,
    D.UINT16: 16, D.INT32: 32, D.UINT32: 32, D.INT64: 64, D.UINT64: 64, D.BOOL: 8, D.COMPLEX64: 64,
    D.COMPLEX128: 128, D.STRING: 0,
}
_TORCH = {
    D.FLOAT32: torch.float32, D.FLOAT16: torch.float16, D.BFLOAT16: torch.bfloat16, D.FLOAT64: torch.float64,
    D.FLOAT8_E4M3FN: torch.float8_e4m3fn, D.FLOAT8_E4M3FNUZ: torch.float8_e4m3fnuz,
    D.FLOAT8_E5M2: torch.float8_e5m2, D.FLOAT8_E5M2FNUZ: torch.float8_e5m2fnuz,
    D.FLOAT8_E8M0: torch.float32, D.FLOAT4_E2M1: torch.float32, D.FLOAT6_E2M3: torch.float32,
    D.FLOAT6_E3M2: torch.float32, D.INT2: torch.int8, D.UINT2: torch.uint8, D.INT4: torch.int8,
    D.UINT4: torch.uint8, D.INT8: torch.int8, D.UINT8: torch.uint8, D.INT16: torch.int16,
    D.UINT16: torch.uint16, D.INT32: torch.int32, D.UINT32: torch.uint32, D.INT64: torch.int64,
    D.UINT64: torch.uint64, D.BOOL: torch.bool, D.COMPLEX64: torch.complex64, D.COMPLEX128: torch.complex128,
}
_NUMPY = {
    D.FLOAT32: np.dtype(np.float32), D.FLOAT16: np.dtype(np.float16), D.BFLOAT16: np.dtype(ml_dtypes.bfloat16),
    D.FLOAT64: np.dtype(np.float64), D.FLOAT8_E4M3FN: np.dtype(ml_dtypes.float8_e4m3fn),
    D.FLOAT8_E4M3FNUZ: np.dtype(ml_dtypes.float8_e4m3fnuz), D.FLOAT8_E5M2: np.dtype(ml_dtypes.float8_e5m2),
    D.FLOAT8_E5M2FNUZ: np.dtype(ml_dtypes.float8_e5m2fnuz), D.FLOAT8_E8M0: np.dtype(ml_dtypes.float8_e8m0fnu),
    D.FLOAT4_E2M1: np.dtype(ml_dtypes.float4_e2m1fn), D.FLOAT6_E2M3: np.dtype(ml_dtypes.float6_e2m3fn),
    D.FLOAT6_E3M2: np.dtype(ml_dtypes.float6_e3m2fn), D.INT2: np.dtype(ml_dtypes.int2),
    D.UINT2: np.dtype(ml_dtypes.uint2), D.INT4: np.dtype(ml_dtypes.int4), D.UINT4: np.dtype(ml_dtypes.uint4),
    D.INT8: np.dtype(np.int8), D.UINT8: np.dtype(np.uint8), D.INT16: np.dtype(np.int16),
    D.UINT16: np.dtype(np.uint16), D.INT32: np.dtype(np.int32), D.UINT32: np.dtype(np.uint32),
    D.INT64: np.dtype(np.int64), D.UINT64: np.dtype(np.uint64), D.BOOL: np.dtype(np.bool_),
    D.COMPLEX64: np.dtype(np.complex64), D.COMPLEX128: np.dtype(np.complex128), D.STRING: np.dtype(object),
}
_FROM_TORCH = {v: k for k, v in _TORCH.items() if not k.is_narrow}
_FROM_NUMPY = {v: k for k, v in _NUMPY.items() if k is not D.STRING}
_ALIASES = {
    "fp32": "float32", "float": "float32", "tf32": "float32", "fp16": "float16", "half": "float16",
    "bf16": "bfloat16", "fp64": "float64", "double": "float64", "fp8": "float8_e4m3fn",
    "fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2", "e4m3": "float8_e4m3fn", "e5m2": "float8_e5m2",
    "fp4": "float4_e2m1", "long": "int64", "int": "int32",
}
