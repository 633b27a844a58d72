"""GELU recognition: the decomposed forms exporters emit become one `Gelu` op.

Rewrite cases (products in any association and order; Div by a constant counts as Mul by its inverse):
- erf form:  0.5 * x * (1 + erf(x / sqrt(2)))  (or x * 0.7071...)                    -> Gelu(x)
- tanh form: 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))                 -> Gelu(x, approximate="tanh")
  with x^3 as Pow(x, 3), x * x * x or x * Pow(x, 2).

Every constant must be the one the formula needs (as the graph's dtype rounds it), every intermediate must be
read only inside the pattern, and x must be the same value everywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from kiln.ir.graph import Graph, Node, Value
from kiln.passes.manager import PassResult
from kiln.passes.matching import add_node, close, private, producer, remove_dead, scalar
from kiln.passes.pattern import apply_rules, rule
from kiln.passes.rewrite import Uses, redirect

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_MAX_FACTORS = 8


@dataclass
class Product:
    """A value as const * (product of factors), flattened through Mul, Div by a constant and Pow by 2 or 3
    wherever the intermediate is read only by the next step. Each factor comes with the node reading it."""

    factors: list[tuple[Value, Node | None]] = field(default_factory=list)
    const: float = 1.0

    @staticmethod
    def of(v: Value, uses: Uses, parent: Node | None = None) -> Product:
        """Flatten `v`, read by `parent` (None: `v` is the top and may have any readers)."""
        p = Product()
        p._add(v, uses, parent, 1)
        return p

    def _add(self, v: Value, uses: Uses, parent: Node | None, power: int) -> None:
        c = scalar(v)
        if c is not None:
            self.const *= c**power
            return
        node = v.producer
        if (node is not None and node.op in ("Mul", "Div", "Pow") and len(node.inputs) == 2
                and (parent is None or private(uses, v, parent)) and len(self.factors) < _MAX_FACTORS):
            a, b = node.inputs
            if node.op == "Mul" and a is not None and b is not None:
                self._add(a, uses, node, power)
                self._add(b, uses, node, power)
                return
            k = scalar(b) if node.op in ("Div", "Pow") and a is not None else None
            if node.op == "Div" and k and a is not None:
                self.const /= k**power
                self._add(a, uses, node, power)
                return
            if node.op == "Pow" and k in (2.0, 3.0) and a is not None:
                self._add(a, uses, node, power * int(k))
                return
        self.factors.extend([(v, parent)] * power)

    def only(self, x: Value, times: int = 1) -> bool:
        """The non-constant factors are exactly `x`, `times` times."""
        return len(self.factors) == times and all(f is x for f, _ in self.factors)


def _one_plus(v: Value, uses: Uses, parent: Node | None) -> Node | None:
    """v = 1 + f(w) (either order) with f Erf or Tanh, v private to `parent`: returns the f node."""
    add = producer(v, "Add")
    if add is None or parent is None or not private(uses, v, parent):
        return None
    for i in (0, 1):
        f = producer(add.inputs[i], ("Erf", "Tanh"))
        if f is not None and close(scalar(add.inputs[1 - i]), 1.0, v.dtype) and private(uses, f.outputs[0], add):
            return f
    return None


def _erf_arg(w: Value, x: Value, uses: Uses, erf: Node) -> bool:
    """w = x / sqrt(2)."""
    arg = Product.of(w, uses, erf)
    return private(uses, w, erf) and arg.only(x) and close(arg.const, 1 / math.sqrt(2.0), w.dtype)


def _tanh_arg(w: Value, x: Value, uses: Uses, tanh: Node) -> bool:
    """w = sqrt(2/pi) * (x + 0.044715 * x^3)."""
    outer = Product.of(w, uses, tanh)
    if not private(uses, w, tanh) or len(outer.factors) != 1 or not close(outer.const, _SQRT_2_OVER_PI, w.dtype):
        return False
    s, reader = outer.factors[0]
    add = producer(s, "Add")
    if add is None or reader is None or not private(uses, s, reader):
        return False
    for i in (0, 1):
        t = add.inputs[1 - i]
        if add.inputs[i] is x and t is not None and t is not x:
            cube = Product.of(t, uses, add)
            if cube.only(x, 3) and close(cube.const, 0.044715, w.dtype):
                return True
    return False


def _gelu(graph: Graph, node: Node, uses: Uses) -> str | None:
    out = node.outputs[0]
    if not out.is_tensor or not out.dtype.is_float:
        return None
    prod = Product.of(out, uses)
    if len(prod.factors) != 2 or not close(prod.const, 0.5, out.dtype):
        return None
    for (x, _), (a, reader) in (prod.factors, prod.factors[::-1]):
        f = _one_plus(a, uses, reader)
        if f is None or x is a or x.type != out.type or f.inputs[0] is None:
            continue
        w = f.inputs[0]
        if f.op == "Erf" and _erf_arg(w, x, uses, f):
            return _replace(graph, node, x, "none")
        if f.op == "Tanh" and _tanh_arg(w, x, uses, f):
            return _replace(graph, node, x, "tanh")
    return None


def _replace(graph: Graph, node: Node, x: Value, approximate: str) -> str:
    (y,) = add_node(graph, node, "Gelu", [x], {"approximate": approximate}, name=f"{node.name}/Gelu")
    redirect(graph, node.outputs[0], y)
    remove_dead(graph, [node])
    return "gelu_tanh" if approximate == "tanh" else "gelu_erf"


RULES = [rule(["Mul", "Div"], _gelu)]


def fuse_gelu(graph: Graph) -> PassResult:
    """Replace decomposed GELUs by `Gelu` (counts: gelu_erf, gelu_tanh)."""
    return apply_rules(graph, RULES)
