"""The optimizer's bars on real architectures: what the plan looks like after the whole pipeline, in plan steps,
and that the optimized engine computes what the imported graph computes."""

from __future__ import annotations

import collections
import os
from pathlib import Path

import numpy as np
import onnx
import pytest

import kiln
from kiln.ir.interpreter import Interpreter
from kiln.ir.verify import verify
from kiln.passes.fuse_norm_gemm import fuse_norm_gemm
from kiln.runtime.engine import Engine
from tests.e2e import models as M

pytestmark = pytest.mark.slow

LIGHT = Path(os.path.dirname(onnx.__file__)) / "backend" / "test" / "data" / "light"


def _label(n) -> str:  # type: ignore[no-untyped-def]
    if n.op != "Fused":
        return n.op
    return f"Fused[{n.attrs['kind']}:{'+'.join(m.op for m in n.attrs['body'].nodes)}]"


def _build(path: str | onnx.ModelProto, profiles: list | None = None) -> tuple[Engine, collections.Counter]:
    engine = kiln.build(path, kiln.BuilderConfig(opt_level=0, profiles=profiles or []))
    return engine, collections.Counter(_label(n) for n in engine.graph.nodes)


def _same_function(engine: Engine, model: str | onnx.ModelProto, feeds: dict) -> None:
    ours = engine.create_context().run(feeds)
    ref = kiln.run_reference(model, feeds)  # the imported graph, unoptimized
    for name, want in ref.items():
        err = np.abs(ours[name].astype(np.float64) - want.astype(np.float64)).max()
        assert err <= 1e-4 * max(1.0, float(np.abs(want).max())), (name, err)


def _norm_gemm_after(engine: Engine, feeds: dict, fused: int, kept: int) -> None:
    """GPU builds' late fusion (`fuse_norm_gemm`, which CPU builds skip) run on this plan's graph: `fused` norms
    join the GEMM reading them, `kept` of those also writing the normalized rows, and the graph computes the same
    (the op table's reference, node by node). Changes `engine.graph`: call it last."""
    g = engine.graph
    before = Interpreter(g).run(dict(feeds))
    counts = fuse_norm_gemm(g).counts
    assert counts.get("fused", 0) + counts.get("with_norm_output", 0) == fused and \
        counts.get("with_norm_output", 0) == kept, counts
    verify(g, types=True)
    after = Interpreter(g).run(dict(feeds))
    for name, want in before.items():
        err = np.abs(after[name].astype(np.float64) - want.astype(np.float64)).max()
        assert err <= 1e-4 * max(1.0, float(np.abs(want).max())), (name, err)


def _resnet_structure(ops: collections.Counter) -> None:
    assert "BatchNormalization" not in ops
    assert not {"Relu", "Add", "Sum"} & set(ops), ops  # every Relu and residual Add is a conv's epilogue
    assert ops["Fused[epilogue:Conv+Relu]"] == 33
    assert ops["Fused[epilogue:Conv+Add+Relu]"] + ops["Fused[epilogue:Conv+Sum+Relu]"] == 16
    assert ops["Conv"] == 4  # the downsample convs, whose outputs are residual inputs of those epilogues


def test_resnet50_torchvision() -> None:
    path = M.torchvision_model("resnet50")
    engine, ops = _build(path, [{"image": (2, 3, 224, 224)}])
    assert len(engine.graph.nodes) <= 60, ops
    _resnet_structure(ops)
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    _same_function(engine, path, {"image": x})


def test_light_resnet50_from_the_onnx_wheel() -> None:
    model = onnx.load(str(LIGHT / "light_resnet50.onnx"))  # opset 9, weights made by ConstantOfShape
    engine, ops = _build(model)
    assert len(engine.graph.nodes) <= 60, ops
    _resnet_structure(ops)
    # Its weights are all 0.02 (logits ~1e19, a uniform softmax): check the function on random weights instead.
    rng = np.random.default_rng(1)
    for node in model.graph.node:
        if node.op_type == "ConstantOfShape":
            value = node.attribute[0]
            value.t.CopyFrom(onnx.numpy_helper.from_array(np.array([rng.uniform(0.005, 0.03)], np.float32)))
    engine, _ = _build(model)
    x = rng.standard_normal((1, 3, 224, 224)).astype(np.float32)
    _same_function(engine, model, {engine.graph.inputs[0].name: x})


def test_bert_base_encoder() -> None:
    path = M.bert_base()
    names = ("input_ids", "attention_mask", "token_type_ids")
    engine, ops = _build(path, [{n: (1, 128) for n in names}])
    assert len(engine.graph.nodes) <= 110, ops
    # Per layer: merged QKV projection (+ its split), attention, output projection with bias + residual,
    # LayerNorm, FFN up-projection with bias + GELU, down-projection with bias + residual, LayerNorm.
    assert ops["Fused[epilogue:MatMul+Add]"] == 12 and ops["Split"] == 12 and ops["Attention"] == 12
    assert ops["Fused[epilogue:MatMul+Add+Add]"] == 24 and ops["Fused[epilogue:MatMul+Add+Gelu]"] == 12
    assert ops["LayerNormalization"] == 25  # 2 per layer + the embeddings'
    layer_steps = [n for n in engine.graph.nodes if "/encoder/layer." in n.name]
    assert len(layer_steps) <= 8 * 12
    rng = np.random.default_rng(2)
    ids = rng.integers(0, 30522, (1, 128)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[0, 100:] = 0
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    _same_function(engine, path, feeds)
    # post-LN: every LayerNorm but the last feeds the next QKV or FFN-up projection and a residual add
    _norm_gemm_after(engine, feeds, fused=24, kept=24)


def test_vit_b_16_has_the_bert_structure_per_block() -> None:
    """torchvision's ViT exports nn.MultiheadAttention sequence-first; pack_attention brings it to [B, S, E]."""
    path = M.vit_b_16()
    engine, ops = _build(path, [{"image": (2, 3, 224, 224)}])
    steps = len(engine.graph.nodes)
    print(f"\nViT-B/16: {steps} plan steps; {dict(ops.most_common(8))}")
    assert ops["Attention"] == 12 and ops["Split"] == 12 and ops["LayerNormalization"] == 25
    assert ops["Fused[epilogue:MatMul+Add+Gelu]"] == 12
    assert ops["Fused[epilogue:MatMul+Add+Add]"] == 24  # attention output and FFN down, bias + residual
    assert not {"Transpose", "Reshape"} & {op for op, k in ops.items() if k > 1}, ops  # none left in the blocks
    assert steps <= 12 * 8 + 10, ops  # measured 104 (2026-11-27): 8 per block + patch embedding and head
    x = np.random.default_rng(3).standard_normal((2, 3, 224, 224)).astype(np.float32)
    _same_function(engine, path, {"image": x})
    # pre-LN: ln_1 and ln_2 of every block feed only the QKV and FFN-up projections; the final norm feeds the head
    _norm_gemm_after(engine, {"image": x}, fused=24, kept=0)


def test_the_late_list_on_a_float16_bert() -> None:
    """What a GPU FP16 build does after lowering, run here on the CPU (the late list skips CPU builds): the
    pooler's output Cast joins its Gemm + Tanh epilogue, the residual Adds of the 4 post-LN norms of a 2-layer BERT
    move into the norms (so those norms stay out of the GEMMs reading them; the embedding's LN, whose sum is a
    pointwise group of two Adds, joins its GEMM keeping its rows), and the lowered graph computes exactly what it
    did."""
    import torch

    from kiln.build.builder import lower_graph
    from kiln.frontend.onnx.importer import import_model
    from kiln.ir import DType
    from kiln.passes.manager import PassContext
    from kiln.passes.pipeline import optimize, optimize_late

    g = import_model(M.bert_small())
    optimize(g, PassContext(static_dims={"batch": 1, "seq": 16}, device="cpu"))
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(0, 1000, (1, 16)), "attention_mask": np.ones((1, 16), np.int64),
             "token_type_ids": np.zeros((1, 16), np.int64)}
    lower_graph(g, DType.FLOAT16, [feeds], torch.device("cpu"), {}, "random")
    before = Interpreter(g).run(dict(feeds))
    records = optimize_late(g, PassContext(static_dims={"batch": 1, "seq": 16}, device="cuda"))
    counts = {r.name: r.result.counts for r in records}
    assert counts.pop("specialize_bodies")["specialized"] >= 1  # the mask group's body reads attention_mask
    assert counts.pop("channel_scale") == {}  # opt-in (level 4), and BERT has no channel scales
    assert counts == {"extend_epilogues": {"steps": 1}, "fuse_residual_norm": {"after_epilogue": 4},
                      "fuse_norm_gemm": {"with_norm_output": 1}}
    from kiln.kernels.pointwise.codegen import check

    mask = next(n for n in g.nodes if n.op == "Fused" and any(v.name == "attention_mask" for v in n.inputs))
    assert mask.attrs["kind"] == "pointwise" and check(mask.attrs["body"]) is None  # one generated kernel
    pooler = next(n for n in g.nodes if "pooler_output_to_float32" in n.name)
    assert [m.op for m in pooler.attrs["body"].nodes] == ["Gemm", "Tanh", "Cast"]
    after = Interpreter(g).run(dict(feeds))
    for name, want in before.items():
        np.testing.assert_array_equal(after[name], want)
