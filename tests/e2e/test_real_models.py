"""Real models on CPU: kiln's reference executor against onnxruntime on the same inputs."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from kiln.cli.demo import load_image
from kiln.frontend.onnx import import_model
from kiln.ir.interpreter import Interpreter
from tests.e2e import models as M

pytestmark = pytest.mark.slow


def _ort(path: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, feeds)


def _assert_close(got: np.ndarray, want: np.ndarray, rel: float) -> None:
    """|got - want| <= rel * max|want| everywhere: relative to the output's scale, so that values near zero
    do not demand more digits than float32 accumulation order can give."""
    assert got.shape == want.shape and got.dtype == want.dtype
    err = np.abs(got.astype(np.float64) - want.astype(np.float64)).max()
    scale = np.abs(want.astype(np.float64)).max()
    assert err <= rel * scale, f"max |diff| {err:.3e} > {rel:g} * {scale:.3e}"


def test_efficientnet_lite0_on_a_real_photo() -> None:
    path = M.efficientnet_lite0()
    x = load_image("chelsea")
    logits = Interpreter(import_model(path)).run({"image": x})["logits"]
    ref = _ort(path, {"image": x})[0]
    assert int(logits[0].argmax()) == 285  # Egyptian cat
    _assert_close(logits, ref, 1e-4)
    np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_minilm_sentence_embeddings_dynamic_batch_and_sequence() -> None:
    path = M.minilm()
    interp = Interpreter(import_model(path))
    for sentences in (M.SENTENCES, M.SENTENCES[:2][::-1], M.SENTENCES[2:3]):
        feeds = M.tokenize(sentences)
        ours = interp.run(feeds)["last_hidden_state"]
        ref = _ort(path, feeds)[0]
        e_ours = M.mean_pool(ours, feeds["attention_mask"])
        e_ref = M.mean_pool(ref, feeds["attention_mask"])
        assert e_ours.shape == (len(sentences), 384)
        np.testing.assert_allclose(e_ours, e_ref, rtol=0, atol=1e-4)
        cos = (e_ours * e_ref).sum(1) / (np.linalg.norm(e_ours, axis=1) * np.linalg.norm(e_ref, axis=1))
        assert cos.min() > 0.99999


def test_silero_vad_streaming_with_state() -> None:
    path = M.silero_vad()
    interp = Interpreter(import_model(path))
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    signal = M.vad_signal(50)
    sr = np.array(16000, dtype=np.int64)
    state_k = np.zeros((2, 1, 128), np.float32)
    state_o = state_k.copy()
    context = np.zeros((1, 64), np.float32)
    probs_k, probs_o = [], []
    for i in range(50):
        chunk = signal[i * 512:(i + 1) * 512][None]
        x = np.concatenate([context, chunk], axis=1)  # the model sees 64 samples of context, as silero's wrapper
        out_k = interp.run({"input": x, "state": state_k, "sr": sr})
        out_o = sess.run(None, {"input": x, "state": state_o, "sr": sr})
        probs_k.append(float(out_k["output"][0, 0]))
        probs_o.append(float(out_o[0][0, 0]))
        state_k, state_o = out_k["stateN"], out_o[1]
        context = chunk[:, -64:]
    np.testing.assert_allclose(probs_k, probs_o, rtol=0, atol=1e-4)
    np.testing.assert_allclose(state_k, state_o, rtol=0, atol=1e-4)
    assert max(probs_o) > 0.5 > min(probs_o), "the signal should contain both speech-like and silent parts"


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_random_weights(name: str) -> None:
    path = M.torchvision_model(name)
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    ours = Interpreter(import_model(path)).run({"image": x})["logits"]
    _assert_close(ours, _ort(path, {"image": x})[0], 1e-4)


def test_bert_small_random_weights() -> None:
    path = M.bert_small()
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 1000, (3, 11)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    ours = Interpreter(import_model(path)).run(feeds)
    ref = _ort(path, feeds)
    _assert_close(ours["last_hidden_state"], ref[0], 1e-4)
    _assert_close(ours["pooler_output"], ref[1], 1e-4)
