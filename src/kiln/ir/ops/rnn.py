"""Op table entries: recurrent nets (RNN, GRU, LSTM), with ONNX semantics (newest version).

Shapes: `layout=0` is time-major (X [seq, batch, input], Y [seq, dirs, batch, hidden], states [dirs, batch,
hidden]); `layout=1` is batch-major (X [batch, seq, input], Y [batch, seq, dirs, hidden], states [batch, dirs,
hidden]). Gate order in W/R/B is ONNX's: GRU z, r, h; LSTM i, o, f, c; peepholes P i, o, f.

Reference semantics worth knowing:
- `sequence_lens[b]` steps are processed for batch entry b (the reverse direction walks them backwards from
  step `sequence_lens[b] - 1`); Y is zero past a sequence's end, and a zero-length sequence has zero final
  states (as onnxruntime does).
- `clip` bounds the gate pre-activations to [-clip, clip]; the LSTM cell state fed to h is not clipped (as
  onnxruntime does).
- `activation_alpha`/`activation_beta` are consumed in order by the activations that take them; missing values
  take the ONNX op defaults (LeakyRelu 0.01, HardSigmoid 0.2/0.5, Elu 1, ThresholdedRelu 1, Affine 1/0,
  ScaledTanh 1/1).
- float16/bfloat16 are computed in float32 and rounded once at the end.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from kiln.ir import symbolic as sym
from kiln.ir.dtype import DType
from kiln.ir.graph import Shape, TensorType
from kiln.ir.ops.base import Attr, AttrKind, InferCtx, RefCtx, register
from kiln.utils.errors import UnsupportedError

Tensor = torch.Tensor
ActImpl = Callable[[Tensor, float, float], Tensor]

GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}
DEFAULT_ACTIVATIONS = {"RNN": ("Tanh",), "GRU": ("Sigmoid", "Tanh"), "LSTM": ("Sigmoid", "Tanh", "Tanh")}

# lower-case name -> (fn(x, alpha, beta), default alpha, default beta); None: the function takes none
_ACTIVATIONS: dict[str, tuple[ActImpl, float | None, float | None]] = {
    "relu": (lambda x, a, b: torch.relu(x), None, None),
    "tanh": (lambda x, a, b: torch.tanh(x), None, None),
    "sigmoid": (lambda x, a, b: torch.sigmoid(x), None, None),
    "affine": (lambda x, a, b: a * x + b, 1.0, 0.0),
    "leakyrelu": (lambda x, a, b: F.leaky_relu(x, a), 0.01, None),
    "thresholdedrelu": (lambda x, a, b: torch.where(x > a, x, torch.zeros_like(x)), 1.0, None),
    "scaledtanh": (lambda x, a, b: a * torch.tanh(b * x), 1.0, 1.0),
    "hardsigmoid": (lambda x, a, b: torch.clamp(a * x + b, 0.0, 1.0), 0.2, 0.5),
    "elu": (lambda x, a, b: F.elu(x, a), 1.0, None),
    "softsign": (lambda x, a, b: F.softsign(x), None, None),
    "softplus": (lambda x, a, b: F.softplus(x), None, None),
}


@dataclass(frozen=True)
class Activation:
    name: str
    alpha: float
    beta: float

    def __call__(self, x: Tensor) -> Tensor:
        return _ACTIVATIONS[self.name.lower()][0](x, self.alpha, self.beta)


def resolve_activations(op: str, attrs: dict[str, Any], num_dirs: int) -> list[list[Activation]]:
    """The activation functions per direction. Raises ValueError for unknown names or wrong counts."""
    per_dir = len(DEFAULT_ACTIVATIONS[op])
    names: Sequence[str] = attrs["activations"] or DEFAULT_ACTIVATIONS[op] * num_dirs
    if len(names) != per_dir * num_dirs:
        raise ValueError(f"activations needs {per_dir * num_dirs} names for {num_dirs} direction(s), "
                         f"got {len(names)} ({', '.join(names)})")
    alphas = list(attrs["activation_alpha"] or ())
    betas = list(attrs["activation_beta"] or ())
    acts: list[Activation] = []
    for name in names:
        spec = _ACTIVATIONS.get(name.lower())
        if spec is None:
            raise ValueError(f"unknown activation '{name}' (supported: {', '.join(sorted(_ACTIVATIONS))})")
        _, da, db = spec
        alpha = (alphas.pop(0) if alphas else da) if da is not None else 0.0
        beta = (betas.pop(0) if betas else db) if db is not None else 0.0
        acts.append(Activation(name, alpha, beta))
    if alphas or betas:
        raise ValueError(f"activation_alpha/activation_beta have {len(alphas)}/{len(betas)} values more than "
                         f"the activations ({', '.join(names)}) take")
    return [acts[d * per_dir:(d + 1) * per_dir] for d in range(num_dirs)]


def _num_dirs(attrs: dict[str, Any]) -> int:
    return 2 if attrs["direction"] == "bidirectional" else 1


# --- inference ----------------------------------------------------------------------------------------


def _dim(shape: Shape | None, i: int, ctx: InferCtx, hint: str) -> sym.Dim:
    return shape[i] if shape is not None else ctx.fresh(hint)


def _check_rank(ctx: InferCtx, i: int, rank: int, what: str) -> Shape | None:
    if not ctx.has(i):
        return None
    s = ctx.shape(i)
    if s is not None and len(s) != rank:
        raise ctx.error(f"{what} must have rank {rank}, got shape {list(s)}")
    return s


def _infer(op: str) -> Callable[[InferCtx], list[TensorType]]:
    gates = GATES[op]

    def infer(ctx: InferCtx) -> list[TensorType]:
        a = ctx.attrs
        dirs = _num_dirs(a)
        try:
            resolve_activations(op, a, dirs)
        except ValueError as e:
            raise UnsupportedError(str(e), op=op, node=ctx.node.name) from None
        dt = ctx.dtype(0)
        if not dt.is_float:
            raise ctx.error(f"X must be a float tensor, got {dt}")
        xs = _check_rank(ctx, 0, 3, "X")
        ws = _check_rank(ctx, 1, 3, "W")
        rs = _check_rank(ctx, 2, 3, "R")
        if ctx.has(4) and ctx.dtype(4) is not DType.INT32:
            raise ctx.error(f"sequence_lens must be int32, got {ctx.dtype(4)}")
        hidden = _hidden_size(ctx, a["hidden_size"], ws, rs, gates)
        for s, what in ((ws, "W"), (rs, "R")):
            if s is not None and isinstance(s[0], int) and s[0] != dirs:
                raise ctx.error(f"{what} has {s[0]} directions, direction='{a['direction']}' needs {dirs}")
        seq, batch = (_dim(xs, 0, ctx, "seq"), _dim(xs, 1, ctx, "batch"))
        if a["layout"] == 1:
            seq, batch = batch, seq
        y = (batch, seq, dirs, hidden) if a["layout"] else (seq, dirs, batch, hidden)
        state = (batch, dirs, hidden) if a["layout"] else (dirs, batch, hidden)
        outs = [TensorType(dt, y), TensorType(dt, state)]
        if op == "LSTM":
            outs.append(TensorType(dt, state))
        return outs

    return infer


def _hidden_size(ctx: InferCtx, attr: int | None, ws: Shape | None, rs: Shape | None, gates: int) -> sym.Dim:
    from_r = rs[2] if rs is not None else None
    if attr is not None:
        if attr <= 0:
            raise ctx.error(f"hidden_size must be positive, got {attr}")
        if isinstance(from_r, int) and from_r != attr:
            raise ctx.error(f"hidden_size={attr} but R has shape {list(rs or ())}")
        if ws is not None and isinstance(ws[1], int) and ws[1] != gates * attr:
            raise ctx.error(f"W has {ws[1]} rows, {gates} gates of hidden_size={attr} need {gates * attr}")
        return attr
    if from_r is not None:
        return from_r
    if ws is not None:
        return sym.floordiv(ws[1], gates)
    return ctx.fresh("hidden")


# --- reference ----------------------------------------------------------------------------------------

Step = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]
"""(input projection of this step [batch, gates*hidden], h, c) -> (new h, new c)."""


def _clip(x: Tensor, clip: float | None) -> Tensor:
    return x if clip is None else x.clamp(-clip, clip)


def _rnn_step(R: Tensor, Rb: Tensor, acts: list[Activation], clip: float | None) -> Step:
    f = acts[0]

    def step(xw: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        return f(_clip(xw + h @ R.T + Rb, clip)), c

    return step


def _gru_step(R: Tensor, Rb: Tensor, acts: list[Activation], clip: float | None,
              linear_before_reset: bool) -> Step:
    f, g = acts
    hidden = R.shape[1]
    R_zr, R_h = R[: 2 * hidden], R[2 * hidden:]
    Rb_zr, Rb_h = Rb[: 2 * hidden], Rb[2 * hidden:]

    def step(xw: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        x_zr, x_h = xw[:, : 2 * hidden], xw[:, 2 * hidden:]
        z, r = f(_clip(x_zr + h @ R_zr.T + Rb_zr, clip)).chunk(2, dim=1)
        if linear_before_reset:
            pre = x_h + r * (h @ R_h.T + Rb_h)
        else:
            pre = x_h + (r * h) @ R_h.T + Rb_h
        cand = g(_clip(pre, clip))
        return (1 - z) * cand + z * h, c

    return step


def _lstm_step(R: Tensor, Rb: Tensor, P: Tensor, acts: list[Activation], clip: float | None,
               input_forget: bool) -> Step:
    f, g, h_act = acts
    p_i, p_o, p_f = P.chunk(3)

    def step(xw: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        gi, go, gf, gc = (xw + h @ R.T + Rb).chunk(4, dim=1)
        i = f(_clip(gi + p_i * c, clip))
        forget = 1 - i if input_forget else f(_clip(gf + p_f * c, clip))
        c_new = forget * c + i * g(_clip(gc, clip))
        o = f(_clip(go + p_o * c_new, clip))
        return o * h_act(c_new), c_new

    return step


def _time_index(steps: int, lens: Tensor, reverse: bool) -> Tensor:
    """[steps, batch] time indices: identity, or each sequence's valid steps reversed (an involution)."""
    t = torch.arange(steps, device=lens.device).unsqueeze(1).expand(steps, lens.shape[0])
    if not reverse:
        return t
    return torch.where(t < lens, lens - 1 - t, t)


def _scan(step: Step, xw: Tensor, h: Tensor, c: Tensor, lens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Run `step` over the time axis of xw [seq, batch, gates*hidden]; gives Y [seq, batch, hidden], h, c."""
    ys = []
    for t in range(xw.shape[0]):
        h_new, c_new = step(xw[t], h, c)
        valid = (t < lens).unsqueeze(1)
        h = torch.where(valid, h_new, h)
        c = torch.where(valid, c_new, c)
        ys.append(torch.where(valid, h_new, torch.zeros_like(h_new)))
    empty = (lens == 0).unsqueeze(1)
    h = torch.where(empty, torch.zeros_like(h), h)
    c = torch.where(empty, torch.zeros_like(c), c)
    y = torch.stack(ys) if ys else h.new_zeros((0, *h.shape))
    return y, h, c


def _ref(op: str) -> Callable[[RefCtx, list[Any]], list[Tensor]]:
    gates = GATES[op]

    def ref(c: RefCtx, xs: list[Any]) -> list[Tensor]:
        a = c.attrs
        xs = xs + [None] * (8 - len(xs))
        X, W, R, B, lens, h0, c0, P = xs
        out_dtype = X.dtype
        cdt = torch.float32 if X.dtype in (torch.float16, torch.bfloat16) else X.dtype
        batch_major = a["layout"] == 1
        X = (X.transpose(0, 1) if batch_major else X).to(cdt)
        steps, batch = X.shape[0], X.shape[1]
        dirs, hidden = W.shape[0], R.shape[2]
        W, R = W.to(cdt), R.to(cdt)
        B = B.to(cdt) if B is not None else X.new_zeros((dirs, 2 * gates * hidden))
        lens = lens.long() if lens is not None else torch.full((batch,), steps, dtype=torch.long, device=X.device)
        if lens.shape != (batch,) or bool(((lens < 0) | (lens > steps)).any()):
            raise ValueError(f"sequence_lens must be {batch} values in [0, {steps}], got {lens.tolist()}")
        h0 = _state(h0, batch_major, (dirs, batch, hidden), X)
        c0 = _state(c0, batch_major, (dirs, batch, hidden), X)
        P = P.to(cdt) if P is not None else X.new_zeros((dirs, 3 * hidden))
        acts = resolve_activations(op, a, dirs)
        rows = torch.arange(batch, device=X.device)
        ys, hs, cs = [], [], []
        for d in range(dirs):
            reverse = a["direction"] == "reverse" or d == 1
            idx = _time_index(steps, lens, reverse)
            xw = X[idx, rows] @ W[d].T + B[d, : gates * hidden]
            Rb = B[d, gates * hidden:]
            if op == "RNN":
                step = _rnn_step(R[d], Rb, acts[d], a["clip"])
            elif op == "GRU":
                step = _gru_step(R[d], Rb, acts[d], a["clip"], bool(a["linear_before_reset"]))
            else:
                step = _lstm_step(R[d], Rb, P[d], acts[d], a["clip"], bool(a["input_forget"]))
            y, h, cell = _scan(step, xw, h0[d], c0[d], lens)
            ys.append(y[idx, rows])
            hs.append(h)
            cs.append(cell)
        Y, Yh, Yc = torch.stack(ys, 1), torch.stack(hs), torch.stack(cs)
        if batch_major:
            Y, Yh, Yc = Y.permute(2, 0, 1, 3), Yh.transpose(0, 1), Yc.transpose(0, 1)
        outs = [Y, Yh] + ([Yc] if op == "LSTM" else [])
        return [o.to(out_dtype).contiguous() for o in outs]

    return ref


def _state(s: Tensor | None, batch_major: bool, shape: tuple[int, int, int], like: Tensor) -> Tensor:
    """An initial state (zeros when absent) in `like`'s dtype, on its device."""
    if s is None:
        return like.new_zeros(shape)
    s = s.transpose(0, 1) if batch_major else s
    if tuple(s.shape) != shape:
        raise ValueError(f"initial state has shape {list(s.shape)}, expected {list(shape)}")
    return s.to(like.dtype)


# --- registration -------------------------------------------------------------------------------------

_COMMON = {
    "activation_alpha": Attr(AttrKind.FLOATS, None),
    "activation_beta": Attr(AttrKind.FLOATS, None),
    "activations": Attr(AttrKind.STRINGS, None),
    "clip": Attr(AttrKind.FLOAT, None, doc="bound on the gate pre-activations"),
    "direction": Attr(AttrKind.STRING, "forward", choices=("forward", "reverse", "bidirectional")),
    "hidden_size": Attr(AttrKind.INT, None, doc="taken from R's shape when absent"),
    "layout": Attr(AttrKind.INT, 0, choices=(0, 1), doc="1: batch-major X, Y and states"),
}

register(
    "RNN", inputs=["X", "W", "R", "B?", "sequence_lens?", "initial_h?"], outputs=["Y?", "Y_h?"],
    attrs=dict(_COMMON), infer=_infer("RNN"), ref=_ref("RNN"),
    doc="Elman RNN: Ht = f(Xt*Wi^T + Ht-1*Ri^T + Wbi + Rbi).",
)
register(
    "GRU", inputs=["X", "W", "R", "B?", "sequence_lens?", "initial_h?"], outputs=["Y?", "Y_h?"],
    attrs={**_COMMON, "linear_before_reset": Attr(AttrKind.INT, 0, doc="nonzero: R_h before the reset gate")},
    infer=_infer("GRU"), ref=_ref("GRU"),
    doc="Gated recurrent unit (gates z, r, h).",
)
register(
    "LSTM", inputs=["X", "W", "R", "B?", "sequence_lens?", "initial_h?", "initial_c?", "P?"],
    outputs=["Y?", "Y_h?", "Y_c?"],
    attrs={**_COMMON, "input_forget": Attr(AttrKind.INT, 0, choices=(0, 1), doc="1: forget = 1 - input")},
    infer=_infer("LSTM"), ref=_ref("LSTM"),
    doc="Long short-term memory (gates i, o, f, c; peepholes i, o, f).",
)
