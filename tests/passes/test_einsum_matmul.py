"""einsum_matmul: two-operand Einsums that are (batched) matrix products -> MatMul (b transposed when its last two
letters are swapped); everything else stays Einsum."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.ir import DType, Graph, TensorType
from kiln.passes.einsum_matmul import einsum_matmul
from tests.passes.pattern_util import ops, rand, rewrite_preserves

SIZES = {"b": 2, "s": 3, "d": 4, "f": 5, "B": 2, "G": 3, "H": 2, "I": 4, "J": 5, "D": 3, "i": 3, "j": 4, "k": 5,
         "n": 2}


def _graph(equation: str) -> tuple[Graph, dict[str, np.ndarray]]:
    lhs = equation.replace(" ", "").split("->")[0].split(",")
    g = Graph()
    ins = [g.add_input(n, TensorType(DType.FLOAT32, tuple(SIZES[c] for c in t))) for n, t in zip("xy", lhs)]
    (y,) = g.add("Einsum", ins, {"equation": equation}, outputs=["out"])
    g.outputs = [y]
    feeds = {n: rand(*(SIZES[c] for c in t), seed=i) for i, (n, t) in enumerate(zip("xy", lhs))}
    return g, feeds


@pytest.mark.parametrize(("equation", "want", "what"), [
    ("bsd,df->bsf", ["MatMul"], "matmul"),                                 # a dense layer
    ("bsd,fd->bsf", ["Transpose", "MatMul"], "matmul_transposed"),         # the weight stored [out, in]
    ("B G H I D, B G H J D -> B G H I J", ["Transpose", "MatMul"], "matmul_transposed"),  # MaxViT's q k^T
    ("BGHIJ,BGHJD->BGHID", ["MatMul"], "matmul"),                          # and its p v
    ("ik,nkj->nij", ["MatMul"], "matmul"),                                 # the first operand broadcast
])
def test_matrix_products_become_matmul(equation: str, want: list[str], what: str) -> None:
    g, res = rewrite_preserves(lambda: _graph(equation)[0], einsum_matmul, _graph(equation)[1])
    assert ops(g) == want and res.counts == {what: 1}


@pytest.mark.parametrize("equation", [
    "bsd,df->bfs",      # another output order
    "ii,ij->ij",        # a repeated letter
    "bsd,bdf->bsdf",    # nothing contracted
    "nij,jk->ik",       # a batch letter summed away
])
def test_other_einsums_stay(equation: str) -> None:
    g, _ = _graph(equation)
    assert not einsum_matmul(g).changed and ops(g) == ["Einsum"]


@pytest.mark.parametrize("equation", ["...d,df->...f", "bij,bjk", "bij,bjk,bkl->bil"])
def test_the_parser_refuses_ellipses_implicit_outputs_and_three_operands(equation: str) -> None:
    from kiln.passes.einsum_matmul import _terms

    assert _terms(equation) is None
