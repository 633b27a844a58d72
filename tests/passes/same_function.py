"""Test helper for passes: run a pass through the manager and check the graph computes what it did before."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from kiln.ir.graph import Graph
from kiln.ir.interpreter import Interpreter
from kiln.ir.verify import verify
from kiln.passes.manager import PassResult, run_passes


def run_checked(g: Graph, passes: Sequence[Callable[[Graph], PassResult]],
                feeds: Sequence[Mapping[str, np.ndarray]], rel: float = 1e-5) -> list[PassResult]:
    """Run `passes` (toposort + verify after each, as the pipeline does) and compare every output on every feed,
    |after - before| <= rel * max|before| (exactly equal when rel is 0); output names and types must not change."""
    before = [Interpreter(g).run(dict(f)) for f in feeds]
    types = [(v.name, v.type) for v in g.outputs]
    records = run_passes(g, [(getattr(p, "__name__", "pass"), p) for p in passes])
    verify(g, types=True)
    assert [(v.name, v.type) for v in g.outputs] == types
    for f, want in zip(feeds, before):
        got = Interpreter(g).run(dict(f))
        assert list(got) == list(want)
        for k in want:
            a, b = np.asarray(got[k], dtype=np.float64), np.asarray(want[k], dtype=np.float64)
            assert a.shape == b.shape, k
            scale = float(np.abs(b).max()) if b.size else 0.0
            assert float(np.abs(a - b).max(initial=0.0)) <= rel * scale, f"{k}: {np.abs(a - b).max()} vs {scale}"
    return [r.result for r in records]


def randn(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
