"""fuse_gelu: the erf and tanh GELU forms become Gelu; near misses stay as they are."""

from __future__ import annotations

import math

import pytest
import torch

from kiln.ir import DType, Graph, TensorType
from kiln.passes.fuse_gelu import fuse_gelu
from tests.passes.pattern_util import ops, rand, rewrite_preserves

X = {"x": rand(2, 5, 8) * 3}


def _graph() -> tuple[Graph, object]:
    g = Graph()
    x = g.add_input("x", TensorType(DType.FLOAT32, ("batch", "seq", 8)))
    return g, x


def _c(g: Graph, value: float, name: str = "c"):
    return g.add_initializer(g.fresh_name(name), torch.tensor(value, dtype=torch.float32))


def erf_bert(sqrt2: float = 1.4142135381698608, half: float = 0.5, one: float = 1.0) -> Graph:
    """The HF BERT export: x * (1 + erf(x / sqrt 2)) * 0.5."""
    g, x = _graph()
    (d,) = g.add("Div", [x, _c(g, sqrt2)])
    (e,) = g.add("Erf", [d])
    (a,) = g.add("Add", [e, _c(g, one)])
    (m,) = g.add("Mul", [x, a])
    (y,) = g.add("Mul", [m, _c(g, half)], outputs=["y"])
    g.outputs = [y]
    return g


def erf_torch() -> Graph:
    """0.5 * x first, then times (1 + erf(x * 0.7071)), constants on the left."""
    g, x = _graph()
    (h,) = g.add("Mul", [_c(g, 0.5), x])
    (d,) = g.add("Mul", [x, _c(g, 1 / math.sqrt(2))])
    (e,) = g.add("Erf", [d])
    (a,) = g.add("Add", [_c(g, 1.0), e])
    (y,) = g.add("Mul", [h, a], outputs=["y"])
    g.outputs = [y]
    return g


def tanh_torch(cube: str = "mul", k: float = 0.044715) -> Graph:
    """torch's tanh export: x*x*x, 0.044715 *, x +, sqrt(2/pi) *, tanh, 1 +, x *, 0.5 *."""
    g, x = _graph()
    if cube == "mul":
        (x2,) = g.add("Mul", [x, x])
        (x3,) = g.add("Mul", [x, x2])
    else:
        (x3,) = g.add("Pow", [x, _c(g, 3.0)])
    (t,) = g.add("Mul", [_c(g, k), x3])
    (s,) = g.add("Add", [x, t])
    (u,) = g.add("Mul", [_c(g, math.sqrt(2 / math.pi)), s])
    (th,) = g.add("Tanh", [u])
    (a,) = g.add("Add", [_c(g, 1.0), th])
    (m,) = g.add("Mul", [x, a])
    (y,) = g.add("Mul", [_c(g, 0.5), m], outputs=["y"])
    g.outputs = [y]
    return g


def tanh_gpt2() -> Graph:
    """GPT-2's gelu_new: (0.5 * x) * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * pow(x, 3))))."""
    g, x = _graph()
    (h,) = g.add("Mul", [x, _c(g, 0.5)])
    (p,) = g.add("Pow", [x, _c(g, 3.0)])
    (t,) = g.add("Mul", [p, _c(g, 0.044715)])
    (s,) = g.add("Add", [x, t])
    (u,) = g.add("Mul", [s, _c(g, math.sqrt(2 / math.pi))])
    (th,) = g.add("Tanh", [u])
    (a,) = g.add("Add", [th, _c(g, 1.0)])
    (y,) = g.add("Mul", [h, a], outputs=["y"])
    g.outputs = [y]
    return g


@pytest.mark.parametrize("build, approx", [(erf_bert, "none"), (erf_torch, "none"), (tanh_torch, "tanh"),
                                           (lambda: tanh_torch("pow"), "tanh"), (tanh_gpt2, "tanh")])
def test_gelu_forms_become_one_op(build, approx) -> None:
    g, res = rewrite_preserves(build, fuse_gelu, X)
    assert ops(g) == ["Gelu"] and g.nodes[0].attrs["approximate"] == approx
    assert g.nodes[0].inputs[0] is g.inputs[0] and g.outputs[0].name == "y"
    assert res.counts == {"gelu_tanh" if approx == "tanh" else "gelu_erf": 1}
    assert not g.initializers  # the constants went with the pattern


@pytest.mark.parametrize("build", [lambda: erf_bert(sqrt2=1.5), lambda: erf_bert(half=0.6),
                                   lambda: erf_bert(one=2.0), lambda: tanh_torch(k=0.05)])
def test_wrong_constants_do_not_match(build) -> None:
    g, res = rewrite_preserves(build, fuse_gelu, X)
    assert "Gelu" not in ops(g) and not res.changed


def test_shared_intermediate_does_not_match() -> None:
    def build() -> Graph:
        g = erf_bert()
        erf = next(n for n in g.nodes if n.op == "Erf")
        g.outputs.append(erf.outputs[0])  # erf(x / sqrt 2) is also an output
        return g

    g, res = rewrite_preserves(build, fuse_gelu, X)
    assert not res.changed and "Erf" in ops(g)


def test_different_x_does_not_match() -> None:
    def build() -> Graph:
        g = Graph()
        x = g.add_input("x", TensorType(DType.FLOAT32, ("batch", "seq", 8)))
        z = g.add_input("z", TensorType(DType.FLOAT32, ("batch", "seq", 8)))
        (d,) = g.add("Div", [z, _c(g, 1.4142135381698608)])
        (e,) = g.add("Erf", [d])
        (a,) = g.add("Add", [e, _c(g, 1.0)])
        (m,) = g.add("Mul", [x, a])
        (y,) = g.add("Mul", [m, _c(g, 0.5)], outputs=["y"])
        g.outputs = [y]
        return g

    _g, res = rewrite_preserves(build, fuse_gelu, {**X, "z": rand(2, 5, 8, seed=1)})
    assert not res.changed


def test_gelu_output_keeps_other_readers() -> None:
    def build() -> Graph:
        g = erf_bert()
        (z,) = g.add("Relu", [g.outputs[0]], outputs=["z"])
        g.outputs.append(z)
        return g

    g, _ = rewrite_preserves(build, fuse_gelu, X)
    assert ops(g) == ["Gelu", "Relu"]
