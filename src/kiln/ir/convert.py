"""Moving tensors between numpy (what users and onnx hand us) and torch storage (what kiln computes on)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kiln.ir.dtype import DType

_VIEW_BITS = {16: (np.uint16, torch.uint16), 8: (np.uint8, torch.uint8)}


def from_numpy(a: Any, dtype: DType | None = None) -> tuple[torch.Tensor | np.ndarray, DType]:
    """A numpy array (or scalar) as kiln storage: a torch tensor, or a numpy object array for strings."""
    a = np.asarray(a)
    dt = dtype or DType.from_numpy(a.dtype)
    if dt is DType.STRING:
        return a.astype(object), dt
    if dt.is_narrow:
        return torch.from_numpy(np.ascontiguousarray(a.astype(dt.torch_numpy)).reshape(a.shape)), dt
    if a.dtype != dt.numpy:
        a = a.astype(dt.numpy)
    if dt in (DType.BFLOAT16, DType.FLOAT8_E4M3FN, DType.FLOAT8_E4M3FNUZ, DType.FLOAT8_E5M2, DType.FLOAT8_E5M2FNUZ):
        np_view, t_view = _VIEW_BITS[dt.bits]
        raw = torch.from_numpy(np.ascontiguousarray(a).view(np_view).reshape(a.shape).copy())
        return raw.view(t_view).view(dt.torch), dt
    return torch.from_numpy(np.array(a, copy=True, order="C")), dt


def to_numpy(x: Any, dtype: DType | None = None) -> np.ndarray:
    """kiln storage as a numpy array of the kiln dtype (ml_dtypes for bfloat16, float8, int4, ...)."""
    if isinstance(x, np.ndarray):
        return x
    if not isinstance(x, torch.Tensor):
        return np.asarray(x)
    t = x.detach().cpu().contiguous()
    dt = dtype or DType.from_torch(t.dtype)
    if dt.is_narrow:
        return t.numpy().astype(dt.numpy)
    if t.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2,
                   torch.float8_e5m2fnuz):
        _, t_view = _VIEW_BITS[t.element_size() * 8]
        out = t.view(t_view).numpy().view(DType.from_torch(t.dtype).numpy)
    else:
        out = t.numpy()
    if dt.numpy != out.dtype:
        out = out.astype(dt.numpy)
    return out
