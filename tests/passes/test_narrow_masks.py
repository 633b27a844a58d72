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


def _bert_mask(g: Graph, tall: torch.Tensor, readers: int = 2, extra_reader: bool = False) -> Value:
    """BERT's export: Where(And(tall constant, keep [1, 1, 1, S]), 0, finfo.min), read as the mask of `readers`
    attentions (and by a plain Add when `extra_reader`)."""
    keep = g.add("Cast", [g.add_input("ids_mask", TensorType(DType.INT64, (1, S)))], {"to": DType.BOOL},
                 name="cast")[0]
    keep = g.add("Reshape", [keep, g.add_initializer("shape", torch.tensor([1, 1, 1, S]))], name="reshape")[0]
    cond = g.add("And", [g.add_initializer("tall", tall), keep], name="and")[0]
    zero, low = g.add_initializer("zero", torch.tensor(0.0)), g.add_initializer("low", torch.tensor(-3.4e38))
    mask = g.add("Where", [cond, zero, low], name="where")[0]
    q = g.add_input("q", TensorType(F32, (1, 2, S, 8)))
    for i in range(readers):
        g.outputs.append(g.add("Attention", [q, q, q, mask], name=f"attention{i}")[0])
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
