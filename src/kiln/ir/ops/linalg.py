"""Op table entries: linear algebra (MatMul, Gemm, Einsum, Det) and integer / quantized matmuls.

MatMul follows numpy.matmul: 1-D operands are promoted to matrices and the added axis removed again, batch
axes broadcast. Integer products are exact on every device (CUDA has no integer matmul kernels): they are
computed in float64 when every partial sum fits its 53-bit mantissa, else in int64 on the CPU, whose wraparound
agrees with the narrower types'.
"""

from __future__ import annotations

from typing import Any

import torch

from kiln.ir import symbolic as sym
from kiln.ir.dtype import DType
from kiln.ir.graph import Shape, TensorType
from kiln.ir.ops.base import Attr, AttrKind, InferCtx, RefCtx, broadcast_dim, broadcast_shapes, register
from kiln.ir.ops.reduce import check_dtype, float_compute

_QUANT_INTS = (DType.INT8, DType.UINT8)
_QUANT_FLOAT8 = (DType.FLOAT8_E4M3FN, DType.FLOAT8_E4M3FNUZ, DType.FLOAT8_E5M2, DType.FLOAT8_E5M2FNUZ)


def _static_mismatch(a: sym.Dim, b: sym.Dim) -> bool:
    return isinstance(a, int) and isinstance(b, int) and a != b


def matmul_shape(ctx: InferCtx, a: Shape | None, b: Shape | None) -> Shape | None:
    """numpy.matmul's output shape; raises when static inner dims disagree."""
    if a is None or b is None:
        return None
    if not a or not b:
        raise ctx.error("matmul operands must be at least 1-D, got a scalar")
    a2 = (1, a[0]) if len(a) == 1 else a
    b2 = (b[0], 1) if len(b) == 1 else b
    if _static_mismatch(a2[-1], b2[-2]):
        raise ctx.error(f"inner dimensions differ: {list(a)} @ {list(b)}")
    batch = broadcast_shapes(ctx, a2[:-2], b2[:-2])
    assert batch is not None
    rows = () if len(a) == 1 else (a2[-2],)
    cols = () if len(b) == 1 else (b2[-1],)
    return batch + rows + cols


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch.matmul in the operands' dtype; integer products are exact (wrapping to the dtype's width)."""
    if a.is_floating_point() or a.is_complex():
        return torch.matmul(a, b)
    return int_einsum(None, [a, b]).to(a.dtype)


def int_einsum(equation: str | None, xs: list[torch.Tensor]) -> torch.Tensor:
    """An exact int64 einsum (a matmul when `equation` is None) of integer tensors, on their device.

    float64 is exact when no partial sum can reach 2**53: every term is at most prod(max |x|), and an output
    sums K terms (a matmul) or at most prod(numel) (an einsum; a loose bound). Otherwise the int64 products
    wrap, and only the CPU has those kernels."""
    ops = [x.to(torch.int64) for x in xs]
    run = (lambda *t: torch.matmul(*t)) if equation is None else (lambda *t: torch.einsum(equation, *t))
    if any(x.numel() == 0 for x in ops):
        return run(*[x.double() for x in ops]).to(torch.int64)
    bound = float(ops[0].shape[-1]) if equation is None else 1.0
    for x in ops:
        bound *= float(x.double().abs().amax()) * (1 if equation is None else x.numel())
    if bound < 2.0**53:
        return run(*[x.double() for x in ops]).to(torch.int64)
    return run(*[x.cpu() for x in ops]).to(ops[0].device)


def _same_dtype(ctx: InferCtx, *inputs: int) -> DType:
    dts = {ctx.dtype(i) for i in inputs}
    if len(dts) != 1:
        raise ctx.error(f"inputs must share one dtype, got {', '.join(sorted(map(str, dts)))}")
    return dts.pop()


# --- MatMul ---------------------------------------------------------------------------------------------


def _matmul_infer(ctx: InferCtx) -> list[TensorType]:
    check_dtype(ctx, 0)
    dt = _same_dtype(ctx, 0, 1)
    return [TensorType(dt, matmul_shape(ctx, ctx.shape(0), ctx.shape(1)))]


register("MatMul", inputs=["A", "B"], outputs=["Y"], infer=_matmul_infer,
         ref=lambda c, xs: [matmul(xs[0], xs[1])],
         doc="numpy.matmul semantics (batch broadcasting, 1-D operands).")


# --- Gemm -----------------------------------------------------------------------------------------------


def _gemm_infer(ctx: InferCtx) -> list[TensorType]:
    check_dtype(ctx, 0)
    dt = _same_dtype(ctx, *[i for i in range(3) if ctx.has(i)])
    a, b = ctx.shape(0), ctx.shape(1)
    for name, s in (("A", a), ("B", b)):
        if s is not None and len(s) != 2:
            raise ctx.error(f"{name} must be 2-D, got shape {list(s)}")
    m = None if a is None else a[1 if ctx.attrs["transA"] else 0]
    k_a = None if a is None else a[0 if ctx.attrs["transA"] else 1]
    k_b = None if b is None else b[1 if ctx.attrs["transB"] else 0]
    n = None if b is None else b[0 if ctx.attrs["transB"] else 1]
    if k_a is not None and k_b is not None and _static_mismatch(k_a, k_b):
        raise ctx.error(f"inner dimensions differ: {k_a} vs {k_b} (A {list(a or ())}, B {list(b or ())})")
    m = ctx.fresh("M") if m is None else m
    n = ctx.fresh("N") if n is None else n
    if ctx.has(2):
        _check_bias(ctx, ctx.shape(2), (m, n))
    return [TensorType(dt, (m, n))]


def _check_bias(ctx: InferCtx, c: Shape | None, out: tuple[sym.Dim, sym.Dim]) -> None:
    """C must broadcast to [M, N] unidirectionally."""
    if c is None:
        return
    if len(c) > 2 or any(d != 1 and _static_mismatch(d, o) for d, o in zip(reversed(c), reversed(out))):
        raise ctx.error(f"C of shape {list(c)} does not broadcast to [{out[0]}, {out[1]}]")


def _gemm_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    a, b = xs[0], xs[1]
    bias = xs[2] if len(xs) > 2 else None
    a = a.t() if c.attrs["transA"] else a
    b = b.t() if c.attrs["transB"] else b
    alpha, beta = c.attrs["alpha"], c.attrs["beta"]
    y = matmul(a, b)
    if not y.is_floating_point():
        # Integer Gemm: exact in int64 for integral factors, else in float64 truncated back.
        integral = alpha.is_integer() and beta.is_integer()
        y = y.to(torch.int64 if integral else torch.float64)
        alpha, beta = (int(alpha), int(beta)) if integral else (alpha, beta)
    if alpha != 1:
        y = y * alpha
    if bias is not None and beta != 0:
        y = y + (bias.to(y.dtype) if beta == 1 else bias.to(y.dtype) * beta)
    return [y.to(xs[0].dtype)]


register(
    "Gemm", inputs=["A", "B", "C?"], outputs=["Y"],
    attrs={"alpha": Attr(AttrKind.FLOAT, 1.0), "beta": Attr(AttrKind.FLOAT, 1.0),
           "transA": Attr(AttrKind.INT, 0, choices=(0, 1)), "transB": Attr(AttrKind.INT, 0, choices=(0, 1))},
    infer=_gemm_infer, ref=_gemm_ref,
    doc="Y = alpha * A' @ B' + beta * C, A' = A^T if transA, B' = B^T if transB; C broadcasts to [M, N] "
        "(and is not read when beta = 0).",
)


# --- Einsum ---------------------------------------------------------------------------------------------


def parse_einsum(equation: str, n_inputs: int) -> tuple[list[str], str]:
    """Input terms and the output term, with '...' written as '.'; the implicit output is made explicit
    (the ellipsis first, then the labels that occur exactly once, in ASCII order, as numpy does)."""
    eq = equation.replace(" ", "")
    lhs, arrow, out = eq.partition("->")
    terms = [t.replace("...", ".") for t in lhs.split(",")]
    if len(terms) != n_inputs:
        raise ValueError(f"equation '{equation}' has {len(terms)} operands, the node {n_inputs}")
    for t in terms + ([out.replace("...", ".")] if arrow else []):
        if t.count(".") > 1 or not all(ch == "." or ch.isalpha() for ch in t):
            raise ValueError(f"equation '{equation}' has an invalid term '{t}'")
    if arrow:
        out = out.replace("...", ".")
        missing = [ch for ch in out if ch != "." and ch not in lhs]
        if missing or len(set(out)) != len(out):
            raise ValueError(f"equation '{equation}' has an invalid output term")
    else:
        joined = "".join(terms)
        once = sorted(ch for ch in set(joined) if ch != "." and joined.count(ch) == 1)
        out = ("." if "." in joined else "") + "".join(once)
    return terms, out


def _einsum_infer(ctx: InferCtx) -> list[TensorType]:
    if ctx.n_inputs == 0:
        raise ctx.error("Einsum needs at least one input")
    check_dtype(ctx, 0)
    dt = _same_dtype(ctx, *range(ctx.n_inputs))
    try:
        terms, out = parse_einsum(ctx.attrs["equation"], ctx.n_inputs)
    except ValueError as e:
        raise ctx.error(str(e)) from None
    labels: dict[str, sym.Dim] = {}
    ellipses: list[Shape] | None = []
    for i, term in enumerate(terms):
        shape = ctx.shape(i)
        if shape is None:
            if "." in term:
                ellipses = None
            continue
        n_ell = len(shape) - len(term.replace(".", ""))
        if n_ell < 0 or ("." not in term and n_ell):
            raise ctx.error(f"input {i} has rank {len(shape)}, its term '{term}' does not fit")
        pos = 0
        for ch in term:
            if ch == ".":
                if ellipses is not None:
                    ellipses.append(shape[pos:pos + n_ell])
                pos += n_ell
                continue
            labels[ch] = broadcast_dim(ctx, [labels[ch], shape[pos]]) if ch in labels else shape[pos]
            pos += 1
    if "." in out and ellipses is None:
        return [TensorType(dt, None)]
    dims: list[sym.Dim] = []
    for ch in out:
        if ch == ".":
            ell = broadcast_shapes(ctx, *ellipses) if ellipses else ()
            dims.extend(ell or ())
        else:
            dims.append(labels[ch] if ch in labels else ctx.fresh(ch))
    return [TensorType(dt, tuple(dims))]


def _einsum_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    like = xs[0]
    terms, out = parse_einsum(c.attrs["equation"], len(xs))
    eq = ",".join(terms).replace(".", "...") + "->" + out.replace(".", "...")
    if not (like.is_floating_point() or like.is_complex()):
        return [int_einsum(eq, xs).to(like.dtype)]
    return [torch.einsum(eq, *[float_compute(x) if x.is_floating_point() else x for x in xs]).to(like.dtype)]


register("Einsum", inputs=["Inputs*"], outputs=["Output"], attrs={"equation": Attr(AttrKind.STRING)},
         infer=_einsum_infer, ref=_einsum_ref,
         doc="Einstein summation (numpy.einsum conventions, including '...' and the implicit output).")


# --- Det --------------------------------------------------------------------------------------------------


def _det_infer(ctx: InferCtx) -> list[TensorType]:
    dt = check_dtype(ctx, 0, ints=False)
    shape = ctx.shape(0)
    if shape is None:
        return [TensorType(dt, None)]
    if len(shape) < 2 or _static_mismatch(shape[-1], shape[-2]):
        raise ctx.error(f"input must be [..., M, M], got {list(shape)}")
    return [TensorType(dt, tuple(shape[:-2]))]


register("Det", inputs=["X"], outputs=["Y"], infer=_det_infer,
         ref=lambda c, xs: [torch.linalg.det(float_compute(xs[0])).to(xs[0].dtype)],
         doc="Determinants of the trailing square matrices.")


# --- MatMulInteger / QLinearMatMul ---------------------------------------------------------------------


def _check_quant(ctx: InferCtx, i: int, allowed: tuple[DType, ...], what: str) -> DType:
    dt = ctx.dtype(i)
    if dt not in allowed:
        raise ctx.error(f"{what} must be {' or '.join(map(str, allowed))}, got {dt}")
    return dt


def _matmulinteger_infer(ctx: InferCtx) -> list[TensorType]:
    for i, what in ((0, "A"), (1, "B"), (2, "a_zero_point"), (3, "b_zero_point")):
        if ctx.has(i):
            _check_quant(ctx, i, _QUANT_INTS, what)
    for z, m in ((2, 0), (3, 1)):
        if ctx.has(z) and ctx.dtype(z) is not ctx.dtype(m):
            raise ctx.error(f"input {z} (zero point) must have input {m}'s dtype {ctx.dtype(m)}")
    return [TensorType(DType.INT32, matmul_shape(ctx, ctx.shape(0), ctx.shape(1)))]


def _per_row(p: torch.Tensor, rank: int) -> torch.Tensor:
    """A per-row parameter given as a vector of M values becomes [M, 1] to broadcast along rows."""
    return p.unsqueeze(-1) if p.dim() == 1 and p.numel() > 1 and rank >= 2 else p


def _centered(x: torch.Tensor, zero: torch.Tensor | None, row: bool) -> torch.Tensor:
    w = x.to(torch.float64) if x.is_floating_point() else x.to(torch.int64)
    if zero is None:
        return w
    z = _per_row(zero, x.dim()) if row else zero
    return w - z.to(w.dtype)


def _matmulinteger_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    xs = xs + [None] * (4 - len(xs))
    a = _centered(xs[0], xs[2], row=True)
    b = _centered(xs[1], xs[3], row=False)
    return [int_einsum(None, [a, b]).to(torch.int32)]


register(
    "MatMulInteger", inputs=["A", "B", "a_zero_point?", "b_zero_point?"], outputs=["Y"],
    infer=_matmulinteger_infer, ref=_matmulinteger_ref,
    doc="(A - a_zero_point) @ (B - b_zero_point) in int32; zero points per tensor, per row of A (M values) "
        "or per column of B (N values).",
)


def _qlinearmatmul_infer(ctx: InferCtx) -> list[TensorType]:
    allowed = _QUANT_INTS + _QUANT_FLOAT8
    for a, z in ((0, 2), (3, 5)):
        _check_quant(ctx, a, allowed, f"input {a}")
        if ctx.dtype(z) is not ctx.dtype(a):
            raise ctx.error(f"input {z} (zero point) must have input {a}'s dtype {ctx.dtype(a)}")
    out = _check_quant(ctx, 7, allowed, "y_zero_point")
    for s in (1, 4, 6):
        check_dtype(ctx, s, ints=False)
    return [TensorType(out, matmul_shape(ctx, ctx.shape(0), ctx.shape(3)))]


def _qlinearmatmul_ref(c: RefCtx, xs: list[Any]) -> list[Any]:
    a, a_scale, a_zero, b, b_scale, b_zero, y_scale, y_zero = xs
    a_c = _centered(a, a_zero, row=True)
    b_c = _centered(b, b_zero, row=False)
    acc = (torch.matmul(a_c, b_c) if a_c.is_floating_point() else int_einsum(None, [a_c, b_c])).to(torch.float64)
    rank = acc.dim()
    # The requantization factor is formed in the scales' own precision, as ONNX's reference does.
    factor = _per_row(a_scale, a.dim()) * b_scale / _per_row(y_scale, rank)
    y = acc * factor.to(torch.float64) + _per_row(y_zero, rank).to(torch.float64)
    out = y_zero.dtype
    if out.is_floating_point:
        limit = torch.finfo(out).max
        return [torch.where(y.isnan(), y, y.clamp(-limit, limit)).to(out)]
    info = torch.iinfo(out)
    return [torch.round(y).clamp(info.min, info.max).to(out)]


register(
    "QLinearMatMul",
    inputs=["a", "a_scale", "a_zero_point", "b", "b_scale", "b_zero_point", "y_scale", "y_zero_point"],
    outputs=["y"], infer=_qlinearmatmul_infer, ref=_qlinearmatmul_ref,
    doc="Quantized matmul: saturate(round_half_even((a - a_zp) @ (b - b_zp) * a_scale * b_scale / y_scale) "
        "+ y_zp). Scales and zero points per tensor, per row (a, y) or per column (b).",
)
