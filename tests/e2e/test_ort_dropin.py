"""A real onnxruntime application, unchanged, on kiln: silero-vad's own ONNX pipeline (`load_silero_vad(onnx=True)`,
its OnnxWrapper, `get_speech_timestamps`, `VADIterator`) with `onnxruntime.InferenceSession` swapped for
`kiln.ort.InferenceSession`, against the same pipeline on onnxruntime."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import pytest
import torch

import kiln.ort
from tests.e2e import models as M

pytestmark = pytest.mark.slow
silero_vad = pytest.importorskip("silero_vad")


def _pipeline(signal: np.ndarray) -> dict[str, Any]:
    """What an application does with silero-vad: whole-file timestamps, per-chunk probabilities, streaming,
    at 16 kHz and 8 kHz, and a batch of two streams."""
    model = silero_vad.load_silero_vad(onnx=True)
    audio = torch.from_numpy(signal)
    out: dict[str, Any] = {"model": model}
    out["probs"] = model.audio_forward(audio, 16000).numpy()
    out["stamps"] = silero_vad.get_speech_timestamps(audio, model, sampling_rate=16000)
    it = silero_vad.VADIterator(model, sampling_rate=16000)
    out["events"] = [it(audio[i:i + 512]) for i in range(0, len(audio), 512)]
    it.reset_states()
    low = torch.from_numpy(signal[::2].copy())
    out["probs_8k"] = model.audio_forward(low, 8000).numpy()
    out["stamps_8k"] = silero_vad.get_speech_timestamps(low, model, sampling_rate=8000)
    model.reset_states()
    out["batch"] = model(torch.stack([audio[:512], audio[20480:20992]]), 16000).numpy()
    return out


def test_silero_vad_pipeline_runs_unchanged_on_kiln(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path))
    signal = M.vad_signal(100)
    want = _pipeline(signal)
    monkeypatch.setattr(onnxruntime, "InferenceSession", kiln.ort.InferenceSession)
    got = _pipeline(signal)
    session = got["model"].session
    assert isinstance(session, kiln.ort.InferenceSession)
    assert type(want["model"].session).__module__.startswith("onnxruntime")
    for key in ("probs", "probs_8k", "batch"):
        assert got[key].shape == want[key].shape, key
        np.testing.assert_allclose(got[key], want[key], rtol=0, atol=1e-4, err_msg=key)
    assert got["stamps"] == want["stamps"] and len(want["stamps"]) == 2
    assert got["stamps_8k"] == want["stamps_8k"] and want["stamps_8k"]
    assert got["events"] == want["events"] and any(e is not None for e in want["events"])
    # One engine serves 16 kHz and 8 kHz chunks (input 1x576 and 1x288) and a batch of two: the profile's
    # buckets cover them all.
    assert session.kiln_stats.builds == 1 and session.kiln_stats.disk_loads == 0
    assert session.get_providers() == ["CPUExecutionProvider"]


def test_a_second_application_start_loads_the_engine_from_disk(monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(onnxruntime, "InferenceSession", kiln.ort.InferenceSession)
    audio = torch.from_numpy(M.vad_signal(20))
    sessions = []
    probs = []
    for _ in range(2):
        model = silero_vad.load_silero_vad(onnx=True)
        probs.append(model.audio_forward(audio, 16000).numpy())
        sessions.append(model.session)
    assert [(s.kiln_stats.builds, s.kiln_stats.disk_loads) for s in sessions] == [(1, 0), (0, 1)]
    np.testing.assert_array_equal(probs[0], probs[1])


def test_bert_with_variable_batch_and_length_matches_onnxruntime(monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path) -> None:
    """A BERT-like model fed changing batch sizes and sequence lengths: a few builds, not one per shape."""
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path))
    path = M.bert_small()
    ours = kiln.ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    ref = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for batch, seq in [(2, 7), (1, 12), (3, 5), (2, 30), (1, 64), (4, 9)]:
        ids = rng.integers(0, 1000, (batch, seq)).astype(np.int64)
        mask = np.ones_like(ids)
        mask[0, seq // 2:] = 0
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        for got, want in zip(ours.run(None, feeds), ref.run(None, feeds)):
            assert got.shape == want.shape and got.dtype == want.dtype
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())
    # (2,7) builds batch<=4 x seq<=16, which covers (1,12) and (3,5); (2,30) builds seq<=64; (1,64) and (4,9) fit.
    assert ours.kiln_stats.builds == 2
