"""`kiln.runtime.cuda_graphs` parts that run anywhere: the input/output copies around a replay, and when a key gets
captured (the capture itself stubbed). (Capture and replay themselves are GPU tests: tests/gpu/test_cuda_engine.py.)"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kiln.runtime import cuda_graphs
from kiln.runtime.cuda_graphs import Captured, GraphCache, copy_all


def test_copy_all_copies_every_pair_in_one_foreach_where_it_can() -> None:
    src = [torch.arange(5, dtype=torch.int64), torch.arange(3, dtype=torch.int64) * 7, torch.ones(2, 2)]
    dst = [torch.zeros(5, dtype=torch.int64), torch.zeros(3, dtype=torch.int64), torch.zeros(2, 2)]
    copy_all(dst, src)  # mixed dtypes: one copy each
    assert all(torch.equal(d, s) for d, s in zip(dst, src))
    src2 = [torch.randn(4), torch.randn(3, 2).t()]  # one of them strided
    dst2 = [torch.zeros(4), torch.zeros(2, 3)]
    copy_all(dst2, src2)
    assert all(torch.equal(d, s) for d, s in zip(dst2, src2))


def test_copy_all_leaves_a_buffer_copied_onto_itself_alone() -> None:
    own = torch.arange(6.0)
    other, target = torch.full((6,), 2.0), torch.zeros(6)
    copy_all([own, target], [own, other])
    assert torch.equal(own, torch.arange(6.0)) and torch.equal(target, other)
    view = own[::2]  # same start, other strides: a real copy
    dst = torch.zeros(3)
    copy_all([dst], [view])
    assert torch.equal(dst, torch.tensor([0.0, 2.0, 4.0]))


class _Replay:
    def __init__(self) -> None:
        self.replays = 0

    def replay(self) -> None:
        self.replays += 1


def _stubbed(cache: GraphCache, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Captures that record their key and return a graph that counts its replays (no GPU needed)."""
    made: list[Any] = []

    def capture(key: Any, inputs: Any, fn: Any) -> Captured:
        cap = Captured({k: x.clone() for k, x in inputs.items()}, {"y": torch.zeros(1)}, _Replay())  # type: ignore[arg-type]
        cache.graphs[key] = cap
        made.append(key)
        return cap

    monkeypatch.setattr(cache, "_capture", capture)
    return made


def test_a_shape_is_captured_on_its_second_run_and_replayed_after(monkeypatch: pytest.MonkeyPatch) -> None:
    cache = GraphCache(torch.device("cpu"))
    made = _stubbed(cache, monkeypatch)
    x = {"x": torch.ones(2)}
    assert cache.run("a", x, lambda f: {}) is None and not made  # first run: the caller runs it step by step
    assert cache.run("b", x, lambda f: {}) is None and not made
    assert cache.run("a", x, lambda f: {}) is not None and made == ["a"]  # second: captured and replayed
    assert cache.run("a", x, lambda f: {}) is not None and made == ["a"]  # later: replayed
    assert cache.graphs["a"].graph.replays == 2 and "a" not in cache.seen and cache.seen["b"] == 1


def test_capture_after_one_captures_on_first_use_and_zero_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    cache = GraphCache(torch.device("cpu"), capture_after=1)
    made = _stubbed(cache, monkeypatch)
    assert cache.run("a", {"x": torch.ones(1)}, lambda f: {}) is not None and made == ["a"]
    with pytest.raises(ValueError, match="capture_after"):
        GraphCache(torch.device("cpu"), capture_after=0)


def test_shapes_seen_once_are_remembered_up_to_a_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """A decode loop over a growing cache: every step a new shape, none captured, the memory of them bounded."""
    monkeypatch.setattr(cuda_graphs, "MAX_SEEN", 4)
    cache = GraphCache(torch.device("cpu"))
    made = _stubbed(cache, monkeypatch)
    for step in range(10):
        assert cache.run(("past", step), {"x": torch.ones(1)}, lambda f: {}) is None
    assert not made and list(cache.seen) == [("past", s) for s in range(6, 10)]
