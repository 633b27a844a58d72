"""The reference executor: runs a graph node by node through the op table's torch references, on the CPU or
on a GPU (the references are device-agnostic; on CUDA they compute float32 in IEEE precision, without TF32).

This is the semantics every faster path is checked against. It also checks, node by node, that what the
reference produced matches what shape/dtype inference promised, so the two parts of each op entry keep each
other honest.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from kiln.ir import symbolic as sym
from kiln.ir.convert import from_numpy, to_numpy
from kiln.ir.dtype import DType
from kiln.ir.graph import Graph, Node, OptionalType, SequenceType, TensorType, Value, ValueType
from kiln.ir.ops import get_op
from kiln.ir.ops.base import RefCtx
from kiln.utils.errors import ExecutionError, InputError, KilnError

Feeds = Mapping[str, Any] | Sequence[Any]
Observer = Callable[[Node, list[Any], list[Any]], None]
"""Called after every node runs (subgraph nodes included) with its inputs and outputs."""


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"{DType.from_torch(x.dtype) if x.dtype in _TORCH_OK else x.dtype}{list(x.shape)}"
    if isinstance(x, np.ndarray):
        return f"{x.dtype}{list(x.shape)}"
    if isinstance(x, list):
        return f"seq[{len(x)}]"
    return type(x).__name__


_TORCH_OK = {dt.torch for dt in DType if dt is not DType.STRING and not dt.is_narrow}


class Scope:
    """Values computed so far; subgraphs see their enclosing scopes."""

    def __init__(self, parent: Scope | None = None, device: torch.device | None = None) -> None:
        self.vals: dict[Value, Any] = {}
        self.parent = parent
        self.device: torch.device | None = device if parent is None else parent.device
        self.consts: dict[Value, Any] = {} if parent is None else parent.consts
        """Constants moved to `device` once per run (the graph's own copies stay where they are)."""

    def get(self, v: Value) -> Any:
        s: Scope | None = self
        while s is not None:
            if v in s.vals:
                return s.vals[v]
            s = s.parent
        if v.data is not None:
            return self.const(v)
        raise KeyError(v.name)

    def const(self, v: Value) -> Any:
        d = v.data
        if self.device is None or not isinstance(d, torch.Tensor) or d.device == self.device:
            return d
        if v not in self.consts:
            self.consts[v] = d.to(self.device)
        return self.consts[v]


class tf32_mode:
    """TF32 for fp32 matmuls and convolutions on CUDA, on or off for the duration (restored afterwards). Engines
    run with the setting they were built (and tuned) with; the reference runs without (IEEE float32), so torch's
    process-wide defaults (cuDNN convolutions allow TF32) do not leak in."""

    def __init__(self, enabled: bool, device: torch.device | None) -> None:
        self.enabled = enabled
        self.active = device is not None and device.type == "cuda"
        self.prev: tuple[bool, bool] = (False, False)

    def __enter__(self) -> None:
        if self.active:
            self.prev = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = self.enabled

    def __exit__(self, *exc: Any) -> None:
        if self.active:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.prev


def to_device(x: Any, device: torch.device) -> Any:
    """A computed value on `device` (ops that create tensors, such as Constant or Range, make them on the CPU)."""
    if isinstance(x, torch.Tensor):
        return x if x.device == device else x.to(device)
    if isinstance(x, list):
        return [to_device(e, device) for e in x]
    return x


def reads(node: Node) -> set[Value]:
    """Every value a node reads, including outer values read inside its subgraphs."""
    out = {v for v in node.inputs if v is not None}
    for g in node.subgraphs():
        for inner in g.nodes:
            out |= reads(inner)
        out |= set(g.outputs)
    return out


class Interpreter:
    """Runs `graph` on `device` (the CPU by default). `run` takes numpy arrays or torch tensors and gives back
    the same kind."""

    def __init__(self, graph: Graph, *, check: bool = True, device: str | torch.device = "cpu",
                 observer: Observer | None = None) -> None:
        self.graph = graph
        self.check = check
        self.device = torch.device(device)
        self.observer = observer
        self._last_use: dict[int, dict[Value, int]] = {}

    # --- public ---------------------------------------------------------------------------------------

    def run(self, feeds: Feeds, outputs: Sequence[str] | None = None) -> Any:
        """Feeds by name (dict) or by position (list); returns a dict by name (or a list, for a list)."""
        as_list = not isinstance(feeds, Mapping)
        named = name_feeds(self.graph, feeds)
        torch_out = bool(named) and all(isinstance(x, torch.Tensor) for x in named.values())
        scope = Scope(device=self.device if self.device.type != "cpu" else None)
        bindings: dict[str, int] = {}
        for v in self.graph.inputs:
            scope.vals[v] = bind_input(v, named[v.name], bindings, self.device)
        wanted = select_outputs(self.graph, outputs)
        results = self._execute(self.graph, scope, bindings)
        by_value = dict(zip(self.graph.outputs, results))
        out = {v.name: export_value(by_value[v], v.type, torch_out) for v in wanted}
        return list(out.values()) if as_list else out

    def run_graph(self, graph: Graph, inputs: list[Any], parent: Scope, bindings: dict[str, int]) -> list[Any]:
        scope = Scope(parent)
        for v, x in zip(graph.inputs, inputs):  # a Loop's iteration count, a Scan's slices, ...: on the device
            scope.vals[v] = x if scope.device is None else to_device(x, scope.device)
        return self._execute(graph, scope, dict(bindings))

    # --- internals ------------------------------------------------------------------------------------

    def _last_uses(self, graph: Graph) -> dict[Value, int]:
        key = id(graph)
        if key not in self._last_use:
            self._last_use[key] = last_uses(graph)
        return self._last_use[key]

    def _execute(self, graph: Graph, scope: Scope, bindings: dict[str, int]) -> list[Any]:
        last = self._last_uses(graph)
        for i, node in enumerate(graph.nodes):
            args = [None if v is None else scope.get(v) for v in node.inputs]
            ctx = RefCtx(node, lambda g, xs: self.run_graph(g, xs, scope, bindings))
            try:
                with tf32_mode(False, scope.device):  # the reference computes in IEEE float32
                    results = list(get_op(node.op).ref(ctx, args))
            except KilnError:
                raise
            except Exception as e:
                shapes = ", ".join(_describe(a) for a in args)
                raise ExecutionError(
                    f"node '{node.name}' ({node.op}) failed on inputs ({shapes}): {type(e).__name__}: {e}"
                ) from e
            if scope.device is not None:
                results = [to_device(r, scope.device) for r in results]
            if len(results) < len(node.outputs):
                raise ExecutionError(
                    f"node '{node.name}' ({node.op}): reference gave {len(results)} outputs, "
                    f"{len(node.outputs)} expected"
                )
            for v, r in zip(node.outputs, results):
                if self.check:
                    check_result(node, v, r, bindings)
                scope.vals[v] = r
            if self.observer is not None:
                self.observer(node, args, results)
            for v in list(scope.vals):
                if last.get(v, -1) <= i and v not in graph.outputs:
                    del scope.vals[v]
        return [scope.get(v) for v in graph.outputs]


def name_feeds(graph: Graph, feeds: Feeds) -> dict[str, Any]:
    """Feeds as a dict by input name, checked: no unknown name, none missing, the right count."""
    names = [v.name for v in graph.inputs]
    if isinstance(feeds, Mapping):
        unknown = [k for k in feeds if k not in names]
        if unknown:
            raise InputError(f"unknown input '{unknown[0]}'; the model's inputs are: {', '.join(names) or 'none'}")
        missing = [n for n in names if n not in feeds]
        if missing:
            raise InputError(f"missing input '{missing[0]}' (the model needs: {', '.join(names)})")
        return dict(feeds)
    feeds = list(feeds)
    if len(feeds) != len(names):
        raise InputError(f"the model takes {len(names)} inputs ({', '.join(names)}), got {len(feeds)}")
    return dict(zip(names, feeds))


def select_outputs(graph: Graph, outputs: Sequence[str] | None) -> list[Value]:
    if outputs is None:
        return list(graph.outputs)
    by_name = {v.name: v for v in graph.outputs}
    missing = [o for o in outputs if o not in by_name]
    if missing:
        raise InputError(f"unknown output '{missing[0]}'; the model's outputs are: {', '.join(by_name)}")
    return [by_name[o] for o in outputs]


def export_value(x: Any, t: ValueType, as_torch: bool) -> Any:
    """A computed value as the caller wants it: torch tensors as they are, or numpy arrays of the kiln dtype."""
    if isinstance(t, SequenceType):
        return [export_value(e, t.elem, as_torch) for e in x]
    if isinstance(t, OptionalType):
        return None if x is None else export_value(x, t.elem, as_torch)
    if as_torch or not isinstance(x, torch.Tensor):
        return x
    return to_numpy(x, t.dtype if isinstance(t, TensorType) else None)


def last_uses(graph: Graph) -> dict[Value, int]:
    """For each value read in `graph`, the index of the last node reading it (graph outputs: len(nodes))."""
    last: dict[Value, int] = {}
    for i, n in enumerate(graph.nodes):
        for v in reads(n):
            last[v] = i
    for v in graph.outputs:
        last[v] = len(graph.nodes)
    return last


def bind_input(v: Value, x: Any, bindings: dict[str, int], device: torch.device | None = None) -> Any:
    """Check a fed value against its graph input and convert it to kiln storage; binds symbolic dims."""
    t = v.type
    if isinstance(t, SequenceType):
        if not isinstance(x, (list, tuple)):
            raise InputError(f"input '{v.name}' is a sequence ({t}); pass a list, got {type(x).__name__}")
        return [bind_input(Value(f"{v.name}[{i}]", t.elem), e, {}, device) for i, e in enumerate(x)]
    if isinstance(t, OptionalType):
        return None if x is None else bind_input(Value(v.name, t.elem), x, bindings, device)
    assert isinstance(t, TensorType)
    if isinstance(x, torch.Tensor):
        got = DType.from_torch(x.dtype) if x.dtype in _TORCH_OK else None
        if got is not t.dtype and not (t.dtype.is_narrow and x.dtype == t.dtype.torch):
            raise InputError(
                f"input '{v.name}' expects {t.dtype}, got torch {x.dtype}",
                hint=f"convert it first, e.g. x.to({t.dtype.torch})" if t.dtype is not DType.STRING else None,
            )
        data: Any = x.detach().to(device or "cpu")
    else:
        arr = np.asarray(x)
        try:  # ml_dtypes (bfloat16, float8, int4, ...) have kind "V" like structured arrays; ask DType
            got = DType.from_numpy(arr.dtype)
        except TypeError:
            got = None
        if got is not t.dtype:
            raise InputError(
                f"input '{v.name}' expects {t.dtype}, got numpy {arr.dtype}",
                hint=f"convert it first, e.g. x.astype(np.{t.dtype.numpy})" if t.dtype is not DType.STRING else None,
            )
        data, _ = from_numpy(arr, t.dtype)
        if device is not None and device.type != "cpu" and isinstance(data, torch.Tensor):
            data = data.to(device)
    check_shape(v.name, t.shape, tuple(data.shape), bindings, what="input")
    return data


def check_shape(name: str, want: tuple | None, got: tuple, bindings: dict[str, int], *, what: str) -> None:
    if want is None:
        return
    if len(want) != len(got):
        raise InputError(f"{what} '{name}' expects rank {len(want)} {_fmt(want)}, got shape {list(got)}")
    for i, (w, g) in enumerate(zip(want, got)):
        if isinstance(w, int):
            if w != g:
                raise InputError(f"{what} '{name}' expects shape {_fmt(want)}, got {list(got)} (dim {i})")
        elif w in bindings:
            if bindings[w] != g:
                raise InputError(
                    f"{what} '{name}' dim {i} is '{w}' = {bindings[w]} elsewhere, got {g} (shape {list(got)})"
                )
        elif sym.symbols(w) == {w}:
            bindings[w] = g


def _fmt(shape: tuple) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def check_result(node: Node, v: Value, r: Any, bindings: dict[str, int]) -> None:
    """The reference's output must match the inferred type: dtype exactly, static dims exactly."""
    t = v.type
    if isinstance(t, OptionalType):
        if r is None:
            return
        t = t.elem
    if isinstance(t, SequenceType):
        if not isinstance(r, list):
            raise ExecutionError(f"node '{node.name}' ({node.op}): output '{v.name}' should be a sequence")
        return
    assert isinstance(t, TensorType)
    if t.dtype is DType.STRING:
        ok = isinstance(r, np.ndarray) and r.dtype == object
    else:
        ok = isinstance(r, torch.Tensor) and r.dtype == t.dtype.torch
    if not ok:
        raise ExecutionError(
            f"node '{node.name}' ({node.op}): output '{v.name}' should be {t.dtype}, the reference gave "
            f"{_describe(r)} (an op table bug)"
        )
    try:
        check_shape(v.name, t.shape, tuple(r.shape), bindings, what="output")
    except InputError as e:
        raise ExecutionError(f"node '{node.name}' ({node.op}): {e.message} (inferred vs computed)") from None
