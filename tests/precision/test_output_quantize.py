"""`fuse_output_quantize` (in the post-quantization pass list): a LayerNorm or an Attention whose result a
QuantizeLinear reads becomes one "quantizing" node that writes the 8-bit values (and the float result its other
readers need); results unchanged."""

from __future__ import annotations

import numpy as np
import torch

import kiln
from kiln.ir import DType, Graph, TensorType
from kiln.ir.ops.base import run_nodes
from kiln.kernels import registry
from kiln.passes.manager import PassContext
from kiln.precision.lower import lower_precision
from kiln.precision.pipeline import optimize_quantized
from kiln.precision.quantize import fuse_output_quantize, quantize_graph
from tests.precision.scales import minmax_scales

H = 32


def _block(stats: bool = False) -> Graph:
    """A transformer FFN block: h = LayerNorm(x); y = LayerNorm(h + W2 relu(W1 h + b1)). `stats`: the first norm's
    Mean is a graph output too."""
    gen = torch.Generator().manual_seed(0)
    g = Graph()
    x = g.add_input("x", TensorType(DType.FLOAT32, (4, 6, H)))

    def const(name: str, *shape: int, shift: float = 0.0) -> object:
        return g.add_initializer(name, torch.randn(*shape, generator=gen) * 0.3 + shift)

    ln1 = g.add("LayerNormalization", [x, const("g1", H, shift=1.0), const("b1n", H)], {"axis": -1},
                name="ln1", outputs=2 if stats else 1)
    h = ln1[0]
    u = g.add("MatMul", [h, const("w1", H, 4 * H)], name="up")[0]
    u = g.add("Add", [u, const("b1", 4 * H)], name="up_bias")[0]
    u = g.add("Relu", [u], name="act")[0]
    d = g.add("MatMul", [u, const("w2", 4 * H, H)], name="down")[0]
    r = g.add("Add", [d, h], name="residual")[0]
    (y,) = g.add("LayerNormalization", [r, const("g2", H, shift=1.0), const("b2n", H)], {"axis": -1}, name="ln2",
                 outputs=1)
    g.outputs.append(y)
    if stats:
        g.outputs.append(ln1[1])
    return g


def _x() -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(1).standard_normal((4, 6, H)).astype(np.float32))


def test_a_norm_read_by_a_quantize_and_a_residual_writes_both_with_the_same_results() -> None:
    g = _block()
    x = _x()
    quantize_graph(g, minmax_scales(g, x))
    lower_precision(g, DType.FLOAT16)
    before = run_nodes(g.nodes, {g.inputs[0]: x.half()})[g.outputs[0]]
    records = optimize_quantized(g, PassContext(device="cuda"))
    assert {r.name: r.result.counts for r in records}["fuse_output_quantize"] == {"outputs_quantized": 1}
    (norm,) = [n for n in g.nodes if n.op == "Fused" and n.attrs["kind"] == "quantizing"]
    assert norm.name == "ln1" and [n.op for n in norm.attrs["body"].nodes] == ["LayerNormalization", "QuantizeLinear"]
    h, hq = norm.outputs  # the float result for the residual add, int8 for the up projection
    assert h.dtype is DType.FLOAT16 and hq.dtype is DType.INT8
    readers = {n.name for n in g.nodes if h in n.inputs}
    assert readers and all("residual" in r for r in readers)
    assert not [n for n in g.nodes if n.op == "QuantizeLinear" and n.inputs[0] is h]
    after = run_nodes(g.nodes, {g.inputs[0]: x.half()})[g.outputs[0]]
    assert torch.equal(before, after)


def test_the_norm_alone_when_only_the_quantize_reads_it() -> None:
    g = _block()
    x = _x()
    quantize_graph(g, minmax_scales(g, x))
    residual = next(n for n in g.nodes if n.name == "residual")
    residual.inputs[1] = residual.inputs[0]  # the block without its skip connection: ln1 feeds the quantize only
    assert fuse_output_quantize(g) == ["ln1"]
    norm = next(n for n in g.nodes if n.name == "ln1")
    assert [v.dtype for v in norm.outputs] == [DType.INT8]


def test_norms_whose_statistics_are_read_stay_a_norm_and_a_quantize() -> None:
    g = _block(stats=True)
    x = _x()
    quantize_graph(g, minmax_scales(g, x))
    assert fuse_output_quantize(g) == []
    assert next(n for n in g.nodes if n.name == "ln1").op == "LayerNormalization"


def test_cpu_builds_keep_the_norm_for_their_own_norm_tactic() -> None:
    """Only GPU builds fuse (the fused node has a Triton kernel only): a CPU int8 build keeps LayerNormalization
    and its quantize apart, each on its CPU tactic."""
    x = _x().numpy()
    e = kiln.build(_block(), kiln.BuilderConfig(device="cpu", precision="int8", calibration=[{"x": x}]))
    assert "quantizing" not in [n.attrs.get("kind") for n in e.plan.graph.nodes if n.op == "Fused"]
    stats = {r["name"]: r["counts"] for r in e.plan.stats["passes"]}
    assert stats["fuse_output_quantize"] == {"outputs_quantized": 0}
    ln = next(n for n in e.plan.graph.nodes if n.name == "ln1")
    # which CPU tactic wins is the tuner's timing; one besides the reference exists
    assert ln.op == "LayerNormalization"
    assert [t.name for t in registry.candidates(ln, torch.device("cpu")) if t.name != "reference"]


def test_an_attention_read_by_a_quantize_writes_the_int8_values() -> None:
    """A packed attention whose output feeds the (quantized) output projection only: one "quantizing" node with
    the int8 output alone; results unchanged."""
    gen = torch.Generator().manual_seed(3)
    g = Graph()
    q, k, v = (g.add_input(n, TensorType(DType.FLOAT32, (2, 5, H))) for n in "qkv")
    (a,) = g.add("Attention", [q, k, v], {"q_num_heads": 2, "kv_num_heads": 2}, name="att", outputs=1)
    (y,) = g.add("MatMul", [a, g.add_initializer("wo", torch.randn(H, H, generator=gen) * 0.2)], name="out_proj")
    g.outputs.append(y)
    feeds = {n: torch.randn(2, 5, H, generator=gen) for n in "qkv"}
    env = run_nodes(g.nodes, {i: feeds[i.name] for i in g.inputs})
    scales = {val.name: float(t.abs().max()) / 127 for val, t in env.items()}
    quantize_graph(g, scales)
    before = run_nodes(g.nodes, {i: feeds[i.name] for i in g.inputs})[g.outputs[0]]
    optimize_quantized(g, PassContext(device="cuda"))
    (att,) = [n for n in g.nodes if n.op == "Fused" and n.attrs["kind"] == "quantizing"]
    assert att.name == "att" and [n.op for n in att.attrs["body"].nodes] == ["Attention", "QuantizeLinear"]
    assert [o.dtype for o in att.outputs] == [DType.INT8]
    after = run_nodes(g.nodes, {i: feeds[i.name] for i in g.inputs})[g.outputs[0]]
    assert torch.equal(before, after)
