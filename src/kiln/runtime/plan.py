"""The plan an engine runs: the optimized graph, its optimization profiles, the tactic chosen for every node
under every profile, and the activation-memory plan. Built by `kiln.build`, stored in the engine file."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kiln.ir.graph import Graph
from kiln.runtime.serialize import Weights, graph_from_json, graph_to_json
from kiln.utils.errors import EngineFileError, InputError


@dataclass(frozen=True)
class ShapeRange:
    """min <= any shape this profile accepts <= max, dim by dim; tactics are tuned at `opt`."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def __post_init__(self) -> None:
        if not len(self.min) == len(self.opt) == len(self.max):
            raise ValueError(f"min/opt/max have different ranks: {self.min}, {self.opt}, {self.max}")
        for lo, mid, hi in zip(self.min, self.opt, self.max):
            if not 0 <= lo <= mid <= hi:
                raise ValueError(f"need 0 <= min <= opt <= max in every dim, got {self.min}/{self.opt}/{self.max}")

    @staticmethod
    def fixed(shape: Sequence[int]) -> ShapeRange:
        s = tuple(int(d) for d in shape)
        return ShapeRange(s, s, s)

    def covers(self, shape: Sequence[int]) -> bool:
        return len(shape) == len(self.min) and all(lo <= d <= hi for lo, d, hi in zip(self.min, shape, self.max))

    def __str__(self) -> str:
        def f(s: tuple[int, ...]) -> str:
            return "x".join(map(str, s))

        return f(self.min) if self.min == self.max else f"{f(self.min)}..{f(self.max)} (opt {f(self.opt)})"


@dataclass(frozen=True)
class Profile:
    """Shape ranges for the model's inputs (inputs of fully static shape may be left out)."""

    shapes: Mapping[str, ShapeRange]

    def mismatch(self, shapes: Mapping[str, tuple[int, ...]]) -> str | None:
        """None when every given shape is inside the profile, else why not."""
        for name, r in self.shapes.items():
            s = shapes.get(name)
            if s is not None and not r.covers(s):
                return f"input '{name}' has shape {list(s)}, the profile takes {r}"
        return None

    def to_json(self) -> dict[str, Any]:
        return {k: {"min": list(r.min), "opt": list(r.opt), "max": list(r.max)} for k, r in sorted(self.shapes.items())}

    @staticmethod
    def from_json(d: Mapping[str, Any]) -> Profile:
        return Profile({k: ShapeRange(tuple(v["min"]), tuple(v["opt"]), tuple(v["max"])) for k, v in d.items()})


@dataclass(frozen=True)
class Choice:
    """The tactic (and its configuration) that runs one node."""

    tactic: str
    config: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"tactic": self.tactic, "config": dict(sorted(self.config.items()))}


@dataclass(frozen=True)
class Slot:
    """Where a value lives in the arena: `nbytes` from `offset`, contiguous - or, with `strides` (in elements),
    a strided view there: a piece of a Concat output that its producer writes in place."""

    offset: int
    nbytes: int
    strides: tuple[int, ...] | None = None

    def to_json(self) -> list[Any]:
        return [self.offset, self.nbytes] if self.strides is None else [self.offset, self.nbytes, list(self.strides)]

    @staticmethod
    def from_json(v: Sequence[Any]) -> Slot:
        return Slot(int(v[0]), int(v[1]), None if len(v) < 3 else tuple(int(s) for s in v[2]))


@dataclass
class MemoryPlan:
    """Activations live in one arena per execution context, at these offsets (planned by liveness)."""

    arena_bytes: int = 0
    naive_bytes: int = 0
    slots: dict[str, Slot] = field(default_factory=dict)
    concats_in_place: list[str] = field(default_factory=list)
    """The outputs of Concats whose inputs are written straight into the output's slot (nothing left to copy)."""

    def to_json(self) -> dict[str, Any]:
        return {"arena_bytes": self.arena_bytes, "naive_bytes": self.naive_bytes,
                "slots": {k: s.to_json() for k, s in sorted(self.slots.items())},
                "concats_in_place": list(self.concats_in_place)}

    @staticmethod
    def from_json(d: Mapping[str, Any]) -> MemoryPlan:
        return MemoryPlan(int(d["arena_bytes"]), int(d["naive_bytes"]),
                          {k: Slot.from_json(v) for k, v in d["slots"].items()},
                          [str(n) for n in d.get("concats_in_place", [])])


@dataclass
class Plan:
    graph: Graph
    profiles: list[Profile]
    choices: list[list[Choice]]
    """choices[p][i]: the tactic for graph.nodes[i] under profile p."""
    memory: MemoryPlan
    stats: dict[str, Any] = field(default_factory=dict)

    def select_profile(self, shapes: Mapping[str, tuple[int, ...]]) -> int:
        reasons = []
        for i, p in enumerate(self.profiles):
            why = p.mismatch(shapes)
            if why is None:
                return i
            reasons.append(f"profile {i}: {why}")
        raise InputError("no optimization profile covers these input shapes: " + "; ".join(reasons),
                         hint="rebuild the engine with a profile that includes them (--min/--opt/--max-shapes)")

    def to_json(self, weights: Weights) -> dict[str, Any]:
        return {
            "graph": graph_to_json(self.graph, weights),
            "profiles": [p.to_json() for p in self.profiles],
            "choices": [[c.to_json() for c in per] for per in self.choices],
            "memory": self.memory.to_json(),
            "stats": self.stats,
        }

    @staticmethod
    def from_json(d: Mapping[str, Any], weights: Weights) -> Plan:
        try:
            graph = graph_from_json(d["graph"], weights)
            profiles = [Profile.from_json(p) for p in d["profiles"]]
            choices = [[Choice(c["tactic"], c.get("config", {})) for c in per] for per in d["choices"]]
            memory = MemoryPlan.from_json(d["memory"])
        except (KeyError, TypeError, ValueError) as e:
            raise EngineFileError(f"the engine's plan is malformed ({type(e).__name__}: {e})",
                                  hint="rebuild the engine") from None
        if len(choices) != len(profiles) or any(len(c) != len(graph.nodes) for c in choices):
            raise EngineFileError("the engine's plan does not match its graph", hint="rebuild the engine")
        return Plan(graph, profiles, choices, memory, dict(d.get("stats", {})))
