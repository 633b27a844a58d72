"""The whole-engine search after tuning (`kiln.tune.refine`): which runners-up it tries, what it keeps, the groups
the tuner hands it, and its plumbing through the builder (engines made with the swapped choices). The GPU timing
itself (`GraphBench`) is tested in tests/gpu/test_refine_gpu.py."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import kiln
from kiln.build import builder
from kiln.build.config import BuilderConfig
from kiln.build.memory import plan_memory
from kiln.runtime.engine import Engine
from kiln.runtime.plan import Choice, Plan
from kiln.tune import refine
from kiln.tune.cache import TimingCache
from kiln.tune.tuner import Group, TuneSettings, tune

A, B, C, X = Choice("a"), Choice("b"), Choice("c"), Choice("x")


class CostBench:
    """An engine's time is the sum of its choices' costs (exact: no noise), as the search sees it."""

    def __init__(self, costs: dict[str, float], choices: list[Choice], broken: tuple[str, ...] = ()) -> None:
        self.costs, self.broken = costs, broken
        self.current = list(choices)
        self.first_s = self._t(choices)
        self.tried: list[list[Choice]] = []
        self.last: list[Choice] | None = None

    def _t(self, choices: list[Choice]) -> float:
        return sum(self.costs[c.tactic] for c in choices)

    def ratio(self, choices: list[Choice]) -> tuple[float, float]:
        self.tried.append(list(choices))
        if any(c.tactic in self.broken for c in choices):
            raise refine.Mismatch("output 'y' cosine 0.5 to the current engine's")
        self.last = list(choices)
        r = self._t(choices) / self._t(self.current)
        return r, 1.0 if r < 1 else 0.0

    def accept(self) -> None:
        assert self.last is not None
        self.current = self.last


def _search(groups: list[Group], choices: list[Choice], bench: CostBench, deadline: float | None = None) -> \
        tuple[list[Choice], refine.RefineReport, list[tuple[str, Choice]]]:
    report = refine.RefineReport()
    decided: list[tuple[str, Choice]] = []
    out = refine.search({g.key: g for g in groups}, choices, bench,
                        time.perf_counter() + 60 if deadline is None else deadline, report,
                        lambda g, c: decided.append((g.key, c)))
    return out, report, decided


def test_a_close_runner_up_that_makes_the_engine_faster_replaces_the_choice_of_its_whole_group() -> None:
    # alone: a 10 us, b 11 us (within SLACK), c 20 us (beyond it); in the engine b is cheaper than a, c cheaper still
    g = Group("k1", [0, 2], [(10e-6, A), (11e-6, B), (20e-6, C)])
    bench = CostBench({"a": 5, "b": 3, "c": 1, "x": 1}, [A, X, A])
    out, report, decided = _search([g], [A, X, A], bench)
    assert out == [B, X, B]  # both nodes of the group changed, the other node kept
    assert all(c != C for tried in bench.tried for c in tried)  # beyond SLACK: never tried
    assert report.groups == 1 and report.trials == 1 and len(report.kept) == 1
    assert "x2: a -> b (0.6364x)" in report.kept[0]  # (3 + 1 + 3) / (5 + 1 + 5)
    assert decided == [("k1", B)]  # written to the timing cache as the group's decision


def test_a_runner_up_not_faster_by_the_margin_keeps_the_tuned_choice() -> None:
    g = Group("k1", [0], [(10e-6, A), (10.5e-6, B)])
    within_noise = 1 - refine.MIN_GAIN / 2
    for b_cost in (5.5, 5 * within_noise):
        bench = CostBench({"a": 5, "b": b_cost}, [A])
        out, report, decided = _search([g], [A], bench)
        assert out == [A] and report.trials == 1 and not report.kept
        assert decided == [("k1", A)]  # decided (searched), so a warm rebuild does not search it again


def test_later_runners_up_must_beat_the_one_kept_before_them() -> None:
    g = Group("k1", [0, 1], [(10e-6, A), (10.1e-6, B), (10.2e-6, C)])
    out, _, _ = _search([g], [A, A], CostBench({"a": 5, "b": 3, "c": 4}, [A, A]))
    assert out == [B, B]  # c beats a but not b
    out, report, _ = _search([g], [A, A], CostBench({"a": 5, "b": 3, "c": 2}, [A, A]))
    assert out == [C, C] and report.trials == 2
    assert "a -> c (0.4000x)" in report.kept[0]  # the gain over the tuned choice: 3/5 then 2/3
    assert report.gain == pytest.approx(0.4)  # the engine's, over every group (one here)


def test_groups_decided_before_or_off_their_tuned_choice_are_left_alone() -> None:
    refined = Group("k1", [0], [(10e-6, A), (10.1e-6, B)], refined=True)
    in_place = Group("k2", [1, 2], [(10e-6, A), (10.1e-6, B)])  # node 2 was overridden (a Concat written in place)
    untimed = Group("k3", [3], [(10e-6, B)])  # its choice (a) is not among the timed candidates
    bench = CostBench({"a": 5, "b": 1, "concat.in_place": 0}, [A, A, Choice("concat.in_place"), A])
    out, report, decided = _search([refined, in_place, untimed], [A, A, Choice("concat.in_place"), A], bench)
    assert out == [A, A, Choice("concat.in_place"), A]
    assert report.groups == 0 and report.trials == 0 and not bench.tried and not decided


def test_a_trial_that_cannot_run_or_differs_is_reported_and_the_search_goes_on() -> None:
    g = Group("k1", [0], [(10e-6, A), (10.1e-6, B), (10.2e-6, C)])
    out, report, _ = _search([g], [A], CostBench({"a": 5, "b": 1, "c": 3}, [A], broken=("b",)))
    assert out == [C]
    assert len(report.rejected) == 1 and "b: output 'y' cosine 0.5" in report.rejected[0]


def test_the_largest_groups_go_first_and_the_deadline_stops_the_search() -> None:
    small = Group("small", [0], [(10e-6, A), (10.1e-6, B)])
    large = Group("large", [1, 2, 3], [(20e-6, A), (20.1e-6, B)])
    bench = CostBench({"a": 5, "b": 4}, [A] * 4)
    _search([small, large], [A] * 4, bench)
    assert bench.tried[0] == [A, B, B, B]  # 3 x 20 us tuned before 1 x 10 us
    bench = CostBench({"a": 5, "b": 4}, [A] * 4)
    out, report, decided = _search([small, large], [A] * 4, bench, deadline=time.perf_counter() - 1)
    assert out == [A] * 4 and report.trials == 0 and not decided  # not decided: a later build searches again


def test_a_change_kept_before_the_deadline_stays_and_is_reported_but_its_group_is_not_decided(monkeypatch: Any) \
        -> None:
    g = Group("k1", [0, 1], [(10e-6, A), (10.1e-6, B), (10.2e-6, C)])
    ticks = [0.0, 5.0]  # the first try starts in time, the second (and anything later) after the deadline

    monkeypatch.setattr(refine.time, "perf_counter", lambda: ticks.pop(0) if len(ticks) > 1 else ticks[0])
    report = refine.RefineReport()
    decided: list[Any] = []
    out = refine.search({g.key: g}, [A, A], CostBench({"a": 5, "b": 3, "c": 1}, [A, A]), 1.0, report,
                        lambda grp, c: decided.append(c))
    assert out == [B, B] and report.trials == 1 and report.kept == ["k1 x2: a -> b (0.6000x)"]
    assert not decided  # c was never tried: a later build searches this group again


def test_outputs_are_compared_with_the_current_engines() -> None:
    y = torch.linspace(-1, 1, 64)
    refine.check_same_outputs({"y": y + 1e-4, "i": torch.arange(3)}, {"y": y, "i": torch.arange(3)})
    with pytest.raises(refine.Mismatch, match="output 'y' cosine"):
        refine.check_same_outputs({"y": -y}, {"y": y})
    with pytest.raises(refine.Mismatch, match="non-finite"):
        refine.check_same_outputs({"y": torch.where(y > 0.5, float("nan"), y)}, {"y": y})
    with pytest.raises(refine.Mismatch, match="output 'i' differs"):
        refine.check_same_outputs({"i": torch.tensor([0, 1, 3])}, {"i": torch.arange(3)})


def _two_matmuls() -> onnx.ModelProto:
    """y = relu(x @ w1) @ w2, both products [32, 64] x [64, 64]: one timing-cache key, one group of two nodes."""
    rng = np.random.default_rng(0)
    ws = [onnx.numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32) / 8, f"w{i}") for i in (1, 2)]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")]
    g = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [32, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [32, 64])], ws)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _tuned(cache: TimingCache) -> tuple[Any, Any, Any, Any]:
    graph = kiln.import_onnx(_two_matmuls())
    profiles = builder.resolve_profiles(graph, [])
    choices, report = tune(graph, profiles, TuneSettings(torch.device("cpu")), cache)
    return graph, profiles, choices, report


def test_the_tuner_hands_over_its_timings_by_cache_key_and_takes_a_refined_choice_from_the_cache() -> None:
    cache = TimingCache()
    graph, _, choices, report = _tuned(cache)
    mms = [i for i, n in enumerate(graph.nodes) if n.op == "MatMul"]
    (group,) = [g for g in report.groups[0].values() if len(g.nodes) > 1]
    assert group.nodes == mms and not group.refined
    times = [t for t, _ in group.ranked]
    assert times == sorted(times) and len(times) >= 2 and all(t > 0 for t in times)
    assert choices[0][mms[0]] == group.ranked[0][1]
    slowest = group.ranked[-1][1]  # a decision of the whole-engine search, as `refine` writes it
    entry = cache.get(group.key)
    assert entry is not None
    cache.put(group.key, {**entry, "refined": {"tactic": slowest.tactic, "config": dict(slowest.config)}})
    _, _, again, report = _tuned(cache)
    assert [again[0][i] for i in mms] == [slowest, slowest]
    (group,) = [g for g in report.groups[0].values() if len(g.nodes) > 1]
    assert group.refined and not refine.open_groups([{group.key: group}])


class RunBench(CostBench):
    """CostBench over real engines: each trial's engine is made by the builder's `make`, run on the feeds, and its
    outputs compared with the current engine's."""

    made: list[list[Choice]] = []

    def __init__(self, make: Any, feeds: dict[str, Any], choices: list[Choice]) -> None:
        self.make, self.feeds = make, feeds
        self.out = self._run(choices)
        costs = {c.tactic: 1.0 for c in choices} | {c.tactic: 1.0 for g in GROUPS for _, c in g.ranked}
        costs.update({c.tactic: 0.5 for g in GROUPS for _, c in g.ranked[1:2]})  # the runner-up is faster
        super().__init__(costs, choices)

    def _run(self, choices: list[Choice]) -> Any:
        RunBench.made.append(list(choices))
        return self.make(choices).create_context().run(self.feeds)

    def ratio(self, choices: list[Choice]) -> tuple[float, float]:
        refine.check_same_outputs(self._run(choices), self.out)
        return super().ratio(choices)


GROUPS: list[Group] = []


def test_the_builder_searches_profile_by_profile_on_engines_made_with_the_swapped_choices(monkeypatch: Any) -> None:
    cache = TimingCache()
    graph, profiles, choices, report = _tuned(cache)
    GROUPS[:] = [g for g in report.groups[0].values() if len(g.ranked) > 1]
    for g in GROUPS:  # the CPU's timings alone may be far apart: make the runners-up close enough to be tried
        g.ranked = [(1e-5 * (1 + k / 100), c) for k, (_, c) in enumerate(g.ranked)]
    RunBench.made = []
    monkeypatch.setattr(refine, "GraphBench", RunBench)
    memory = plan_memory(graph, profiles)
    out, reports = builder._refine(graph, profiles, choices, memory, BuilderConfig(), cache, report, 30.0)
    (rep,) = reports
    assert rep["trials"] >= 1 and rep["kept"] and rep["after_ms"] < rep["before_ms"]
    (group,) = [g for g in GROUPS if len(g.nodes) > 1]
    runner_up = group.ranked[1][1]
    assert [out[0][i] for i in group.nodes] == [runner_up, runner_up]
    assert RunBench.made[0] == choices[0] and any(m[group.nodes[0]] == runner_up for m in RunBench.made[1:])
    assert cache.get(group.key)["refined"] == {"tactic": runner_up.tactic, "config": dict(runner_up.config)}
    # the refined plan is an engine like any other: it computes the model
    engine = Engine(Plan(graph, profiles, out, memory), {"config": BuilderConfig().to_json()})
    x = np.random.default_rng(1).standard_normal((32, 64)).astype(np.float32)
    np.testing.assert_allclose(engine.create_context().run({"x": x})["y"],
                               kiln.run_reference(_two_matmuls(), {"x": x})["y"], rtol=1e-4, atol=1e-4)


def test_cpu_builds_do_not_search() -> None:
    stats = kiln.build(_two_matmuls(), BuilderConfig()).plan.stats["tuning"]
    assert "refine" not in stats  # the search times CUDA graphs: GPU builds only
    assert BuilderConfig().to_json()["refine"] is True and BuilderConfig(refine=False).to_json()["refine"] is False


def test_the_reported_engine_time_after_is_the_time_before_times_the_kept_ratios() -> None:
    """No second measurement at the end (the card is warmer by then): unchanged means the same number."""
    g = Group("k1", [0, 1], [(10e-6, A), (10.1e-6, B)])
    for b_cost, kept in ((6.0, False), (4.0, True)):
        def bench(make: Any, feeds: Any, choices: list[Choice], b: float = b_cost) -> CostBench:
            return CostBench({"a": 5, "b": b}, choices)

        out, rep = refine.refine({g.key: g}, [A, A], lambda c: None, {}, TimingCache(), bench=bench)  # type: ignore
        assert rep.before_ms == pytest.approx(10 * 1e3)  # CostBench's first_s: 5 + 5 "seconds"
        assert bool(rep.kept) is kept and out == ([B, B] if kept else [A, A])
        assert rep.after_ms == pytest.approx(rep.before_ms * (0.8 if kept else 1.0))
