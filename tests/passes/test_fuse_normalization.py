"""fuse_normalization: decomposed layer / RMS / group / instance norms become single ops, function preserved."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kiln.ir import DType, Graph, TensorType
from kiln.ir.graph import Value
from kiln.passes.fuse_normalization import fuse_normalization
from tests.passes.pattern_util import ops, rand, rewrite_preserves


def _w(g: Graph, *shape: int, name: str = "w", dtype: torch.dtype = torch.float32) -> Value:
    gen = torch.Generator().manual_seed(len(g.initializers))  # the same weights every time a graph is built
    return g.add_initializer(g.fresh_name(name), torch.randn(*shape, generator=gen).to(dtype))


def _c(g: Graph, value, dtype: torch.dtype = torch.float32) -> Value:
    return g.add_initializer(g.fresh_name("c"), torch.tensor(value, dtype=dtype))


def _mean(g: Graph, x: Value, axes: list[int], keepdims: int = 1) -> Value:
    (m,) = g.add("ReduceMean", [x, _c(g, axes, torch.int64)], {"keepdims": keepdims})
    return m


def _input(g: Graph, shape: tuple, dtype: DType = DType.FLOAT32) -> Value:
    return g.add_input("x", TensorType(dtype, shape))


def layer_norm_torch(*, square: str = "pow", inverse: str = "div", affine: bool = True, axes: list[int] | None = None,
                     eps_outside: bool = False, shape: tuple = ("batch", "seq", 16), gamma_shape: tuple = (16,),
                     power: float = 2.0, mean_axes: list[int] | None = None) -> Graph:
    """torch's opset < 17 export: ReduceMean, Sub, Pow, ReduceMean, Add eps, Sqrt, Div, Mul gamma, Add beta."""
    g = Graph()
    x = _input(g, shape)
    axes = axes or [-1]
    m = _mean(g, x, mean_axes or axes)
    (d,) = g.add("Sub", [x, m])
    (sq,) = g.add("Pow", [d, _c(g, power)]) if square == "pow" else g.add("Mul", [d, d])
    v = _mean(g, sq, axes)
    if eps_outside:
        (s,) = g.add("Sqrt", [v])
        (s,) = g.add("Add", [s, _c(g, 1e-5)])
    else:
        (ve,) = g.add("Add", [v, _c(g, 1e-5)])
        (s,) = g.add("Sqrt", [ve])
    if inverse == "div":
        (n,) = g.add("Div", [d, s])
    else:
        (r,) = g.add("Reciprocal", [s])
        (n,) = g.add("Mul", [r, d])
    if affine:
        (n,) = g.add("Mul", [n, _w(g, *gamma_shape)])
        (n,) = g.add("Add", [_w(g, *gamma_shape), n])
    g.rename(n, "y")
    g.outputs = [n]
    return g


def layer_norm_keras() -> Graph:
    """tf2onnx's Keras LayerNormalization: x * g + (beta - mean * g), g = rsqrt(var + eps) * gamma."""
    g = Graph()
    x = _input(g, ("batch", 16))
    m = _mean(g, x, [1])
    (d,) = g.add("Sub", [x, m])
    (sq,) = g.add("Mul", [d, d])
    v = _mean(g, sq, [1])
    (ve,) = g.add("Add", [v, _c(g, 1e-3)])
    (s,) = g.add("Sqrt", [ve])
    (r,) = g.add("Reciprocal", [s])
    (gg,) = g.add("Mul", [r, _w(g, 16)])
    (a,) = g.add("Mul", [x, gg])
    (b,) = g.add("Mul", [m, gg])
    (c,) = g.add("Sub", [_w(g, 16), b])
    (y,) = g.add("Add", [a, c], outputs=["y"])
    g.outputs = [y]
    return g


def rms_llama(dtype: DType = DType.FLOAT16, *, weight: bool = True, inverse: str = "reciprocal") -> Graph:
    """LlamaRMSNorm: x.float(); x * rsqrt(mean(x^2) + eps); weight * x.to(dtype)."""
    g = Graph()
    x = _input(g, ("batch", "seq", 16), dtype)
    (x32,) = g.add("Cast", [x], {"to": DType.FLOAT32}) if dtype is not DType.FLOAT32 else (x,)
    (sq,) = g.add("Pow", [x32, _c(g, 2.0)])
    v = _mean(g, sq, [-1])
    (ve,) = g.add("Add", [v, _c(g, 1e-6)])
    if inverse == "pow":
        (r,) = g.add("Pow", [ve, _c(g, -0.5)])
    else:
        (s,) = g.add("Sqrt", [ve])
        (r,) = g.add("Reciprocal", [s]) if inverse == "reciprocal" else g.add("Div", [_c(g, 1.0), s])
    (n,) = g.add("Mul", [x32, r])
    if dtype is not DType.FLOAT32:
        (n,) = g.add("Cast", [n], {"to": dtype})
    if weight:
        (n,) = g.add("Mul", [_w(g, 16, dtype=dtype.torch), n])
    g.rename(n, "y")
    g.outputs = [n]
    return g


X3 = {"x": rand(2, 5, 16) * 2 + 1}


@pytest.mark.parametrize("kw", [{}, {"square": "mul"}, {"inverse": "reciprocal"}, {"affine": False}])
def test_layer_norm_torch_forms(kw) -> None:
    g, res = rewrite_preserves(lambda: layer_norm_torch(**kw), fuse_normalization, X3)
    assert ops(g) == ["LayerNormalization"] and res.counts == {"layer_norm": 1}
    ln = g.nodes[0]
    assert ln.attrs["axis"] == -1 and ln.attrs["epsilon"] == pytest.approx(1e-5)
    assert len(ln.inputs) == (3 if kw.get("affine", True) else 2)


def test_layer_norm_over_two_axes() -> None:
    def build() -> Graph:
        return layer_norm_torch(axes=[-2, -1], shape=("batch", 4, 8), gamma_shape=(4, 8))

    g, _ = rewrite_preserves(build, fuse_normalization, {"x": rand(3, 4, 8)})
    assert ops(g) == ["LayerNormalization"] and g.nodes[0].attrs["axis"] == -2


def test_layer_norm_keras_form() -> None:
    g, res = rewrite_preserves(layer_norm_keras, fuse_normalization, {"x": rand(3, 16) * 4})
    assert ops(g) == ["LayerNormalization"] and res.counts == {"layer_norm": 1}
    assert g.nodes[0].attrs["epsilon"] == pytest.approx(1e-3)


def test_gamma_along_other_axis_stays_outside() -> None:
    """A scale that varies along the batch-like axis is not a LayerNorm gamma: it stays a Mul."""
    def build() -> Graph:
        return layer_norm_torch(shape=(3, "seq", 16), gamma_shape=(3, 1, 1))

    g, _ = rewrite_preserves(build, fuse_normalization, {"x": rand(3, 5, 16)})
    assert ops(g) == ["LayerNormalization", "Mul", "Add"]


@pytest.mark.parametrize("kw", [{"eps_outside": True}, {"power": 4.0}])
def test_near_misses_do_not_match(kw) -> None:
    g, res = rewrite_preserves(lambda: layer_norm_torch(**kw), fuse_normalization, X3)
    assert not res.changed and "LayerNormalization" not in ops(g)


def test_mean_over_other_axes_is_not_layer_norm() -> None:
    def build() -> Graph:  # the mean over axis 1, the variance over axis 2
        return layer_norm_torch(shape=("batch", 4, 16), mean_axes=[1])

    g, res = rewrite_preserves(build, fuse_normalization, {"x": rand(2, 4, 16)})
    assert "LayerNormalization" not in ops(g)  # (x - mean_1) / rms_2 is no LayerNorm: an RMSNorm of x - mean_1
    assert res.counts == {"rms_norm": 1}


def test_shared_intermediate_does_not_match() -> None:
    def build() -> Graph:
        g = layer_norm_torch()
        sub = next(n for n in g.nodes if n.op == "Sub")
        g.outputs.append(sub.outputs[0])
        return g

    g, _res = rewrite_preserves(build, fuse_normalization, X3)
    assert "LayerNormalization" not in ops(g)


@pytest.mark.parametrize("inverse", ["reciprocal", "div", "pow"])
def test_rms_norm_llama_half(inverse: str) -> None:
    feeds = {"x": (rand(2, 5, 16) * 3).astype(np.float16)}
    g, res = rewrite_preserves(lambda: rms_llama(inverse=inverse), fuse_normalization, feeds, rtol=2e-3,
                               atol=2e-3)
    assert ops(g) == ["RMSNormalization"] and res.counts == {"rms_norm": 1}
    node = g.nodes[0]
    assert node.inputs[0] is g.inputs[0] and node.attrs["stash_type"] is DType.FLOAT32
    assert node.attrs["epsilon"] == pytest.approx(1e-6)


def test_rms_norm_float32_without_weight() -> None:
    g, _ = rewrite_preserves(lambda: rms_llama(DType.FLOAT32, weight=False), fuse_normalization, X3)
    assert ops(g) == ["RMSNormalization"]


def _group_norm_torch(groups: int, *, inner: str = "instance") -> Graph:
    """torch's GroupNorm export: Reshape [N, G, -1], InstanceNormalization(1, 0), Reshape(Shape(x)), * gamma, + beta."""
    g = Graph()
    x = _input(g, ("N", 8, 4, 4))
    (r,) = g.add("Reshape", [x, _c(g, [0, groups, -1], torch.int64)])
    if inner == "instance":
        (n,) = g.add("InstanceNormalization", [r, _c(g, [1.0] * groups), _c(g, [0.0] * groups)], {"epsilon": 1e-5})
    else:  # the decomposed statistics, which the LayerNorm rule turns into a unit LayerNorm first
        m = _mean(g, r, [2])
        (d,) = g.add("Sub", [r, m])
        (sq,) = g.add("Mul", [d, d])
        v = _mean(g, sq, [2])
        (ve,) = g.add("Add", [v, _c(g, 1e-5)])
        (s,) = g.add("Sqrt", [ve])
        (n,) = g.add("Div", [d, s])
    (shape,) = g.add("Shape", [x])
    (b,) = g.add("Reshape", [n, shape])
    (y,) = g.add("Mul", [b, _w(g, 8, 1, 1)])
    (y,) = g.add("Add", [y, _w(g, 8, 1, 1)], outputs=["y"])
    g.outputs = [y]
    return g


@pytest.mark.parametrize("inner", ["instance", "decomposed"])
def test_group_norm(inner: str) -> None:
    g, _ = rewrite_preserves(lambda: _group_norm_torch(4, inner=inner), fuse_normalization, {"x": rand(2, 8, 4, 4)})
    assert ops(g) == ["GroupNormalization"]
    assert g.nodes[0].attrs["num_groups"] == 4 and g.nodes[0].inputs[0] is g.inputs[0]


def test_group_norm_with_one_channel_per_group_is_instance_norm() -> None:
    g, res = rewrite_preserves(lambda: _group_norm_torch(8), fuse_normalization, {"x": rand(2, 8, 4, 4)})
    assert ops(g) == ["InstanceNormalization"] and res.counts == {"instance_norm": 1}


def test_instance_norm_decomposed() -> None:
    def build() -> Graph:
        g = layer_norm_torch(axes=[2, 3], shape=("N", 8, 4, 4), gamma_shape=(8, 1, 1))
        return g

    g, res = rewrite_preserves(build, fuse_normalization, {"x": rand(2, 8, 4, 4)})
    assert ops(g) == ["InstanceNormalization"]
    assert res.counts == {"layer_norm": 1, "instance_norm": 1}
