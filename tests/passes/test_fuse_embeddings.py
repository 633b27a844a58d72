"""Embedding fusion: lookups and terms summed, then a LayerNorm, become one "embedding" node on GPU builds (with the
sum as a second output where it is read elsewhere); lookups by constant indices are terms; sums without a runtime
lookup, terms that do not repeat per row, norms over more than the last axis, and CPU builds are left alone."""

from __future__ import annotations

import numpy as np
import torch

from kiln.ir import DType, Graph, TensorType
from kiln.passes.fuse_embeddings import fuse_embeddings
from kiln.passes.manager import PassContext
from tests.passes.cleanup_util import ops, preserves

F32 = DType.FLOAT32


def _model(variant: str = "bert") -> Graph:
    """BERT's embeddings: word[ids] + type[types] + position rows [1, 5, 8], LayerNorm over the last axis."""
    g = Graph()
    ids = g.add_input("ids", TensorType(DType.INT64, ("n", 5)))
    types = g.add_input("types", TensorType(DType.INT64, ("n", 5)))
    gen = torch.Generator().manual_seed(0)
    word = g.add_initializer("word", torch.randn(20, 8, generator=gen))
    kind = g.add_initializer("kind", torch.randn(2, 8, generator=gen))
    const = variant in ("constant ids", "only constant ids")
    lookup_ids = g.add_initializer("const_ids", torch.tensor([[1, 2, 3, 4, 5]])) if const else ids
    type_ids = g.add_initializer("const_types", torch.tensor([[0, 1, 0, 1, 0]])) if variant == "only constant ids" \
        else types
    (w,) = g.add("Gather", [word, lookup_ids], {"axis": 0}, name="word_lookup")
    (k,) = g.add("Gather", [kind, type_ids], {"axis": 0}, name="type_lookup")
    (x,) = g.add("Add", [w, k])
    pos_shape = (2, 1, 8) if variant == "per batch term" else (1, 5, 8)
    (x,) = g.add("Add", [g.add_initializer("pos", torch.randn(*pos_shape, generator=gen)), x])
    scale, bias = g.add_initializer("scale", torch.ones(8) * 1.5), g.add_initializer("bias", torch.zeros(8) + 0.1)
    norm_axis = 1 if variant == "norm axis 1" else -1
    (y,) = g.add("LayerNormalization", [x, scale, bias], {"axis": norm_axis, "epsilon": 1e-5}, name="ln",
                 outputs=1)
    g.outputs = [y]
    if variant == "sum read elsewhere":  # GPT-2's: the sum is also the residual stream
        (r,) = g.add("Relu", [x], outputs=["r"])
        g.outputs.append(r)
    return g


FEEDS = [{"ids": np.array([[1, -2, 3, 19, 0], [4, 5, 6, 7, -20]]),
          "types": np.array([[0, 1, 1, 0, 0], [1, 1, 0, 0, 1]])}]


def _gpu(graph: Graph):  # type: ignore[no-untyped-def]
    return fuse_embeddings(PassContext(device="cuda"))(graph)


def test_lookups_summed_and_normalized_become_one_node() -> None:
    g, result = preserves(_model, _gpu, FEEDS)
    assert result.counts == {"embeddings": 1} and ops(g) == ["Fused"]
    node = g.nodes[0]
    assert node.attrs["kind"] == "embedding" and node.outputs[0].name == g.outputs[0].name
    assert [n.op for n in node.attrs["body"].nodes] == ["Gather", "Gather", "Add", "Add", "LayerNormalization"]


def test_cpu_builds_are_left_alone() -> None:
    g, result = preserves(_model, fuse_embeddings(PassContext(device="cpu")), FEEDS)
    assert not result.changed and "Fused" not in ops(g)


def test_a_lookup_by_constant_indices_is_a_term() -> None:
    g, result = preserves(lambda: _model("constant ids"), _gpu, FEEDS)
    assert result.counts == {"embeddings": 1} and ops(g) == ["Gather", "Fused"]
    assert [n.op for n in g.nodes[1].attrs["body"].nodes] == ["Gather", "Add", "Add", "LayerNormalization"]


def test_a_sum_read_elsewhere_is_an_output_too() -> None:
    """GPT-2's residual stream starts with the embeddings' sum: the node outputs [sum, norm]."""
    g, result = preserves(lambda: _model("sum read elsewhere"), _gpu, FEEDS)
    assert result.counts == {"embeddings": 1} and ops(g) == ["Fused", "Relu"]
    node = g.nodes[0]
    assert len(node.outputs) == 2 and node.outputs[1].name == g.outputs[0].name
    assert g.nodes[1].inputs[0] is node.outputs[0]


def test_left_alone_where_one_kernel_could_not_make_it() -> None:
    for variant in ("only constant ids", "per batch term", "norm axis 1"):
        g, result = preserves(lambda v=variant: _model(v), _gpu, FEEDS)
        assert not result.changed and "Fused" not in ops(g), variant
