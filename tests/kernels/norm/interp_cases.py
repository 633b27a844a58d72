"""The Triton norm tactics against the op table's reference, run on the CPU by Triton's interpreter.

The test module starts this file as a worker process (`python interp_cases.py GROUP OUT.jsonl`) with
TRITON_INTERPRET=1 set before triton is imported; an out-of-bounds access can kill the process, so every case
writes its own result line as soon as it is done. Importing this module (to list the cases) imports no triton."""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kiln.ir import DType, Graph, Node, TensorType

CUDA = torch.device("cuda")  # what the tactics are built for; the interpreter runs them on CPU tensors
SMALL = {"tile": 256, "per_thread": 8, "max_row": 512}
"""Streams every row longer than 512 elements in chunks of 256 (the looped / split kernels at small sizes)."""
TINY = {"tile": 16, "per_thread": 4, "max_row": 16}


class C:
    """A constant (initializer) input."""

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t


Arg = torch.Tensor | C | None


@dataclass
class Case:
    id: str
    group: str
    tactic: str
    op: str
    make: Callable[[torch.Generator], list[Arg]]
    attrs: dict[str, Any] = field(default_factory=dict)
    n_out: int = 1
    configs: Sequence[str] = ("default",)
    """Config names: "default" (the space's first), "small", "tiny", "space" (every config of the space)."""
    kernel: bool = True
    """Whether the Triton kernels run (False: an empty tensor, left to the reference)."""


def rand(g: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32, scale: float = 1.0,
         shift: float = 0.0) -> torch.Tensor:
    return (torch.randn(shape, generator=g) * scale + shift).to(dtype)


def node_of(op: str, inputs: Sequence[Arg], n_out: int, attrs: dict[str, Any]) -> tuple[Node, list[Any]]:
    """A one-node graph (C inputs become initializers); the node and the values a runtime would pass it."""
    g = Graph()
    vals: list[Any] = []
    args: list[Any] = []
    for i, x in enumerate(inputs):
        if x is None:
            vals.append(None)
            args.append(None)
        elif isinstance(x, C):
            vals.append(g.add_initializer(f"c{i}", x.t))
            args.append(x.t)
        else:
            vals.append(g.add_input(f"in{i}", TensorType(DType.from_torch(x.dtype), tuple(x.shape))))
            args.append(x)
    g.add(op, vals, attrs, outputs=n_out)
    return g.nodes[-1], args


# --- the cases ----------------------------------------------------------------------------------------------

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
DT_NAME = {F32: "f32", F16: "f16", BF16: "bf16"}


def _softmax_inf(rows: int, n: int, dt: torch.dtype) -> Callable[[torch.Generator], list[Arg]]:
    """Rows with some -inf, a row of -inf only (NaN in the reference), a row with +inf and one with a NaN."""

    def make(g: torch.Generator) -> list[Arg]:
        x = rand(g, rows, n, scale=3.0)
        x[0, ::3] = float("-inf")
        x[1, :] = float("-inf")
        x[2, n // 2] = float("inf")
        x[3, n - 1] = float("nan")
        return [x.to(dt)]

    return make


def softmax_cases() -> list[Case]:
    cases = []
    for op in ("Softmax", "LogSoftmax"):
        for dt in (F32, F16):
            for shape in [(1, 1), (3, 7), (257, 768), (3, 1000), (1, 5000), (2, 3, 129)]:
                cfgs = ("default", "small") if shape[-1] >= 512 else ("default", "tiny")
                name = f"{op}-{DT_NAME[dt]}-{'x'.join(map(str, shape))}"
                cases.append(Case(name, "softmax", "triton.softmax", op,
                                  lambda g, s=shape, d=dt: [rand(g, *s, dtype=d, scale=4.0)], {"axis": -1}, 1, cfgs))
            for rows, n in [(5, 33), (6, 1000)]:
                cases.append(Case(f"{op}-{DT_NAME[dt]}-inf-{rows}x{n}", "softmax", "triton.softmax", op,
                                  _softmax_inf(rows, n, dt), {"axis": 1}, 1, ("default", "small", "tiny")))
        cases.append(Case(f"{op}-bf16-31x300", "softmax", "triton.softmax", op,
                          lambda g: [rand(g, 31, 300, dtype=BF16, scale=4.0)], {"axis": -1}, 1, ("default", "tiny")))
        cases.append(Case(f"{op}-axis-rank-1", "softmax", "triton.softmax", op,
                          lambda g: [rand(g, 2, 3, 40)], {"axis": 2}, 1, ("space",)))
        cases.append(Case(f"{op}-noncontiguous", "softmax", "triton.softmax", op,
                          lambda g: [rand(g, 40, 9).t()], {"axis": -1}))
        cases.append(Case(f"{op}-empty", "softmax", "triton.softmax", op, lambda g: [rand(g, 0, 9)], {"axis": -1},
                          kernel=False))
    return cases


def _ln(x: tuple[int, ...], axis: int, dt: torch.dtype, bias: bool = True, wdt: torch.dtype | None = None,
        lead_ones: int = 0, const: bool = True) -> Callable[[torch.Generator], list[Arg]]:
    norm = x[axis:]
    wshape = (1,) * lead_ones + norm

    def make(g: torch.Generator) -> list[Arg]:
        w = rand(g, *wshape, dtype=wdt or dt, shift=1.0)
        b = rand(g, *wshape, dtype=wdt or dt) if bias else None
        wrap: Callable[[torch.Tensor], Arg] = C if const else (lambda t: t)
        return [rand(g, *x, dtype=dt, scale=2.0, shift=0.5), wrap(w), None if b is None else wrap(b)]

    return make


def layernorm_cases() -> list[Case]:
    cases = []
    forms: list[tuple[tuple[int, ...], int, str]] = [
        ((257, 768), -1, "default"), ((3, 7), 1, "tiny"), ((1, 1), -1, "default"), ((2, 3, 5, 7), 1, "tiny"),
        ((2, 3, 5, 7), -2, "default"), ((4, 9), 0, "default"), ((1, 1000), -1, "small"), ((3, 5000), 1, "small"),
    ]
    for dt in (F32, F16):
        for x, axis, cfg in forms:
            for bias in (True, False):
                name = f"LN-{DT_NAME[dt]}-{'x'.join(map(str, x))}-axis{axis}-{'bias' if bias else 'nobias'}"
                cases.append(Case(name, "layernorm", "triton.layernorm", "LayerNormalization", _ln(x, axis, dt, bias),
                                  {"axis": axis}, 1, ("default", cfg)))
            cases.append(Case(f"LN-{DT_NAME[dt]}-{'x'.join(map(str, x))}-axis{axis}-stats", "layernorm",
                              "triton.layernorm", "LayerNormalization", _ln(x, axis, dt), {"axis": axis}, 3,
                              ("default", cfg)))
    for eps in (1e-3, 0.5):
        cases.append(Case(f"LN-eps{eps}", "layernorm", "triton.layernorm", "LayerNormalization",
                          _ln((5, 64), -1, F16), {"epsilon": eps}, 3, ("default", "tiny")))
    cases += [
        Case("LN-bf16", "layernorm", "triton.layernorm", "LayerNormalization", _ln((9, 96), -1, BF16), {}, 3,
             ("default", "tiny")),
        Case("LN-f16-x-f32-scale", "layernorm", "triton.layernorm", "LayerNormalization",
             _ln((9, 96), -1, F16, wdt=F32), {}, 1, ("default", "tiny")),
        Case("LN-leading-one-scale", "layernorm", "triton.layernorm", "LayerNormalization",
             _ln((4, 6, 10), 1, F32, lead_ones=1), {"axis": 1}),
        Case("LN-runtime-scale", "layernorm", "triton.layernorm", "LayerNormalization",
             _ln((4, 50), -1, F32, const=False), {}),
        Case("LN-space", "layernorm", "triton.layernorm", "LayerNormalization", _ln((6, 300), -1, F16), {}, 3,
             ("space",)),
        Case("LN-noncontiguous", "layernorm", "triton.layernorm", "LayerNormalization",
             lambda g: [rand(g, 30, 8).t(), C(rand(g, 30)), C(rand(g, 30))], {}),
        Case("LN-empty", "layernorm", "triton.layernorm", "LayerNormalization", _ln((0, 8), -1, F32), {}, 3,
             kernel=False),
    ]
    for dt, wdt in ((F32, F32), (F16, F16), (F32, F16), (BF16, BF16)):
        for x, axis, cfg in [((257, 768), -1, "default"), ((3, 7), 1, "tiny"), ((2, 3, 5, 7), 1, "tiny"),
                             ((3, 5000), -1, "small")]:
            name = f"RMS-{DT_NAME[dt]}-{DT_NAME[wdt]}-{'x'.join(map(str, x))}-axis{axis}"
            make = _ln(x, axis, dt, bias=False, wdt=wdt)
            cases.append(Case(name, "layernorm", "triton.rmsnorm", "RMSNormalization", lambda g, m=make: m(g)[:2],
                              {"axis": axis, "epsilon": 1e-6}, 1, ("default", cfg)))
    cases.append(Case("RMS-space", "layernorm", "triton.rmsnorm", "RMSNormalization",
                      lambda g: _ln((6, 300), -1, F16)(g)[:2], {}, 1, ("space",)))
    return cases


def _gn(x: tuple[int, ...], dt: torch.dtype) -> Callable[[torch.Generator], list[Arg]]:
    def make(g: torch.Generator) -> list[Arg]:
        ch = x[1]
        return [rand(g, *x, dtype=dt, scale=3.0, shift=1.0), C(rand(g, ch, dtype=dt, shift=1.0)),
                C(rand(g, ch, dtype=dt))]

    return make


def groupnorm_cases() -> list[Case]:
    cases = []
    forms: list[tuple[tuple[int, ...], int, str]] = [
        ((2, 6, 10, 11), 3, "tiny"), ((1, 4, 7), 2, "tiny"), ((3, 8), 4, "default"), ((2, 4, 33, 35), 1, "small"),
        ((1, 6, 3, 100), 6, "small"), ((2, 32, 4, 4), 8, "default"),
    ]
    for dt in (F32, F16):
        for x, groups, cfg in forms:
            shape = "x".join(map(str, x))
            cases.append(Case(f"GN-{DT_NAME[dt]}-{shape}-g{groups}", "groupnorm", "triton.groupnorm",
                              "GroupNormalization", _gn(x, dt), {"num_groups": groups}, 1, ("default", cfg)))
        for x, cfg in [((2, 6, 10, 11), "tiny"), ((2, 3), "default"), ((1, 1, 600), "small"), ((1, 2, 3000), "small")]:
            cases.append(Case(f"IN-{DT_NAME[dt]}-{'x'.join(map(str, x))}", "groupnorm", "triton.groupnorm",
                              "InstanceNormalization", _gn(x, dt), {}, 1, ("default", cfg)))
    cases += [
        Case("GN-eps0.25", "groupnorm", "triton.groupnorm", "GroupNormalization", _gn((2, 4, 5), F32),
             {"num_groups": 2, "epsilon": 0.25}, 1, ("default", "tiny")),
        Case("GN-bf16", "groupnorm", "triton.groupnorm", "GroupNormalization", _gn((2, 8, 9, 9), BF16),
             {"num_groups": 4}, 1, ("default", "tiny")),
        Case("GN-space", "groupnorm", "triton.groupnorm", "GroupNormalization", _gn((2, 8, 30, 30), F16),
             {"num_groups": 2}, 1, ("space",)),
        Case("IN-noncontiguous", "groupnorm", "triton.groupnorm", "InstanceNormalization",
             lambda g: [rand(g, 7, 3, 2).permute(2, 1, 0), C(rand(g, 3)), C(rand(g, 3))], {}),
        Case("GN-empty", "groupnorm", "triton.groupnorm", "GroupNormalization", _gn((0, 4, 3), F32),
             {"num_groups": 2}, kernel=False),
    ]
    return cases


def all_cases() -> list[Case]:
    return softmax_cases() + layernorm_cases() + groupnorm_cases()


# --- the checks (run in the worker) ---------------------------------------------------------------------------


def tolerances(dt: torch.dtype) -> dict[str, float]:
    """rtol and atol (relative to the largest finite reference value) per output dtype. float16 results must
    match the reference almost everywhere (the kernels round where it does; streamed softmax rows sum exp()
    unrounded); the interpreter truncates when it converts to bfloat16 (the GPU rounds to nearest), so bfloat16
    is allowed a few units in the last place."""
    if dt == torch.float32:
        return {"rtol": 1e-4, "atol": 1e-5, "exact": 0.0}
    if dt == torch.float16:
        return {"rtol": 1e-3, "atol": 1e-4, "exact": 0.98}
    return {"rtol": 3e-2, "atol": 2e-2, "exact": 0.0}


def compare(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape, want.dtype, want.shape)
    tol = tolerances(want.dtype)
    finite = want[want.isfinite()]
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=tol["rtol"], atol=tol["atol"] * (1 + scale), equal_nan=True)
    if want.numel() and tol["exact"]:
        same = ((got == want) | (got.isnan() & want.isnan())).float().mean().item()
        assert same >= tol["exact"], f"only {same:.4f} of the elements match the reference exactly"


def configs(names: Sequence[str], space: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for n in names:
        out += space if n == "space" else [{"default": space[0], "small": SMALL, "tiny": TINY}[n]]
    return out


def run_case(case: Case, seed: int) -> None:
    from kiln.ir.ops import get_op
    from kiln.ir.ops.base import RefCtx
    from kiln.kernels import registry

    g = torch.Generator().manual_seed(seed)
    node, args = node_of(case.op, case.make(g), case.n_out, case.attrs)
    tactic = registry.get(case.tactic)
    assert tactic.applicable(node, CUDA), f"{case.tactic} should take this node"
    assert not tactic.applicable(node, torch.device("cpu"))
    want = list(get_op(case.op).ref(RefCtx(node), list(args)))[:case.n_out]
    before = [None if a is None else a.clone() for a in args]
    cfgs = configs(case.configs, tactic.configs())
    launches = _count_launches()
    for cfg in cfgs:
        got = tactic.build(node, cfg, CUDA)(list(args))
        assert len(got) == case.n_out, f"{len(got)} outputs, want {case.n_out}"
        for i, (a, b) in enumerate(zip(got, want)):
            try:
                compare(a, b)
            except AssertionError as e:
                raise AssertionError(f"output {i} under {cfg}: {e}") from None
    for a, b in zip(args, before):
        assert a is None or torch.equal(a.nan_to_num(), b.nan_to_num()), "a kernel modified its input"
    assert launches[0] == (len(cfgs) if case.kernel else 0), f"{launches[0]} kernel launches for {len(cfgs)} runs"


def _count_launches() -> list[int]:
    """Wrap the launchers of `triton_kernels` (the tactics look them up at call time) to count their calls."""
    from kiln.kernels.norm import triton_kernels as tk

    count = [0]
    for name in ("softmax", "layernorm", "groupnorm"):
        fn = getattr(tk, name)
        fn = getattr(fn, "__wrapped__", fn)

        def counted(*a: Any, _fn: Callable[..., Any] = fn, **k: Any) -> Any:
            count[0] += 1
            return _fn(*a, **k)

        counted.__wrapped__ = fn  # type: ignore[attr-defined]
        setattr(tk, name, counted)
    return count


def main(group: str, out_path: str) -> int:
    with open(out_path, "w") as out:
        for k, case in enumerate(c for c in all_cases() if c.group == group):
            out.write(json.dumps({"id": case.id, "status": "started"}) + "\n")
            out.flush()
            try:
                run_case(case, seed=k)
                result = {"id": case.id, "status": "passed"}
            except Exception as e:  # every failure is reported, then the next case runs
                tb = traceback.format_exc(limit=-3)
                result = {"id": case.id, "status": "failed", "message": f"{type(e).__name__}: {e}\n{tb}"}
            out.write(json.dumps(result) + "\n")
            out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))

