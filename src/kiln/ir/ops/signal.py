"""Op table entries: signal processing (DFT, STFT, window functions, MelWeightMatrix).

Complex values are real tensors with a last dim of 2 (real, imaginary); real signals have a last dim of 1.
Transforms compute in complex128 (correctly rounded for float32 and narrower) and return the input's dtype.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from kiln.ir import symbolic as sym
from kiln.ir.dtype import DType
from kiln.ir.graph import TensorType, ValueType
from kiln.ir.ops.base import Attr, AttrKind, InferCtx, RefCtx, register
from kiln.utils.errors import ExecutionError

FLOATS = (DType.FLOAT32, DType.FLOAT16, DType.BFLOAT16, DType.FLOAT64)


def _arg(xs: list[Any], i: int) -> Any:
    return xs[i] if i < len(xs) else None


def _int_scalar(c: RefCtx, x: Any, what: str) -> int:
    if x.numel() != 1:
        raise ExecutionError(f"node '{c.node.name}' ({c.node.op}): {what} must be a scalar, got "
                             f"{list(x.shape)}")
    return int(x.reshape(-1)[0])


def _const_scalar(ctx: InferCtx, i: int) -> int | None:
    v = ctx.const_ints(i)
    return v[0] if v is not None and len(v) == 1 else None


def _check_float(ctx: InferCtx, i: int) -> TensorType:
    t = ctx.tensor(i)
    if t.dtype not in FLOATS:
        raise ctx.error(f"input {i} must be a float tensor, got {t.dtype}")
    return t


def _complex_dim(d: sym.Dim) -> bool:
    return not isinstance(d, int) or d in (1, 2)


def _as_complex(x: torch.Tensor) -> torch.Tensor:
    """[..., 1] real or [..., 2] (real, imag) as a complex tensor of the leading dims."""
    wide = x.to(torch.float64)
    if x.shape[-1] == 1:
        return torch.complex(wide[..., 0], torch.zeros_like(wide[..., 0]))
    if x.shape[-1] == 2:
        return torch.complex(wide[..., 0], wide[..., 1])
    raise ExecutionError(f"the last dim must be 1 (real) or 2 (complex), got {x.shape[-1]}")


def _as_pairs(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.stack([y.real, y.imag], dim=-1).to(dtype)


# --- DFT ----------------------------------------------------------------------------------------------


def _dft_len(ctx: InferCtx, dim: sym.Dim, irfft: bool) -> sym.Dim:
    if ctx.has(1):
        n = _const_scalar(ctx, 1)
        return n if n is not None else ctx.fresh("dft")
    return sym.mul(2, sym.sub(dim, 1)) if irfft else dim


def _dft_infer(ctx: InferCtx) -> list[ValueType]:
    t = _check_float(ctx, 0)
    inverse, onesided = ctx.attrs["inverse"], ctx.attrs["onesided"]
    last = 1 if inverse and onesided else 2
    if t.shape is None:
        return [TensorType(t.dtype, None)]
    r = len(t.shape)
    if r < 2 or not _complex_dim(t.shape[-1]):
        raise ctx.error(f"the input must be [..., N, 1] or [..., N, 2], got {t}")
    axis = _const_scalar(ctx, 2) if ctx.has(2) else -2
    if axis is None:
        same = not onesided and not ctx.has(1)
        dims = t.shape[:-1] if same else tuple(ctx.fresh("dft") for _ in t.shape[:-1])
        return [TensorType(t.dtype, (*dims, last))]
    if not (-r <= axis <= -2 or 0 <= axis <= r - 2):
        raise ctx.error(f"axis {axis} is out of range for rank {r} (the last dim holds complex parts)")
    a = axis % r
    n = _dft_len(ctx, t.shape[a], bool(inverse and onesided))
    if onesided and not inverse:
        n = sym.add(sym.floordiv(n, 2), 1)
    out: list[sym.Dim] = list(t.shape[:-1])
    out[a] = n
    return [TensorType(t.dtype, (*out, last))]


def _dft_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    x, length, axis_t = xs[0], _arg(xs, 1), _arg(xs, 2)
    axis = -2 if axis_t is None else _int_scalar(c, axis_t, "axis")
    a = axis % x.ndim
    inverse, onesided = c.attrs["inverse"], c.attrs["onesided"]
    z = _as_complex(x)
    if length is not None:
        n = _int_scalar(c, length, "dft_length")
    else:
        n = 2 * (x.shape[a] - 1) if inverse and onesided else x.shape[a]
    if n < 1:
        raise ExecutionError(f"node '{c.node.name}' (DFT): the DFT length must be positive, got {n}")
    if inverse and onesided:
        return [torch.fft.irfft(z, n=n, dim=a).unsqueeze(-1).to(x.dtype)]
    y = torch.fft.ifft(z, n=n, dim=a) if inverse else torch.fft.fft(z, n=n, dim=a)
    if onesided:
        y = y.narrow(a, 0, n // 2 + 1)
    return [_as_pairs(y, x.dtype)]


register(
    "DFT", inputs=["input", "dft_length?", "axis?"], outputs=["output"], infer=_dft_infer, ref=_dft_ref,
    attrs={"inverse": Attr(AttrKind.INT, 0, choices=(0, 1)),
           "onesided": Attr(AttrKind.INT, 0, choices=(0, 1))},
    doc="DFT along axis (default -2) of a [..., 1] real or [..., 2] complex signal, zero-padded or cut to "
        "dft_length. onesided: forward keeps n//2+1 bins (RFFT); inverse takes them, gives a real signal.",
)


# --- STFT ---------------------------------------------------------------------------------------------


def _stft_infer(ctx: InferCtx) -> list[ValueType]:
    t = _check_float(ctx, 0)
    if t.shape is not None and (len(t.shape) != 3 or not _complex_dim(t.shape[-1])):
        raise ctx.error(f"the signal must be [batch, length, 1 or 2], got {t}")
    step = _const_scalar(ctx, 1)
    frame: sym.Dim | None = None
    if ctx.has(3):
        frame = _const_scalar(ctx, 3)
    elif ctx.has(2) and ctx.shape(2) is not None:
        frame = ctx.shape(2)[0]  # type: ignore[index]
    elif not ctx.has(2) and t.shape is not None:
        frame = t.shape[1]
    if t.shape is None:
        return [TensorType(t.dtype, None)]
    frames: sym.Dim = ctx.fresh("frames")
    if step is not None and frame is not None and step > 0:
        frames = sym.add(sym.floordiv(sym.sub(t.shape[1], frame), step), 1)
    bins: sym.Dim = ctx.fresh("bins") if frame is None else (
        sym.add(sym.floordiv(frame, 2), 1) if ctx.attrs["onesided"] else frame)
    return [TensorType(t.dtype, (t.shape[0], frames, bins, 2))]


def _stft_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    x, step_t, window, frame_t = xs[0], xs[1], _arg(xs, 2), _arg(xs, 3)
    step = _int_scalar(c, step_t, "frame_step")
    if frame_t is not None:
        frame = _int_scalar(c, frame_t, "frame_length")
    else:
        frame = window.shape[0] if window is not None else x.shape[1]
    if window is not None and (window.ndim != 1 or window.shape[0] != frame):
        raise ExecutionError(f"node '{c.node.name}' (STFT): window {list(window.shape)} is not [{frame}]")
    if step < 1 or not 1 <= frame <= x.shape[1]:
        raise ExecutionError(f"node '{c.node.name}' (STFT): frame_step {step} and frame_length {frame} do "
                             f"not fit a signal of {x.shape[1]}")
    z = _as_complex(x).unfold(1, frame, step)  # [batch, frames, frame]
    if window is not None:
        z = z * window.to(z.real.dtype)
    y = torch.fft.fft(z, dim=-1)
    if c.attrs["onesided"]:
        y = y[..., : frame // 2 + 1]
    return [_as_pairs(y, x.dtype)]


register(
    "STFT", inputs=["signal", "frame_step", "window?", "frame_length?"], outputs=["output"],
    infer=_stft_infer, ref=_stft_ref, attrs={"onesided": Attr(AttrKind.INT, 1, choices=(0, 1))},
    doc="Short-time Fourier transform of a [batch, length, 1|2] signal: [batch, frames, bins, 2].",
)


# --- windows ------------------------------------------------------------------------------------------


def _window_infer(ctx: InferCtx) -> list[ValueType]:
    if ctx.dtype(0) not in (DType.INT32, DType.INT64):
        raise ctx.error(f"size must be int32 or int64, got {ctx.dtype(0)}")
    out = ctx.attrs["output_datatype"]
    if out is DType.STRING or out.is_narrow or out.is_complex:
        raise ctx.error(f"cannot produce a {out} window")
    size = _const_scalar(ctx, 0)
    return [TensorType(out, (size if size is not None else ctx.fresh("window"),))]


def _window(coeffs: tuple[float, ...]) -> Any:
    """A generalized cosine window sum_k (-1)^k a_k cos(2 pi k n / N), N = size (periodic) or size - 1."""

    def ref(c: RefCtx, xs: list[Any]) -> list[Any]:
        size = _int_scalar(c, xs[0], "size")
        if size < 0:
            raise ExecutionError(f"node '{c.node.name}' ({c.node.op}): size must be non-negative, got {size}")
        denom = size if c.attrs["periodic"] else size - 1
        n = torch.arange(size, dtype=torch.float64)
        w = torch.zeros(size, dtype=torch.float64)
        for k, a in enumerate(coeffs):
            w += (-1) ** k * a * torch.cos(2 * math.pi * k * n / max(denom, 1))
        if denom == 0:
            w = torch.ones(size, dtype=torch.float64)  # a one-point symmetric window
        # Computed on the CPU (the same numbers on every device), delivered where `size` is.
        return [w.to(device=xs[0].device, dtype=c.out_dtype().torch)]

    return ref


_WINDOW_ATTRS = {
    "periodic": Attr(AttrKind.INT, 1, choices=(0, 1)),
    "output_datatype": Attr(AttrKind.DTYPE, DType.FLOAT32),
}
for _name, _coeffs in (("HannWindow", (0.5, 0.5)), ("HammingWindow", (25 / 46, 21 / 46)),
                       ("BlackmanWindow", (0.42, 0.5, 0.08))):
    register(_name, inputs=["size"], outputs=["output"], infer=_window_infer, ref=_window(_coeffs),
             attrs=_WINDOW_ATTRS, doc=f"A {_name[:-6]} window of `size` points (periodic, or symmetric).")


# --- MelWeightMatrix ----------------------------------------------------------------------------------


def _mel_infer(ctx: InferCtx) -> list[ValueType]:
    for i in range(3):
        if ctx.dtype(i) not in (DType.INT32, DType.INT64):
            raise ctx.error(f"input {i} must be int32 or int64, got {ctx.dtype(i)}")
    out = ctx.attrs["output_datatype"]
    if (not out.is_float and not out.is_int) or out.is_narrow:
        raise ctx.error(f"cannot produce a {out} matrix")
    bins, length = _const_scalar(ctx, 0), _const_scalar(ctx, 1)
    rows = length // 2 + 1 if length is not None else ctx.fresh("spectrogram_bins")
    return [TensorType(out, (rows, bins if bins is not None else ctx.fresh("mel_bins")))]


def _mel_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    bins, length, rate = (_int_scalar(c, xs[i], n) for i, n in enumerate(("num_mel_bins", "dft_length",
                                                                            "sample_rate")))
    low, high = (float(xs[i].reshape(-1)[0]) for i in (3, 4))
    rows = length // 2 + 1
    mel_lo, mel_hi = (2595 * math.log10(1 + f / 700) for f in (low, high))
    # bins + 2 band edges, equally spaced on the mel scale (ONNX divides the range into bins + 2 steps).
    mel = torch.arange(bins + 2, dtype=torch.float64) * ((mel_hi - mel_lo) / (bins + 2)) + mel_lo
    hz = 700 * (torch.pow(10.0, mel / 2595) - 1)
    edges = torch.floor((length + 1) * hz / rate).to(torch.int64)
    if bool((edges < 0).any()) or bool((edges[: bins + 1] >= rows).any()):
        raise ExecutionError(f"node '{c.node.name}' (MelWeightMatrix): the band edges {edges.tolist()} fall "
                             f"outside the {rows} spectrogram bins")
    left, center, right = edges[:-2], edges[1:-1], edges[2:]
    j = torch.arange(rows, dtype=torch.int64)[:, None]
    rise = (j - left).double() / (center - left).clamp(min=1).double()
    fall = (right - j).double() / (right - center).clamp(min=1).double()
    out = torch.where((j >= left) & (j <= center), rise, torch.zeros(()))
    out = torch.where((j == center) & (center == left), torch.ones(()), out)
    out = torch.where((j >= center) & (j < right), fall, out)
    # Computed on the CPU (the same numbers on every device), delivered where the inputs are.
    return [out.to(device=xs[0].device, dtype=c.out_dtype().torch)]


register(
    "MelWeightMatrix",
    inputs=["num_mel_bins", "dft_length", "sample_rate", "lower_edge_hertz", "upper_edge_hertz"],
    outputs=["output"], infer=_mel_infer, ref=_mel_ref,
    attrs={"output_datatype": Attr(AttrKind.DTYPE, DType.FLOAT32)},
    doc="A [dft_length//2 + 1, num_mel_bins] matrix of triangular mel filters (peak 1) mapping a onesided "
        "spectrogram to the mel scale.",
)
