"""specialize_bodies: the static dims go into the bodies fused after shape arithmetic (a body reading a model input
copied its declared, symbolic type), so the pointwise generator can take BERT's mask group; the model's own inputs
and outputs keep their declared types, and builds without static dims are left alone."""

from __future__ import annotations

import torch

from kiln.ir import DType, Graph, TensorType
from kiln.kernels.pointwise.codegen import check
from kiln.passes.manager import PassContext
from kiln.passes.pointwise_fusion import pointwise_fusion
from kiln.passes.specialize_bodies import specialize_bodies


def _mask() -> Graph:
    """BERT's mask group once its Reshape has sunk: Cast(mask, bool) -> Where(., 0, low) on a model input of
    declared shape (batch, seq); the Where's output already specialized to (1, 6), as shape arithmetic leaves it."""
    g = Graph()
    m = g.add_input("mask", TensorType(DType.INT64, ("batch", "seq")))
    (c,) = g.add("Cast", [m], {"to": DType.BOOL})
    c.type = TensorType(DType.BOOL, (1, 6))
    (y,) = g.add("Where", [c, g.add_initializer("zero", torch.tensor(0.0, dtype=torch.float16)),
                           g.add_initializer("low", torch.tensor(-65504.0, dtype=torch.float16))], outputs=["y"])
    y.type = TensorType(DType.FLOAT16, (1, 6))
    (z,) = g.add("Relu", [y], outputs=["z"])  # the model output: keeps the declared type
    z.type = TensorType(DType.FLOAT16, ("batch", "seq"))
    g.outputs = [z]
    pointwise_fusion(g)
    return g


def test_a_body_reading_a_model_input_gets_the_static_dims_and_becomes_generatable() -> None:
    g = _mask()
    (fused,) = [n for n in g.nodes if n.op == "Fused"]
    body = fused.attrs["body"]
    assert body.inputs[0].shape == ("batch", "seq")
    assert check(body) is None  # the generator takes a named dim under a known size (its kernel checks at run time)
    result = specialize_bodies(PassContext(static_dims={"batch": 1, "seq": 6}))(g)
    assert result.changed and result.counts["specialized"] >= 1
    assert body.inputs[0].shape == (1, 6) and check(body) is None
    assert g.inputs[0].shape == ("batch", "seq") and g.outputs[0].shape == ("batch", "seq")  # the model's, as declared


def test_without_static_dims_nothing_changes() -> None:
    g = _mask()
    (fused,) = [n for n in g.nodes if n.op == "Fused"]
    result = specialize_bodies(PassContext())(g)
    assert not result.changed and fused.attrs["body"].inputs[0].shape == ("batch", "seq")
