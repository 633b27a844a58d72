"""What the CPU tactics share: a CPU-only tactic base, type checks on a node, weights prepared once at build
time, and the reference as a fallback for run-time corner cases."""

from __future__ import annotations

import threading
import weakref
from abc import abstractmethod
from collections.abc import Callable, Hashable, Iterable
from typing import Any

import torch

from kiln.ir.dtype import DType
from kiln.ir.graph import Node, TensorType, Value
from kiln.ir.ops import get_op
from kiln.ir.ops.base import RefCtx
from kiln.kernels.base import Kernel, Tactic

F32 = frozenset({DType.FLOAT32})
F32_F64 = frozenset({DType.FLOAT32, DType.FLOAT64})


class CpuTactic(Tactic):
    """A tactic for the CPU; subclasses say which nodes they take in `supports`."""

    devices = frozenset({"cpu"})

    def applicable(self, node: Node, device: torch.device) -> bool:
        return super().applicable(node, device) and self.supports(node)

    @abstractmethod
    def supports(self, node: Node) -> bool:
        """Whether this tactic computes `node` exactly as the reference does (up to rounding)."""


def tensor_type(v: Value | None) -> TensorType | None:
    return v.type if v is not None and isinstance(v.type, TensorType) else None


def present(node: Node, i: int) -> bool:
    return i < len(node.inputs) and node.inputs[i] is not None


def dtypes_in(node: Node, allowed: frozenset[DType], inputs: Iterable[int] | None = None) -> bool:
    """Every listed input that is present (all, by default) and every output is a tensor of an allowed dtype."""
    idx = range(len(node.inputs)) if inputs is None else inputs
    values = [node.inputs[i] for i in idx if present(node, i)] + list(node.outputs)
    types = [tensor_type(v) for v in values]
    return all(t is not None and t.dtype in allowed for t in types)


def rank(node: Node, i: int) -> int | None:
    t = tensor_type(node.inputs[i]) if present(node, i) else None
    return None if t is None else t.rank


def static_shape(node: Node, i: int) -> tuple[int, ...] | None:
    t = tensor_type(node.inputs[i]) if present(node, i) else None
    if t is None or t.shape is None or not all(isinstance(d, int) for d in t.shape):
        return None
    return tuple(int(d) for d in t.shape)


def constant(node: Node, i: int) -> torch.Tensor | None:
    """Input i's value when it is a graph constant (the runtime passes exactly this tensor)."""
    v = node.inputs[i] if present(node, i) else None
    data = None if v is None else v.data
    return data if isinstance(data, torch.Tensor) else None


_SHARED: weakref.WeakValueDictionary[tuple[int, Hashable], torch.Tensor] = weakref.WeakValueDictionary()
_SHARED_LOCK = threading.Lock()


def prepared(node: Node, i: int, key: Hashable,
             fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """`fn` of input i, computed once at build time when input i is a constant. The kernel gets it back when
    called with that constant, and a fresh `fn(x)` for any other tensor (a kernel never trusts a stale copy).

    `key` names the derivation (with its parameters): the kernels of every execution context of an engine share
    one prepared copy of a weight while any of them is alive. (The cache holds it weakly, keyed by the
    constant's id, which stays valid because every kernel holding the copy also holds the constant.)"""
    src = constant(node, i)
    if src is None:
        return fn
    with _SHARED_LOCK:
        done = _SHARED.get((id(src), key))
        if done is None:
            done = _SHARED[(id(src), key)] = fn(src)
    return lambda x: done if x is src else fn(x)


def reference(node: Node) -> Kernel:
    """The op table's reference for `node`: the fallback for cases a fast path cannot express."""
    ref = get_op(node.op).ref
    ctx = RefCtx(node)
    return lambda xs: list(ref(ctx, xs))


def mkldnn_ops(*names: str) -> bool:
    """Whether torch was built with oneDNN and has these (private, but long-standing) mkldnn ops."""
    if not torch.backends.mkldnn.is_available():
        return False
    return all(hasattr(torch.ops.mkldnn, n) for n in names)


def empty(xs: list[Any]) -> bool:
    """Any tensor argument without elements (oneDNN primitives reject zero-sized problems)."""
    return any(isinstance(x, torch.Tensor) and x.numel() == 0 for x in xs)
