"""Epilogue fusion: a Conv, ConvTranspose, Gemm or MatMul (the anchor) and the chain of elementwise ops after it
become one Fused node of kind "epilogue", rendered by one GEMM/conv template.

The body is data for that template, the same shape for every anchor:
- body.nodes[0] is the anchor, unchanged; its own bias input stays (Conv/ConvTranspose B, Gemm C with beta);
- body.nodes[1:] is the epilogue list. Step i reads the previous step's output (the accumulator, in any input
  position, possibly twice as in Mul(acc, acc)); its other inputs are operands: constants, or tensors computed
  before the anchor, each broadcasting to the anchor's output shape without growing it (a bias [N], a
  per-channel [M,1,1], a full-size residual, a scalar Clip bound). A MatMul has no bias input, so its bias is the
  first step, Add(acc, b): "linear with bias" is Fused[epilogue: MatMul+Add] at every rank (a 2-D one stays a
  MatMul, not a Gemm, so one form serves both);
- outputs: the last step's value, plus any earlier value that is read elsewhere (an extra output, written too).

A model output that ends a chain keeps its declared (symbolic) shape: it still joins (`_keeps`).

Epilogue steps (`EPILOGUE_OPS`): activations (Relu, Clip (Relu6), LeakyRelu, PRelu, Elu, Celu, Selu,
ThresholdedRelu, Sigmoid, HardSigmoid, Swish, HardSwish, Gelu (erf and tanh), Tanh, Mish, Softplus, Softsign),
arithmetic (Add, Sub, Mul, Div, Sum, Max, Min: bias, scale, residual), a few unary math ops, and Cast to a float
type. A step joins when it is the only reader of the accumulator that qualifies (the accumulator's other readers
then read an extra output), its output keeps the anchor's shape, no operand depends on the anchor (no cycle) and
no operand is an earlier value of the chain.

Rewrite cases (canonical activations first, graph-wide, so the epilogue stays a list of single ops):
- Mul(x, Sigmoid(x)) -> Swish(x) (SiLU);  Mul(x, HardSigmoid(x; alpha=1/6, beta=1/2)) -> HardSwish(x);
  Mul(x, Tanh(Softplus(x))) -> Mish(x)  (the inner values having no other reader);
- Split(x) -> act(part) for every part, the same activation -> Split(act(x)) (so that sibling Convs/MatMuls
  merged into one wider op keep their activation in its epilogue);
- anchor -> step -> step ... -> Fused(kind="epilogue").

Order: after BatchNormalization folding (a BN between a Conv and its Relu blocks the chain), after the pattern
passes that produce Gelu/LayerNorm/attention and merge MatMuls (an epilogue hides its anchor from them), before
pointwise fusion (which would otherwise take the activations).
"""

from __future__ import annotations

from kiln.ir.graph import Graph, Node, Value
from kiln.passes.manager import PassResult
from kiln.passes.pattern import apply_rules, rule
from kiln.passes.pointwise_fusion import Fusing, fits
from kiln.passes.rewrite import Uses, graphs, reads, redirect

ANCHORS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
ACTIVATIONS = frozenset({
    "Relu", "Clip", "LeakyRelu", "PRelu", "Elu", "Celu", "Selu", "ThresholdedRelu", "Sigmoid", "HardSigmoid",
    "Swish", "HardSwish", "Gelu", "Tanh", "Mish", "Softplus", "Softsign",
})
ARITHMETIC = frozenset({"Add", "Sub", "Mul", "Div", "Sum", "Max", "Min", "Neg", "Abs", "Sqrt", "Exp", "Erf",
                        "Reciprocal", "Cast"})
EPILOGUE_OPS = ACTIVATIONS | ARITHMETIC


def extend_epilogues(graph: Graph) -> PassResult:
    """Steps that appeared after epilogue fusion (the float32 Cast that FP16 lowering puts before a model output,
    ...) join the epilogue before them: a Fused[epilogue] node whose one output has the step as its only reader
    takes it into its body; a bare anchor is fused with it as `epilogue_fusion` would. One kernel less per
    output at batch 1. Run after precision (`kiln.passes.pipeline.LATE`)."""
    counts: dict[str, int] = {}
    for g in graphs(graph):
        state = Fusing(g)
        for n in [n for n in g.nodes if len(n.outputs) == 1 and (n.op in ANCHORS or _is_epilogue(n))]:
            steps = _private_prefix(n, _Chain(n, state.uses, state.order).grow(), state.uses)
            if not steps:
                continue
            if n.op == "Fused":
                _append(g, n, steps)
                state = Fusing(g)
            else:
                state.fuse([n, *steps], "epilogue")
            counts["steps"] = counts.get("steps", 0) + len(steps)
    return PassResult(bool(counts), counts)


def _is_epilogue(n: Node) -> bool:
    return n.op == "Fused" and n.attrs["kind"] == "epilogue" and len(n.attrs["body"].outputs) == 1


def _private_prefix(n: Node, chain: list[Node], uses: Uses) -> list[Node]:
    """The steps of `chain` whose accumulator has no other reader and is no model output (no extra outputs: the
    GEMM and conv templates write one)."""
    out, acc = [], n.outputs[0]
    for step in chain:
        if uses.only_reader(acc) is not step:
            break
        out.append(step)
        acc = step.outputs[0]
    return out


def _append(graph: Graph, node: Node, steps: list[Node]) -> None:
    """Moves `steps` (a chain reading `node`'s one output) into `node`'s epilogue body."""
    body: Graph = node.attrs["body"]
    inner = {node.outputs[0]: body.outputs[0]}
    for step in steps:
        for v in step.inputs:
            if v is not None and v not in inner:
                if v in node.inputs:
                    inner[v] = body.inputs[node.inputs.index(v)]
                else:
                    inner[v] = Value(graph.fresh_name(f"{v.name}.in"), v.type)
                    body.inputs.append(inner[v])
                    node.inputs.append(v)
        step.inputs = [inner.get(v, v) if v is not None else None for v in step.inputs]
        out = step.outputs[0]
        inner[out] = Value(graph.fresh_name(f"{out.name}.inner"), out.type)
        inner[out].producer = step
        step.outputs = [inner[out]]
        body.nodes.append(step)
    last = steps[-1]
    body.outputs = [last.outputs[0]]
    outer = next(v for v, i in inner.items() if i is last.outputs[0])
    graph.remove_nodes(steps)
    node.outputs = [outer]
    outer.producer = node
    node.name = body.name = f"{node.name} + {' + '.join(st.name for st in steps)}"
    graph.use_name(node.name)


def epilogue_fusion(graph: Graph) -> PassResult:
    counts: dict[str, int] = {}
    for g in graphs(graph):
        for k, v in apply_rules(g, ACTIVATION_RULES).counts.items():
            counts[k] = counts.get(k, 0) + v
        for anchor, chain in _fuse_all(g):
            key = "linear_bias" if anchor.op == "MatMul" and chain[0].op == "Add" else "epilogues"
            counts[key] = counts.get(key, 0) + 1
            counts["steps"] = counts.get("steps", 0) + len(chain)
    return PassResult(bool(counts), counts)


# --- canonical activations ------------------------------------------------------------------------------


def _times_itself(graph: Graph, n: Node, uses: Uses) -> str | None:
    """Mul(x, f(x)) with f a known activation body -> one activation node."""
    for i in (0, 1):
        x, fx = n.inputs[i], n.inputs[1 - i]
        if x is None or fx is None or fx.producer is None or uses.only_reader(fx) is not n:
            continue
        match = _activation_of(x, fx.producer, uses)
        if match is not None:
            op, attrs = match
            at = graph.nodes.index(n)
            (y,) = graph.add(op, [x], attrs, name=graph.fresh_name(f"{n.name}.{op.lower()}"))
            graph.nodes.insert(at, graph.nodes.pop())
            redirect(graph, n.outputs[0], y)
            graph.remove_nodes([n, fx.producer, *_inner(fx.producer)])
            return op.lower()
    return None


def _activation_of(x: Value, f: Node, uses: Uses) -> tuple[str, dict] | None:
    if f.op == "Sigmoid" and f.inputs[0] is x:
        return "Swish", {"alpha": 1.0}
    if (f.op == "HardSigmoid" and f.inputs[0] is x and abs(f.attrs["alpha"] - 1 / 6) < 1e-6
            and abs(f.attrs["beta"] - 0.5) < 1e-6):
        return "HardSwish", {}
    if f.op == "Tanh" and f.inputs[0] is not None:
        sp = f.inputs[0].producer
        if sp is not None and sp.op == "Softplus" and sp.inputs[0] is x and uses.only_reader(f.inputs[0]) is f:
            return "Mish", {}
    return None


def _inner(f: Node) -> list[Node]:
    """Nodes of the activation body below f (Softplus under Mish's Tanh)."""
    p = f.inputs[0].producer if f.op == "Tanh" and f.inputs[0] is not None else None
    return [p] if p is not None else []


def _hoist_through_split(graph: Graph, n: Node, uses: Uses) -> str | None:
    """Split(x) whose every part feeds the same activation -> Split(act(x)): elementwise ops commute with Split,
    and the activation can then join the epilogue of x's producer (siblings merged into one wider Conv/MatMul)."""
    x = n.inputs[0]
    acts = [uses.only_reader(o) for o in n.outputs]
    first = acts[0]
    if x is None or first is None or first.op not in ACTIVATIONS or first.op == "PRelu":
        return None
    if any(a is None or not _same_step(a, first) or a.inputs[0] is not o or len(a.outputs) != 1
           for a, o in zip(acts, n.outputs)):
        return None
    at = graph.nodes.index(n)
    name = graph.fresh_name(f"{first.name}.hoisted")
    (y,) = graph.add(first.op, [x, *first.inputs[1:]], dict(first.attrs), name=name)
    graph.nodes.insert(at, graph.nodes.pop())
    n.inputs[0] = y
    for a, o in zip(acts, n.outputs):
        assert a is not None
        redirect(graph, a.outputs[0], o)
    graph.remove_nodes([a for a in acts if a is not None])
    return "hoisted_through_split"


def _same_step(a: Node, b: Node) -> bool:
    """The same op with the same attributes and the same extra operands (Clip bounds)."""
    return a.op == b.op and a.attrs == b.attrs and all(u is v for u, v in zip(a.inputs[1:], b.inputs[1:]))


ACTIVATION_RULES = [rule("Mul", _times_itself), rule("Split", _hoist_through_split)]


# --- chains ---------------------------------------------------------------------------------------------


def _fuse_all(g: Graph) -> list[tuple[Node, list[Node]]]:
    """Grow each anchor's chain and fuse it, anchors in topological order."""
    done = []
    state = Fusing(g)
    for anchor in [n for n in g.nodes if n.op in ANCHORS and len(n.outputs) == 1]:
        chain = _Chain(anchor, state.uses, state.order).grow()
        if chain:
            state.fuse([anchor, *chain], "epilogue")
            done.append((anchor, chain))
    return done


def _keeps(out: tuple | None, acc: tuple | None) -> bool:
    """A step's output has the accumulator's shape. A symbolic dim where the accumulator's is a number counts: a
    model output keeps its declared type after the profile's static dims are substituted everywhere else
    (`shape_arithmetic`), and the step's operands fitting the accumulator (`_operand`) is what fixes its shape."""
    if out is None or acc is None or len(out) != len(acc):
        return out == acc
    return all(o == a or (isinstance(a, int) and not isinstance(o, int)) for o, a in zip(out, acc))


class _Chain:
    def __init__(self, anchor: Node, uses: Uses, order: dict[int, int]) -> None:
        self.anchor = anchor
        self.uses = uses
        self.order = order
        self.values: set[Value] = {anchor.outputs[0]}

    def grow(self) -> list[Node]:
        chain: list[Node] = []
        acc = self.anchor.outputs[0]
        while True:
            readers = {id(r): r for r in self.uses.readers.get(acc, ())}
            steps = [r for r in readers.values() if self._joins(r, acc)]
            if len(steps) != 1:
                return chain
            chain.append(steps[0])
            acc = steps[0].outputs[0]
            self.values.add(acc)

    def _joins(self, n: Node, acc: Value) -> bool:
        if n.op not in EPILOGUE_OPS or len(n.outputs) != 1 or n.subgraphs():
            return False
        out = n.outputs[0]
        if not out.is_tensor or not out.dtype.is_float or not _keeps(out.shape, acc.shape) or not acc.dtype.is_float:
            return False
        return all(self._operand(u, acc) for u in n.inputs if u is not None and u is not acc)

    def _operand(self, u: Value, acc: Value) -> bool:
        return (u.is_tensor and u not in self.values and fits(u.shape, acc.shape)
                and not self._depends_on_anchor(u))

    def _depends_on_anchor(self, u: Value) -> bool:
        """Whether u is computed from the anchor's output (only nodes after the anchor can be)."""
        start = self.order[id(self.anchor)]
        stack, seen = [u.producer], set()
        while stack:
            m = stack.pop()
            if m is None or id(m) in seen or self.order.get(id(m), -1) < start:
                continue
            if m is self.anchor:
                return True
            seen.add(id(m))
            stack.extend(v.producer for v in reads(m))
        return False
