"""Whole-graph FP16/BF16: every FP32 value and weight converted, the interface kept, internal precisions kept,
huge constants clamped rather than turned into inf - and the function preserved within half precision."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kiln
from kiln.ir import DType, Graph, TensorType
from kiln.ir.interpreter import Interpreter
from kiln.precision.lower import lower_precision

F32 = DType.FLOAT32


def _graph() -> Graph:
    """conv -> LayerNorm over channels-last-ish trailing dims -> + mask built with float32's min -> Resize."""
    g = Graph()
    x = g.add_input("x", TensorType(F32, (2, 3, 8, 8)))
    gen = torch.Generator().manual_seed(0)
    w = g.add_initializer("w", torch.randn(4, 3, 3, 3, generator=gen) * 0.3)
    b = g.add_initializer("b", torch.randn(4, generator=gen))
    (c,) = g.add("Conv", [x, w, b], {"pads": (1, 1, 1, 1)}, name="conv")
    scale = g.add_initializer("scale", torch.ones(8))
    (ln,) = g.add("LayerNormalization", [c, scale], {"axis": -1}, name="ln", outputs=1)
    keep = g.add_initializer("keep", torch.ones(1, 1, 1, 8))
    big = g.add_initializer("min", torch.tensor(torch.finfo(torch.float32).min))
    one = g.add_initializer("one", torch.tensor(1.0))
    (inv,) = g.add("Sub", [one, keep], name="inv")
    (bias,) = g.add("Mul", [inv, big], name="mask")  # 0 * float32.min: 0, not NaN, once clamped
    (y,) = g.add("Add", [ln, bias], name="masked")
    scales = g.add_initializer("scales", torch.tensor([1.0, 1.0, 1.5, 1.5]))
    (r,) = g.add("Resize", [y, None, scales], {"mode": "nearest"}, name="resize")
    g.outputs.append(r)
    return g


@pytest.mark.parametrize("to", [DType.FLOAT16, DType.BFLOAT16])
def test_lowered_graph_keeps_its_interface_and_function(to: DType) -> None:
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    want = Interpreter(_graph()).run({"x": x})
    g = _graph()
    report = lower_precision(g, to)
    assert [str(v.type) for v in g.inputs] == ["float32[2,3,8,8]"]
    assert g.outputs[0].type.dtype is F32 and g.outputs[0].name == _graph().outputs[0].name
    internal = {n.name: n.outputs[0].type.dtype for n in g.nodes}
    assert internal["conv"] is to and internal["ln"] is to and internal["masked"] is to
    ln = next(n for n in g.nodes if n.name == "ln")
    assert ln.attrs["stash_type"] is F32  # statistics stay in float32
    assert g.initializers["scales"].type.dtype is F32  # a size, not data
    assert g.initializers["w"].type.dtype is to and report.weights >= 5
    assert report.clamped == {"min": 1}
    got = Interpreter(g).run({"x": x})
    for k, ref in want.items():
        assert got[k].dtype == np.float32 and got[k].shape == ref.shape
        assert np.isfinite(got[k]).all()
        np.testing.assert_allclose(got[k], ref, rtol=0.05, atol=0.05 * np.abs(ref).max())


def test_only_half_types_are_accepted() -> None:
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        lower_precision(_graph(), DType.FLOAT64)


def test_half_precision_needs_a_gpu() -> None:
    with pytest.raises(kiln.KilnError, match="needs a GPU"):
        kiln.BuilderConfig(precision="fp16", device="cpu")


def test_a_channels_last_input_is_converted_after_its_cast() -> None:
    g = _graph()
    g.layouts["x"] = "channels_last"
    lower_precision(g, DType.FLOAT16)
    cast = next(n for n in g.nodes if n.op == "Cast" and n.inputs[0] is g.inputs[0])
    assert g.layouts == {cast.outputs[0].name: "channels_last"}
