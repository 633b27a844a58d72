"""build -> save -> load -> run on the real models equals the CPU reference executor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import kiln
from kiln.cli.demo import load_image
from tests.e2e import models as M

pytestmark = pytest.mark.slow


def _roundtrip(path: str, tmp: Path, feeds_list: list[dict], config: kiln.BuilderConfig | None = None) -> None:
    engine = kiln.build(path, config or kiln.BuilderConfig(timing_cache=str(tmp / "t.cache")))
    engine.save(tmp / "m.kiln")
    ctx = kiln.load(tmp / "m.kiln").create_context()
    graph = kiln.import_onnx(path)
    for feeds in feeds_list:
        ours = ctx.run(feeds)
        ref = kiln.run_reference(graph, feeds)
        assert list(ours) == list(ref)
        for name in ref:
            err = np.abs(ours[name].astype(np.float64) - ref[name].astype(np.float64)).max()
            assert err <= 1e-5 * max(1.0, np.abs(ref[name]).max()), (name, err)


def test_efficientnet_lite0(tmp_path: Path) -> None:
    _roundtrip(M.efficientnet_lite0(), tmp_path, [{"image": load_image("chelsea")}])


def test_resnet18_two_batch_sizes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    cfg = kiln.BuilderConfig(profiles=[{"image": ((1, 3, 224, 224), (2, 3, 224, 224), (4, 3, 224, 224))}],
                             timing_cache=str(tmp_path / "t.cache"))
    feeds = [{"image": rng.standard_normal((b, 3, 224, 224)).astype(np.float32)} for b in (1, 3)]
    _roundtrip(M.torchvision_model("resnet18"), tmp_path, feeds, cfg)


def test_minilm_dynamic(tmp_path: Path) -> None:
    names = ("input_ids", "attention_mask", "token_type_ids")
    cfg = kiln.BuilderConfig(profiles=[{n: ((1, 1), (4, 16), (8, 64)) for n in names}],
                             timing_cache=str(tmp_path / "t.cache"))
    _roundtrip(M.minilm(), tmp_path, [M.tokenize(M.SENTENCES), M.tokenize(M.SENTENCES[1:2])], cfg)


def test_silero_vad_control_flow(tmp_path: Path) -> None:
    # 16 kHz chunks are 512 + 64 samples of context, 8 kHz ones 256 + 32: both branches of the model's If.
    cfg = kiln.BuilderConfig(profiles=[{"input": ((1, 288), (1, 576), (1, 576)), "state": (2, 1, 128)}],
                             timing_cache=str(tmp_path / "t.cache"))
    x = M.vad_signal(2)[None, :576].copy()
    feeds = [{"input": x, "state": np.zeros((2, 1, 128), np.float32), "sr": np.array(16000, np.int64)},
             {"input": x[:, ::2].copy(), "state": np.full((2, 1, 128), 0.1, np.float32),
              "sr": np.array(8000, np.int64)}]
    _roundtrip(M.silero_vad(), tmp_path, feeds, cfg)
