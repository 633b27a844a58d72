"""Models as users export them today: transformers' default SDPA attention, through both of torch.onnx.export's
exporters (the TorchScript tracer and torch.export, the default since torch 2.9), and a CNN through torch.export.

On the GPU pass pipeline every attention becomes one `Attention` node on the packed [B, S, H*D] tensors - torch.export
writes K^T as a 3-D transpose between two reshapes (for grouped-query attention straight from the per-head repeat)
and SDPA's export reads the probabilities through a NaN guard; LLaMA's rotate-half rotary embeddings become
`RotaryEmbedding` - and every spatial mean a GlobalAveragePool (a pooling op the channels-last regions go
through). kiln's CPU engine matches onnxruntime on sequences with padding, one of them all padding.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnxruntime as ort
import pytest

import kiln
from kiln.build.builder import resolve_profiles, static_dims
from kiln.frontend.onnx import import_model
from kiln.passes.manager import PassContext
from kiln.passes.pipeline import optimize, optimize_late
from tests.e2e import models as M

pytestmark = pytest.mark.slow


def _gpu_ops(path: str) -> Counter[str]:
    """The op counts after the GPU build's pass pipeline (passes only: no kernel is built)."""
    g = import_model(path)
    context = PassContext(static_dims=static_dims(g, resolve_profiles(g, [])), device="cuda")
    optimize(g, context)
    optimize_late(g, context)
    found = Counter(n.op for n in g.nodes)
    found["causal Attention"] = sum(n.op == "Attention" and n.attrs.get("is_causal") == 1 for n in g.nodes)
    return found


def _feeds() -> dict[str, np.ndarray]:
    ids = np.random.default_rng(0).integers(0, 1000, (2, 16)).astype(np.int64)
    mask = np.ones((2, 16), np.int64)
    mask[0, 11:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("exporter", M.EXPORTERS)
@pytest.mark.parametrize("arch", ["bert", "llama", "phi", "gptj"])
def test_sdpa_exports_fuse_every_attention(arch: str, exporter: str) -> None:
    path = M.hf_default(arch, exporter)
    found = _gpu_ops(path)
    assert found["Attention"] == 2 and found["Softmax"] == 0 and found["IsNaN"] == 0, found
    assert found["Transpose"] == 0, found  # on the packed [B, S, H*D] tensors: no head split or merge left
    if arch != "bert":  # its rotary embeddings (Q and K of each layer) on those packed tensors
        assert found["RotaryEmbedding"] == 4 and found["Neg"] == 0, found
        assert found["Slice"] == 0 and found["Concat"] == 0, found  # Phi's, GPT-J's: the rotated part and the rest
        # the causal triangle ANDed into the padding mask: is_causal where the export fills with -inf (exact),
        # kept in the mask where torch.export fills with finfo.min (`kiln.passes.narrow_masks`)
        assert found["causal Attention"] == (2 if exporter == "torchscript" else 0), found
    feeds = _feeds()
    for padded in (False, True):
        if padded:
            feeds["attention_mask"][1] = 0  # a sequence of padding alone: every key hidden from every query
        want = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        engine = kiln.build(path, kiln.BuilderConfig(device="cpu"))
        assert sum(n.op == "Attention" for n in engine.plan.graph.nodes) == 2
        got = np.asarray(engine.create_context().run(feeds)["hidden"])
        assert np.isfinite(got).all() == np.isfinite(want).all()
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * float(np.abs(want).max()))


def test_dynamo_cnn_means_are_global_pools() -> None:
    path = M.mobilenet_v3_small_dynamo()
    found = _gpu_ops(path)
    assert found["ReduceMean"] == 0 and found["GlobalAveragePool"] == 10, found  # 9 squeeze-excitations + head
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    want = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    got = np.asarray(kiln.build(path, kiln.BuilderConfig(device="cpu")).create_context().run({"image": x})["logits"])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * float(np.abs(want).max()))
