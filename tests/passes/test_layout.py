"""layout: channels-last regions around GPU convolutions, conversions only where a region meets row-major."""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import torch

from kiln.frontend.onnx import import_model
from kiln.ir import DType, Graph, TensorType
from kiln.ir.graph import Value
from kiln.passes.layout import decide_layout
from kiln.passes.manager import PassContext
from kiln.passes.pipeline import optimize

F32 = DType.FLOAT32


def _w(g: Graph, name: str, *shape: int) -> Value:
    return g.add_initializer(name, torch.randn(shape, generator=torch.Generator().manual_seed(len(name))))


def _cnn() -> Graph:
    """conv -> relu -> maxpool -> conv, + residual add, -> global pool -> flatten -> gemm; plus a 4-D branch
    without convolutions that must stay row-major."""
    g = Graph()
    x = g.add_input("x", TensorType(F32, (2, 4, 8, 8)))
    a = g.add("Conv", [x, _w(g, "w1", 4, 4, 3, 3)], {"pads": (1, 1, 1, 1)}, name="conv1")[0]
    r = g.add("Relu", [a], name="relu")[0]
    p = g.add("MaxPool", [r], {"kernel_shape": (2, 2), "strides": (2, 2)}, name="pool")[0]
    c = g.add("Conv", [p, _w(g, "w2", 4, 4, 3, 3)], {"pads": (1, 1, 1, 1)}, name="conv2")[0]
    s = g.add("Add", [c, p], name="residual")[0]
    gp = g.add("GlobalAveragePool", [s], name="gap")[0]
    f = g.add("Flatten", [gp], name="flatten")[0]
    y = g.add("Gemm", [f, _w(g, "w3", 3, 4)], {"transB": 1}, name="fc")[0]
    g.outputs.append(y)
    z = g.add_input("z", TensorType(F32, (2, 3, 5, 5)))
    t = g.add("Tanh", [z], name="tanh")[0]
    g.outputs.append(g.add("Transpose", [t], {"perm": (0, 2, 3, 1)}, name="tr")[0])
    return g


def test_one_channels_last_region_with_conversions_at_its_borders() -> None:
    g = _cnn()
    result = decide_layout(g, "cuda")
    nhwc = set(g.layouts)
    assert nhwc == {"x", "conv1_out0", "relu_out0", "pool_out0", "conv2_out0", "residual_out0", "gap_out0"}
    assert set(g.layouts.values()) == {"channels_last"}
    assert "tanh_out0" not in nhwc and "z" not in nhwc  # no convolution in that region
    assert result.counts["regions"] == 1
    assert result.counts["conversions"] == 2  # the graph input x, and Flatten reading the pooled value


def test_cpu_builds_record_no_layouts() -> None:
    g = _cnn()
    decide_layout(g, "cuda")
    result = decide_layout(g, "cpu")
    assert g.layouts == {} and not result.changed


def test_fused_resnet50_is_one_region_converted_twice() -> None:
    light = Path(os.path.dirname(onnx.__file__)) / "backend" / "test" / "data" / "light" / "light_resnet50.onnx"
    g = import_model(onnx.load(str(light)))
    records = optimize(g, PassContext(device="cuda"))
    counts = {r.name: r.result.counts for r in records}["layout"]
    assert counts["regions"] == 1 and counts["conversions"] == 2, counts
    convs = [n for n in g.nodes if n.op in ("Conv", "Fused") and n.outputs[0].rank == 4]
    assert convs and all(n.outputs[0].name in g.layouts for n in convs)


def test_a_lone_conv_read_row_major_at_once_stays_row_major() -> None:
    """ViT's patch embedding: one conv between the input and a Reshape costs two conversions for one conv."""
    g = Graph()
    x = g.add_input("x", TensorType(F32, (2, 3, 32, 32)))
    c = g.add("Conv", [x, _w(g, "w", 8, 3, 16, 16)], {"strides": (16, 16)}, name="patch")[0]
    shape = g.add_initializer("shape", torch.tensor([2, 8, 4]))
    g.outputs.append(g.add("Reshape", [c, shape], name="flat")[0])
    result = decide_layout(g, "cuda")
    assert g.layouts == {} and result.counts["regions"] == 0


def test_convnext_blocks_go_to_nhwc_and_back_for_free() -> None:
    """ConvNeXt's block: depthwise conv -> Transpose(0, 2, 3, 1) -> LayerNorm -> Linear -> Transpose(0, 3, 1, 2)
    -> + residual. A Transpose(0, 2, 3, 1) of a channels-last value is that value's memory (no conversion), so the
    two convs and the residual are one channels-last region: before, each such Transpose counted as a conversion,
    the region of two convs lost to its three transposes and stayed row-major (ConvNeXt-T's first stage did)."""
    g = Graph()
    c = g.add_input("x", TensorType(F32, (2, 8, 6, 6)))
    d = g.add("Conv", [c, _w(g, "dw", 8, 1, 7, 7)], {"pads": (3, 3, 3, 3), "group": 8}, name="dwconv")[0]
    t = g.add("Transpose", [d], {"perm": (0, 2, 3, 1)}, name="to_nhwc")[0]
    n = g.add("LayerNormalization", [t, _w(g, "gamma", 8), _w(g, "beta", 8)], {"axis": -1}, name="norm")[0]
    m = g.add("MatMul", [n, _w(g, "fc", 8, 8)], name="fc")[0]
    b = g.add("Transpose", [m], {"perm": (0, 3, 1, 2)}, name="to_nchw")[0]
    s = g.add("Add", [b, c], name="residual")[0]
    g.outputs.append(g.add("Conv", [s, _w(g, "w2", 4, 8, 1, 1)], name="next")[0])
    result = decide_layout(g, "cuda")
    assert {"x", "dwconv_out0", "to_nchw_out0", "residual_out0", "next_out0"} <= set(g.layouts)
    assert "to_nhwc_out0" not in g.layouts and "fc_out0" not in g.layouts  # row-major NHWC: the view's layout
    assert result.counts["conversions"] == 2  # the graph input and output only
