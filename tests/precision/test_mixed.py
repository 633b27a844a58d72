"""FP16 with automatic FP32 fallback: a layer whose values leave FP16's range is found on sample inputs, kept in
FP32 with its readers, and the lowered graph then matches FP32 where plain FP16 gives inf/NaN; user pins."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kiln.ir import DType, Graph, TensorType
from kiln.ir.interpreter import Interpreter
from kiln.passes.manager import PassContext
from kiln.passes.pipeline import optimize
from kiln.precision.lower import lower_precision
from kiln.precision.ranges import PrecisionError, decide, observe_peaks

F32 = DType.FLOAT32
CPU = torch.device("cpu")


def _overflowing() -> Graph:
    """fc1 (+bias, relu) in range; `boost` multiplies by 4000 (values ~1e5 > 65504); LayerNorm brings them back;
    fc3 in range."""
    g = Graph()
    gen = torch.Generator().manual_seed(0)
    x = g.add_input("x", TensorType(F32, (4, 16)))
    (h,) = g.add("MatMul", [x, g.add_initializer("w1", torch.randn(16, 32, generator=gen) * 0.3)], name="fc1")
    (h,) = g.add("Add", [h, g.add_initializer("b1", torch.randn(32, generator=gen))], name="fc1_bias")
    (h,) = g.add("Relu", [h], name="fc1_relu")
    (h,) = g.add("MatMul", [h, g.add_initializer("w2", torch.randn(32, 32, generator=gen) * 4000)], name="boost")
    (h,) = g.add("LayerNormalization", [h, g.add_initializer("s", torch.ones(32))], name="norm", outputs=1)
    (y,) = g.add("MatMul", [h, g.add_initializer("w3", torch.randn(32, 8, generator=gen) * 0.3)], name="fc3",
                 outputs=["y"])
    g.outputs.append(y)
    optimize(g, PassContext(device="cuda"))
    return g


def _feeds(seed: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((4, 16)).astype(np.float32)}


def test_the_overflowing_layer_and_its_reader_stay_fp32_and_the_result_matches() -> None:
    want = Interpreter(_overflowing()).run(_feeds(1))["y"]
    plain = _overflowing()
    lower_precision(plain, DType.FLOAT16)
    assert not np.isfinite(Interpreter(plain).run(_feeds(1))["y"]).all()  # the failure being prevented

    g = _overflowing()
    peaks = observe_peaks(g, [_feeds(0)], CPU)
    d = decide(g, DType.FLOAT16, peaks, {})
    assert set(d.kept) == {"boost", "norm"}, d.kept
    assert "beyond FP16's range" in d.kept["boost"]
    report = lower_precision(g, DType.FLOAT16, d.kept)
    assert report.kept == d.kept
    dtypes = {n.name: n.outputs[0].type.dtype for n in g.nodes}
    assert dtypes["boost"] is F32 and dtypes["norm"] is F32
    assert any(t is DType.FLOAT16 for name, t in dtypes.items() if name.startswith("fc1"))
    got = Interpreter(g).run(_feeds(1))["y"]
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=0.02, atol=0.02 * np.abs(want).max())


def test_bf16_keeps_only_pinned_layers() -> None:
    g = _overflowing()
    d = decide(g, DType.BFLOAT16, observe_peaks(g, [_feeds(0)], CPU), {"fc3*": "fp32"})
    assert list(d.kept) == [n.name for n in g.nodes if n.name.startswith("fc3")]
    assert d.kept[next(iter(d.kept))] == "pinned by 'fc3*'"


@pytest.mark.parametrize("pins,match", [({"nope*": "fp32"}, "matches no layer"),
                                        ({"fc3*": "int8"}, "only fp32 pins")])
def test_bad_pins_are_clear_errors(pins: dict[str, str], match: str) -> None:
    g = _overflowing()
    with pytest.raises(PrecisionError, match=match):
        decide(g, DType.FLOAT16, {}, pins)


def _overflows_on_large_inputs() -> Graph:
    """x -> fc (x 400) -> LayerNorm -> y: in range for unit-scale inputs (|x| of a few units), beyond FP16's range
    for the real data's inputs of magnitude ~1000 (sensor counts, say)."""
    g = Graph()
    gen = torch.Generator().manual_seed(3)
    x = g.add_input("x", TensorType(F32, ("batch", 16)))
    (h,) = g.add("MatMul", [x, g.add_initializer("w", torch.randn(16, 32, generator=gen) * 25)], name="fc")
    (y,) = g.add("LayerNormalization", [h, g.add_initializer("s", torch.ones(32))], name="norm", outputs=["y"])
    g.outputs.append(y)
    return g


def test_fp16_ranges_come_from_the_calibration_data_when_given(tmp_path) -> None:
    from kiln.build.builder import range_feeds
    from kiln.runtime.plan import Profile, ShapeRange

    profiles = [Profile({"x": ShapeRange((1, 16), (4, 16), (8, 16))})]
    g = _overflows_on_large_inputs()
    feeds, seen_on = range_feeds(g, None, profiles, CPU)
    assert seen_on == "random inputs at 1 profile opt shape" and len(feeds) == 1
    assert decide(g, DType.FLOAT16, observe_peaks(g, feeds, CPU), {}).kept == {}  # random inputs miss it
    rng = np.random.default_rng(0)
    for i in range(3):
        np.save(tmp_path / f"s{i}.npy", (rng.standard_normal((2, 16)) * 1000).astype(np.float32))
    feeds, seen_on = range_feeds(g, str(tmp_path), profiles, CPU)
    assert seen_on == "3 calibration samples" and len(feeds) == 3
    kept = decide(g, DType.FLOAT16, observe_peaks(g, feeds, CPU), {}).kept
    assert "fc" in kept and "beyond FP16's range" in kept["fc"]


def test_calibration_data_for_an_fp32_build_is_an_error(tmp_path) -> None:
    from kiln.build.config import BuilderConfig, ConfigError

    with pytest.raises(ConfigError, match="fp32 build"):
        BuilderConfig(calibration=str(tmp_path))


def _masked_attention(extra_reader: bool = False, positive: bool = False) -> Graph:
    """transformers' padding mask: keep = ids >= 0; mask = Where(keep, 0, finfo.min) (+finfo.max with `positive`)
    as Attention's additive mask; `extra_reader`: the mask also goes to the output."""
    g = Graph()
    gen = torch.Generator().manual_seed(3)
    q = g.add_input("q", TensorType(F32, (2, 2, 5, 4)))
    ids = g.add_input("ids", TensorType(DType.INT64, (2, 1, 1, 5)))
    zero = g.add_initializer("zero", torch.tensor(0, dtype=torch.int64))
    (keep,) = g.add("GreaterOrEqual", [ids, zero], name="keep")
    big = torch.finfo(torch.float32).max * (1 if positive else -1)
    (mask,) = g.add("Where", [keep, g.add_initializer("open", torch.tensor(0.0)),
                              g.add_initializer("shut", torch.tensor(big))], name="mask")
    k = g.add_initializer("k", torch.randn(2, 2, 5, 4, generator=gen))
    (y,) = g.add("Attention", [q, k, k, mask], name="attn", outputs=["y"])
    g.outputs.append(y)
    if extra_reader:
        (m2,) = g.add("Identity", [mask], outputs=["m"])
        g.outputs.append(m2)
    return g


def _mask_feeds() -> dict[str, np.ndarray]:
    ids = np.array([[1, 2, 3, -1, -1], [4, 5, 6, 7, -1]], dtype=np.int64).reshape(2, 1, 1, 5)
    return {"q": np.random.default_rng(4).standard_normal((2, 2, 5, 4)).astype(np.float32), "ids": ids}


def test_a_padding_mask_of_float32_min_keeps_nothing_in_fp32_and_still_hides_the_keys() -> None:
    g = _masked_attention()
    want = Interpreter(_masked_attention()).run(_mask_feeds())["y"]
    highs: dict = {}
    peaks = observe_peaks(g, [_mask_feeds()], CPU, highs)
    assert decide(g, DType.FLOAT16, peaks, {}).kept.keys() == {"mask", "attn"}  # magnitudes alone: both kept
    d = decide(g, DType.FLOAT16, peaks, {}, highs)
    assert d.kept == {} and d.masks == [n.outputs[0].name for n in g.nodes if n.name == "mask"]
    report = lower_precision(g, DType.FLOAT16, {})
    assert report.clamped  # -3.4e38 became -65504
    got = Interpreter(g).run(_mask_feeds())["y"]
    np.testing.assert_allclose(got, want, rtol=5e-3, atol=5e-3)


@pytest.mark.parametrize("extra_reader, positive", [(True, False), (False, True)])
def test_a_large_mask_read_elsewhere_or_positive_is_still_kept(extra_reader: bool, positive: bool) -> None:
    g = _masked_attention(extra_reader, positive)
    highs: dict = {}
    peaks = observe_peaks(g, [_mask_feeds()], CPU, highs)
    assert "mask" in decide(g, DType.FLOAT16, peaks, {}, highs).kept
