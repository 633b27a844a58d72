"""Softmax family, normalizations and losses: inference, references against numpy / torch / onnxruntime, and
the legacy ONNX handlers (2-D coercing softmax, BatchNormalization is_test/spatial, GroupNormalization 18)."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper

from kiln.frontend.onnx import import_model
from kiln.ir import DType, Graph, TensorType
from kiln.ir.interpreter import Interpreter
from kiln.utils.errors import ExecutionError, ShapeError, UnsupportedError

D = DType
RNG = np.random.default_rng(0)


def _graph(op: str, types: list[TensorType | None], n_out: int = 1, **attrs: Any) -> tuple[Graph, list[Any]]:
    g = Graph()
    ins = [None if t is None else g.add_input(f"x{i}", t) for i, t in enumerate(types)]
    outs = g.add(op, ins, attrs, outputs=n_out)
    g.outputs += outs
    return g, outs


def _run(op: str, xs: list[np.ndarray | None], n_out: int = 1, **attrs: Any) -> list[np.ndarray]:
    types = [None if x is None else TensorType(D.from_numpy(x.dtype), x.shape) for x in xs]
    g, _ = _graph(op, types, n_out, **attrs)
    return Interpreter(g).run([x for x in xs if x is not None])


def _model(op: str, feeds: dict[str, np.ndarray], opset: int, n_out: int = 1,
           shapes: dict[str, list[Any]] | None = None, **attrs: Any) -> onnx.ModelProto:
    outs = ["y"] + [f"y{i}" for i in range(1, n_out)]
    node = helper.make_node(op, list(feeds), outs, **attrs)
    vis = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype),
                                         (shapes or {}).get(k, list(v.shape))) for k, v in feeds.items()]
    elem = vis[0].type.tensor_type.elem_type
    g = helper.make_graph([node], "g", vis, [helper.make_tensor_value_info(o, elem, None) for o in outs])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _kiln(m: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return Interpreter(import_model(m)).run(list(feeds.values()))


def _ort(m: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def _same_as_ort(m: onnx.ModelProto, feeds: dict[str, np.ndarray], rtol: float = 1e-5) -> None:
    for got, want in zip(_kiln(m, feeds), _ort(m, feeds)):
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_allclose(got, want, rtol=rtol, atol=1e-6)


def _x(*shape: int, dtype: type = np.float32) -> np.ndarray:
    return RNG.standard_normal(shape).astype(dtype)


# --- softmax family --------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax", "Hardmax"])
@pytest.mark.parametrize(("opset", "axis"), [(13, 1), (13, -1), (11, 1), (11, 0), (11, -1), (1, 1)])
def test_softmax_family_matches_ort(op: str, opset: int, axis: int) -> None:
    feeds = {"x": _x(2, 3, 4)}
    _same_as_ort(_model(op, feeds, opset, axis=axis), feeds)


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
def test_legacy_softmax_symbolic_shape_uses_shape_of_input(op: str) -> None:
    feeds = {"x": _x(2, 3, 4)}
    m = _model(op, feeds, 11, shapes={"x": ["N", 3, 4]}, axis=1)
    g = import_model(m)
    assert {"Flatten", "Shape", "Reshape"} <= set(g.op_counts())
    assert g.outputs[0].shape is not None and len(g.outputs[0].shape) == 3
    _same_as_ort(m, feeds)


def test_legacy_softmax_on_last_axis_is_one_node() -> None:
    feeds = {"x": _x(2, 3, 1)}
    g = import_model(_model("Softmax", feeds, 11, axis=1))
    assert g.op_counts() == {"Softmax": 1}


def test_softmax_inference() -> None:
    _, (y,) = _graph("Softmax", [TensorType(D.FLOAT16, ("N", 8))], axis=0)
    assert y.type == TensorType(D.FLOAT16, ("N", 8))
    _, (y,) = _graph("LogSoftmax", [TensorType(D.FLOAT32, None)])
    assert y.type == TensorType(D.FLOAT32, None)
    with pytest.raises(ShapeError, match="out of range"):
        _graph("Softmax", [TensorType(D.FLOAT32, (2, 3))], axis=2)
    with pytest.raises(ShapeError, match="does not accept"):
        _graph("Softmax", [TensorType(D.INT32, (2, 3))])


def test_hardmax_picks_first_of_ties() -> None:
    x = np.array([[1, 3, 3, 0], [2, 2, 2, 2]], dtype=np.float32)
    (y,) = _run("Hardmax", [x])
    np.testing.assert_array_equal(y, [[0, 1, 0, 0], [1, 0, 0, 0]])


def test_half_softmax_rounds_like_its_function_body() -> None:
    x = _x(3, 7, dtype=np.float16) * 4
    (y,) = _run("Softmax", [x])
    e = np.exp((x - x.max(1, keepdims=True)).astype(np.float32)).astype(np.float16)
    total = e.astype(np.float32).sum(1, keepdims=True).astype(np.float16)
    want = (e.astype(np.float32) / total).astype(np.float16)
    np.testing.assert_array_equal(y, want)


def test_lp_normalization() -> None:
    x = np.array([[3.0, -4.0], [0.0, 0.0]], dtype=np.float32)
    (y,) = _run("LpNormalization", [x], p=1)
    np.testing.assert_allclose(y, [[3 / 7, -4 / 7], [0, 0]], rtol=1e-6)
    (y,) = _run("LpNormalization", [x], axis=0)
    np.testing.assert_allclose(y, [[1, -1], [0, 0]], rtol=1e-6)
    with pytest.raises(UnsupportedError):
        _run("LpNormalization", [x], p=3)


# --- BatchNormalization ----------------------------------------------------------------------------------


def _bn_feeds(c: int = 3, shape: tuple[int, ...] = (2, 3, 4, 5)) -> dict[str, np.ndarray]:
    var = RNG.uniform(0.5, 2, c).astype(np.float32)
    return {"x": _x(*shape), "s": _x(c), "b": _x(c), "m": _x(c), "v": var}


def _bn_numpy(f: dict[str, np.ndarray], eps: float = 1e-5, training: bool = False) -> np.ndarray:
    x = f["x"].astype(np.float64)
    shape = [1, -1] + [1] * (x.ndim - 2)
    axes = tuple(i for i in range(x.ndim) if i != 1)
    mean = x.mean(axes) if training else f["m"]
    var = x.var(axes) if training else f["v"]
    y = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps)
    return y * f["s"].reshape(shape) + f["b"].reshape(shape)


@pytest.mark.parametrize("opset", [15, 14, 9, 7])
def test_batchnorm_inference_mode_matches_ort(opset: int) -> None:
    feeds = _bn_feeds()
    _same_as_ort(_model("BatchNormalization", feeds, opset, epsilon=1e-3), feeds, rtol=1e-4)


def test_batchnorm_training_mode_outputs() -> None:
    feeds = _bn_feeds()
    m = _model("BatchNormalization", feeds, 15, n_out=3, training_mode=1, momentum=0.8)
    y, rm, rv = _kiln(m, feeds)
    x = feeds["x"].astype(np.float64)
    np.testing.assert_allclose(y, _bn_numpy(feeds, training=True), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(rm, feeds["m"] * 0.8 + x.mean((0, 2, 3)) * 0.2, rtol=1e-5)
    np.testing.assert_allclose(rv, feeds["v"] * 0.8 + x.var((0, 2, 3)) * 0.2, rtol=1e-5)


def test_batchnorm_rank1_and_rank2_inputs() -> None:
    f = _bn_feeds(1, (6,))
    (y,) = _run("BatchNormalization", [f["x"], f["s"], f["b"], f["m"], f["v"]])
    want = (f["x"] - f["m"]) / np.sqrt(f["v"] + 1e-5) * f["s"] + f["b"]
    np.testing.assert_allclose(y, want, rtol=1e-5)
    f = _bn_feeds(3, (4, 3))
    (y,) = _run("BatchNormalization", [f["x"], f["s"], f["b"], f["m"], f["v"]])
    np.testing.assert_allclose(y, _bn_numpy(f), rtol=1e-5, atol=1e-6)


def test_batchnorm_inference_checks() -> None:
    x, c = TensorType(D.FLOAT32, ("N", 3, "H")), TensorType(D.FLOAT32, (3,))
    _, (y,) = _graph("BatchNormalization", [x, c, c, c, c])
    assert y.type == x
    with pytest.raises(ShapeError, match=r"shape \[3\]"):
        _graph("BatchNormalization", [x, TensorType(D.FLOAT32, (4,)), c, c, c])
    with pytest.raises(ShapeError, match="training_mode=1"):
        _graph("BatchNormalization", [x, c, c, c, c], n_out=3)


def test_batchnorm_opset6_is_test() -> None:
    feeds = _bn_feeds()
    (y,) = _kiln(_model("BatchNormalization", feeds, 6, is_test=1), feeds)
    np.testing.assert_allclose(y, _bn_numpy(feeds), rtol=1e-4, atol=1e-5)
    (y,) = _kiln(_model("BatchNormalization", feeds, 6), feeds)  # is_test=0: batch statistics
    np.testing.assert_allclose(y, _bn_numpy(feeds, training=True), rtol=1e-4, atol=1e-5)


def test_batchnorm_opset9_training_by_output_count() -> None:
    feeds = _bn_feeds()
    y, rm, _ = _kiln(_model("BatchNormalization", feeds, 9, n_out=3), feeds)
    np.testing.assert_allclose(y, _bn_numpy(feeds, training=True), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(rm, feeds["m"] * 0.9 + feeds["x"].mean((0, 2, 3)) * 0.1, rtol=1e-5)
    with pytest.raises(UnsupportedError, match="saved_mean"):
        import_model(_model("BatchNormalization", feeds, 9, n_out=5))


def test_batchnorm_spatial0_inference_mode() -> None:
    x = _x(2, 3, 4)
    p = {k: _x(3, 4) for k in ("s", "b", "m")}
    feeds = {"x": x, **p, "v": RNG.uniform(0.5, 2, (3, 4)).astype(np.float32)}
    (y,) = _kiln(_model("BatchNormalization", feeds, 7, spatial=0), feeds)
    want = (x - p["m"]) / np.sqrt(feeds["v"] + 1e-5) * p["s"] + p["b"]
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(UnsupportedError, match="spatial=0"):
        import_model(_model("BatchNormalization", feeds, 7, n_out=3, spatial=0))
    with pytest.raises(UnsupportedError, match="spatial"):
        import_model(_model("BatchNormalization", feeds, 9, spatial=0))


# --- InstanceNormalization, LayerNormalization, GroupNormalization, RMSNormalization ------------------------


@pytest.mark.parametrize("opset", [6, 22])
def test_instancenorm_matches_ort(opset: int) -> None:
    feeds = {"x": _x(2, 3, 4, 5), "s": _x(3), "b": _x(3)}
    _same_as_ort(_model("InstanceNormalization", feeds, opset, epsilon=1e-3), feeds, rtol=1e-4)


@pytest.mark.parametrize("axis", [-1, 1, 0])
def test_layernorm_matches_ort(axis: int) -> None:
    x = _x(2, 3, 4)
    feeds = {"x": x, "s": _x(*x.shape[axis:]), "b": _x(*x.shape[axis:])}
    _same_as_ort(_model("LayerNormalization", feeds, 17, n_out=3, axis=axis), feeds, rtol=1e-4)


def test_layernorm_inference() -> None:
    x = TensorType(D.FLOAT16, ("N", "S", 8))
    _, (y, mean, inv) = _graph("LayerNormalization", [x, TensorType(D.FLOAT16, (8,)), None], n_out=3, axis=-1)
    assert y.type == x
    assert mean.type == inv.type == TensorType(D.FLOAT32, ("N", "S", 1))
    _, (_, mean) = _graph("LayerNormalization", [x, TensorType(D.FLOAT16, (8,))], n_out=2, axis=1,
                          stash_type=D.FLOAT16)
    assert mean.type == TensorType(D.FLOAT16, ("N", 1, 1))
    with pytest.raises(ShapeError, match="broadcast"):
        _graph("LayerNormalization", [x, TensorType(D.FLOAT16, (7,))])
    with pytest.raises(UnsupportedError, match="stash_type"):
        _graph("LayerNormalization", [x, TensorType(D.FLOAT16, (8,))], stash_type=D.INT32)


def test_layernorm_half_input_outputs_float32_statistics() -> None:
    x = _x(2, 5, dtype=np.float16)
    y, mean, inv = _run("LayerNormalization", [x, np.ones(5, np.float16), np.zeros(5, np.float16)], n_out=3)
    assert y.dtype == np.float16 and mean.dtype == inv.dtype == np.float32
    xf = x.astype(np.float32)
    np.testing.assert_allclose(mean[:, 0], xf.mean(1), rtol=1e-6)
    np.testing.assert_allclose(inv[:, 0], 1 / np.sqrt(xf.var(1) + 1e-5), rtol=1e-5)


def _groupnorm_numpy(x: np.ndarray, groups: int, scale: np.ndarray, bias: np.ndarray) -> np.ndarray:
    n, c = x.shape[:2]
    g = x.reshape(n, groups, -1).astype(np.float64)
    y = ((g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + 1e-5)).reshape(x.shape)
    shape = [1, c] + [1] * (x.ndim - 2)
    return y * scale.reshape(shape) + bias.reshape(shape)


def test_groupnorm_21_per_channel() -> None:
    x, s, b = _x(2, 6, 3, 2), _x(6), _x(6)
    (y,) = _run("GroupNormalization", [x, s, b], num_groups=3)
    np.testing.assert_allclose(y, _groupnorm_numpy(x, 3, s, b), rtol=1e-4, atol=1e-5)
    with pytest.raises(ShapeError, match="groups"):
        _graph("GroupNormalization", [TensorType(D.FLOAT32, (2, 6, 3)), *[TensorType(D.FLOAT32, (6,))] * 2],
               num_groups=4)


@pytest.mark.parametrize("const_params", [True, False])
def test_groupnorm_18_per_group_params_expand_per_channel(const_params: bool) -> None:
    x, s, b = _x(2, 6, 3), _x(3), _x(3)
    node = helper.make_node("GroupNormalization", ["x", "s", "b"], ["y"], num_groups=3)
    f32 = TensorProto.FLOAT
    vis = [helper.make_tensor_value_info("x", f32, [2, 6, 3])]
    inits = []
    if const_params:
        inits = [onnx.numpy_helper.from_array(s, "s"), onnx.numpy_helper.from_array(b, "b")]
    else:
        vis += [helper.make_tensor_value_info(k, f32, [3]) for k in ("s", "b")]
    out = [helper.make_tensor_value_info("y", f32, None)]
    g = helper.make_graph([node], "g", vis, out, initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    feeds = [x] if const_params else [x, s, b]
    (y,) = Interpreter(import_model(m)).run(feeds)
    want = _groupnorm_numpy(x, 3, np.repeat(s, 2), np.repeat(b, 2))
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)


def test_groupnorm_18_needs_static_channels() -> None:
    feeds = {"x": _x(2, 6, 3), "s": _x(3), "b": _x(3)}
    with pytest.raises(UnsupportedError, match="static channel"):
        import_model(_model("GroupNormalization", feeds, 18, shapes={"x": ["N", "C", 3]}, num_groups=3))


def test_rmsnorm() -> None:
    x, s = _x(2, 3, 4), _x(3, 4)
    (y,) = _run("RMSNormalization", [x, s], axis=1)
    xf = x.astype(np.float64)
    want = xf / np.sqrt((xf * xf).mean((1, 2), keepdims=True) + 1e-5) * s
    np.testing.assert_allclose(y, want, rtol=1e-5)
    _, (y,) = _graph("RMSNormalization", [TensorType(D.FLOAT16, ("N", 4)), TensorType(D.FLOAT32, (4,))])
    assert y.type == TensorType(D.FLOAT32, ("N", 4))  # Y has scale's dtype


# --- MeanVarianceNormalization, LRN ----------------------------------------------------------------------


@pytest.mark.parametrize("axes", [None, [1], [0, 1, 2, 3]])
def test_mvn_matches_ort(axes: list[int] | None) -> None:
    feeds = {"x": _x(2, 3, 4, 5)}
    attrs = {} if axes is None else {"axes": axes}
    _same_as_ort(_model("MeanVarianceNormalization", feeds, 13, **attrs), feeds, rtol=1e-4)


@pytest.mark.parametrize("size", [1, 3])
def test_lrn_matches_ort(size: int) -> None:
    feeds = {"x": _x(2, 5, 3, 3)}
    _same_as_ort(_model("LRN", feeds, 13, size=size, alpha=0.01, beta=0.5, bias=2.0), feeds)


@pytest.mark.parametrize("size", [2, 4])
def test_lrn_even_size_window(size: int) -> None:
    x = _x(2, 5, 3)
    (y,) = _run("LRN", [x], size=size, alpha=0.01, beta=0.5, bias=2.0)
    lo, hi = (size - 1) // 2, size // 2  # floor((size-1)/2) before, ceil((size-1)/2) after
    sq = np.zeros_like(x, dtype=np.float64)
    for c in range(5):
        sq[:, c] = (x[:, max(0, c - lo):min(5, c + hi + 1)].astype(np.float64) ** 2).sum(1)
    np.testing.assert_allclose(y, x / (2.0 + 0.01 / size * sq) ** 0.5, rtol=1e-5)


def test_lrn_needs_size() -> None:
    with pytest.raises(UnsupportedError, match="size"):
        _graph("LRN", [TensorType(D.FLOAT32, (1, 3, 2, 2))])


# --- losses ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("ignore", [None, 1, -1])
def test_nll_matches_torch(reduction: str, weighted: bool, ignore: int | None) -> None:
    x = torch.randn(3, 4, 2, 5, generator=torch.Generator().manual_seed(1))
    t = torch.tensor(RNG.integers(0, 4, (3, 2, 5)))
    if ignore is not None:
        t[0, 0, :2] = ignore
    w = torch.rand(4) + 0.5 if weighted else None
    ins = [x.numpy(), t.numpy()] + ([w.numpy()] if w is not None else [])
    attrs: dict[str, Any] = {"reduction": reduction} | ({} if ignore is None else {"ignore_index": ignore})
    (got,) = _run("NegativeLogLikelihoodLoss", ins, **attrs)
    ii = -100 if ignore is None else ignore
    want = F.nll_loss(x, t, weight=w, reduction=reduction, ignore_index=ii)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-6)
    (loss, log_prob) = _run("SoftmaxCrossEntropyLoss", ins, n_out=2, **attrs)
    want = F.cross_entropy(x, t, weight=w, reduction=reduction, ignore_index=ii)
    np.testing.assert_allclose(loss, want.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(log_prob, torch.log_softmax(x, 1).numpy(), rtol=1e-5, atol=1e-6)


def test_loss_inference() -> None:
    scores, labels = TensorType(D.FLOAT32, ("N", 5, "L")), TensorType(D.INT64, ("N", "L"))
    _, (loss, log_prob) = _graph("SoftmaxCrossEntropyLoss", [scores, labels], n_out=2, reduction="none")
    assert loss.type == TensorType(D.FLOAT32, ("N", "L")) and log_prob.type == scores
    _, (loss,) = _graph("NegativeLogLikelihoodLoss", [scores, labels])
    assert loss.type == TensorType(D.FLOAT32, ())
    with pytest.raises(ShapeError, match="do not fit"):
        _graph("NegativeLogLikelihoodLoss", [scores, TensorType(D.INT64, ("N",))])
    with pytest.raises(ShapeError, match=r"shape \[C\]"):
        _graph("NegativeLogLikelihoodLoss", [scores, labels, TensorType(D.FLOAT32, (4,))])
    with pytest.raises(UnsupportedError, match="reduction"):
        _graph("NegativeLogLikelihoodLoss", [scores, labels], reduction="avg")


def test_loss_target_out_of_range() -> None:
    with pytest.raises(ExecutionError, match="outside"):
        _run("NegativeLogLikelihoodLoss", [_x(2, 3), np.array([0, 3])])
