"""An LLM as onnxruntime-genai's model builder exports it (the format its users download): a random 2-layer LLaMA with
a tiny tokenizer, built in FP32 and in INT4, then run by kiln's CPU engine and by onnxruntime over a prompt and two
decode steps, each step's present key/values fed back as the next step's past.

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


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random LLaMA saved as transformers saves it, with a WordLevel tokenizer of its 512 tokens."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256,
                                      num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=KV_HEADS,
                                      max_position_embeddings=256)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(1.0 if p.dim() == 1 else 0.0, 0.05)
    model.save_pretrained(folder)
    tok = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(512)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", bos_token="t1",
                                         eos_token="t2").save_pretrained(folder)
    return folder


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


def _steps(path: Path) -> list[float]:
    """Per step (a prompt of 6, two decode steps), the largest difference of any output relative to its scale."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 500, (2, 6)).astype(np.int64)
    mask = np.ones((2, 6), np.int64)
    past = {f"past_key_values.{i}.{w}": np.zeros((2, KV_HEADS, 0, HEAD), np.float32)
            for i in range(LAYERS) for w in ("key", "value")}
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
        past = {k.replace("present", "past_key_values"): v for k, v in want.items() if k.startswith("present")}
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
