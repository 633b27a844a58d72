"""Normalization recognition: decomposed layer / RMS / group / instance norms become single ops.

Rewrite cases (m = ReduceMean over the trailing axes [a, rank) with keepdims; "sq(d)" is Pow(d, 2) or Mul(d, d);
"inv(t)" is Reciprocal(t), Div(1, t), or Pow(t, -0.5) in place of Sqrt then inverse):
- LayerNorm, torch shape:  d = x - m(x); n = d / Sqrt(m(sq(d)) + eps)  or  d * inv(Sqrt(m(sq(d)) + eps));
  then optionally * gamma, + beta                            -> LayerNormalization(x, gamma or 1, beta?, axis=a)
- LayerNorm, Keras shape:  r = inv(Sqrt(m(sq(x - m(x))) + eps)); g = r * gamma; y = x * g + (beta - m(x) * g)
                                                              -> LayerNormalization(x, gamma, beta, axis=a)
- RMSNorm:                 n = x / Sqrt(m(sq(x)) + eps)  or  x * inv(...); optionally * gamma
                                                              -> RMSNormalization(x, gamma or 1, axis=a)
  For both: x = Cast(x0) to float32 with the normalized result cast back to x0's dtype (the mixed-precision
  export) becomes the op on x0 with its statistics in float32.
- GroupNorm (torch's export): Reshape(x, [N, G, -1]) -> InstanceNormalization(1, 0) (or a unit LayerNorm over
  axes >= 2) -> Reshape back to x's shape -> * gamma[C,1,..] -> + beta[C,1,..]  -> GroupNormalization(x, G)
  (InstanceNormalization when G == C).
- InstanceNorm: a unit LayerNormalization over axes >= 2 of an [N, C, ...] tensor followed by a per-channel
  * gamma (+ beta)                                            -> InstanceNormalization(x, gamma, beta)

gamma and beta must be constants that only vary along the normalized axes (per channel for group/instance
norm); an affine step that does not fit is left in place after the normalization. Every intermediate must be
read only inside the pattern.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kiln.ir import symbolic as sym
from kiln.ir.dtype import DType
from kiln.ir.graph import Graph, Node, Value
from kiln.passes.manager import PassResult
from kiln.passes.matching import (
    add_const,
    add_node,
    const,
    keeps_dims,
    other,
    private,
    producer,
    readers,
    reduce_axes,
    remove_dead,
    same_dim,
    same_shape,
    scalar,
    sole_reader,
    trailing,
)
from kiln.passes.pattern import apply_rules, rule
from kiln.passes.rewrite import Uses, redirect


@dataclass
class _Core:
    """A matched normalization up to the normalized value `n` (before any affine step)."""

    x: Value
    """The normalized input (for RMSNorm, what is squared)."""
    axis: int
    eps: float
    mean: Node | None
    """The first ReduceMean (LayerNorm), None for RMSNorm."""
    inv_std: Value
    """1 / sqrt(var + eps) (forms with a reciprocal) or sqrt(var + eps) (Div forms): see `divides`."""
    divides: bool


def _square_base(sq: Value) -> Value | None:
    p = producer(sq, ("Pow", "Mul"))
    if p is None:
        return None
    if p.op == "Pow":
        return p.inputs[0] if scalar(p.inputs[1]) == 2.0 else None
    return p.inputs[0] if p.inputs[0] is p.inputs[1] else None


def _std_chain(var: Node, uses: Uses) -> tuple[float, Value, bool] | None:
    """From the variance reduction: + eps, then Sqrt (Div form) or an inverse square root.
    Returns (eps, the sqrt or inverse-sqrt value, whether it divides)."""
    add = sole_reader(uses, var.outputs[0], "Add")
    if add is None:
        return None
    eps = scalar(other(add, var.outputs[0]))
    if eps is None or eps < 0:
        return None
    ve = add.outputs[0]
    nxt = sole_reader(uses, ve, ("Sqrt", "Pow"))
    if nxt is None:
        return None
    if nxt.op == "Pow":
        return (eps, nxt.outputs[0], False) if scalar(nxt.inputs[1]) == -0.5 else None
    s = nxt.outputs[0]
    inv = sole_reader(uses, s, ("Reciprocal", "Div"))
    if inv is not None and inv.op == "Reciprocal":
        return eps, inv.outputs[0], False
    if inv is not None and inv.inputs[1] is s and scalar(inv.inputs[0]) == 1.0 and inv.inputs[0] is not s:
        return eps, inv.outputs[0], False
    return eps, s, True


def _core(var: Node, uses: Uses) -> _Core | None:
    """Match from the variance (or mean-square) ReduceMean."""
    sq = var.inputs[0]
    if sq is None or not sq.is_tensor or not sq.dtype.is_float or not keeps_dims(var):
        return None
    rank = sq.rank
    axes = reduce_axes(var, rank)
    first = trailing(axes, rank)
    base = _square_base(sq)
    if first is None or base is None or not private(uses, sq, var):
        return None
    chain = _std_chain(var, uses)
    if chain is None:
        return None
    eps, inv_std, divides = chain
    sub = producer(base, "Sub")
    mean = producer(sub.inputs[1], "ReduceMean") if sub is not None else None
    x = mean.inputs[0] if mean is not None else None
    if (sub is not None and mean is not None and x is not None and x is sub.inputs[0] and keeps_dims(mean)
            and reduce_axes(mean, rank) == axes):
        return _Core(x, first, eps, mean, inv_std, divides)
    return _Core(base, first, eps, None, inv_std, divides)


def _normalized(core: _Core, d: Value, uses: Uses) -> Node | None:
    """The node computing d / sqrt(...) or d * inv_std, the only reader of inv_std."""
    n = sole_reader(uses, core.inv_std, "Div" if core.divides else "Mul")
    if n is None:
        return None
    if core.divides:
        return n if n.inputs[0] is d and n.inputs[1] is core.inv_std else None
    return n if other(n, core.inv_std) is d else None


def _fits(c: torch.Tensor, shape: tuple, axes: range) -> torch.Tensor | None:
    """`c` as a tensor of the normalized dims (shape[a] for a in axes), when it only varies along them and
    broadcasts into `shape` without changing it."""
    rank = len(shape)
    if c.dim() > rank:
        return None
    full = [1] * (rank - c.dim()) + list(c.shape)
    norm = [shape[a] for a in axes]
    if not all(isinstance(d, int) for d in norm):
        return None
    for i, d in enumerate(full):
        if i in axes:
            if d not in (1, shape[i]):
                return None
        elif d != 1:
            return None
    return c.reshape([full[a] for a in axes]).expand(norm).contiguous()


def _affine(v: Value, uses: Uses, op: str, shape: tuple, axes: range) -> tuple[Node, torch.Tensor] | None:
    """The only reader of v: `op`(v, c) with a constant c that fits the normalized axes."""
    n = sole_reader(uses, v, op)
    c = const(other(n, v)) if n is not None else None
    if n is None:
        return None
    if c is None or c.dtype != v.dtype.torch:
        return None
    fitted = _fits(c, shape, axes)
    return None if fitted is None else (n, fitted)


_CASTABLE = (DType.FLOAT16, DType.BFLOAT16, DType.FLOAT32)


def _stash(dtype: DType) -> DType:
    return DType.FLOAT64 if dtype is DType.FLOAT64 else DType.FLOAT32


def _unit(shape: tuple, axes: range, dtype: DType, fill: float) -> torch.Tensor | None:
    norm = [shape[a] for a in axes]
    if not all(isinstance(d, int) for d in norm):
        return None
    return torch.full(norm, fill, dtype=dtype.torch)


def _layer_or_rms(graph: Graph, var: Node, uses: Uses) -> str | None:
    core = _core(var, uses)
    if core is None:
        return None
    if core.mean is not None and _keras(graph, core, var, uses):
        return "layer_norm"
    sq = var.inputs[0]
    d = _square_base(sq) if sq is not None else None
    n = _normalized(core, d, uses) if d is not None else None
    if n is None or d is None or sq is None or sq.producer is None:
        return None
    center = d.producer
    if core.mean is not None and not (center is not None and private(uses, d, n, sq.producer)
                                      and private(uses, core.mean.outputs[0], center)):
        return None
    x, out = core.x, n.outputs[0]
    cast_in, cast_out = producer(x, "Cast"), sole_reader(uses, out, "Cast")
    if cast_in is not None and cast_out is not None and x.dtype is DType.FLOAT32:
        x0 = cast_in.inputs[0]
        if x0 is not None and x0.dtype in _CASTABLE and cast_out.outputs[0].dtype is x0.dtype:
            x, out = x0, cast_out.outputs[0]  # a half-precision input normalized in float32
    return _emit(graph, core, x, out, uses)


def _emit(graph: Graph, core: _Core, x: Value, out: Value, uses: Uses) -> str | None:
    shape = x.shape
    if shape is None:
        return None
    axes = range(core.axis, len(shape))
    last = out.producer
    scale = _affine(out, uses, "Mul", shape, axes)
    gamma = None
    if scale is not None:
        last, gamma = scale
        out = last.outputs[0]
    bias = _affine(out, uses, "Add", shape, axes) if core.mean is not None else None
    beta = None
    if bias is not None:
        last, beta = bias
    if gamma is None:
        gamma = _unit(shape, axes, x.dtype, 1.0)
        if gamma is None:
            return None
    assert last is not None
    inputs = [x, add_const(graph, f"{last.name}.gamma", gamma)]
    if beta is not None:
        inputs.append(add_const(graph, f"{last.name}.beta", beta))
    attrs: dict[str, object] = {"axis": core.axis - len(shape), "epsilon": core.eps, "stash_type": _stash(x.dtype)}
    op = "LayerNormalization" if core.mean is not None else "RMSNormalization"
    (y, *_) = add_node(graph, last, op, inputs, attrs, name=f"{last.name}/{op}")
    redirect(graph, last.outputs[0], y)
    remove_dead(graph, [last])
    return "layer_norm" if core.mean is not None else "rms_norm"


def _keras(graph: Graph, core: _Core, var: Node, uses: Uses) -> bool:
    """y = x * g + (beta - mean * g) with g = inv_std * gamma."""
    mean, x = core.mean, core.x
    sq = var.inputs[0]
    if core.divides or mean is None or sq is None or sq.producer is None:
        return False
    d = sq.producer.inputs[0]
    shape = x.shape
    g_mul = sole_reader(uses, core.inv_std, "Mul")
    if d is None or shape is None or g_mul is None:
        return False
    axes = range(core.axis, len(shape))
    gamma = const(other(g_mul, core.inv_std))
    g = g_mul.outputs[0]
    rs = readers(uses, g)
    if gamma is None or len(rs) != 2 or g in uses.outputs or any(r.op != "Mul" for r in rs):
        return False
    xg = next((r for r in rs if other(r, g) is x), None)
    mg = next((r for r in rs if other(r, g) is mean.outputs[0]), None)
    sub = sole_reader(uses, mg.outputs[0], "Sub") if mg is not None else None
    if xg is None or mg is None or sub is None or sub.inputs[1] is not mg.outputs[0]:
        return False
    add = sole_reader(uses, xg.outputs[0], "Add")
    beta = const(sub.inputs[0])
    fg = _fits(gamma, shape, axes)
    fb = _fits(beta, shape, axes) if beta is not None else None
    center = d.producer
    if (add is None or center is None or other(add, xg.outputs[0]) is not sub.outputs[0] or fg is None
            or fb is None or not private(uses, sub.outputs[0], add) or not private(uses, mean.outputs[0], center, mg)
            or not private(uses, d, sq.producer)):
        return False
    inputs = [x, add_const(graph, f"{add.name}.gamma", fg.to(gamma.dtype)),
              add_const(graph, f"{add.name}.beta", fb.to(gamma.dtype))]
    attrs: dict[str, object] = {"axis": core.axis - len(shape), "epsilon": core.eps, "stash_type": _stash(x.dtype)}
    (y, *_) = add_node(graph, add, "LayerNormalization", inputs, attrs, name=f"{add.name}/LayerNormalization")
    redirect(graph, add.outputs[0], y)
    remove_dead(graph, [add])
    return True


# --- group / instance norm --------------------------------------------------------------------------


def _is_unit(v: Value | None, fill: float) -> bool:
    c = const(v)
    return c is not None and bool((c == fill).all())


def _unit_norm_eps(node: Node, rank: int) -> float | None:
    """A normalization over axes >= 2 with unit scale and zero (or no) bias: its epsilon."""
    if node.op == "InstanceNormalization":
        ok = _is_unit(node.inputs[1], 1.0) and _is_unit(node.inputs[2], 0.0)
    else:
        axis = node.attrs["axis"] + rank if node.attrs["axis"] < 0 else node.attrs["axis"]
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        ok = (axis == 2 and len(node.outputs) == 1 and _is_unit(node.inputs[1], 1.0)
              and (bias is None or _is_unit(bias, 0.0)))
    return float(node.attrs["epsilon"]) if ok else None


def _channel_const(v: Value, uses: Uses, op: str, channels: int, rank: int) -> tuple[Node, torch.Tensor] | None:
    """The only reader of v is `op`(v, c) with c a per-channel constant ([C,1,..] or [1,C,1,..])."""
    n = sole_reader(uses, v, op)
    if n is None:
        return None
    c = const(other(n, v))
    if c is None or c.dtype != v.dtype.torch or c.dim() > rank:
        return None
    full = [1] * (rank - c.dim()) + list(c.shape)
    if full[0] != 1 or any(d != 1 for d in full[2:]) or full[1] not in (1, channels):
        return None
    return n, c.reshape(-1).expand(channels).contiguous()


def _channel_affine(x: Value, out: Value, uses: Uses, channels: int) -> tuple[Node | None, torch.Tensor,
                                                                             torch.Tensor, Value]:
    """Per-channel * gamma and + beta after `out` (ones and zeros when absent); returns the last node."""
    rank = len(x.shape or ())
    last: Node | None = None
    gamma = torch.ones(channels, dtype=x.dtype.torch)
    beta = torch.zeros(channels, dtype=x.dtype.torch)
    scale = _channel_const(out, uses, "Mul", channels, rank)
    if scale is not None:
        last, gamma = scale
        out = last.outputs[0]
    shift = _channel_const(out, uses, "Add", channels, rank)
    if shift is not None:
        last, beta = shift
        out = last.outputs[0]
    return last, gamma, beta, out


def _group_norm(graph: Graph, node: Node, uses: Uses) -> str | None:
    r = node.inputs[0]
    reshape = producer(r, "Reshape")
    if reshape is None or r is None or r.shape is None or not private(uses, r, node):
        return None
    x = reshape.inputs[0]
    eps = _unit_norm_eps(node, len(r.shape))
    back = sole_reader(uses, node.outputs[0], "Reshape")
    if x is None or x.shape is None or eps is None or back is None or len(x.shape) < 3:
        return None
    channels, groups = x.shape[1], r.shape[1]
    if (not isinstance(channels, int) or not isinstance(groups, int) or channels % groups
            or not same_dim(r.shape[0], x.shape[0]) or not same_shape(back.outputs[0].shape, x.shape)
            or sym.equal(sym.prod(r.shape[2:]), sym.prod([channels // groups, *x.shape[2:]])) is False):
        return None
    last, gamma, beta, _ = _channel_affine(x, back.outputs[0], uses, channels)
    last = last or back
    op = "InstanceNormalization" if groups == channels else "GroupNormalization"
    attrs: dict[str, object] = {"epsilon": eps}
    if op == "GroupNormalization":
        attrs.update(num_groups=groups, stash_type=_stash(x.dtype))
    inputs = [x, add_const(graph, f"{last.name}.scale", gamma), add_const(graph, f"{last.name}.bias", beta)]
    (y,) = add_node(graph, last, op, inputs, attrs, name=f"{last.name}/{op}")
    redirect(graph, last.outputs[0], y)
    remove_dead(graph, [last])
    return "group_norm" if op == "GroupNormalization" else "instance_norm"


def _instance_norm(graph: Graph, node: Node, uses: Uses) -> str | None:
    x = node.inputs[0]
    if x is None or x.shape is None or len(x.shape) < 3 or not isinstance(x.shape[1], int):
        return None
    eps = _unit_norm_eps(node, len(x.shape))
    if eps is None:
        return None
    channels = x.shape[1]
    last, gamma, beta, _ = _channel_affine(x, node.outputs[0], uses, channels)
    if last is None and len(x.shape) == 3:
        return None  # a plain LayerNorm over the last axis of [B, S, D]: leave it
    last = last or node
    inputs = [x, add_const(graph, f"{last.name}.scale", gamma), add_const(graph, f"{last.name}.bias", beta)]
    (y,) = add_node(graph, last, "InstanceNormalization", inputs, {"epsilon": eps},
                    name=f"{last.name}/InstanceNormalization")
    redirect(graph, last.outputs[0], y)
    remove_dead(graph, [last])
    return "instance_norm"


RULES = [
    rule("ReduceMean", _layer_or_rms),
    rule(["InstanceNormalization", "LayerNormalization"], _group_norm),
    rule("LayerNormalization", _instance_norm),
]


def fuse_normalization(graph: Graph) -> PassResult:
    """Replace decomposed normalizations (counts: layer_norm, rms_norm, group_norm, instance_norm)."""
    return apply_rules(graph, RULES)

