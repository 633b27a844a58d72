"""Engines and execution contexts.

An `Engine` holds a plan and its weights, on one device, once. `create_context()` gives an `ExecutionContext`
with its own activation arena; several contexts may share one engine (one context per thread).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kiln.ir.dtype import DType
from kiln.ir.graph import Graph, TensorType, Value
from kiln.ir.interpreter import (
    Feeds,
    Interpreter,
    Scope,
    bind_input,
    export_value,
    last_uses,
    name_feeds,
    select_outputs,
    tf32_mode,
    to_device,
)
from kiln.kernels import pdl, registry
from kiln.kernels.base import Kernel, plan_layouts
from kiln.runtime import engine_file
from kiln.runtime.cuda_graphs import GraphCache, copy_all
from kiln.runtime.device import DeviceInfo, describe
from kiln.runtime.plan import Plan
from kiln.utils.errors import EngineFileError, ExecutionError, InputError, KilnError
from kiln.utils.version import __version__

ARENA_ALIGN = 256


def versions() -> dict[str, str | None]:
    """Library versions recorded in engines (and in timing-cache keys)."""
    try:
        import triton

        triton_version: str | None = triton.__version__
    except ImportError:
        triton_version = None
    return {"kiln": __version__, "torch": torch.__version__, "triton": triton_version,
            "cuda": torch.version.cuda}


def concrete(device: torch.device) -> torch.device:
    """"cuda" as the GPU it means now ("cuda:0"), so it compares equal to the device tensors report."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _all_graphs(g: Graph) -> list[Graph]:
    out = [g]
    for n in g.nodes:
        for sub in n.subgraphs():
            out.extend(_all_graphs(sub))
    return out


def place_constants(graph: Graph, device: torch.device) -> None:
    """Moves every constant of `graph` and its subgraphs to `device`, in place: the weights the kernels get (and
    prepare once, `kiln.kernels.cpu.common.prepared`) are then these very tensors."""
    for g in _all_graphs(graph):
        for v in g.initializers.values():
            if isinstance(v.data, torch.Tensor) and v.data.device != device:
                v.data = v.data.to(device)
        for n in g.nodes:  # Constant nodes' values too, so they are not copied to the device on every run
            value = n.attrs.get("value") if n.op == "Constant" else None
            if isinstance(value, torch.Tensor) and value.device != device:
                n.attrs["value"] = value.to(device)


class Engine:
    """A built model for one device: plan + weights (held once) + metadata."""

    def __init__(self, plan: Plan, metadata: dict[str, Any], device: str | torch.device = "cpu") -> None:
        self.plan = plan
        self.metadata = metadata
        self.device = concrete(torch.device(device))
        place_constants(plan.graph, self.device)
        self._last_use = last_uses(plan.graph)
        self.tf32 = bool(metadata.get("config", {}).get("tf32", True))
        pdl_on = metadata.get("config", {}).get("pdl")
        self.pdl: bool | None = None if pdl_on is None else bool(pdl_on)
        """Programmatic dependent launch for its Triton kernels (`kiln.kernels.pdl`; None: as KILN_PDL says)."""

    @property
    def graph(self) -> Graph:
        return self.plan.graph

    @property
    def inputs(self) -> list[Value]:
        return list(self.plan.graph.inputs)

    @property
    def outputs(self) -> list[Value]:
        return list(self.plan.graph.outputs)

    @property
    def device_info(self) -> DeviceInfo:
        return DeviceInfo.from_json(self.metadata["device"])

    def create_context(self, *, cuda_graphs: bool = True, capture_after: int = 2) -> ExecutionContext:
        """A context to run the engine with. On a GPU, `cuda_graphs` captures the whole plan once per input shape
        and replays it (no per-step launch overhead): on the shape's `capture_after`-th run (the runs before, and
        shapes that cannot be captured, run step by step - a shape seen once never pays for a capture)."""
        return ExecutionContext(self, cuda_graphs=cuda_graphs, capture_after=capture_after)

    def header(self, weights: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {**self.metadata, "plan": self.plan.to_json(weights)}

    def save(self, path: str | os.PathLike[str]) -> int:
        """Write the engine file; returns its size in bytes."""
        weights: dict[str, torch.Tensor] = {}
        header = self.header(weights)
        return engine_file.write(path, header, weights)

    def to_bytes(self) -> bytes:
        weights: dict[str, torch.Tensor] = {}
        header = self.header(weights)
        return engine_file.dumps(header, weights)


def check_device(meta: Mapping[str, Any], device: torch.device, where: str) -> None:
    """Raise EngineFileError when the engine was built for another device."""
    built = DeviceInfo.from_json(meta["device"])
    here = describe(device)
    if not built.compatible(here):
        raise EngineFileError(
            f"'{where}' was built on {built.short()}, this is {here.short()}",
            hint="rebuild it here, or load it with retune=True (kiln: --retune) to re-tune its stored graph",
        )


def engine_from_blob(blob: engine_file.EngineBlob, device: str | torch.device, where: str,
                     *, check: bool = True) -> Engine:
    header = dict(blob.header)
    if "plan" not in header or "device" not in header:
        raise EngineFileError(f"'{where}' has no plan or device record", hint="rebuild the engine")
    dev = torch.device(device)
    if check:
        check_device(header, dev, where)
    plan = Plan.from_json(header.pop("plan"), blob.weights)
    return Engine(plan, header, dev)


def load_engine(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> Engine:
    """Load an engine file for `device`; every problem is an EngineFileError saying what to do."""
    p = os.fspath(path)
    return engine_from_blob(engine_file.read(p), device, p)


@dataclass
class Call:
    """One run in progress: the bound inputs, symbol values, chosen profile and how to answer."""

    env: dict[Value, Any]
    bindings: dict[str, int]
    profile: int
    wanted: list[Value]
    as_list: bool
    torch_in: bool
    out_device: torch.device | None


class ExecutionContext:
    """Runs an engine; not meant to be used by two threads at once.

    On the CPU, activations live in the context's arena, at the offsets of the engine's memory plan. On a GPU
    they come from the CUDA caching allocator - inside CUDA graphs, from the graphs' private pool, where
    liveness gives the same reuse - so that kernels write their results once, where they stay."""

    def __init__(self, engine: Engine, cuda_graphs: bool = True, capture_after: int = 2) -> None:
        self.engine = engine
        self.device = engine.device
        self.graphs = (GraphCache(self.device, capture_after=capture_after)
                       if self.device.type == "cuda" and cuda_graphs else None)
        self._pinned: dict[str, torch.Tensor] = {}
        self._kernels: dict[int, list[Kernel]] = {}
        self._checks: list[Any] = []
        """The built kernels' `DeferredCheck`s (read after runs whose results reach the host)."""
        self._arena: torch.Tensor | None = None
        self._scope = Scope(device=self.device if self.device.type != "cpu" else None)  # subgraph values
        self._bindings: dict[str, int] = {}
        self._interp = Interpreter(engine.graph, check=False)
        self.last_profile: int | None = None

    @property
    def arena_bytes(self) -> int:
        return self.engine.plan.memory.arena_bytes

    def run(self, feeds: Feeds, outputs: Sequence[str] | None = None, *, stream: Any = None) -> Any:
        """Run once. Numpy arrays in give numpy arrays out; torch tensors give torch tensors (on the device of
        the inputs). Feeds by name (dict) or by position (list, answered with a list).

        `stream` (a torch.cuda.Stream, GPU engines): the work is queued on it and the call returns without waiting
        for the GPU when inputs and outputs are device tensors; the outputs are ready once that stream gets there
        (synchronize it, or make another stream wait on it, before reading them)."""
        if stream is not None and self.device.type == "cuda":
            with torch.cuda.stream(stream):
                return self._run(feeds, outputs)
        return self._run(feeds, outputs)

    def _run(self, feeds: Feeds, outputs: Sequence[str] | None) -> Any:
        call = self.prepare(feeds, outputs)
        results = self._replay(call) if self.graphs is not None else None
        if results is None:
            results = self.execute(call.profile, call.env, call.bindings)
        out = self.finish(call, results)
        if not (call.torch_in and call.out_device is not None and call.out_device.type != "cpu"):
            self.check()  # the results are on the host: the device has finished, reading its flags costs nothing
        return out

    def check(self) -> None:
        """Raise what kernels found wrong in the data of the runs so far (`kernels.base.DeferredCheck`: e.g. a
        Gather index out of range on a GPU). Runs whose results come back to the host check by themselves; a run
        on device tensors is checked by the next such run or by calling this (which waits for the device)."""
        for deferred in self._checks:
            message = deferred.raised()
            if message is not None:
                raise InputError(message, hint="check the input data (token ids within the vocabulary, indices "
                                               "within the gathered axis)")

    def _replay(self, call: Call) -> dict[Value, Any] | None:
        """The run through the CUDA graph captured for these input shapes; None when it cannot be captured."""
        graph = self.engine.graph
        feeds = {v.name: call.env[v] for v in graph.inputs}
        if self.graphs is None or not all(isinstance(x, torch.Tensor) and x.device == self.device
                                          for x in feeds.values()):
            return None
        key = (call.profile, tuple((k, tuple(x.shape), x.dtype) for k, x in feeds.items()))
        names = {v.name: v for v in graph.inputs}

        def fn(static: dict[str, torch.Tensor]) -> dict[str, Any]:
            env: dict[Value, Any] = {names[k]: x for k, x in static.items()}
            out = self.execute(call.profile, env, dict(call.bindings))
            return {v.name: x for v, x in out.items()}

        got = self.graphs.run(key, feeds, fn)
        if got is None:
            return None
        out = {v: got[v.name] for v in graph.outputs}
        # the graph's own buffers are overwritten by its next replay: the caller gets copies, made in one launch
        held = [v for v, x in out.items() if isinstance(x, torch.Tensor)]
        copies = [torch.empty_like(out[v]) for v in held]
        copy_all(copies, [out[v] for v in held])
        out.update(zip(held, copies))
        return out

    def prepare(self, feeds: Feeds, outputs: Sequence[str] | None = None) -> Call:
        """Check and place the inputs on the device, and pick the profile (the first phase of `run`)."""
        graph = self.engine.graph
        named = name_feeds(graph, feeds)
        torch_in = bool(named) and all(isinstance(x, torch.Tensor) for x in named.values())
        out_device = next((x.device for x in named.values() if isinstance(x, torch.Tensor)), None)
        bindings: dict[str, int] = {}
        env: dict[Value, Any] = {}
        for v in graph.inputs:
            env[v] = bind_input(v, self._staged(v, named[v.name]), bindings, self.device)
        shapes = {v.name: tuple(env[v].shape) for v in graph.inputs if isinstance(env[v], torch.Tensor)}
        profile = self.engine.plan.select_profile(shapes)
        self.last_profile = profile
        return Call(env, bindings, profile, select_outputs(graph, outputs), not isinstance(feeds, Mapping),
                    torch_in, out_device)

    def _staged(self, v: Value, x: Any) -> Any:
        """A host array bound for the GPU, copied into this context's pinned buffer for it first: the copy to the
        device then runs at full bus speed, not through the driver's pageable staging. (The device copy that
        follows is synchronous, so the buffer is free again when the next run refills it.)"""
        if self.device.type != "cuda" or not isinstance(x, np.ndarray) or not isinstance(v.type, TensorType):
            return x
        if x.dtype.kind not in "biuf" or x.dtype.itemsize > 8 or DType.from_numpy(x.dtype) is not v.type.dtype:
            return x  # bind_input explains what is wrong, or converts what torch cannot hold
        t = torch.from_numpy(x if x.flags.c_contiguous else np.ascontiguousarray(x))  # why: that makes 0-d 1-d
        buf = self._pinned.get(v.name)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = self._pinned[v.name] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        buf.copy_(t)
        return buf

    def finish(self, call: Call, results: Mapping[Value, Any]) -> Any:
        """Hand the outputs back in the caller's kind (the last phase of `run`)."""
        out = {}
        for v in call.wanted:
            x = results[v]
            if call.torch_in and isinstance(x, torch.Tensor) and call.out_device is not None:
                x = x.to(call.out_device)
            out[v.name] = export_value(x, v.type, call.torch_in)
        return list(out.values()) if call.as_list else out

    # --- execution ----------------------------------------------------------------------------------

    def kernels(self, profile: int) -> list[Kernel]:
        if profile not in self._kernels:
            plan = self.engine.plan
            built = []
            layouts = plan.graph.layouts if self.device.type == "cuda" else {}
            with pdl.mode(self.engine.pdl):  # generated kernels take it in their source
                for node, choice in zip(plan.graph.nodes, plan.choices[profile]):
                    tactic = registry.get(choice.tactic)
                    kernel = tactic.build(node, dict(choice.config), self.device, self._run_subgraph)
                    plan_layouts(kernel, node, layouts)
                    built.append(kernel)
            self._kernels[profile] = built
            self._checks += [c for k in built for c in getattr(k, "checks", ())]
        return self._kernels[profile]

    def _run_subgraph(self, g: Graph, xs: list[Any]) -> list[Any]:
        return self._interp.run_graph(g, xs, self._scope, self._bindings)

    def arena(self) -> torch.Tensor:
        if self._arena is None:
            self._arena = torch.empty(max(self.arena_bytes, 1), dtype=torch.uint8, device=self.device)
        return self._arena

    def execute(self, profile: int, env: dict[Value, Any], bindings: dict[str, int],
                hook: Any = None) -> dict[Value, Any]:
        """Run every step; `env` holds the graph inputs. Returns the graph outputs by value. `hook(i, node,
        outputs)` is called after each step (used by profiling and per-layer comparison)."""
        graph = self.engine.plan.graph
        self._scope.vals = env
        self._bindings = bindings
        with tf32_mode(self.engine.tf32, self.device), pdl.mode(self.engine.pdl):
            self._steps(profile, env, hook)
        return {v: (v.data if v.data is not None else env[v]) for v in graph.outputs}

    def _steps(self, profile: int, env: dict[Value, Any], hook: Any) -> None:
        plan = self.engine.plan
        graph = plan.graph
        kernels = self.kernels(profile)
        slots = plan.memory.slots
        arena = self.arena() if slots and self.device.type == "cpu" else None
        layouts = graph.layouts if self.device.type == "cuda" else {}
        for v in graph.inputs:
            if v.name in layouts and v in env:
                env[v] = to_layout(env[v])
        last = self.engine._last_use
        outputs = set(graph.outputs)
        for i, (node, kernel) in enumerate(zip(graph.nodes, kernels)):
            args = [None if v is None else (v.data if v.data is not None else env[v]) for v in node.inputs]
            try:
                results = kernel(args)
            except KilnError:
                raise
            except Exception as e:
                raise ExecutionError(
                    f"node '{node.name}' ({node.op}, tactic {plan.choices[profile][i].tactic}) failed: "
                    f"{type(e).__name__}: {e}"
                ) from e
            for v, r in zip(node.outputs, results):
                if v.name in layouts:
                    r = to_layout(r)
                env[v] = self._place(v, r, slots.get(v.name), arena, keep=v in outputs)
            if hook is not None:
                hook(i, node, [env[v] for v in node.outputs])
            for inp in node.inputs:
                if inp is not None and inp in env and last.get(inp, -1) <= i and inp not in outputs \
                        and inp not in graph.inputs:
                    del env[inp]

    def _place(self, v: Value, r: Any, slot: Any, arena: torch.Tensor | None, keep: bool) -> Any:
        """Put a result in its arena slot; never let a value that outlives the arena's reuse alias it."""
        r = to_device(r, self.device)
        if not isinstance(r, torch.Tensor) or arena is None:
            return r
        in_arena = r.untyped_storage().data_ptr() == arena.untyped_storage().data_ptr()
        if slot is not None and not keep and isinstance(v.type, TensorType) and r.device == arena.device:
            view = _slot_view(arena, slot, r)
            if view is not None:
                if view.data_ptr() != r.data_ptr() or view.stride() != r.stride():
                    view.copy_(r)
                return view
        return r.clone() if in_arena else r


def to_layout(x: Any) -> Any:
    """A 4-D tensor in channels-last memory order (the layout pass chose it for this value)."""
    if isinstance(x, torch.Tensor) and x.dim() == 4 and not x.is_contiguous(memory_format=torch.channels_last):
        return x.contiguous(memory_format=torch.channels_last)
    return x


def _slot_view(arena: torch.Tensor, slot: Any, r: torch.Tensor) -> torch.Tensor | None:
    """The arena view where `r` belongs (contiguous, or strided for a piece of an in-place Concat); None when `r`
    does not fit (a shape the plan did not foresee)."""
    size = r.element_size()
    if slot.strides is None:
        nbytes = r.numel() * size
        return arena[slot.offset:slot.offset + nbytes].view(r.dtype).view(r.shape) if nbytes <= slot.nbytes else None
    if len(slot.strides) != r.dim() or slot.offset % size:
        return None
    extent = sum((d - 1) * s for d, s in zip(r.shape, slot.strides)) + 1
    if extent * size > slot.nbytes:
        return None
    typed = arena[slot.offset:slot.offset + slot.nbytes].view(r.dtype)
    return typed.as_strided(tuple(r.shape), slot.strides)
