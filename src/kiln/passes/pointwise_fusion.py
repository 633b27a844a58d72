"""Pointwise fusion: connected groups of elementwise ops become one Fused node of kind "pointwise" (one kernel).

Elementwise (`ELEMENTWISE`, from the op table): output element i depends only on element i of each input after
numpy broadcasting - the unary math and activation ops, the binary and variadic arithmetic, comparison, logic
and bitwise ops, Where, Clip, PRelu, SwiGLU, Cast, and Expand with a constant shape (a pure broadcast). Left out:
Identity (a no-op for the cleanup passes, and it may carry sequences), ops with subgraphs, random ops (Dropout,
Bernoulli ...), quantization ops (they belong to the precision passes), and any node with a string or
unknown-rank input or output (data-dependent shapes).

A group grows from a seed (nodes in topological order) to producers and readers that are elementwise, while:
- it stays convex: no path leaves the group and comes back (so the fused node creates no cycle);
- it has one iteration domain: every node's output broadcasts into the group's largest output shape, and every
  value read outside the group (an output of the fused node) has exactly that shape, so one kernel over the
  domain writes every output (smaller values used only inside are recomputed per element).
A group of one node stays as it is. Values the group produces and the rest of the graph reads (or the graph
returns) are outputs of the fused node and keep their names, so multi-output groups stay correct. Subgraphs
(If/Loop/Scan bodies) are fused inside themselves.

Run after epilogue fusion, so activations after a Conv/Gemm/MatMul go to its epilogue rather than a kernel of
their own.
"""

from __future__ import annotations

from collections.abc import Sequence

from kiln.ir.dtype import DType
from kiln.ir.graph import Graph, Node, Shape, Value
from kiln.ir.ops.base import const_value
from kiln.passes.manager import PassResult
from kiln.passes.rewrite import Uses, fuse, graphs, reads

UNARY = frozenset({
    "Abs", "Neg", "Sign", "Reciprocal", "Ceil", "Floor", "Round", "Sqrt", "Exp", "Log", "Erf",
    "Sin", "Cos", "Tan", "Asin", "Acos", "Atan", "Sinh", "Cosh", "Asinh", "Acosh", "Atanh", "Tanh", "Sigmoid",
    "Relu", "LeakyRelu", "Elu", "Celu", "Selu", "ThresholdedRelu", "HardSigmoid", "HardSwish", "Softplus",
    "Softsign", "Mish", "Gelu", "Swish", "Shrink", "IsNaN", "IsInf", "Not", "BitwiseNot", "Cast",
})
BROADCASTING = frozenset({
    "Add", "Sub", "Mul", "Div", "Mod", "Pow", "Max", "Min", "Sum", "Mean",
    "Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "And", "Or", "Xor",
    "BitwiseAnd", "BitwiseOr", "BitwiseXor", "BitShift", "Where", "Clip", "PRelu", "SwiGLU",
})
ELEMENTWISE = UNARY | BROADCASTING | {"Expand"}


def pointwise_fusion(graph: Graph) -> PassResult:
    groups = nodes = 0
    for g in graphs(graph):
        for region in _regions(g):
            groups += 1
            nodes += len(region)
    return PassResult.of(groups=groups, nodes_fused=nodes)


# --- the elementwise set and shapes ----------------------------------------------------------------------


def is_elementwise(n: Node) -> bool:
    """An elementwise node kiln can generate a kernel for (see the module docstring)."""
    if n.op not in ELEMENTWISE or len(n.outputs) != 1 or n.subgraphs():
        return False
    if n.op == "Expand" and (const_value(n.inputs[1]) is None or n.inputs[0] is None):
        return False
    tensors = [v for v in n.inputs[:1] if v is not None] if n.op == "Expand" else [v for v in n.inputs if v]
    return all(_plain(v) for v in [*tensors, n.outputs[0]])


def _plain(v: Value) -> bool:
    return v.is_tensor and v.shape is not None and v.dtype is not DType.STRING


def fits(small: Shape | None, big: Shape | None) -> bool:
    """Whether a tensor of shape `small` broadcasts to `big` without growing it."""
    if small is None or big is None or len(small) > len(big):
        return False
    return all(d == 1 or d == b for d, b in zip(small, big[len(big) - len(small):]))


# --- growing groups ---------------------------------------------------------------------------------------


def _regions(g: Graph) -> list[list[Node]]:
    """Grow and fuse groups one at a time, seeds in topological order (later groups see earlier ones as single
    nodes, so no two groups can form a cycle)."""
    done: list[list[Node]] = []
    tried: set[int] = set()
    state = Fusing(g)
    for seed in list(g.nodes):
        if id(seed) in tried or id(seed) not in state.order or not is_elementwise(seed):
            continue
        region = _Grower(state).grow(seed)
        tried.update(id(n) for n in region)
        if len(region) > 1:
            state.fuse(region, "pointwise")
            done.append(region)
    return done


class Fusing:
    """A graph being fused region by region: its uses and a topological position for every node, kept current
    (a fused node takes its last member's position) so that each fusion costs about the size of its region."""

    def __init__(self, g: Graph) -> None:
        self.g = g
        self.uses = Uses.of(g)
        self.order = {id(n): i for i, n in enumerate(g.nodes)}

    def fuse(self, region: list[Node], kind: str) -> Node:
        last = max(self.order[id(n)] for n in region)
        node = fuse(self.g, region, kind, uses=self.uses)
        for n in region:
            del self.order[id(n)]
        self.order[id(node)] = last
        readers = (r for v in node.outputs for r in self.uses.readers.get(v, ()))
        if any(self.order[id(r)] < last for r in readers):  # a reader of an extra output came before the last member
            self.g.toposort()
            self.order = {id(n): i for i, n in enumerate(self.g.nodes)}
        return node


class _Grower:
    def __init__(self, state: Fusing) -> None:
        self.uses = state.uses
        self.order = state.order

    def grow(self, seed: Node) -> list[Node]:
        region = [seed]
        ids = {id(seed)}
        domain = seed.outputs[0].shape
        queue = self._neighbours(seed)
        while queue:
            n = queue.pop(0)
            if id(n) in ids or not is_elementwise(n):
                continue
            d = _domain(domain, n.outputs[0].shape)
            if d is None or not self._outputs_fit([*region, n], d) or not self._convex_with(region, ids, n):
                continue
            region.append(n)
            ids.add(id(n))
            domain = d
            queue.extend(self._neighbours(n))
        return region

    def _neighbours(self, n: Node) -> list[Node]:
        producers = [v.producer for v in n.inputs if v is not None and v.producer is not None]
        readers = [r for v in n.outputs for r in self.uses.readers.get(v, ())]
        return [m for m in producers + readers if id(m) in self.order]

    def _outputs_fit(self, region: list[Node], domain: Shape) -> bool:
        """Every value read outside the group (or returned by the graph) has the domain's shape."""
        ids = {id(n) for n in region}
        for n in region:
            v = n.outputs[0]
            outside = v in self.uses.outputs or any(id(r) not in ids for r in self.uses.readers.get(v, ()))
            if outside and tuple(v.shape or ()) != tuple(domain):
                return False
        return True

    def _convex_with(self, region: list[Node], ids: set[int], n: Node) -> bool:
        """Adding n keeps the group convex: no path n -> outside -> group, nor group -> outside -> n."""
        lo = min(self.order[id(m)] for m in region)
        hi = max(self.order[id(m)] for m in region)
        after = [r for v in n.outputs for r in self.uses.readers.get(v, ()) if id(r) not in ids]
        before = [v.producer for v in reads(n) if v.producer is not None and id(v.producer) not in ids]
        return not self._reaches(after, ids, hi) and not self._reached(before, ids, lo)

    def _reaches(self, starts: Sequence[Node], targets: set[int], hi: int) -> bool:
        """Whether a path from `starts` leads to a target (only nodes up to position hi can)."""
        stack, seen = list(starts), set()
        while stack:
            m = stack.pop()
            if id(m) in targets:
                return True
            if id(m) in seen or self.order.get(id(m), hi + 1) > hi:
                continue
            seen.add(id(m))
            stack.extend(r for v in m.outputs for r in self.uses.readers.get(v, ()))
        return False

    def _reached(self, starts: Sequence[Node], sources: set[int], lo: int) -> bool:
        """Whether a path from a source leads to one of `starts` (only nodes from position lo on are reached)."""
        stack, seen = list(starts), set()
        while stack:
            m = stack.pop()
            if id(m) in sources:
                return True
            if id(m) in seen or self.order.get(id(m), -1) < lo:
                continue
            seen.add(id(m))
            stack.extend(v.producer for v in reads(m) if v.producer is not None)
        return False


def _domain(a: Shape | None, b: Shape | None) -> Shape | None:
    """The larger of two shapes when one broadcasts into the other, else None."""
    if fits(b, a):
        return a
    if fits(a, b):
        return b
    return None
