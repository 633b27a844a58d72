"""An LLM as onnxruntime-genai's model builder exports it (the format its users download): a random 2-layer LLaMA with
a tiny tokenizer, built in FP32 and in INT4, and random Gemma-2 (softcaps, sliding-window caches), gpt-oss (head
sinks, mixture of experts), Phi and Nemotron (partial rotary), Qwen3, OLMo, Granite, ERNIE 4.5 and LFM2 (a carried
convolution state) in FP32, then run by kiln's CPU engine and by onnxruntime over a prompt and two decode steps, each
step's present key/values (and states) fed back as the next step's past.

The export holds GroupQueryAttention (packed QKV, rotary inside, the growing key/value cache), SkipSimplified- and
SimplifiedLayerNormalization, and in INT4 MatMulNBits. onnxruntime's INT4 CPU kernel quantizes activations to int8
at the builder's accuracy_level 4; kiln multiplies in float (see `handlers/contrib.py`), so the INT4 model is
compared at accuracy_level 0, where onnxruntime multiplies in float too.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import kiln

pytestmark = pytest.mark.slow
pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai (a test dependency) builds the models")

LAYERS, KV_HEADS, HEAD = 2, 2, 32


def _save(model: torch.nn.Module, folder: Path, norm_weight: float) -> Path:
    """`model`'s weights redrawn (norm weights around `norm_weight`), saved as transformers saves it, with a
    WordLevel tokenizer of its 512 tokens."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    with torch.no_grad():
        for p in model.parameters():
            p.normal_(norm_weight if p.dim() == 1 else 0.0, 0.05)
    model.save_pretrained(folder)
    tok = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(512)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", bos_token="t1",
                                         eos_token="t2").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer LLaMA."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256,
                                      num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=KV_HEADS,
                                      max_position_embeddings=256)
    return _save(transformers.LlamaForCausalLM(config), tmp_path_factory.mktemp("tiny_llama"), 1.0)


def _build(source: Path, out: Path, precision: str) -> Path:
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(source), "-o", str(out), "-p",
           precision, "-e", "cpu", "-c", str(out / "cache")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return out / "model.onnx"


def _float_accuracy(path: Path) -> Path:
    """The model with every MatMulNBits at accuracy_level 0 (onnxruntime then multiplies in float)."""
    model = onnx.load(str(path))
    for node in model.graph.node:
        for a in node.attribute:
            if node.op_type == "MatMulNBits" and a.name == "accuracy_level":
                a.i = 0
    out = path.with_name("model_float.onnx")
    onnx.save(model, str(out), save_as_external_data=True, location="model_float.onnx.data")
    return out


def _capacities(path: Path) -> dict[str, int]:
    """The past inputs of the layers with a sliding-window cache, and its capacity (their window)."""
    found = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "GroupQueryAttention" and attrs.get("sliding_window_cache"):
            found.update({node.input[3]: attrs["local_window_size"], node.input[4]: attrs["local_window_size"]})
    return found


def _steps(path: Path) -> list[float]:
    """Per step (a prompt of 6, two decode steps), the largest difference of any output relative to its scale.
    Every state input starts empty: a key/value cache at length 0 (a sliding-window one at its capacity, zeros),
    other states (LFM2's convolution state) zeros of their declared size; each present.* output feeds the input
    of the same name after 'past_key_values.' or 'past.'."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 500, (2, 6)).astype(np.int64)
    mask = np.ones((2, 6), np.int64)
    capacity = _capacities(path)
    past = {}
    for i in sess.get_inputs():
        if i.name in ("input_ids", "attention_mask"):
            continue
        sizes = {"batch_size": 2, "kv_cache_dim": HEAD}  # a *_length axis: the cache's (0, or its capacity)
        dims = [d if isinstance(d, int) else sizes.get(d, capacity.get(i.name, 0) if d.endswith("length") else -1)
                for d in i.shape]
        assert min(dims) >= 0, (i.name, i.shape)
        past[i.name] = np.zeros(dims, np.float32)
    errors = []
    for _ in range(3):
        feeds = {"input_ids": ids, "attention_mask": mask, **past}
        want = dict(zip(names, sess.run(None, feeds)))
        shapes = {k: tuple(v.shape) for k, v in feeds.items()}
        got = kiln.build(str(path), kiln.BuilderConfig(device="cpu", profiles=[shapes])).create_context().run(feeds)
        errors.append(max(float(np.abs(np.asarray(got[k]) - w).max()) / max(float(np.abs(w).max()), 1.0)
                          for k, w in want.items()))
        ids = want["logits"][:, -1].argmax(-1)[:, None].astype(np.int64)
        mask = np.ones((2, mask.shape[1] + 1), np.int64)
        fed = {k.split("present", 1)[1]: v for k, v in want.items() if k.startswith("present")}
        past = {name: fed[name.split("past_key_values", 1)[-1] if name.startswith("past_key_values")
                          else name.split("past", 1)[1]] for name in past}
    return errors


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_genai_export_runs_as_onnxruntime_runs_it(source: Path, tmp_path: Path, precision: str) -> None:
    path = _build(source, tmp_path / precision, precision)
    ops = {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}
    assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization"} <= ops, ops
    if precision == "int4":
        assert "MatMulNBits" in ops, ops
        path = _float_accuracy(path)
    errors = _steps(path)
    assert max(errors) < 1e-5, errors


def test_a_gemma2_export_with_sliding_window_caches_and_softcaps(tmp_path: Path) -> None:
    """Gemma-2 as the builder writes it: GroupQueryAttention with softcap, a sliding window whose layers keep a
    key/value cache of fixed capacity (sliding_window_cache), the final logits softcapped; prompt and decode steps
    against onnxruntime."""
    import transformers

    torch.manual_seed(0)
    config = transformers.Gemma2Config(vocab_size=512, hidden_size=128, intermediate_size=256,
                                       num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=KV_HEADS,
                                       head_dim=HEAD, max_position_embeddings=256, sliding_window=4,
                                       attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                                       query_pre_attn_scalar=HEAD)
    folder = _save(transformers.Gemma2ForCausalLM(config), tmp_path / "gemma2", 0.5)
    path = _build(folder, tmp_path / "fp32", "fp32")
    assert _capacities(path), "the builder no longer writes a sliding-window cache: see what it writes now"
    errors = _steps(path)
    assert max(errors) < 1e-5, errors


def test_a_gpt_oss_export_with_head_sinks_and_experts(tmp_path: Path) -> None:
    """gpt-oss as the builder writes it: GroupQueryAttention with head sinks (and a sliding-window cache on
    alternate layers), MoE with gpt-oss's clamped SwiGLU over top-2 of 4 experts; prompt and decode steps against
    onnxruntime."""
    import transformers

    torch.manual_seed(0)
    config = transformers.GptOssConfig(vocab_size=512, hidden_size=128, intermediate_size=128,
                                       num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=KV_HEADS,
                                       head_dim=HEAD, max_position_embeddings=256, sliding_window=4,
                                       num_local_experts=4, num_experts_per_tok=2)
    folder = _save(transformers.GptOssForCausalLM(config), tmp_path / "gpt_oss", 0.5)
    path = _build(folder, tmp_path / "fp32", "fp32")
    nodes = onnx.load(str(path), load_external_data=False).graph.node
    assert any(n.op_type == "MoE" for n in nodes)
    assert any(n.op_type == "GroupQueryAttention" and len(n.input) > 11 and n.input[11] for n in nodes)
    errors = _steps(path)
    assert max(errors) < 1e-5, errors


ARCHITECTURES = {  # the builder's other decoder families, each with what sets it apart
    "phi": ("PhiConfig", "PhiForCausalLM", {"partial_rotary_factor": 0.5}),  # rotary on half of each head
    "nemotron": ("NemotronConfig", "NemotronForCausalLM", {"head_dim": HEAD, "partial_rotary_factor": 0.5}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": HEAD}),  # q/k norms
    "olmo": ("OlmoConfig", "OlmoForCausalLM", {}),  # LayerNorm without weights
    "granite": ("GraniteConfig", "GraniteForCausalLM", {"embedding_multiplier": 2.0, "residual_multiplier": 0.5,
                                                         "attention_multiplier": 0.1, "logits_scaling": 4.0}),
    "ernie": ("Ernie4_5Config", "Ernie4_5ForCausalLM", {"head_dim": HEAD}),
    # a convolution layer (CausalConvWithState, its state carried like a cache) and an attention layer
    "lfm2": ("Lfm2Config", "Lfm2ForCausalLM", {"layer_types": ["conv", "full_attention"], "block_ff_dim": 256,
                                                "conv_L_cache": 3}),
}


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_other_builder_architectures(tmp_path: Path, arch: str) -> None:
    import transformers

    config_name, model_name, extra = ARCHITECTURES[arch]
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(vocab_size=512, hidden_size=128, intermediate_size=256,
                                                num_hidden_layers=LAYERS, num_attention_heads=4,
                                                num_key_value_heads=KV_HEADS, max_position_embeddings=256, **extra)
    folder = _save(getattr(transformers, model_name)(config), tmp_path / arch, 0.5)
    errors = _steps(_build(folder, tmp_path / "fp32", "fp32"))
    assert max(errors) < 1e-5, errors
