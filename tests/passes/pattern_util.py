"""Shared by the pattern-pass tests: build a graph twice, run a pass on one copy through the manager (which
re-sorts and verifies), and check the interpreter gives the same outputs before and after."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from kiln.ir import Graph
from kiln.ir.interpreter import Interpreter
from kiln.ir.verify import verify
from kiln.passes.manager import Pass, PassResult, run_passes


def rewrite_preserves(build: Callable[[], Graph], fn: Pass, feeds: Mapping[str, np.ndarray], *,
                      rtol: float = 1e-5, atol: float = 1e-6) -> tuple[Graph, PassResult]:
    """Run `fn` on a fresh `build()`; assert the outputs (and their names, dtypes and shapes) are unchanged."""
    before = Interpreter(build()).run(dict(feeds))
    g = build()
    names = [v.name for v in g.outputs]
    types = [v.type for v in g.outputs]
    (record,) = run_passes(g, [("pass", fn)])
    verify(g, types=True)
    assert [v.name for v in g.outputs] == names
    assert [v.type for v in g.outputs] == types
    after = Interpreter(g).run(dict(feeds))
    for k, want in before.items():
        got = after[k]
        assert got.dtype == want.dtype and got.shape == want.shape, k
        scale = max(float(np.abs(want).max()), 1.0) if want.size else 1.0
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol * scale, err_msg=k)
    return g, record.result


def ops(g: Graph) -> list[str]:
    return [n.op for n in g.nodes]


def rand(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
