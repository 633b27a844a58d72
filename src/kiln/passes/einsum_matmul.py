"""Einsum as MatMul: a two-operand Einsum that is a (batched) matrix product becomes MatMul, so the fusions that
read MatMul (epilogues, attention) see it.

Rewrite cases (spaces ignored; P the batch letters, i, j, k single letters; every letter once per operand):
- Einsum("P i k, Q k j -> P i j")  -> MatMul(a, b)
- Einsum("P i k, Q j k -> P i j")  -> MatMul(a, Transpose(b, last two axes swapped))
where the batch letters of one operand are P itself and those of the other a suffix of P (MatMul broadcasts
the missing leading axes; same letters, same sizes): "bsd,df->bsf" (a dense layer, as JAX/TensorFlow exports
write it), MaxViT's "BGHID,BGHJD->BGHIJ" and "BGHIJ,BGHJD->BGHID" (its attention). k must not appear in the
output, i only in the first operand, j only in the second. Equations with an ellipsis, repeated letters (traces,
diagonals) or any other output order stay Einsum.
"""

from __future__ import annotations

from kiln.ir.graph import Graph, Node
from kiln.passes.manager import PassResult
from kiln.passes.matching import add_node, swap_in
from kiln.passes.pattern import apply_rules, rule
from kiln.passes.rewrite import Uses


def _terms(equation: str) -> tuple[str, str, str] | None:
    eq = equation.replace(" ", "")
    if "->" not in eq or "." in eq:
        return None
    lhs, out = eq.split("->")
    ops = lhs.split(",")
    if len(ops) != 2 or not all(t.isalpha() and len(set(t)) == len(t) for t in (*ops, out)):
        return None
    return ops[0], ops[1], out


def _plan(a: str, b: str, out: str) -> bool | None:
    """None when a, b -> out is no matrix product; else whether b must be transposed (its last two swapped)."""
    if len(a) < 2 or len(b) < 2 or len(out) < 2:
        return None
    i, k = a[-2], a[-1]
    batch = out[:-2]
    if out[-2] != i or k in out or k not in b[-2:]:
        return None
    j = out[-1]
    swapped = b[-2:] == j + k
    if not (swapped or b[-2:] == k + j) or j in a or i in b:
        return None
    pa, pb = a[:-2], b[:-2]
    if {i, j, k} & set(batch) or batch not in (pa, pb):
        return None
    if not (batch.endswith(pa) and batch.endswith(pb)):
        return None
    return swapped


def _einsum(graph: Graph, node: Node, uses: Uses) -> str | None:
    if len(node.inputs) != 2 or node.inputs[0] is None or node.inputs[1] is None:
        return None
    terms = _terms(str(node.attrs.get("equation", "")))
    a, b = node.inputs
    if terms is None or a.rank != len(terms[0]) or b.rank != len(terms[1]):  # type: ignore[union-attr]
        return None
    swapped = _plan(*terms)
    if swapped is None:
        return None
    if swapped:
        perm = [*range(b.rank - 2), b.rank - 1, b.rank - 2]  # type: ignore[union-attr]
        (b,) = add_node(graph, node, "Transpose", [b], {"perm": perm}, name=f"{node.name}/b")
    (y,) = add_node(graph, node, "MatMul", [a, b], name=f"{node.name}/matmul")
    return swap_in(graph, node, y, "matmul_transposed" if swapped else "matmul")


RULES = [rule("Einsum", _einsum)]


def einsum_matmul(graph: Graph) -> PassResult:
    """Two-operand Einsums that are matrix products as MatMul (counts: matmul, matmul_transposed)."""
    return apply_rules(graph, RULES)
