"""fold_attention_batch: MaxViT's 5-D attention [B, G, H, S, D] on 4-D operands, so `fuse_attention` fuses it."""

from __future__ import annotations

import pytest
import torch

from kiln.ir import DType, Graph, TensorType
from kiln.ir.graph import Value
from kiln.passes.attention_batch import fold_attention_batch
from kiln.passes.fuse_attention import fuse_attention
from tests.passes.pattern_util import ops, rand, rewrite_preserves

B, G, H, S, D = 2, 3, 2, 5, 4
F32 = DType.FLOAT32


def _c(g: Graph, value: torch.Tensor) -> Value:
    return g.add_initializer(g.fresh_name("c"), value)


def maxvit(bias: str = "heads", *, k_transposed: bool = True, extra_read: bool = False) -> Graph:
    """softmax(q k^T [+ bias]) v on [batch, G, H, S, D] inputs; bias "heads" [1, H, S, S] (MaxViT's relative
    positions), "windows" [batch-sized B, G, H, S, S] input, "per-window" [1, G, H, S, S] (does not fold), "" none."""
    g = Graph()
    q = g.add_input("q", TensorType(F32, ("batch", G, H, S, D)))
    k = g.add_input("k", TensorType(F32, ("batch", G, H, S, D) if k_transposed else ("batch", G, H, D, S)))
    v = g.add_input("v", TensorType(F32, ("batch", G, H, S, D)))
    kt = g.add("Transpose", [k], {"perm": (0, 1, 2, 4, 3)})[0] if k_transposed else k
    (s,) = g.add("MatMul", [q, kt])
    if bias == "heads":
        (s,) = g.add("Add", [s, _c(g, torch.randn(1, H, S, S, generator=torch.Generator().manual_seed(1)))])
    elif bias == "per-window":
        (s,) = g.add("Add", [_c(g, torch.randn(1, G, H, S, S, generator=torch.Generator().manual_seed(2))), s])
    elif bias == "windows":
        (s,) = g.add("Add", [s, g.add_input("m", TensorType(F32, ("batch", G, H, S, S)))])
    (p,) = g.add("Softmax", [s], {"axis": -1})
    (y,) = g.add("MatMul", [p, v], outputs=["y"])
    g.outputs = [y, p] if extra_read else [y]
    return g


def _feeds(bias: str = "heads", k_transposed: bool = True) -> dict:
    f = {"q": rand(B, G, H, S, D), "k": rand(B, G, H, S, D, seed=1) if k_transposed else rand(B, G, H, D, S, seed=1),
         "v": rand(B, G, H, S, D, seed=2)}
    return {**f, "m": rand(B, G, H, S, S, seed=3)} if bias == "windows" else f


@pytest.mark.parametrize("bias", ["heads", "windows", ""])
def test_5d_attention_becomes_4d_and_then_one_attention(bias: str) -> None:
    g, res = rewrite_preserves(lambda: maxvit(bias), fold_attention_batch, _feeds(bias))
    assert res.counts == {"attention_5d": 1}
    assert all(n.outputs[0].rank == 4 for n in g.nodes if n.op in ("MatMul", "Softmax", "Add"))
    def folded() -> Graph:
        g = maxvit(bias)
        fold_attention_batch(g)
        return g

    g2, res2 = rewrite_preserves(folded, fuse_attention, _feeds(bias))
    assert res2.counts.get("attention") == 1 and "Softmax" not in ops(g2) and "MatMul" not in ops(g2), res2.counts


def test_k_given_transposed_folds_too() -> None:
    build = lambda: maxvit("heads", k_transposed=False)  # noqa: E731
    _g, res = rewrite_preserves(build, fold_attention_batch, _feeds(k_transposed=False))
    assert res.counts == {"attention_5d": 1}


@pytest.mark.parametrize("case", ["per-window", "probs-read"])
def test_what_does_not_fold_stays(case: str) -> None:
    build = (lambda: maxvit("per-window")) if case == "per-window" else (lambda: maxvit(extra_read=True))
    _g, res = rewrite_preserves(build, fold_attention_batch, _feeds())
    assert not res.changed
