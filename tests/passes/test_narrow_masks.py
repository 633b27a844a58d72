"""narrow_masks: an attention mask made as tall as the queries only by an all-true constant -> its narrow form."""

from __future__ import annotations

import numpy as np
import torch

from kiln.ir import DType, Graph, TensorType
from kiln.ir.graph import Value
from kiln.passes.dead_nodes import dead_nodes
from kiln.passes.narrow_masks import narrow_masks
from tests.passes.same_function import randn, run_checked

S = 6
F32 = DType.FLOAT32


def _bert_mask(g: Graph, tall: torch.Tensor, readers: int = 2, extra_reader: bool = False, fill: float = -3.4e38,
               q_len: int = S) -> Value:
    """BERT's export: Where(And(tall constant, keep [1, 1, 1, S]), 0, fill (finfo.min)), read as the mask of
    `readers` attentions of `q_len` queries (and by a plain Add when `extra_reader`)."""
    keep = g.add("Cast", [g.add_input("ids_mask", TensorType(DType.INT64, (1, S)))], {"to": DType.BOOL},
                 name="cast")[0]
    keep = g.add("Reshape", [keep, g.add_initializer("shape", torch.tensor([1, 1, 1, S]))], name="reshape")[0]
    cond = g.add("And", [g.add_initializer("tall", tall), keep], name="and")[0]
    zero, low = g.add_initializer("zero", torch.tensor(0.0)), g.add_initializer("low", torch.tensor(fill))
    mask = g.add("Where", [cond, zero, low], name="where")[0]
    q = g.add_input("q", TensorType(F32, (1, 2, q_len, 8)))
    k = q if q_len == S else g.add_input("k", TensorType(F32, (1, 2, S, 8)))
    for i in range(readers):
        g.outputs.append(g.add("Attention", [q, k, k, mask], name=f"attention{i}")[0])
    if extra_reader:
        g.outputs.append(g.add("Add", [mask, mask], name="other")[0])
    return mask


FEEDS = [{"ids_mask": np.array([[1, 1, 1, 1, 0, 0]], dtype=np.int64), "q": randn(1, 2, S, 8)}]


def test_the_bert_mask_is_computed_one_row_tall() -> None:
    g = Graph()
    _bert_mask(g, torch.ones(1, 1, S, 1, dtype=torch.bool))
    results = run_checked(g, [narrow_masks, dead_nodes], FEEDS, rel=0.0)
    assert results[0].counts == {"masks_narrowed": 1}
    masks = {n.inputs[3] for n in g.nodes if n.op == "Attention"}
    (mask,) = masks
    assert mask.shape == (1, 1, 1, S) and not [n for n in g.nodes if n.op == "And"]


def test_left_alone_when_the_constant_hides_something_or_another_op_reads_the_mask() -> None:
    partly = torch.ones(1, 1, S, 1, dtype=torch.bool)
    partly[0, 0, 2, 0] = False
    for tall, extra in ((partly, False), (torch.ones(1, 1, S, 1, dtype=torch.bool), True)):
        g = Graph()
        mask = _bert_mask(g, tall, extra_reader=extra)
        assert not narrow_masks(g).changed and mask.shape == (1, 1, S, S)


CAUSAL = torch.ones(S, S, dtype=torch.bool).tril()[None, None]


def test_a_causal_triangle_with_an_infinite_fill_becomes_is_causal() -> None:
    """LLaMA's TorchScript export: And(triangle, keep) with -inf. Left padding hides every key of queries 0 and
    1: those rows are -inf throughout before and after (zeros), the rest the same function."""
    g = Graph()
    _bert_mask(g, CAUSAL, fill=float("-inf"))
    feeds = [{"ids_mask": np.array([[0, 0, 1, 1, 1, 1]], dtype=np.int64), "q": randn(1, 2, S, 8)}]
    results = run_checked(g, [narrow_masks, dead_nodes], feeds, rel=1e-6)
    assert results[0].counts == {"masks_narrowed": 1}
    attentions = [n for n in g.nodes if n.op == "Attention"]
    assert all(n.attrs["is_causal"] == 1 and n.inputs[3].shape == (1, 1, 1, S) for n in attentions)


def test_a_causal_triangle_stays_with_a_finite_fill_or_other_queries() -> None:
    """finfo.min: a row hidden entirely averages all keys, under is_causal it would average keys 0..i; and a
    triangle over other queries than the readers' is no causal mask for them."""
    for fill, q_len in ((-3.4e38, S), (float("-inf"), S - 1)):
        g = Graph()
        tall = CAUSAL if q_len == S else CAUSAL[:, :, 1:, :]
        mask = _bert_mask(g, tall, fill=fill, q_len=q_len)
        assert not narrow_masks(g).changed and mask.shape == (1, 1, q_len, S), (fill, q_len)
        assert all(not n.attrs.get("is_causal") for n in g.nodes if n.op == "Attention")
