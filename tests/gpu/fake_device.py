"""A second device on the CPU: runs code meant for CUDA tensors and fails where CUDA would on a device mix.

`FakeCuda()` is a torch function mode. While it is active, tensors "on cuda" are CPU tensors of the subclass
`FakeCudaTensor`, and the usual idioms work unchanged: `x.device` reports `cuda:0`, `torch.zeros(..., device=x.device)`,
`y.to(x.device)`, `y.cuda()` and `x.new_zeros(...)` make fake device tensors, `x.cpu()` / `x.to("cpu")` give plain
tensors back. What CUDA refuses is refused, with CUDA's messages:

- an op mixing device tensors with CPU tensors of one or more dims ("Expected all tensors to be on the same
  device ..."); 0-dim CPU tensors and Python scalars mix with device tensors (CUDA takes CPU scalars), except in
  the concatenation family; CPU index tensors may index a device tensor (`x[idx]`), as on CUDA;
- `.numpy()` / `np.asarray()` of a device tensor ("can't convert cuda:0 device type tensor to numpy");
- an integer matmul on device tensors ("addmm_cuda" not implemented for 'Long').

Two of CUDA's numeric habits that change results beyond a kernel's rounding are emulated as well:
- division of a float device tensor by a CPU scalar (a Python number or a 0-dim CPU tensor) multiplies by the
  scalar's reciprocal, as CUDA's `div_true_kernel_cuda` does (the quotient may differ in the last bit);
- float32 convolutions (and matmuls) round their operands to TF32 while `torch.backends.cudnn.allow_tf32`
  (`torch.backends.cuda.matmul.allow_tf32`) is set, as cuDNN (cuBLAS) on Ampere and later GPUs do.
Otherwise numerics are the CPU's: other differences between CUDA and CPU kernels are not emulated.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

DEVICE = torch.device("cuda", 0)
_CPU = torch.device("cpu")
_T = torch.Tensor


class FakeCudaTensor(torch.Tensor):
    """A CPU tensor that says it lives on `cuda:0` (meaningful only under `FakeCuda`)."""

    __torch_function__ = torch._C._disabled_torch_function_impl  # type: ignore[assignment]


def wrap(t: Any) -> Any:
    if isinstance(t, _T) and not isinstance(t, FakeCudaTensor):
        with torch._C.DisableTorchFunction():
            return _T._make_subclass(FakeCudaTensor, t, t.requires_grad)
    return t


def unwrap(t: Any) -> Any:
    if isinstance(t, FakeCudaTensor):
        with torch._C.DisableTorchFunction():
            return t.as_subclass(_T)
    return t


def _is_cuda(d: Any) -> bool | None:
    """True / False for a device (or device string) argument; None for anything else."""
    if isinstance(d, torch.device):
        return d.type == "cuda"
    if isinstance(d, str):
        try:
            return torch.device(d).type == "cuda"
        except RuntimeError:
            return None
    return None


def _mixed() -> RuntimeError:
    return RuntimeError("Expected all tensors to be on the same device, but found at least two devices, cuda:0 "
                        "and cpu!")


_CAT = {torch.cat, torch.concat, torch.concatenate, torch.stack, torch.hstack, torch.vstack, torch.dstack,
        torch.column_stack, torch.row_stack, torch.block_diag, torch.cartesian_prod}
_MATMUL = {torch.matmul, torch.mm, torch.bmm, torch.addmm, torch.baddbmm, torch.addbmm, torch.addmv, torch.mv,
           torch.einsum, torch.tensordot, torch.inner, torch.dot, torch.vdot, torch.chain_matmul, torch.kron,
           torch.nn.functional.linear, _T.matmul, _T.__matmul__, _T.__rmatmul__, _T.mm, _T.bmm, _T.addmm,
           _T.baddbmm, _T.mv, _T.dot}
_SCALAR_NAME = {torch.int64: "Long", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte",
                torch.bool: "Bool"}
_DIV = {torch.div, torch.divide, torch.true_divide, _T.div, _T.divide, _T.true_divide, _T.__truediv__,
        _T.div_, _T.divide_, _T.true_divide_, _T.__itruediv__}
_F = torch.nn.functional
_CONV = {_F.conv1d, _F.conv2d, _F.conv3d, _F.conv_transpose1d, _F.conv_transpose2d, _F.conv_transpose3d,
         torch.conv1d, torch.conv2d, torch.conv3d, torch.conv_transpose1d, torch.conv_transpose2d,
         torch.conv_transpose3d, torch.convolution}
_FACTORIES_FROM_DATA = {torch.tensor, torch.as_tensor, torch.asarray}
_PROPS: dict[Any, Callable[[bool], Any]] = {
    _T.device.__get__: lambda fake: DEVICE if fake else _CPU,  # type: ignore[attr-defined]
    _T.is_cuda.__get__: lambda fake: fake,  # type: ignore[attr-defined]
    _T.is_cpu.__get__: lambda fake: not fake,  # type: ignore[attr-defined]
}


class FakeCuda(TorchFunctionMode):
    """Emulates `cuda:0` on the CPU (see the module docstring). Use as a context manager around the code to test."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        if func in _PROPS:
            return _PROPS[func](isinstance(args[0], FakeCudaTensor))
        self_fake = bool(args) and isinstance(args[0], FakeCudaTensor)
        if func in (_T.numpy, _T.__array__) and self_fake:
            raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor "
                            "to host memory first.")
        if func is _T.get_device:
            return 0 if self_fake else -1
        if func is _T.cpu:
            return unwrap(args[0])
        if func is _T.cuda:
            return wrap(unwrap(args[0]))
        if func is _T.to:
            return self._to(args, kwargs)
        if func is _T.__iter__:
            return iter([wrap(t) if self_fake else t for t in unwrap(args[0]).unbind(0)])
        if func is _T.copy_:  # copies across devices
            unwrap(args[0]).copy_(unwrap(args[1]), *args[2:], **kwargs)
            return args[0]

        target = None  # the device an explicit `device=` argument asks for
        if "device" in kwargs:
            target = _is_cuda(kwargs["device"])
            if target is not None:
                kwargs["device"] = _CPU
        leaves, _ = tree_flatten((args, kwargs))
        fakes = [t for t in leaves if isinstance(t, FakeCudaTensor)]
        plains = [t for t in leaves if isinstance(t, _T) and not isinstance(t, FakeCudaTensor)]
        if func in _FACTORIES_FROM_DATA:
            fake_out = target if target is not None else self_fake
        elif func in (_T.__getitem__, _T.__setitem__):
            fake_out = self_fake
            self._check_index(args, self_fake)
        else:
            if fakes and plains:
                if func in _CAT or any(t.dim() > 0 for t in plains):
                    raise _mixed()
            fake_out = target if target is not None else bool(fakes)
            if func in _MATMUL and fakes and all(not (t.is_floating_point() or t.is_complex()) for t in fakes):
                raise RuntimeError(f"\"addmm_cuda\" not implemented for '{_SCALAR_NAME.get(fakes[0].dtype, 'Long')}'")
            if getattr(func, "__name__", "").endswith("_") and args and isinstance(args[0], _T):
                fake_out = self_fake  # in place: the result is `self`
        plain_args, plain_kwargs = tree_map(unwrap, args), tree_map(unwrap, kwargs)
        if fakes and func in _DIV and len(args) > 1 and not isinstance(args[1], FakeCudaTensor):
            emulated = _reciprocal_div(func, plain_args, plain_kwargs)
            if emulated is not None:
                return wrap(emulated) if fake_out else emulated
        if fakes and _tf32(func):
            plain_args = tuple(_round_tf32(a) for a in plain_args)
        out = func(*plain_args, **plain_kwargs)
        if func is _T.__setitem__:
            return out
        return tree_map(wrap, out) if fake_out else out

    @staticmethod
    def _check_index(args: tuple, self_fake: bool) -> None:
        idx = args[1]
        leaves, _ = tree_flatten(idx if isinstance(idx, (tuple, list)) else (idx,))
        if not self_fake and any(isinstance(t, FakeCudaTensor) for t in leaves):
            raise RuntimeError("indices should be either on cpu or on the same device as the indexed tensor (cpu)")
        if len(args) > 2:
            v = args[2]
            if isinstance(v, _T) and isinstance(v, FakeCudaTensor) != self_fake and v.dim() > 0:
                raise _mixed()

    @staticmethod
    def _to(args: tuple, kwargs: dict) -> Any:
        src, rest = args[0], list(args[1:])
        target = None
        if "device" in kwargs:
            target = _is_cuda(kwargs["device"])
            kwargs["device"] = _CPU
        elif rest and isinstance(rest[0], _T):
            other = rest.pop(0)
            target = isinstance(other, FakeCudaTensor)
            rest.insert(0, other.dtype)
        elif rest and _is_cuda(rest[0]) is not None:
            target = _is_cuda(rest[0])
            rest[0] = _CPU
        out = unwrap(src).to(*rest, **kwargs)
        return wrap(out) if (target if target is not None else isinstance(src, FakeCudaTensor)) else out


def _reciprocal_div(func: Any, args: tuple, kwargs: dict) -> Any:
    """a / b for a CPU scalar b as CUDA computes it, a * (1 / b) in the op's math type; None where CUDA divides."""
    if len(args) < 2 or kwargs.get("rounding_mode") is not None or set(kwargs) - {"rounding_mode"}:
        return None
    a, b = args[0], args[1]
    if isinstance(b, _T):
        if b.dim() != 0:
            return None
        b = b.item()
    if not isinstance(a, _T) or isinstance(b, bool) or not isinstance(b, (int, float)):
        return None
    dtype = torch.result_type(a, b)
    if not dtype.is_floating_point:
        return None
    opmath = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    inv = 1 / torch.tensor(b, dtype=opmath)
    out = (a.to(opmath) * inv).to(dtype)
    if getattr(func, "__name__", "").endswith("_") or func is _T.__itruediv__:
        return a.copy_(out)
    return out


def _tf32(func: Any) -> bool:
    if func in _CONV:
        return bool(torch.backends.cudnn.allow_tf32)
    return func in _MATMUL and bool(torch.backends.cuda.matmul.allow_tf32)


def _round_tf32(t: Any) -> Any:
    """float32 values rounded to TF32's 10 mantissa bits (to nearest, ties away from zero)."""
    if not isinstance(t, _T) or t.dtype != torch.float32:
        return t
    bits = t.contiguous().view(torch.int32)
    rounded = ((bits + 0x1000) & ~0x1FFF).view(torch.float32)
    return torch.where(torch.isfinite(t), rounded, t)
