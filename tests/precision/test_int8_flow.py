"""int8 flowing between layers: a max pool between two quantized convolutions pools int8 (quantizing first is exact:
it is monotonic), and the first conv then requantizes in its own epilogue. The graph's results do not change."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kiln.ir import DType, Graph, TensorType
from kiln.ir.interpreter import Interpreter
from kiln.passes.manager import PassContext
from kiln.passes.pipeline import optimize
from kiln.precision.quantize import fold_quantized, fuse_requantize, hoist_quantize, quantize_graph
from tests.precision.scales import minmax_scales

F32 = DType.FLOAT32


def _cnn() -> Graph:
    g = Graph()
    gen = torch.Generator().manual_seed(0)
    x = g.add_input("x", TensorType(F32, (2, 16, 16, 16)))
    conv = {"strides": (1, 1), "pads": (1, 1, 1, 1), "dilations": (1, 1)}
    (h,) = g.add("Conv", [x, g.add_initializer("w1", torch.randn(16, 16, 3, 3, generator=gen) * 0.1)], conv, name="c1")
    (h,) = g.add("Relu", [h], name="r1")
    (h,) = g.add("MaxPool", [h], {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}, name="pool",
                 outputs=1)
    (y,) = g.add("Conv", [h, g.add_initializer("w2", torch.randn(4, 16, 3, 3, generator=gen) * 0.1)], conv, name="c2",
                 outputs=["y"])
    g.outputs.append(y)
    optimize(g, PassContext(device="cuda"))
    return g


def test_the_pool_runs_on_int8_and_the_first_conv_requantizes() -> None:
    g = _cnn()
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 16, 16, 16)).astype(np.float32))
    scales = minmax_scales(g, x)
    assert len(quantize_graph(g, scales).layers) == 2
    before = Interpreter(g).run({"x": x.numpy()})["y"]
    assert len(fold_quantized(g)) == 2
    assert hoist_quantize(g) == ["pool"]
    pool = next(n for n in g.nodes if n.op == "MaxPool")
    assert pool.inputs[0].dtype is DType.INT8 and pool.outputs[0].dtype is DType.INT8  # type: ignore[union-attr]
    assert len(fuse_requantize(g)) == 1  # c1 (+ relu) now ends by quantizing for the pool
    first = next(n for n in g.nodes if n.op == "Fused")
    assert first.attrs["body"].nodes[-1].op == "QuantizeLinear" and first.outputs[0].dtype is DType.INT8
    np.testing.assert_array_equal(Interpreter(g).run({"x": x.numpy()})["y"], before)


def test_after_a_float_conv_the_pool_runs_before_the_quantize() -> None:
    """A float producer (here c1, kept float as a GPU build keeps an RGB stem) cannot requantize, so the quantize
    stays after the pool, where it reads the pooled (4x smaller) tensor."""
    g = _cnn()
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 16, 16, 16)).astype(np.float32))
    quantize_graph(g, minmax_scales(g, x), skip={next(n.name for n in g.nodes if "c1" in n.name)})
    assert len(fold_quantized(g)) == 1
    assert hoist_quantize(g) == []
    pool = next(n for n in g.nodes if n.op == "MaxPool")
    assert pool.outputs[0].dtype is F32  # type: ignore[union-attr]


def test_on_gpus_a_three_channel_stem_stays_float_and_says_why() -> None:
    g = Graph()
    x = g.add_input("x", TensorType(F32, (1, 3, 8, 8)))
    w = g.add_initializer("w", torch.randn(8, 3, 3, 3, generator=torch.Generator().manual_seed(0)))
    (y,) = g.add("Conv", [x, w], {"strides": (1, 1), "pads": (1, 1, 1, 1), "dilations": (1, 1)}, name="stem",
                 outputs=["y"])
    g.outputs.append(y)
    from kiln.precision.quantize import MIN_INT8_CHANNELS

    report = quantize_graph(g, {"x": 0.01}, min_channels=MIN_INT8_CHANNELS)  # a GPU build's floor
    assert report.layers == [] and "3 input channels" in report.float_layers["stem"]
    assert quantize_graph(g, {"x": 0.01}).layers == ["stem"]  # CPU builds quantize it


def test_int8_activations_stay_channels_last_between_quantized_convs(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The post-quantization pass list (`precision.pipeline`) decides layouts again on the folded graph: the
    quantized convs count as convs, the per-tensor quantize and the int8 pool as elementwise, so the int8 values
    between them are channels-last. Each rewrite is recorded and, with KILN_DUMP_GRAPHS, written out."""
    from kiln.passes.layout import CHANNELS_LAST
    from kiln.precision.pipeline import QUANTIZED, optimize_quantized

    g = _cnn()
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 16, 16, 16)).astype(np.float32))
    scales = minmax_scales(g, x)
    quantize_graph(g, scales)
    monkeypatch.setenv("KILN_DUMP_GRAPHS", str(tmp_path))
    records = optimize_quantized(g, PassContext(device="cuda"))
    assert [r.name for r in records] == [name for name, _ in QUANTIZED]
    assert {r.name: r.result.counts for r in records}["fold_quantized"] == {"folded": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "quantized_00_start.txt", "quantized_01_fold_quantized.txt", "quantized_02_hoist_quantize.txt",
        "quantized_03_fuse_requantize.txt", "quantized_04_fuse_output_quantize.txt", "quantized_05_layout.txt"]
    pool = next(n for n in g.nodes if n.op == "MaxPool")
    assert pool.inputs[0].dtype is DType.INT8  # type: ignore[union-attr]
    for v in (pool.inputs[0], pool.outputs[0]):
        assert v is not None and g.layouts.get(v.name) == CHANNELS_LAST, v
    quant = next(n for n in g.nodes if n.op == "QuantizeLinear")  # the graph input's, before the first conv
    assert g.layouts.get(quant.outputs[0].name) == CHANNELS_LAST


def _bottleneck() -> Graph:
    """h = relu(conv1(x)); y = relu(conv3(relu(conv2(h))) + down(h)): the first block of a ResNet stage, whose
    residual is a 1x1 downsample conv of the block input rather than the input itself."""
    g = Graph()
    gen = torch.Generator().manual_seed(4)
    x = g.add_input("x", TensorType(F32, (2, 16, 8, 8)))

    def conv(v: Any, name: str, k: int = 3) -> Any:
        w = g.add_initializer(f"w_{name}", torch.randn(16, 16, k, k, generator=gen) * 0.1)
        pads = (k // 2,) * 4
        return g.add("Conv", [v, w], {"strides": (1, 1), "pads": pads, "dilations": (1, 1)}, name=name)[0]

    (h,) = g.add("Relu", [conv(x, "c1")], name="r1")
    (t,) = g.add("Relu", [conv(h, "c2")], name="r2")
    (s,) = g.add("Add", [conv(t, "c3"), conv(h, "down", 1)], name="skip")
    (y,) = g.add("Relu", [s], name="r3", outputs=["y"])
    g.outputs.append(y)
    optimize(g, PassContext(device="cuda"))
    return g


def test_a_downsample_branch_is_written_in_int8_for_the_residual_add() -> None:
    """The downsample conv's output, read only by the block's last conv as its residual, is calibrated
    (`quantizable_inputs` lists it) and then written in int8 by the downsample's own epilogue; the adding layer
    dequantizes it. Without its scale (an older calibration cache) it stays float."""
    from kiln.precision.pipeline import optimize_quantized
    from kiln.precision.quantize import quantizable_inputs, residual_operands

    g = _bottleneck()
    down = next(n for n in g.nodes if n.name == "down")
    assert residual_operands(g) == [down.outputs[0].name] and down.outputs[0].name in quantizable_inputs(g)
    x = torch.from_numpy(np.random.default_rng(5).standard_normal((2, 16, 8, 8)).astype(np.float32))
    exact = Interpreter(g).run({"x": x})["y"]
    scales = minmax_scales(g, x)
    report = quantize_graph(g, scales)
    assert report.residuals == ["c3 + skip + r3"]
    before = Interpreter(g).run({"x": x})["y"]
    optimize_quantized(g, PassContext(device="cuda"))
    assert [v.dtype for v in next(n for n in g.nodes if n.name == "down").outputs] == [DType.INT8]
    last = next(n for n in g.nodes if "c3" in n.name)
    assert last.attrs["body"].nodes[3].op == "DequantizeLinear"
    after = Interpreter(g).run({"x": x})["y"]
    assert torch.equal(after, before)
    cos = torch.nn.functional.cosine_similarity(after.flatten().double(), exact.flatten().double(), dim=0)
    assert float(cos) > 0.999, float(cos)

    g = _bottleneck()
    name = next(n for n in g.nodes if n.name == "down").outputs[0].name
    assert quantize_graph(g, {k: v for k, v in scales.items() if k != name}).residuals == []


def _residual_block(matmul: bool = False) -> Graph:
    """h = relu(conv1(x)); y = relu(conv3(relu(conv2(h))) + h): h is read by the next conv (through its quantize)
    and by the residual add, as a ResNet block's output is. `matmul`: the same with MatMuls on [N, C] rows."""
    g = Graph()
    gen = torch.Generator().manual_seed(2)
    shape = (6, 16) if matmul else (2, 16, 8, 8)
    x = g.add_input("x", TensorType(F32, shape))
    conv = {"strides": (1, 1), "pads": (1, 1, 1, 1), "dilations": (1, 1)}

    def layer(v: Any, name: str) -> Any:
        if matmul:
            return g.add("MatMul", [v, g.add_initializer(f"w_{name}", torch.randn(16, 16, generator=gen) * 0.2)],
                         name=name)[0]
        w = g.add_initializer(f"w_{name}", torch.randn(16, 16, 3, 3, generator=gen) * 0.1)
        return g.add("Conv", [v, w], conv, name=name)[0]

    (h,) = g.add("Relu", [layer(x, "c1")], name="r1")
    (t,) = g.add("Relu", [layer(h, "c2")], name="r2")
    (s,) = g.add("Add", [layer(t, "c3"), h], name="skip")
    (y,) = g.add("Relu", [s], name="r3", outputs=["y"])
    g.outputs.append(y)
    optimize(g, PassContext(device="cuda"))
    return g


def test_a_conv_read_by_a_quantize_and_a_residual_writes_its_float_result_and_an_int8_copy() -> None:
    """fuse_requantize's dual output: the first conv's float result feeds the residual add (kept float here), its
    int8 copy the next conv (no quantize pass between them); results unchanged. A MatMul layer (whose int8 kernels
    write one output) keeps the quantize pass."""
    from kiln.precision.pipeline import optimize_quantized

    g = _residual_block()
    x = torch.from_numpy(np.random.default_rng(3).standard_normal((2, 16, 8, 8)).astype(np.float32))
    quantize_graph(g, minmax_scales(g, x), residuals=False)
    before = Interpreter(g).run({"x": x})["y"]
    optimize_quantized(g, PassContext(device="cuda"))
    first = next(n for n in g.nodes if n.op == "Fused" and "c1" in n.name)
    assert [v.dtype for v in first.outputs] == [F32, DType.INT8]
    assert first.attrs["body"].nodes[-1].op == "QuantizeLinear"
    assert not [n for n in g.nodes if n.op == "QuantizeLinear" and n.inputs[0] is first.outputs[0]]
    assert torch.equal(Interpreter(g).run({"x": x})["y"], before)

    g = _residual_block(matmul=True)
    x2 = torch.from_numpy(np.random.default_rng(3).standard_normal((6, 16)).astype(np.float32))
    quantize_graph(g, minmax_scales(g, x2))
    optimize_quantized(g, PassContext(device="cuda"))
    first = next(n for n in g.nodes if n.op == "Fused" and "c1" in n.name)
    assert len(first.outputs) == 1 and [n for n in g.nodes if n.op == "QuantizeLinear" and n.inputs[0] is
                                        first.outputs[0]]


def test_a_residual_add_reads_the_int8_copy_and_the_block_input_is_written_in_int8_alone() -> None:
    """By default the residual add of a quantized conv reads the int8 copy its input already has (for the block's
    first conv): the conv making that input writes int8 only, and the adding layer dequantizes it in its epilogue
    (one DequantizeLinear step after the conv). The folded graph computes what the Q/DQ graph computes, which
    stays close to the float model; a MatMul block keeps its float residual."""
    from kiln.precision.pipeline import optimize_quantized

    g = _residual_block()
    x = torch.from_numpy(np.random.default_rng(3).standard_normal((2, 16, 8, 8)).astype(np.float32))
    exact = Interpreter(g).run({"x": x})["y"]
    report = quantize_graph(g, minmax_scales(g, x))
    assert report.residuals == ["c3 + skip + r3"]
    before = Interpreter(g).run({"x": x})["y"]
    optimize_quantized(g, PassContext(device="cuda"))
    first = next(n for n in g.nodes if n.op == "Fused" and "c1" in n.name)
    assert [v.dtype for v in first.outputs] == [DType.INT8]
    last = next(n for n in g.nodes if n.op == "Fused" and "c3" in n.name)
    body = last.attrs["body"]
    assert [m.op for m in body.nodes[:4]] == ["DequantizeLinear", "DequantizeLinear", "Conv", "DequantizeLinear"]
    assert first.outputs[0] in last.inputs and not [n for n in g.nodes if n.op == "DequantizeLinear"]
    after = Interpreter(g).run({"x": x})["y"]
    assert torch.equal(after, before)
    cos = torch.nn.functional.cosine_similarity(after.flatten().double(), exact.flatten().double(), dim=0)
    assert float(cos) > 0.999, float(cos)

    g = _residual_block(matmul=True)
    x2 = torch.from_numpy(np.random.default_rng(3).standard_normal((6, 16)).astype(np.float32))
    assert quantize_graph(g, minmax_scales(g, x2)).residuals == []
