"""Choosing a tactic for every node: time the applicable candidates at the profile's opt shapes, keep the
fastest whose outputs match the reference, remember the choice in the timing cache.

Candidates are timed on real intermediate values: the graph first runs once through the reference executor
on sample inputs of the opt shapes, and each node is tuned as the run reaches it (its inputs are at hand and
its reference outputs are the yardstick). Candidates that raise or disagree with the reference are dropped.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch

from kiln.ir.dtype import DType
from kiln.ir.graph import Graph, Node, TensorType, Value
from kiln.ir.interpreter import Interpreter, tf32_mode
from kiln.ir.ops import get_op
from kiln.ir.ops.base import RefCtx
from kiln.kernels import registry
from kiln.kernels.base import Kernel, Tactic, plan_layouts
from kiln.runtime.device import describe
from kiln.runtime.engine import to_layout, versions
from kiln.runtime.plan import Choice, Profile
from kiln.tune.cache import TimingCache, cache_key
from kiln.tune.timer import timed

Progress = Callable[[str, int, int], None]


@dataclass
class TuneReport:
    nodes: int = 0
    single: int = 0
    """Nodes with only one applicable tactic (nothing to choose)."""
    cache_hits: int = 0
    timed_nodes: int = 0
    candidates_timed: int = 0
    rejected: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    tactic_seconds: dict[str, list[float]] = field(default_factory=dict)
    """Per tactic, seconds spent [building and first running its candidates (Triton compiles happen there),
    timing them]: where a build's time goes."""
    groups: list[dict[str, Group]] = field(default_factory=list)
    """Per profile, the timed nodes by timing-cache key, with their candidates' timings (`kiln.tune.refine` tries
    the runners-up in the whole engine). Not part of the report's JSON."""

    def spent(self, tactic: str, first: float, timing: float) -> None:
        acc = self.tactic_seconds.setdefault(tactic, [0.0, 0.0])
        acc[0] += first
        acc[1] += timing

    def to_json(self) -> dict[str, Any]:
        return {"nodes": self.nodes, "single": self.single, "cache_hits": self.cache_hits,
                "timed_nodes": self.timed_nodes, "candidates_timed": self.candidates_timed,
                "rejected": self.rejected[:50], "warnings": self.warnings,
                "tactic_seconds": {k: [round(a, 6), round(b, 6)] for k, (a, b) in sorted(self.tactic_seconds.items())}}


@dataclass
class Group:
    """Nodes of one profile that share a timing-cache key (the same op, shapes, dtypes and attributes: BERT's twelve
    FFN-up layers), so the tuner made one choice for all of them."""

    key: str
    nodes: list[int]
    ranked: list[tuple[float, Choice]]
    """The candidates that passed, fastest first: (seconds alone, choice)."""
    refined: bool = False
    """The timing cache holds a choice made in the whole engine (`refine`) for this key."""


@dataclass
class TuneSettings:
    device: torch.device
    opt_level: int = 3
    deterministic: bool = False
    time_budget_s: float | None = None
    has_cache: bool = False
    refined: bool = True
    """Take a choice the whole-engine search made (`refined` in a cache entry) over the fastest one alone."""


def sample_inputs(graph: Graph, profile: Profile, device: torch.device, seed: int = 0) -> dict[str, Any]:
    """Inputs of the profile's opt shapes: normal floats, ones for integers (valid indices and masks), False."""
    gen = torch.Generator().manual_seed(seed)
    feeds: dict[str, Any] = {}
    for v in graph.inputs:
        t = v.type
        if not isinstance(t, TensorType):
            raise ValueError(f"input '{v.name}' is a {t}: no sample can be made")
        r = profile.shapes.get(v.name)
        dims = r.opt if r is not None else tuple(t.shape or ())
        if any(not isinstance(d, int) for d in dims):
            raise ValueError(f"input '{v.name}' has no opt shape")
        shape = [int(d) for d in dims]
        if t.dtype.is_float and not t.dtype.is_narrow:
            x = torch.randn(shape, generator=gen).to(t.dtype.torch)
        elif t.dtype is DType.BOOL:
            x = torch.zeros(shape, dtype=torch.bool)
        elif t.dtype is DType.STRING:
            feeds[v.name] = np.full(shape, "", dtype=object)
            continue
        else:
            x = torch.ones(shape, dtype=t.dtype.torch)
        feeds[v.name] = x.to(device)
    return feeds


def _describe_arg(a: Any) -> Any:
    if isinstance(a, torch.Tensor):
        desc = [str(a.dtype).replace("torch.", ""), list(a.shape)]
        return [*desc, "channels_last"] if a.dim() == 4 and not a.is_contiguous() and \
            a.is_contiguous(memory_format=torch.channels_last) else desc
    if a is None:
        return None
    return type(a).__name__


def _attr_sig(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return {"tensor": [str(v.dtype), list(v.shape), v.flatten()[:16].tolist() if v.numel() else []]}
    if isinstance(v, np.ndarray):
        return {"strings": list(v.shape)}
    if isinstance(v, Graph):
        return {"graph": _graph_sig(v)}
    if isinstance(v, tuple):
        return [_attr_sig(x) for x in v]
    return v if isinstance(v, (int, float, str, bool)) or v is None else str(v)


def _graph_sig(g: Graph) -> dict[str, Any]:
    """A body graph (a fused group, a control-flow branch) as structure: its nodes' ops and attributes, and its
    values by position with their types (and constants' contents as `_attr_sig` gives them) - not its names, so
    the fused groups of identical layers (BERT's twelve FFN-up products) share one timing-cache entry: tuned
    once, and one group for the whole-engine search (`kiln.tune.refine`)."""
    ids: dict[int, int] = {}

    def ref(v: Value | None) -> Any:
        if v is None:
            return None
        k = ids.get(id(v))
        if k is not None:
            return k
        k = ids[id(v)] = len(ids)
        return [k, str(v.type), None if v.data is None else _attr_sig(v.data)]

    return {"inputs": [ref(v) for v in g.inputs],
            "nodes": [[n.op, {k: _attr_sig(a) for k, a in sorted(n.attrs.items())}, [ref(v) for v in n.inputs],
                       [ref(v) for v in n.outputs]] for n in g.nodes],
            "outputs": [ref(v) for v in g.outputs]}


def label(tactic: str, config: Mapping[str, Any]) -> str:
    """A candidate as the timing cache's `candidates` entries name it: the tactic, then its configuration."""
    return tactic + (f"{dict(config)}" if config else "")


def signature(node: Node, args: list[Any], device: torch.device) -> dict[str, Any]:
    info = describe(device)
    return {
        "op": node.op,
        "attrs": {k: _attr_sig(v) for k, v in sorted(node.attrs.items())},
        "inputs": [[_describe_arg(a), v is not None and v.data is not None] for a, v in zip(args, node.inputs)],
        "device": [info.kind, info.name, info.arch],
        "versions": {k: v for k, v in versions().items()},
    }


TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 5e-2}
"""Relative tolerance against the reference by output dtype (1e-3 otherwise, which covers TF32)."""

_SECOND_OPINION = frozenset({torch.float16, torch.bfloat16, torch.float32})
"""Result dtypes `_as_accurate` may accept beyond the tolerance."""


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.dtype.is_floating_point or a.dtype.is_complex:
            fa, fb = a.double(), b.double()
            finite = fb[fb.isfinite()]  # NaN/inf (a fully masked softmax row) must not poison the tolerance
            scale = float(finite.abs().max()) if finite.numel() else 0.0
            rtol = TOLERANCE.get(a.dtype, 1e-3)  # a low-precision result may round differently per tactic
            return bool(torch.allclose(fa, fb, rtol=rtol, atol=1e-5 + rtol * 0.1 * scale, equal_nan=True))
        return bool(torch.equal(a, b))
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return a.shape == b.shape and bool((a == b).all())
    return a is None and b is None


def _mismatch(node: Node, got: list[Any], ref: list[Any], wide: Callable[[int], Any]) -> str | None:
    """None when a candidate's outputs pass (each close to the reference's, or, see `_one_step`, `_as_accurate` and
    `_codes_as_accurate`, as accurate as it), else what differs first. `wide(k)`: output k computed from
    float32-widened inputs (asked for only when needed)."""
    n = len(node.outputs)  # the reference may compute optional outputs the node does not have
    if len(got) < n:
        return f"{len(got)} outputs, the node has {n}"
    quantizes = _quantizes(node)
    for k, (g, r) in enumerate(zip(got[:n], ref[:n])):
        if _close(g, r) or (quantizes and _one_step(g, r)) or _as_accurate(g, r, wide(k)) \
                or (quantizes and _codes_as_accurate(g, r, wide(k))):
            continue
        return f"output {k}: {_difference(g, r)}"
    return None


def _difference(got: Any, ref: Any) -> str:
    """How far apart two results are, in words (for a rejected candidate's report line)."""
    if not (isinstance(got, torch.Tensor) and isinstance(ref, torch.Tensor)):
        return f"{type(got).__name__} vs {type(ref).__name__}"
    if got.shape != ref.shape or got.dtype != ref.dtype:
        return f"{got.dtype}{list(got.shape)} vs {ref.dtype}{list(ref.shape)}"
    if got.numel() == 0:
        return "empty"
    if ref.dtype in (torch.int8, torch.uint8, torch.float8_e4m3fn):
        apart = (_codes(got) - _codes(ref)).abs()
        return f"{float((apart > 0).double().mean()) * 100:.2f} % of the codes differ, by up to {int(apart.max())}"
    if ref.dtype.is_floating_point:
        diff = (got.double() - ref.double()).abs()
        finite = ref[ref.isfinite()]
        top = float(finite.abs().max()) if finite.numel() else 0.0
        return f"max |diff| {float(diff.nan_to_num(float('inf')).max()):.4g} (largest |value| {top:.4g})"
    return f"{int((got != ref).sum())} of {got.numel()} values differ"


def _quantizes(node: Node) -> bool:
    """Whether the node's result is a QuantizeLinear's (alone, or a fused layer's last step)."""
    if node.op == "QuantizeLinear":
        return True
    body = node.attrs.get("body") if node.op == "Fused" else None
    return isinstance(body, Graph) and bool(body.nodes) and body.nodes[-1].op == "QuantizeLinear"


def _one_step(got: Any, ref: Any) -> bool:
    """A quantized (8-bit) result within one step of the reference's, and equal to it almost everywhere: the
    float value before rounding differs in its last bits between kernels (another summation order, a float32
    dequantization where the reference rounds to float16), so a value near a .5 boundary may round the other way.
    More than one step, or more than 1 % of the values off, is a wrong kernel."""
    if not (isinstance(got, torch.Tensor) and isinstance(ref, torch.Tensor)) or got.shape != ref.shape \
            or got.dtype != ref.dtype or got.dtype not in (torch.int8, torch.uint8, torch.float8_e4m3fn):
        return False
    if got.numel() == 0:
        return True
    return bool(_near(got, ref).all()) and float((_codes(got) == _codes(ref)).float().mean()) >= 0.99


FLOAT8_FLOOR = 2.0 ** -10
"""Float8 results may also differ by this share of the reference's largest magnitude, however many codes apart:
float8 codes crowd around zero (E4M3's subnormal step is 2^-9 where the top step is 32), and Hopper's FP8 tensor
cores sum products with about 14 significant bits (cuBLASLt promotes to float32 only between k-blocks), so a
value that cancels to near zero lands several codes from the exact result while off by a few 1e-5 of the range
(measured on an H100: 5 codes, 0.0097 against a largest value of 384). A wrong kernel is off by far more."""


def _near(got: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Where `got` is within one step of `ref` (float8: neighbouring codes of one sign, or within
    `FLOAT8_FLOOR` of the largest magnitude)."""
    g, r = _codes(got), _codes(ref)
    near = (g - r).abs() <= 1
    if got.dtype == torch.float8_e4m3fn:
        gf, rf = got.float(), ref.float()
        finite = rf[rf.isfinite()]
        top = float(finite.abs().max()) if finite.numel() else 0.0
        near |= ((gf - rf).abs() <= FLOAT8_FLOOR * top) | (gf.isnan() & rf.isnan())
    return near


def _codes(t: torch.Tensor) -> torch.Tensor:
    """8-bit results as integers that are one apart for neighbouring values (float8: sign and magnitude bits)."""
    if t.dtype != torch.float8_e4m3fn:
        return t.int()
    b = t.view(torch.uint8).int()
    return torch.where(b >= 128, -(b & 127), b)


def _codes_as_accurate(got: Any, ref: Any, wide: Any) -> bool:
    """Whether a quantized (8-bit) result that misses `_one_step`'s 99 % agreement with the reference is as close to
    `wide` (the same layer computed from float32-widened inputs) as the reference itself: within one step of it
    everywhere, and off it at most twice as often as the reference (plus 1 %; float8 `FLOAT8_SLACK`). A reference
    that rounds to
    float16 before quantizing to float8's 3-bit mantissa flips codes on its own; a candidate rounding elsewhere
    flips others."""
    if not all(isinstance(x, torch.Tensor) for x in (got, ref, wide)) \
            or ref.dtype not in (torch.int8, torch.uint8, torch.float8_e4m3fn):
        return False
    if got.shape != ref.shape or wide.shape != ref.shape or got.dtype != ref.dtype or wide.dtype != ref.dtype:
        return False
    if got.numel() == 0:
        return True
    if not bool(_near(got, wide).all()):
        return False
    g, r, w = _codes(got), _codes(ref), _codes(wide)
    slack = FLOAT8_SLACK if got.dtype == torch.float8_e4m3fn else 0.01
    return float((g != w).float().mean()) <= 2 * float((r != w).float().mean()) + slack


FLOAT8_SLACK = 0.02
"""Float8 codes off the float32 result a candidate may have beyond twice the reference's. E4M3 keeps 3 mantissa
bits, so a value's rounding flips once its error reaches 1/16-1/8 of it: a relative error d flips about 11 d of the
codes. Hopper's FP8 tensor cores sum with about 14 significant bits between cuBLASLt's float32 promotions, a few
1e-4 of the result after cancellation, which flips 1-2 % of the codes (measured on an H100, BERT-base's FFN-up
+ GELU + quantize, K=768: 1.39-1.61 % against the reference's 0.17-0.19 %). The same GEMM with a float16 output
passes the float16 tolerance; the fused quantize only makes its error countable. A wrong kernel flips far more."""


def _as_accurate(got: Any, ref: Any, wide: Any) -> bool:
    """Whether a half-precision result that misses the reference's tolerance is still at least about as accurate
    as the reference itself, measured against `wide` (the reference computed in float32). A reference that rounds
    every step to float16/bfloat16 has its own error; over long reductions (attention over a thousand keys) a
    candidate that rounds less can land farther from it than the tolerance while being closer to the exact
    result. Accepted: same non-finite places as the reference, and max and mean errors at most twice the
    reference's. Float32 results too: a fused step that computes in half precision and casts its result to float32
    (a bfloat16 classifier head before the model's float32 output) has a reference that rounds to bfloat16 first,
    off by up to 2**-9 relative - beyond float32's tolerance - where a kernel casting its float32 sum directly is
    nearer the exact result. Where nothing was rounded (float32 all through), the reference is its own second
    opinion and only the tolerance can pass a result."""
    if not all(isinstance(x, torch.Tensor) for x in (got, ref, wide)) or got.dtype not in _SECOND_OPINION:
        return False
    if got.shape != ref.shape or got.dtype != ref.dtype or wide.shape != ref.shape:
        return False
    g, r, w = got.double(), ref.double(), wide.double()
    if not torch.equal(g.isfinite(), r.isfinite()) or not torch.equal(g.isnan(), r.isnan()):
        return False
    m = r.isfinite() & w.isfinite()
    if not bool(m.any()):
        return False
    eg, er = (g - w)[m].abs(), (r - w)[m].abs()
    floor = 1e-6 * float(w[m].abs().max())
    return bool(eg.max() <= 2 * er.max() + floor) and bool(eg.mean() <= 2 * er.mean() + floor)


class _Widened:
    """The node's reference on its half-precision inputs widened to float32, computed once per node on demand."""

    def __init__(self) -> None:
        self.outputs: list[Any] | None = None
        self.failed = False

    def get(self, node: Node, args: list[Any], k: int) -> Any:
        if self.outputs is None and not self.failed:
            wide = [a.float() if isinstance(a, torch.Tensor) and a.dtype in TOLERANCE else a for a in args]
            device = next((a.device for a in wide if isinstance(a, torch.Tensor)), None)
            try:
                with tf32_mode(False, device):  # the second opinion in IEEE float32, as the reference runs
                    self.outputs = list(get_op(node.op).ref(RefCtx(_widened(node)), wide))
            except Exception:  # a reference that insists on its declared dtypes: no second opinion
                self.failed = True
        return None if self.outputs is None or k >= len(self.outputs) else self.outputs[k]


_HALF = frozenset({DType.FLOAT16, DType.BFLOAT16})


def _widened(node: Node) -> Node:
    """A Fused node with its body's float16/bfloat16 values (and constants) retyped to float32, for the second
    opinion. Body ops whose reference produces the declared output type (DequantizeLinear does) would otherwise
    round to half precision again, and every later op would compute in it: the second opinion would be the
    reference itself (an int8 conv's body dequantizing to float16 rounds every weight to 11 bits, an error the
    int8 kernel, summing exactly in int32, does not make). 8-bit values keep their types. Other nodes as they are."""
    body = node.attrs.get("body") if node.op == "Fused" else None
    if not isinstance(body, Graph) or any(m.subgraphs() for m in body.nodes):
        return node
    made: dict[Value, Value] = {}

    def wide(v: Value | None) -> Value | None:
        if v is None:
            return None
        if v not in made:
            t, data = v.type, v.data
            if isinstance(t, TensorType) and t.dtype in _HALF:
                t = TensorType(DType.FLOAT32, t.shape)
                data = data.float() if isinstance(data, torch.Tensor) else data
            made[v] = Value(v.name, t, data)
        return made[v]

    copy = Graph(f"{body.name} (float32)", parent=body.parent)
    copy.inputs = [cast(Value, wide(v)) for v in body.inputs]
    for m in body.nodes:
        outs = [cast(Value, wide(o)) for o in m.outputs]
        step = Node(m.op, [wide(v) for v in m.inputs], outs, dict(m.attrs), m.name)
        for o in outs:
            o.producer = step
        copy.nodes.append(step)
    copy.outputs = [cast(Value, wide(v)) for v in body.outputs]
    return Node("Fused", list(node.inputs), [cast(Value, made.get(v, v)) for v in body.outputs],
                {**node.attrs, "body": copy}, node.name)


def candidates(node: Node, settings: TuneSettings) -> list[Tactic]:
    """The tactics a build at this optimization level considers for `node`, best-ranked first."""
    found = [t for t in registry.candidates(node, settings.device) if t.min_opt_level <= settings.opt_level]
    return found or registry.candidates(node, settings.device)[-1:]


def _call(kernel: Kernel, args: list[Any], converted: list[bool]) -> Callable[[], Any]:
    """One run of `kernel` as the runtime makes it: the outputs flagged in `converted` brought to channels-last."""
    if not any(converted):
        return lambda: kernel(list(args))
    return lambda: [to_layout(r) if c else r for r, c in zip(kernel(list(args)), converted)]


def _in_space(tactics: list[Tactic], entry: dict[str, Any]) -> bool:
    """Whether a cached choice is still a configuration of its tactic (a cache written before a tactic's space
    changed may name a tile that no longer exists: that node is timed again)."""
    tactic = next(t for t in tactics if t.name == entry.get("tactic"))
    return entry.get("config", {}) in tactic.configs()


SMALL_SPACE = 16
"""At the default level, spaces up to this many configurations are searched whole (the first one otherwise)."""


def _configs(tactic: Tactic, node: Node, opt_level: int) -> list[dict[str, Any]]:
    cfgs = tactic.node_configs(node)
    return cfgs if opt_level >= 4 or (opt_level == 3 and len(cfgs) <= SMALL_SPACE) else cfgs[:1]


class _ProfileTuner:
    def __init__(self, graph: Graph, settings: TuneSettings, cache: TimingCache, report: TuneReport,
                 deadline: float | None, progress: Progress | None) -> None:
        self.graph = graph
        self.s = settings
        self.cache = cache
        self.report = report
        self.deadline = deadline
        self.progress = progress
        self.index = {id(n): i for i, n in enumerate(graph.nodes)}
        self.cands = [candidates(n, settings) for n in graph.nodes]
        self.choices: list[Choice | None] = [None] * len(graph.nodes)
        self.groups: dict[str, Group] = {}
        self.done = 0
        self.total = 0
        """Nodes to time under this profile (progress is reported as done / total)."""

    def first(self, i: int) -> Choice:
        t = self.cands[i][0]
        return Choice(t.name, t.configs()[0])

    def needs_tuning(self, i: int) -> bool:
        return len(self.cands[i]) > 1 and self.s.opt_level > 0 and not (self.s.deterministic and not self.s.has_cache)

    def run(self, profile: Profile) -> list[Choice]:
        todo = [i for i in range(len(self.graph.nodes)) if self.needs_tuning(i)]
        self.total = len(todo)
        self.report.single += sum(len(c) == 1 for c in self.cands)
        if todo and self.progress is not None:
            self.progress("tune", 0, self.total)
        if todo:
            try:
                feeds = sample_inputs(self.graph, profile, self.s.device)
                Interpreter(self.graph, check=False, device=self.s.device, observer=self.observe).run(feeds)
            except Exception as e:
                self.report.warnings.append(
                    f"the sample run for tuning stopped ({type(e).__name__}: {e}); untuned nodes take their "
                    f"first tactic")
        out = []
        for i in range(len(self.graph.nodes)):
            out.append(self.choices[i] or self.first(i))
        self.report.groups.append(self.groups)
        return out

    def observe(self, node: Node, args: list[Any], results: list[Any]) -> None:
        i = self.index.get(id(node))
        if i is None or self.choices[i] is not None or not self.needs_tuning(i):
            return
        self.choices[i] = self.choose(i, node, args, results)
        self.done += 1
        if self.progress is not None:
            self.progress("tune", self.done, self.total)

    def choose(self, i: int, node: Node, args: list[Any], results: list[Any]) -> Choice:
        layouts = self.graph.layouts  # time candidates on inputs in the memory format they will get at run time
        args = [to_layout(x) if v is not None and v.name in layouts else x for x, v in zip(args, node.inputs)]
        # why: the runtime converts an output the plan keeps channels-last after a kernel that wrote it otherwise,
        # so that conversion is part of what a candidate costs
        converted = [v is not None and v.name in layouts for v in node.outputs]
        key = cache_key(signature(node, args, self.s.device))
        entry = self.cache.get(key)
        names = {t.name for t in self.cands[i]}
        if entry is not None and entry.get("tactic") in names and _in_space(self.cands[i], entry):
            self.report.cache_hits += 1
            self._group(key, i, self._ranked(i, entry.get("candidates", {})), "refined" in entry)
            refined = entry.get("refined")
            if refined is not None and self.s.refined and refined.get("tactic") in names and \
                    _in_space(self.cands[i], refined):
                return Choice(refined["tactic"], refined.get("config", {}))
            return Choice(entry["tactic"], entry.get("config", {}))
        if self.s.deterministic or (self.deadline is not None and time.perf_counter() > self.deadline):
            return self.first(i)
        limit = {1: 2, 2: 3}.get(self.s.opt_level, len(self.cands[i]))
        high = _Widened()
        timings: dict[str, float | str] = {}
        best: tuple[bool, float, int, Choice] | None = None
        turned_down: list[str] = []  # why each kernel (not the reference) was rejected
        kernels_passed = 0
        for rank, tactic in enumerate(self.cands[i][:limit]):
            for cfg in _configs(tactic, node, self.s.opt_level):
                cand_label = label(tactic.name, cfg)
                t0 = time.perf_counter()
                t1 = None
                try:
                    kernel = tactic.build(node, cfg, self.s.device)
                    plan_layouts(kernel, node, layouts)
                    with warnings.catch_warnings():  # a library saying why it cannot: the mismatch/failure says it
                        warnings.simplefilter("ignore")
                        got = kernel(list(args))
                    why = _mismatch(node, got, results, lambda k: high.get(node, args, k))
                    if why is not None:
                        timings[cand_label] = "mismatch"
                        turned_down.append(f"{cand_label} (outputs differ from the reference: {why})")
                        continue
                    t1 = time.perf_counter()
                    t, captured = timed(_call(kernel, args, converted), self.s.device)
                except Exception as e:
                    timings[cand_label] = f"failed: {type(e).__name__}"
                    turned_down.append(f"{cand_label} ({type(e).__name__}: {e})")
                    continue
                finally:
                    now = time.perf_counter()
                    self.report.spent(tactic.name, (t1 or now) - t0, now - t1 if t1 is not None else 0.0)
                self.report.candidates_timed += 1
                kernels_passed += tactic.name != "reference"
                timings[cand_label] = round(t * 1e6, 3) if captured else f"{round(t * 1e6, 3)} (not capturable)"
                # A step that cannot be captured keeps the whole plan out of CUDA graphs: any capturable
                # candidate wins over it, whatever the timings.
                cand = (not captured, t, rank, Choice(tactic.name, cfg))
                if best is None or cand[:3] < best[:3]:
                    best = cand
        self.report.timed_nodes += 1
        self.report.rejected += [f"{node.name}: {why}" for why in turned_down]
        if best is None:
            return Choice("reference", {})
        choice = best[3]
        if choice.tactic == "reference" and turned_down and not kernels_passed:
            self.report.warnings.append(
                f"{node.name} ({node.op}) runs on the reference: all {len(turned_down)} kernel candidates were "
                f"rejected (first: {turned_down[0]}); it will be slow - please report it")
        self.cache.put(key, {"op": node.op, "tactic": choice.tactic, "config": dict(choice.config),
                             "time_us": round(best[1] * 1e6, 3), "candidates": timings})
        self._group(key, i, self._ranked(i, timings), False)
        return choice

    def _ranked(self, i: int, timings: dict[str, Any]) -> list[tuple[float, Choice]]:
        """The candidates of node i that passed and were captured, fastest first."""
        out = []
        for tactic in self.cands[i]:
            for cfg in tactic.configs():
                t = timings.get(label(tactic.name, cfg))
                if isinstance(t, (int, float)):
                    out.append((t / 1e6, Choice(tactic.name, cfg)))
        return sorted(out, key=lambda tc: tc[0])

    def _group(self, key: str, i: int, ranked: list[tuple[float, Choice]], refined: bool) -> None:
        group = self.groups.get(key)
        if group is None:
            self.groups[key] = Group(key, [i], ranked, refined)
        else:
            group.nodes.append(i)


def tune(graph: Graph, profiles: list[Profile], settings: TuneSettings, cache: TimingCache,
         progress: Progress | None = None) -> tuple[list[list[Choice]], TuneReport]:
    """Choices for every node under every profile."""
    report = TuneReport(nodes=len(graph.nodes))
    t0 = time.perf_counter()
    deadline = None if settings.time_budget_s is None else t0 + settings.time_budget_s
    choices = [_ProfileTuner(graph, settings, cache, report, deadline, progress).run(p) for p in profiles]
    report.seconds = time.perf_counter() - t0
    if settings.deterministic and not settings.has_cache:
        report.warnings.append("deterministic build without a timing cache: tactics chosen by rank, not timed")
    return choices, report
