"""Shared by the cleanup-pass tests (folding, CSE, no-ops, shape arithmetic, transpose sinking): build a graph
twice, run passes on one copy through the manager (which re-sorts and verifies after each), and check that the
reference interpreter gives the same outputs, with the same names, dtypes and shapes, on every feed."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from kiln.ir import Graph
from kiln.ir.interpreter import Interpreter
from kiln.ir.verify import verify
from kiln.passes.manager import Pass, PassResult, run_passes

Feeds = Mapping[str, np.ndarray]


def preserves(build: Callable[[], Graph], passes: Pass | Sequence[Pass], feeds: Feeds | Sequence[Feeds] = (),
              ) -> tuple[Graph, PassResult]:
    """Run `passes` on a fresh `build()`; assert every feed gives the same outputs as before (exactly: these
    passes do not reorder arithmetic). Returns the rewritten graph and the first pass's result."""
    fns = [passes] if callable(passes) else list(passes)
    runs = [feeds] if isinstance(feeds, Mapping) else list(feeds) or [{}]
    before = [Interpreter(build()).run(dict(f)) for f in runs]
    g = build()
    names, types = [v.name for v in g.outputs], [v.type for v in g.outputs]
    records = run_passes(g, [(f"pass{i}", fn) for i, fn in enumerate(fns)])
    verify(g, types=True)
    assert [v.name for v in g.outputs] == names
    assert [v.type for v in g.outputs] == types
    for f, want in zip(runs, before):
        got = Interpreter(g).run(dict(f))
        for k, w in want.items():
            assert got[k].dtype == w.dtype and got[k].shape == w.shape, k
            np.testing.assert_array_equal(got[k], w, err_msg=k)
    return g, records[0].result


def ops(g: Graph) -> list[str]:
    return [n.op for n in g.nodes]


def all_ops(g: Graph) -> list[str]:
    return [n.op for n in g.all_nodes()]


def rand(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
