"""distribute_adds: a constant added to a Concat -> added to its pieces (constant pieces summed now)."""

from __future__ import annotations

import numpy as np
import torch

from kiln.ir import DType, Graph, TensorType
from kiln.ir.graph import Value
from kiln.passes.concat_add import distribute_adds
from kiln.passes.dead_nodes import dead_nodes
from kiln.passes.epilogue_fusion import epilogue_fusion
from tests.passes.same_function import randn, run_checked

F32 = DType.FLOAT32
D = 4


def _tokens(g: Graph, pos_shape: tuple[int, ...] = (1, 4, D), second_input: bool = False) -> Value:
    """ViT's sequence: Concat(class token [1, 1, D] (constant), patch tokens [1, 3, D] (a MatMul)) + constant."""
    gen = torch.Generator().manual_seed(0)
    x = g.add_input("x", TensorType(F32, (1, 3, D)))
    patches = g.add("MatMul", [x, g.add_initializer("w", torch.randn(D, D, generator=gen))], name="patches")[0]
    first = g.add_input("y", TensorType(F32, (1, 1, D))) if second_input else \
        g.add_initializer("cls", torch.randn(1, 1, D, generator=gen))
    tokens = g.add("Concat", [first, patches], {"axis": 1}, name="tokens")[0]
    return g.add("Add", [tokens, g.add_initializer("pos", torch.randn(*pos_shape, generator=gen))], name="pos")[0]


FEEDS = [{"x": randn(1, 3, D, seed=s), "y": randn(1, 1, D, seed=s + 5)} for s in (0, 1)]


def test_the_position_embedding_goes_onto_the_pieces_and_into_the_gemm() -> None:
    g = Graph()
    g.outputs.append(_tokens(g))
    results = run_checked(g, [distribute_adds, epilogue_fusion, dead_nodes], [{"x": f["x"]} for f in FEEDS])
    assert results[0].counts == {"adds_distributed": 1}
    assert [n.op for n in g.nodes] == ["Fused", "Concat"], [n.op for n in g.nodes]  # MatMul + Add, then the join
    assert g.outputs[0].name == "pos_out0" and g.outputs[0].shape == (1, 4, D)
    cls = g.nodes[1].inputs[0]
    assert cls is not None and cls.data is not None  # class token + its position embedding, summed now


def test_a_constant_the_same_along_the_axis_is_added_as_it_is() -> None:
    g = Graph()
    g.outputs.append(_tokens(g, pos_shape=(D,)))
    results = run_checked(g, [distribute_adds, dead_nodes], [{"x": f["x"]} for f in FEEDS])
    assert results[0].counts == {"adds_distributed": 1}
    (add,) = [n for n in g.nodes if n.op == "Add"]
    assert add.inputs[1] is not None and add.inputs[1].name == "pos"


def test_left_alone_with_two_computed_pieces_or_another_reader_or_a_widening_constant() -> None:
    g = Graph()
    g.outputs.append(_tokens(g, second_input=True))
    assert run_checked(g, [distribute_adds], FEEDS)[0].counts == {"adds_distributed": 0}
    g = Graph()
    g.outputs.append(_tokens(g))
    g.outputs.append(next(n for n in g.nodes if n.op == "Concat").outputs[0])
    assert run_checked(g, [distribute_adds], [{"x": f["x"]} for f in FEEDS])[0].counts == {"adds_distributed": 0}
    g = Graph()
    g.outputs.append(_tokens(g, pos_shape=(2, 4, D)))  # the Add broadcasts the sequence over a new batch of 2
    assert run_checked(g, [distribute_adds], [{"x": f["x"]} for f in FEEDS])[0].counts == {"adds_distributed": 0}
    assert np.prod(g.outputs[0].shape) == 2 * 4 * D


def test_a_class_token_expanded_over_the_batch_counts_as_constant() -> None:
    """torchvision's ViT: Concat(Expand(class token, [batch, 1, 1]), patch tokens) + position embedding. The class
    token's sum is made now and expanded as before; the patch tokens' Add goes into their GEMM's epilogue."""
    gen = torch.Generator().manual_seed(1)
    g = Graph()
    x = g.add_input("x", TensorType(F32, ("N", 3, D)))
    patches = g.add("MatMul", [x, g.add_initializer("w", torch.randn(D, D, generator=gen))], name="patches")[0]
    (shape,) = g.add("Shape", [x], name="shape")
    (batch,) = g.add("Mul", [shape, g.add_initializer("keep_n", torch.tensor([1, 0, 0]))], name="batch")
    (target,) = g.add("Add", [batch, g.add_initializer("ones", torch.tensor([0, 1, 1]))], name="target")
    (cls,) = g.add("Expand", [g.add_initializer("cls", torch.randn(1, 1, D, generator=gen)), target], name="expand")
    tokens = g.add("Concat", [cls, patches], {"axis": 1}, name="tokens")[0]
    g.outputs.append(g.add("Add", [tokens, g.add_initializer("pos", torch.randn(1, 4, D, generator=gen))],
                           name="pos")[0])
    feeds = [{"x": randn(n, 3, D, seed=n)} for n in (1, 3)]
    results = run_checked(g, [distribute_adds, epilogue_fusion, dead_nodes], feeds)
    assert results[0].counts == {"adds_distributed": 1}
    assert "Add" not in [n.op for n in g.nodes if n.name not in ("target",)], [n.op for n in g.nodes]
    (expand,) = [n for n in g.nodes if n.op == "Expand"]
    summed = expand.inputs[0]
    assert summed is not None and summed.data is not None and summed.name != "cls"  # class token + its position
    (fused,) = [n for n in g.nodes if n.op == "Fused"]
    assert [n.op for n in fused.attrs["body"].nodes] == ["MatMul", "Add"]  # the patches' share, in the epilogue


def test_an_expand_of_a_computed_value_is_not_a_constant_piece() -> None:
    g = Graph()
    x = g.add_input("x", TensorType(F32, (2, 3, D)))
    y = g.add_input("y", TensorType(F32, (1, 1, D)))
    patches = g.add("MatMul", [x, g.add_initializer("w", torch.randn(D, D))], name="patches")[0]
    (cls,) = g.add("Expand", [y, g.add_initializer("to", torch.tensor([2, 1, D]))], name="expand")
    tokens = g.add("Concat", [cls, patches], {"axis": 1}, name="tokens")[0]
    g.outputs.append(g.add("Add", [tokens, g.add_initializer("pos", torch.randn(1, 4, D))], name="pos")[0])
    feeds = [{"x": randn(2, 3, D, seed=s), "y": randn(1, 1, D, seed=s + 9)} for s in (0, 1)]
    assert run_checked(g, [distribute_adds], feeds)[0].counts == {"adds_distributed": 0}
