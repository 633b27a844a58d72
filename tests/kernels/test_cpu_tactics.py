"""The CPU tactics against the op table's reference, their applicability limits, and an engine build that
tunes, caches and reuses their choices."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

import kiln
from kiln.ir import DType, Graph, Node, TensorType
from kiln.kernels import registry
from kiln.kernels.cpu.common import mkldnn_ops, prepared, reference

CPU = torch.device("cpu")
GEN = torch.Generator().manual_seed(0)


class C:
    """A constant (initializer) input."""

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t


Arg = torch.Tensor | C | None


def r(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=GEN).to(dtype)


def node_of(op: str, inputs: Sequence[Arg], n_out: int = 1, dims: dict[int, Sequence[Any]] | None = None,
            **attrs: Any) -> tuple[Node, list[Any]]:
    """A one-node graph: C(...) inputs become initializers, tensors graph inputs (with `dims[i]` as their
    declared shape, symbolic dims allowed); returns the node and the values a runtime would pass it."""
    g = Graph()
    vals, args = [], []
    for i, x in enumerate(inputs):
        if x is None:
            vals.append(None)
            args.append(None)
        elif isinstance(x, C):
            vals.append(g.add_initializer(f"c{i}", x.t))
            args.append(x.t)
        else:
            shape = tuple((dims or {}).get(i, x.shape))
            vals.append(g.add_input(f"in{i}", TensorType(DType.from_torch(x.dtype), shape)))
            args.append(x)
    g.add(op, vals, attrs, outputs=n_out)
    return g.nodes[-1], args


def assert_same(got: list[Any], want: list[Any], n: int) -> None:
    assert len(got) >= n
    for g, w in zip(got[:n], want[:n]):
        assert g.dtype == w.dtype and g.shape == w.shape, (g.dtype, g.shape, w.dtype, w.shape)
        scale = float(w.abs().max()) if w.numel() else 0.0
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5 * (1 + scale), equal_nan=True)


def check(tactic: str, op: str, inputs: Sequence[Arg], n_out: int = 1, dims: dict[int, Sequence[Any]] | None = None,
          **attrs: Any) -> None:
    """The tactic takes the node and matches the reference under every configuration of its space, leaves its
    inputs alone, and stays right when a constant arrives as another tensor than the one it was built with."""
    node, args = node_of(op, inputs, n_out, dims, **attrs)
    t = registry.get(tactic)
    assert t.applicable(node, CPU), f"{tactic} should take {op} {attrs}"
    assert t in registry.candidates(node, CPU)
    want = reference(node)(list(args))
    before = [None if a is None else a.clone() for a in args]
    for cfg in t.configs():
        kernel = t.build(node, cfg, CPU)
        assert_same(kernel(list(args)), want, n_out)
        assert_same(kernel([None if a is None else a.clone() for a in args]), want, n_out)
    for a, b in zip(args, before):
        assert a is None or torch.equal(a.nan_to_num(), b.nan_to_num()), "a kernel modified its input"


def refuses(tactic: str, op: str, inputs: Sequence[Arg], n_out: int = 1,
            dims: dict[int, Sequence[Any]] | None = None, **attrs: Any) -> None:
    node, _ = node_of(op, inputs, n_out, dims, **attrs)
    assert not registry.get(tactic).applicable(node, CPU), f"{tactic} must not take {op} {attrs}"


onednn = pytest.mark.skipif(not mkldnn_ops("_linear_pointwise", "_convolution_pointwise"), reason="no oneDNN")


# --- MatMul / Gemm ----------------------------------------------------------------------------------------


MATMULS = [
    ([r(5, 7), C(r(7, 3))], {}),
    ([r(2, 3, 7), C(r(7, 11))], {}),
    ([r(7), C(r(7, 4))], {}),
    ([r(2, 1, 4, 7), r(7, 9)], {}),
    ([r(0, 7), C(r(7, 3))], {}),
    ([r(3, 6), C(r(6, 5))], {0: ("M", 6)}),
]


@onednn
@pytest.mark.parametrize("inputs,dims", MATMULS)
def test_onednn_linear_matmul(inputs: list[Arg], dims: dict[int, Any]) -> None:
    check("cpu.onednn_linear", "MatMul", inputs, dims=dims)


def _gemm_inputs(m: int, k: int, n: int, trans_a: int, trans_b: int, c: Sequence[int] | None,
                 const_b: bool = True, const_c: bool = True, dtype: torch.dtype = torch.float32) -> list[Arg]:
    a = r(*((k, m) if trans_a else (m, k)), dtype=dtype)
    b = r(*((n, k) if trans_b else (k, n)), dtype=dtype)
    cc = None if c is None else r(*c, dtype=dtype)
    return [a, C(b) if const_b else b, None if cc is None else (C(cc) if const_c else cc)]


GEMMS = [
    (dict(trans_a=0, trans_b=1, c=(6,)), {}),
    (dict(trans_a=0, trans_b=0, c=None), dict(alpha=0.5)),
    (dict(trans_a=1, trans_b=1, c=(1, 6)), dict(alpha=2.0, beta=0.25)),
    (dict(trans_a=1, trans_b=0, c=()), dict(beta=3.0)),
    (dict(trans_a=0, trans_b=1, c=(1,)), {}),
    (dict(trans_a=0, trans_b=1, c=(5, 1)), dict(beta=-1.0)),
    (dict(trans_a=0, trans_b=1, c=(5, 6)), dict(alpha=0.75, beta=0.5)),
    (dict(trans_a=0, trans_b=1, c=(6,), const_b=False, const_c=False), dict(beta=2.0)),
]


@onednn
@pytest.mark.parametrize("form,attrs", GEMMS)
def test_onednn_linear_gemm(form: dict[str, Any], attrs: dict[str, Any]) -> None:
    check("cpu.onednn_linear", "Gemm", _gemm_inputs(5, 7, 6, **form), transA=form["trans_a"],
          transB=form["trans_b"], **attrs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("form,attrs", GEMMS)
def test_gemm_addmm(form: dict[str, Any], attrs: dict[str, Any], dtype: torch.dtype) -> None:
    check("cpu.gemm_addmm", "Gemm", _gemm_inputs(5, 7, 6, dtype=dtype, **form), transA=form["trans_a"],
          transB=form["trans_b"], **attrs)


def test_gemm_with_beta_zero_never_reads_c() -> None:
    inputs = [r(4, 3), C(r(3, 2)), C(torch.full((2,), math.nan))]
    for tactic in ("cpu.onednn_linear", "cpu.gemm_addmm"):
        if tactic == "cpu.onednn_linear" and not mkldnn_ops("_linear_pointwise"):
            continue
        check(tactic, "Gemm", inputs, beta=0.0)


@pytest.mark.parametrize("inputs", [[r(5, 7), C(r(7, 3))], [r(2, 3, 7), C(r(7, 11))], [r(7), C(r(7, 4))],
                                    [r(3, 7, dtype=torch.float64), C(r(7, 2, dtype=torch.float64))]])
def test_matmul_linear(inputs: list[Arg]) -> None:
    check("cpu.matmul_linear", "MatMul", inputs)


def test_matmul_tactics_refuse_what_they_do_not_compute() -> None:
    for tactic in ("cpu.onednn_linear", "cpu.matmul_linear"):
        refuses(tactic, "MatMul", [r(2, 3, 4), C(r(2, 4, 5))])  # batched B
        refuses(tactic, "MatMul", [r(3, 4), C(r(4))])  # 1-D B
        refuses(tactic, "MatMul", [torch.ones(3, 4, dtype=torch.int32), C(torch.ones(4, 5, dtype=torch.int32))])
        refuses(tactic, "MatMul", [r(3, 4, dtype=torch.float16), C(r(4, 5, dtype=torch.float16))])
    refuses("cpu.onednn_linear", "MatMul", [r(3, 4, dtype=torch.float64), C(r(4, 5, dtype=torch.float64))])
    refuses("cpu.matmul_linear", "MatMul", [r(3, 4), r(4, 5)])  # B not constant: nothing to pre-transpose
    refuses("cpu.gemm_addmm", "Gemm", [torch.ones(3, 4, dtype=torch.int64), torch.ones(4, 5, dtype=torch.int64)])


# --- Conv ---------------------------------------------------------------------------------------------


def _conv(n: int, c: int, hw: Sequence[int], m: int, k: Sequence[int], group: int = 1, bias: bool = True,
          const_w: bool = True) -> list[Arg]:
    w = r(m, c // group, *k) * 0.3
    return [r(n, c, *hw), C(w) if const_w else w, C(r(m)) if bias else None]


CONVS = [
    (_conv(1, 3, (17, 15), 8, (3, 3)), dict(pads=(1, 1, 1, 1))),
    (_conv(2, 6, (11, 13), 4, (3, 5), group=2), dict(strides=(2, 1), pads=(1, 2, 1, 2), group=2)),
    (_conv(2, 8, (9, 9), 8, (3, 3), group=8, bias=False), dict(pads=(1, 1, 1, 1), dilations=(2, 2), group=8)),
    (_conv(1, 4, (10, 7), 6, (3, 3)), dict(auto_pad="SAME_UPPER", strides=(2, 2))),
    (_conv(1, 4, (10, 7), 6, (4, 4)), dict(auto_pad="SAME_LOWER")),
    (_conv(3, 5, (8, 9), 7, (2, 3)), dict(auto_pad="VALID", strides=(3, 2))),
    (_conv(2, 4, (9, 8), 5, (3, 3)), dict(pads=(0, 1, 2, 1))),
    (_conv(1, 16, (7, 7), 32, (1, 1), const_w=False), {}),
    (_conv(2, 3, (12, 10), 4, (7, 7)), dict(strides=(2, 2), pads=(3, 3, 3, 3))),
]


@onednn
@pytest.mark.parametrize("inputs,attrs", CONVS)
def test_onednn_conv_2d(inputs: list[Arg], attrs: dict[str, Any]) -> None:
    check("cpu.onednn_conv", "Conv", inputs, **attrs)


@onednn
def test_onednn_conv_3d_and_a_batch_other_than_the_build_shape() -> None:
    check("cpu.onednn_conv", "Conv", _conv(2, 4, (5, 6, 7), 3, (3, 3, 3)), pads=(1, 0, 1, 1, 0, 1), strides=(1, 2, 1))
    # Weights packed for the declared shape (batch 1) serve a call with batch 3 and other spatial sizes.
    check("cpu.onednn_conv", "Conv", _conv(3, 4, (12, 11), 6, (3, 3)), dims={0: ("N", 4, "H", "W")},
          pads=(1, 1, 1, 1))
    node, args = node_of("Conv", _conv(1, 4, (8, 8), 6, (3, 3)), pads=(1, 1, 1, 1))
    kernel = registry.get("cpu.onednn_conv").build(node, {}, CPU)
    x = r(3, 4, 13, 10)
    assert_same(kernel([x, *args[1:]]), reference(node)([x, *args[1:]]), 1)


@pytest.mark.parametrize("inputs,attrs", CONVS)
def test_conv_channels_last(inputs: list[Arg], attrs: dict[str, Any]) -> None:
    check("cpu.conv_channels_last", "Conv", inputs, **attrs)


@pytest.mark.parametrize("inputs,attrs", [
    (_conv(2, 16, (7, 9), 8, (1, 1)), {}),
    (_conv(1, 6, (9, 8), 5, (1, 1), bias=False), dict(strides=(2, 3))),
    (_conv(3, 4, (5, 5), 12, (1, 1), const_w=False), dict(auto_pad="SAME_UPPER", strides=(2, 2))),
    (_conv(1, 4, (6, 6), 3, (1, 1)), dict(pads=(0, 0, 0, 0), dilations=(2, 2))),
])
def test_conv1x1_matmul(inputs: list[Arg], attrs: dict[str, Any]) -> None:
    check("cpu.conv1x1_matmul", "Conv", inputs, **attrs)


def test_conv_tactics_refuse_what_they_do_not_compute() -> None:
    conv1d = [r(1, 3, 10), C(r(4, 3, 3))]
    for tactic in ("cpu.onednn_conv", "cpu.conv_channels_last", "cpu.conv1x1_matmul"):
        refuses(tactic, "Conv", conv1d)
        refuses(tactic, "Conv", [r(1, 3, 8, 8, dtype=torch.float64), C(r(4, 3, 1, 1, dtype=torch.float64))])
        refuses(tactic, "Conv", [r(1, 3, 8, 8), r(4, 3, 3, 3)], dims={1: (4, 3, "kh", "kw")})  # unknown kernel
    refuses("cpu.conv_channels_last", "Conv", _conv(1, 2, (4, 4, 4), 2, (1, 1, 1)))
    refuses("cpu.conv1x1_matmul", "Conv", _conv(1, 4, (6, 6), 4, (3, 3)))
    refuses("cpu.conv1x1_matmul", "Conv", _conv(1, 4, (6, 6), 4, (1, 1), group=2), group=2)
    refuses("cpu.conv1x1_matmul", "Conv", _conv(1, 4, (6, 6), 4, (1, 1)), pads=(1, 1, 1, 1))


# --- softmax and normalizations ---------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
@pytest.mark.parametrize("axis", [0, 1, -1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_softmax(op: str, axis: int, dtype: torch.dtype) -> None:
    check("cpu.softmax", op, [r(3, 5, 7, dtype=dtype) * 4], axis=axis)


@pytest.mark.parametrize("inputs,n_out,attrs", [
    ([r(2, 5, 8), C(r(8)), C(r(8))], 1, {}),
    ([r(2, 5, 8), C(r(8))], 1, dict(epsilon=1e-3)),
    ([r(2, 5, 8), C(r(5, 8)), C(r(1, 8))], 3, dict(axis=1)),
    ([r(3, 4, 6), C(r(6)), r(1, 1, 6)], 3, dict(axis=-2)),
    ([r(3, 7), C(r(1, 7)), C(r(7))], 2, {}),
])
def test_layer_norm(inputs: list[Arg], n_out: int, attrs: dict[str, Any]) -> None:
    check("cpu.layer_norm", "LayerNormalization", inputs, n_out, **attrs)


@pytest.mark.skipif(not hasattr(F, "rms_norm"), reason="torch without F.rms_norm")
@pytest.mark.parametrize("inputs,attrs", [([r(2, 5, 8), C(r(8))], {}), ([r(2, 5, 8), C(r(1, 8))], dict(axis=1))])
def test_rms_norm(inputs: list[Arg], attrs: dict[str, Any]) -> None:
    check("cpu.layer_norm", "RMSNormalization", inputs, **attrs)


def test_norms_refuse_what_they_do_not_compute() -> None:
    refuses("cpu.softmax", "Softmax", [r(3, 4, dtype=torch.float16)])
    refuses("cpu.layer_norm", "LayerNormalization", [r(2, 3, 4), C(r(3, 4))])  # Scale varies along axis 1
    refuses("cpu.layer_norm", "LayerNormalization", [r(2, 3, 4), C(r(4))], stash_type=DType.FLOAT64)
    refuses("cpu.layer_norm", "LayerNormalization", [r(2, 4, dtype=torch.float64), C(r(4, dtype=torch.float64))])
    refuses("cpu.batch_norm", "BatchNormalization", [r(2, 3, 4), *(C(r(3).abs()) for _ in range(4))], 3,
            training_mode=1)
    refuses("cpu.group_norm", "GroupNormalization", [r(2, 4, 3), C(r(4)), C(r(4))], num_groups=2,
            stash_type=DType.FLOAT64)


@pytest.mark.parametrize("shape", [(4, 3), (2, 3, 5, 4), (1, 3, 6)])
def test_batch_norm(shape: tuple[int, ...]) -> None:
    check("cpu.batch_norm", "BatchNormalization", [r(*shape), C(r(3)), C(r(3)), C(r(3)), C(r(3).abs() + 0.1)],
          epsilon=1e-3)


@pytest.mark.parametrize("shape", [(2, 3, 7), (2, 3, 5, 4)])
def test_instance_norm(shape: tuple[int, ...]) -> None:
    check("cpu.instance_norm", "InstanceNormalization", [r(*shape), C(r(3)), C(r(3))])


@pytest.mark.parametrize("groups", [1, 2, 6])
def test_group_norm(groups: int) -> None:
    check("cpu.group_norm", "GroupNormalization", [r(2, 6, 5, 3), C(r(6)), C(r(6))], num_groups=groups)


# --- pooling --------------------------------------------------------------------------------------------


POOLS = [
    ((1, 4, 17, 16), dict(kernel_shape=(3, 3), strides=(2, 2), pads=(1, 1, 1, 1))),
    ((2, 3, 11, 10), dict(kernel_shape=(2, 2), strides=(2, 2))),
    ((2, 3, 11, 10), dict(kernel_shape=(3, 2), strides=(2, 2), ceil_mode=1)),
    ((2, 3, 11, 10), dict(kernel_shape=(3, 3), strides=(2, 2), pads=(1, 1, 1, 1), ceil_mode=1)),
    ((1, 2, 9, 9), dict(kernel_shape=(3, 3), pads=(0, 1, 2, 1))),
    ((1, 2, 9, 9), dict(kernel_shape=(3, 3), pads=(0, 1, 2, 1), ceil_mode=1, strides=(2, 2))),
    ((1, 2, 10, 7), dict(kernel_shape=(3, 3), strides=(2, 2), auto_pad="SAME_UPPER")),
    ((1, 2, 10, 7), dict(kernel_shape=(4, 2), auto_pad="SAME_LOWER")),
    ((2, 3, 13), dict(kernel_shape=(4,), strides=(3,), pads=(1, 2))),
    ((1, 2, 5, 6, 7), dict(kernel_shape=(2, 3, 2), strides=(1, 2, 2), pads=(1, 1, 0, 1, 1, 0))),
]


@pytest.mark.parametrize("shape,attrs", POOLS)
def test_max_pool(shape: tuple[int, ...], attrs: dict[str, Any]) -> None:
    check("cpu.pool", "MaxPool", [r(*shape)], **attrs)


def test_max_pool_dilated_and_float64() -> None:
    check("cpu.pool", "MaxPool", [r(1, 2, 12, 11)], kernel_shape=(3, 3), dilations=(2, 1), pads=(2, 1, 2, 1))
    check("cpu.pool", "MaxPool", [r(1, 2, 8, 8, dtype=torch.float64)], kernel_shape=(2, 2))


@pytest.mark.parametrize("count_include_pad", [0, 1])
@pytest.mark.parametrize("shape,attrs", POOLS)
def test_average_pool(shape: tuple[int, ...], attrs: dict[str, Any], count_include_pad: int) -> None:
    check("cpu.pool", "AveragePool", [r(*shape)], count_include_pad=count_include_pad, **attrs)


def test_pool_refuses_what_it_does_not_compute() -> None:
    refuses("cpu.pool", "MaxPool", [r(1, 2, 6, 6)], 2, kernel_shape=(2, 2))  # Indices wanted
    refuses("cpu.pool", "MaxPool", [torch.ones(1, 2, 6, 6, dtype=torch.int8)], kernel_shape=(2, 2))
    refuses("cpu.pool", "AveragePool", [r(1, 2, 9, 9)], kernel_shape=(2, 2), dilations=(2, 2))


# --- activations ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("op,attrs", [
    ("Swish", {}), ("HardSwish", {}), ("HardSigmoid", dict(alpha=1 / 6, beta=0.5)), ("Softplus", {}),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_activations(op: str, attrs: dict[str, Any], dtype: torch.dtype) -> None:
    x = r(3, 4, 50, dtype=dtype) * 8
    x[0, 0, :3] = torch.tensor([-3.0, 3.0, 25.0], dtype=dtype)  # the kinks, and softplus' linear region
    check("cpu.activation", op, [x], **attrs)


@pytest.mark.parametrize("slope", [C(r(3, 1, 1)), C(r(1)), r(1, 3, 1, 1), C(r(1, 1, 1, 1))])
def test_prelu(slope: Arg) -> None:
    check("cpu.activation", "PRelu", [r(2, 3, 4, 5), slope])


def test_activations_refuse_what_they_do_not_compute() -> None:
    refuses("cpu.activation", "Swish", [r(3, 4)], alpha=2.0)
    refuses("cpu.activation", "HardSigmoid", [r(3, 4)])  # ONNX defaults alpha=0.2, beta=0.5
    refuses("cpu.activation", "HardSwish", [r(3, 4, dtype=torch.float16)])
    refuses("cpu.activation", "PRelu", [r(2, 3, 4, 5), C(r(5))])  # broadcasts along the last axis
    refuses("cpu.activation", "PRelu", [r(2, 3, 4, 5), C(r(3, 4, 1))])


# --- registry and priorities ------------------------------------------------------------------------------


def test_cpu_tactics_are_cpu_only_and_ranked_around_the_reference() -> None:
    names = [n for n, _ in registry.TACTICS.items() if n.startswith("cpu.")]
    assert len(names) >= 10
    relu, _ = node_of("Relu", [r(2, 2)])
    for n in names:
        t = registry.get(n)
        assert t.devices == frozenset({"cpu"}) and t.priority != 1000 and not t.applicable(relu, CPU)
    gemm, _ = node_of("Gemm", _gemm_inputs(4, 3, 2, 0, 1, (2,)), transB=1)
    assert not any(t.name.startswith("cpu.") for t in registry.candidates(gemm, torch.device("cuda")))
    ranked = [t.name for t in registry.candidates(gemm, CPU)]
    assert ranked.index("cpu.gemm_addmm") < ranked.index("reference")
    if mkldnn_ops("_linear_pointwise"):
        assert ranked[0] == "cpu.onednn_linear"


def test_prepared_weights_are_shared_between_kernels_and_never_trusted_for_other_tensors() -> None:
    node, args = node_of("MatMul", [r(3, 4), C(r(4, 5))])
    calls: list[int] = []

    def transpose(w: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return w.t().contiguous()

    first, second = prepared(node, 1, "test", transpose), prepared(node, 1, "test", transpose)
    assert first(args[1]) is second(args[1]) and len(calls) == 1
    other = args[1] * 2
    assert torch.equal(first(other), other.t()) and len(calls) == 2


def test_the_tuners_comparison_tolerates_nan_in_the_reference() -> None:
    from kiln.tune.tuner import _close

    y = torch.tensor([0.5, math.nan, 2.0, -math.inf])
    assert _close(y, y.clone()) and not _close(y, y + 1)


# --- an engine built with them ----------------------------------------------------------------------------


def _init(name: str, shape: tuple[int, ...], scale: float = 0.3, rng: np.random.Generator | None = None
          ) -> onnx.TensorProto:
    rng = rng or np.random.default_rng(abs(hash(name)) % 1000)
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def cnn_mlp() -> onnx.ModelProto:
    """conv-relu-maxpool, conv (stride 2)-batchnorm-relu, 1x1 conv, global pool, flatten, gemm-layernorm-relu,
    gemm, softmax."""
    rng = np.random.default_rng(0)
    inits = [_init("w1", (8, 3, 3, 3), rng=rng), _init("b1", (8,), rng=rng), _init("w2", (16, 8, 3, 3), rng=rng),
             _init("bn_s", (16,), rng=rng), _init("bn_b", (16,), rng=rng), _init("bn_m", (16,), rng=rng),
             numpy_helper.from_array(rng.uniform(0.5, 1.5, 16).astype(np.float32), "bn_v"),
             _init("w3", (16, 16, 1, 1), rng=rng), _init("fc1_w", (32, 16), rng=rng), _init("fc1_b", (32,), rng=rng),
             _init("ln_s", (32,), rng=rng), _init("ln_b", (32,), rng=rng), _init("fc2_w", (32, 10), rng=rng),
             _init("fc2_b", (10,), rng=rng)]
    n = helper.make_node
    nodes = [
        n("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]), n("Relu", ["c1"], ["r1"]),
        n("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        n("Conv", ["p1", "w2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
        n("BatchNormalization", ["c2", "bn_s", "bn_b", "bn_m", "bn_v"], ["bn"]), n("Relu", ["bn"], ["r2"]),
        n("Conv", ["r2", "w3"], ["c3"]), n("GlobalAveragePool", ["c3"], ["gp"]), n("Flatten", ["gp"], ["f"]),
        n("Gemm", ["f", "fc1_w", "fc1_b"], ["h"], transB=1),
        n("LayerNormalization", ["h", "ln_s", "ln_b"], ["ln"], axis=-1), n("Relu", ["ln"], ["hr"]),
        n("Gemm", ["hr", "fc2_w", "fc2_b"], ["logits"]), n("Softmax", ["logits"], ["y"], axis=-1),
    ]
    g = helper.make_graph(nodes, "cnn_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 20, 20])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 10])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_engine_tunes_cpu_tactics_caches_them_and_matches_the_reference(tmp_path: Path) -> None:
    model = cnn_mlp()
    cache = tmp_path / "timing.json"
    x = np.random.default_rng(1).standard_normal((2, 3, 20, 20)).astype(np.float32)
    want = kiln.run_reference(model, {"x": x})["y"]

    cold = kiln.build(model, kiln.BuilderConfig(timing_cache=str(cache)))
    tuning = cold.plan.stats["tuning"]
    assert tuning["candidates_timed"] > 0 and tuning["timed_nodes"] > 0 and cache.exists()
    assert tuning["rejected"] == []  # every candidate agreed with the reference on the real intermediate values
    assert any(c.tactic.startswith("cpu.") for c in cold.plan.choices[0])
    np.testing.assert_allclose(cold.create_context().run({"x": x})["y"], want, rtol=1e-4, atol=1e-6)

    warm = kiln.build(model, kiln.BuilderConfig(timing_cache=str(cache)))
    again = warm.plan.stats["tuning"]
    assert again["candidates_timed"] == 0 and again["timed_nodes"] == 0
    assert again["cache_hits"] == tuning["timed_nodes"] + tuning["cache_hits"]
    assert [c.tactic for c in warm.plan.choices[0]] == [c.tactic for c in cold.plan.choices[0]]
    np.testing.assert_allclose(warm.create_context().run({"x": x})["y"], want, rtol=1e-4, atol=1e-6)

    # a cache written before a tactic's space changed names a configuration that no longer exists: that node is
    # timed again (not built from a stale entry), the others still come from the cache
    data = json.loads(cache.read_text())
    stale = next(e for e in data["entries"].values() if e.get("config"))
    stale["config"] = {**stale["config"], "tile": "a-tile-since-dropped"}
    cache.write_text(json.dumps(data))
    mixed = kiln.build(model, kiln.BuilderConfig(timing_cache=str(cache)))
    redone = mixed.plan.stats["tuning"]
    assert redone["timed_nodes"] >= 1 and redone["cache_hits"] == again["cache_hits"] - redone["timed_nodes"]
    np.testing.assert_allclose(mixed.create_context().run({"x": x})["y"], want, rtol=1e-4, atol=1e-6)

    fast = kiln.build(model, kiln.BuilderConfig(opt_level=0))
    assert fast.plan.stats["tuning"]["candidates_timed"] == 0
    first = [registry.candidates(n, CPU)[0].name for n in fast.plan.graph.nodes]
    assert [c.tactic for c in fast.plan.choices[0]] == first
    assert "cpu.onednn_conv" in first or not mkldnn_ops("_convolution_pointwise")
    np.testing.assert_allclose(fast.create_context().run({"x": x})["y"], want, rtol=1e-4, atol=1e-6)
