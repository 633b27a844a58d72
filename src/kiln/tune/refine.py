"""Refining the tuner's choices in the whole engine.

The tuner (`kiln.tune.tuner`) times each candidate of a node alone: one launch in a CUDA graph after an L2 flush.
In the engine the steps run back to back in one CUDA graph, and what a step costs there also depends on its
neighbours: a kiln Triton kernel launched with programmatic dependent launch (`kiln.kernels.pdl`) starts while the
step before it finishes, a library kernel (cuBLAS) does not; a candidate that leaves part of its epilogue to a
second kernel pays for that kernel's start in the graph as well. At batch 1, where a step takes a few microseconds,
these effects are as large as the differences the tuner measured, so its ranking of close candidates is not the
engine's. (Measured on an H100, BERT-base batch 1: the tuner put cuBLAS + a GELU kernel 0.3 us ahead of a Triton
GEMM with the GELU in its epilogue for the twelve LN + FFN-up steps; in the engine the two cuBLAS-side kernels took
7.1 us, and swapping in the Triton GEMM made the whole engine 0.97x the time - 0.98x in the benchmark.)

So after tuning, the runners-up are tried in the engine itself. Nodes that share a timing-cache key (BERT's twelve
FFN-up layers) form a group and change together. Groups go in order of their share of the tuned time; for each,
the candidates whose time alone was within `SLACK` of the chosen one's (at most `TRIES` of them) are swapped in one
at a time: the engine is built with the swap, its plan captured in a CUDA graph, its outputs compared with the
current engine's, and the two graphs replayed in alternating rounds. A runner-up replaces the choice when the whole
graph's time fell by more than `MIN_GAIN` in the median of the rounds' ratios, and in most rounds. The search stops
at its time budget; each group decided is written to the timing cache (`refined` in its entry), so a warm rebuild
takes the decision without searching again.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from kiln.runtime.engine import Engine
from kiln.runtime.plan import Choice
from kiln.tune.cache import TimingCache
from kiln.tune.tuner import Group, label

SLACK = 0.25
"""A runner-up is tried when its time alone was at most this much above the chosen candidate's."""
TRIES = 3
"""At most this many runners-up are tried per group."""
MIN_GAIN = 0.003
"""A runner-up is kept when the whole engine got at least this much faster (0.3 %)."""
BUDGET_S = 30.0
"""Seconds the search may take (less when the build's time budget has less left)."""
ROUNDS = 9
"""Alternating timing rounds per trial (current engine, trial engine; then the other order)."""
ROUND_S = 2e-3
"""Each round replays a graph for about this long (at least once, at most 50 times)."""
MIN_COSINE = 0.999
"""A trial engine's outputs must match the current one's at least this well (cosine, per output)."""


class Bench(Protocol):
    """Times engines that differ in their choices, made as `Bench(make, feeds, choices)`: `choices` give the current
    engine. `ratio(choices)` is the median time of the engine with `choices` over the current one's, and the share
    of rounds it was faster in (raising `Mismatch` when that engine cannot run or computes something else);
    `accept()` makes the engine of the last `ratio` call the current one; `first_s` is the first engine's time a
    run."""

    first_s: float

    def ratio(self, choices: list[Choice]) -> tuple[float, float]: ...

    def accept(self) -> None: ...


@dataclass
class RefineReport:
    groups: int = 0
    """Groups with a runner-up close enough to try."""
    trials: int = 0
    kept: list[str] = field(default_factory=list)
    """`key-prefix: old -> new (ratio)` for each change made."""
    rejected: list[str] = field(default_factory=list)
    """Trials whose engine could not run or whose outputs differed (not a timing loss: those are not listed)."""
    skipped: str | None = None
    """Why no search ran."""
    seconds: float = 0.0
    gain: float = 1.0
    """The product of the kept changes' ratios, each the median of alternating rounds against the engine before it."""
    before_ms: float | None = None
    after_ms: float | None = None
    """`before_ms` times `gain`. Not a measurement of its own at the end: the search's seconds of back-to-back replays
    warm the card, and at batch 128 the same engine timed 10.39 ms before them and 11.22 ms after (ViT-B/16, H100)."""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"groups": self.groups, "trials": self.trials, "kept": self.kept,
                               "rejected": self.rejected, "seconds": round(self.seconds, 3)}
        if self.skipped is not None:
            out["skipped"] = self.skipped
        if self.before_ms is not None and self.after_ms is not None:
            out["before_ms"], out["after_ms"] = round(self.before_ms, 4), round(self.after_ms, 4)
        return out


def _label(c: Choice) -> str:
    return label(c.tactic, c.config)


def search(groups: Mapping[str, Group], choices: list[Choice], bench: Bench, deadline: float,
           report: RefineReport, decided: Callable[[Group, Choice], None] | None = None) -> list[Choice]:
    """The choices after trying the close runners-up of each group in the whole engine (see the module)."""
    current = list(choices)
    todo = []
    for g in groups.values():
        chosen = current[g.nodes[0]]
        alone = next((t for t, c in g.ranked if c == chosen), None)
        if g.refined or alone is None or any(current[i] != chosen for i in g.nodes):
            continue  # decided before, or a choice the tuner did not time (a concatenation written in place)
        tries = [c for t, c in g.ranked if c != chosen and t <= alone * (1 + SLACK)][:TRIES]
        if tries:
            todo.append((alone * len(g.nodes), g, chosen, tries))
    report.groups = len(todo)
    for _, g, chosen, tries in sorted(todo, key=lambda x: -x[0]):
        gain = 1.0
        stopped = False
        for alt in tries:
            if time.perf_counter() > deadline:
                stopped = True
                break
            trial = list(current)
            for i in g.nodes:
                trial[i] = alt
            report.trials += 1
            try:
                r, faster = bench.ratio(trial)
            except Mismatch as e:
                report.rejected.append(f"{g.key[:12]}: {_label(alt)}: {e}")
                continue
            if r < 1 - MIN_GAIN and faster > 0.5:  # the current engine from now on: later tries must beat it
                bench.accept()
                current, gain = trial, gain * r
        if current[g.nodes[0]] != chosen:
            report.gain *= gain
            report.kept.append(f"{g.key[:12]} x{len(g.nodes)}: {_label(chosen)} -> {_label(current[g.nodes[0]])} "
                               f"({gain:.4f}x)")
        if stopped:  # out of time: what was kept stays, but the group is not decided (a later build goes on)
            return current
        if decided is not None:
            decided(g, current[g.nodes[0]])
    return current


class Mismatch(Exception):
    """A trial engine that cannot be captured or run, or whose outputs differ from the current engine's."""


class GraphBench:
    """`Bench` on the GPU: each engine's plan captured in a CUDA graph (as the runtime runs it) and replayed back to
    back, timed with CUDA events, the current and the trial engine in alternating rounds."""

    def __init__(self, make: Callable[[list[Choice]], Engine], feeds: dict[str, Any], choices: list[Choice]) -> None:
        self.make = make
        self.feeds = feeds
        self.base = self._capture(choices)
        one = min(self._once(self.base, 1) for _ in range(3))
        self.reps = max(1, min(50, round(ROUND_S / max(one, 1e-7))))
        self.last: tuple[Any, torch.cuda.CUDAGraph, dict[str, Any]] | None = None
        self.first_s = statistics.median(self._once(self.base, self.reps) for _ in range(5))

    def _capture(self, choices: list[Choice]) -> tuple[Any, torch.cuda.CUDAGraph, dict[str, Any]]:
        ctx = self.make(choices).create_context(capture_after=1)
        out = ctx.run(self.feeds)
        caps = list(ctx.graphs.graphs.values()) if ctx.graphs is not None else []
        if len(caps) != 1:
            why = "; ".join(ctx.graphs.eager_keys.values()) if ctx.graphs is not None else "no CUDA graphs"
            raise Mismatch(f"not captured in a CUDA graph ({why})")
        return ctx, caps[0].graph, out

    def _once(self, run: tuple[Any, torch.cuda.CUDAGraph, dict[str, Any]], reps: int) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            run[1].replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / reps

    def ratio(self, choices: list[Choice]) -> tuple[float, float]:
        self.last = None
        try:
            trial = self._capture(choices)
        except Mismatch:
            raise
        except Exception as e:  # a combination that cannot run: the search goes on without it
            raise Mismatch(f"{type(e).__name__}: {e}") from None
        check_same_outputs(trial[2], self.base[2])
        ratios = []
        self._once(trial, 1)
        for r in range(ROUNDS):
            if r % 2:
                t_trial, t_base = self._once(trial, self.reps), self._once(self.base, self.reps)
            else:
                t_base, t_trial = self._once(self.base, self.reps), self._once(trial, self.reps)
            ratios.append(t_trial / t_base)
        self.last = trial
        return statistics.median(ratios), sum(x < 1 for x in ratios) / len(ratios)

    def accept(self) -> None:
        assert self.last is not None
        self.base = self.last


def check_same_outputs(got: Mapping[str, Any], ref: Mapping[str, Any]) -> None:
    """Raise `Mismatch` unless every output of `got` matches `ref`'s: equal where not floating point, else finite
    where `ref` is and at cosine >= MIN_COSINE (two valid choices of tactics round differently, nothing more)."""
    for name, r in ref.items():
        g = got[name]
        if not isinstance(r, torch.Tensor) or not r.is_floating_point():
            if isinstance(r, torch.Tensor) and not torch.equal(g, r):
                raise Mismatch(f"output '{name}' differs")
            continue
        a, b = g.double().flatten(), r.double().flatten()
        finite = torch.isfinite(b)
        if not torch.equal(torch.isfinite(a), finite):
            raise Mismatch(f"output '{name}' has non-finite values where the current engine's has none, or the "
                           f"other way round")
        a, b = a[finite], b[finite]
        den = float(a.norm() * b.norm())
        cos = float(a @ b) / den if den > 0 else float(torch.equal(a, b))
        if cos < MIN_COSINE:
            raise Mismatch(f"output '{name}' cosine {cos:.6f} to the current engine's")


def refine(groups: Mapping[str, Group], choices: list[Choice], make: Callable[[list[Choice]], Engine],
           feeds: dict[str, Any], cache: TimingCache, budget_s: float = BUDGET_S,
           bench: Callable[..., Bench] | None = None) -> tuple[list[Choice], RefineReport]:
    """`search` with a `bench` (on the GPU: `GraphBench`) over engines made by `make(choices)`, run on `feeds`
    (device tensors at the profile's opt shapes); the decisions go to `cache`."""
    report = RefineReport()
    t0 = time.perf_counter()

    def decided(g: Group, c: Choice) -> None:
        entry = cache.get(g.key)
        if entry is not None:
            cache.put(g.key, {**entry, "refined": {"tactic": c.tactic, "config": dict(c.config)}})

    try:
        timer = (bench or GraphBench)(make, feeds, choices)
    except Exception as e:  # the tuned engine itself cannot be captured: nothing to compare against
        report.skipped = str(e) if isinstance(e, Mismatch) else f"{type(e).__name__}: {e}"
        return choices, report
    report.before_ms = timer.first_s * 1e3
    out = search(groups, choices, timer, t0 + budget_s, report, decided)
    report.after_ms = report.before_ms * report.gain
    report.seconds = time.perf_counter() - t0
    return out, report


def open_groups(groups: Sequence[Mapping[str, Group]]) -> bool:
    """Whether any group has a runner-up to try (else no engine need be built for the search)."""
    return any(not g.refined and len(g.ranked) > 1 for per in groups for g in per.values())
