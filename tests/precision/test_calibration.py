"""INT8 calibration: loading and checking calibration data, histograms, collecting them through the interpreter,
the four calibrators, scales and the calibration cache."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kiln.ir import DType, Graph, TensorType
from kiln.precision.calibration import (
    CALIBRATORS,
    ENTROPY_MAX_CLIPPED,
    SCALE_FLOOR,
    CalibrationCache,
    CalibrationError,
    Histogram,
    activation_scales,
    collect,
    load_calibration_data,
    threshold,
    weight_scales,
)
from kiln.utils.errors import KilnError

F32 = DType.FLOAT32
CPU = torch.device("cpu")


def _one_input() -> Graph:
    g = Graph()
    x = g.add_input("x", TensorType(F32, ("n", 4)))
    g.outputs = g.add("Relu", [x], name="relu")
    return g


def _two_inputs() -> Graph:
    g = Graph()
    a = g.add_input("a", TensorType(F32, (2, 3)))
    b = g.add_input("b", TensorType(F32, (2, 3)))
    g.outputs = g.add("Add", [a, b], name="add")
    return g


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# --- load_calibration_data ------------------------------------------------------------------------------


def test_load_npy_dir_sorted(tmp_path: Path) -> None:
    for i in (2, 0, 1):
        np.save(tmp_path / f"s{i}.npy", np.full((3, 4), i, np.float32))
    (tmp_path / "README.txt").write_text("ignored")
    samples = load_calibration_data(tmp_path, _one_input())
    assert [float(s["x"][0, 0]) for s in samples] == [0.0, 1.0, 2.0]
    assert all(s["x"].dtype == np.float32 and s["x"].shape == (3, 4) for s in samples)


def test_load_npz_dir_and_limit(tmp_path: Path) -> None:
    for i in range(5):
        np.savez(tmp_path / f"{i:03d}.npz", a=np.full((2, 3), i, np.float32), b=np.ones((2, 3), np.float32))
    samples = load_calibration_data(str(tmp_path), _two_inputs())
    assert len(samples) == 5 and set(samples[0]) == {"a", "b"}
    assert float(samples[4]["a"][1, 2]) == 4.0
    limited = load_calibration_data(tmp_path, _two_inputs(), limit=2)
    assert [float(s["a"][0, 0]) for s in limited] == [0.0, 1.0]


def test_load_iterable_numpy_and_torch_stops_at_limit() -> None:
    def endless():  # the loader must stop consuming at `limit`
        i = 0
        while True:
            yield {"x": torch.full((i + 1, 4), float(i))}
            i += 1

    samples = load_calibration_data(endless(), _one_input(), limit=3)
    assert len(samples) == 3 and isinstance(samples[2]["x"], np.ndarray) and samples[2]["x"].shape == (3, 4)
    mixed = load_calibration_data([{"x": np.zeros((1, 4), np.float32)}, {"x": torch.ones(2, 4)}], _one_input())
    assert [s["x"].shape for s in mixed] == [(1, 4), (2, 4)]


@pytest.mark.parametrize(
    ("sample", "message"),
    [
        ({}, "missing input 'x'"),
        ({"x": np.zeros((1, 4), np.float32), "y": np.zeros(1)}, "unknown input 'y'"),
        ({"x": np.zeros((1, 4), np.float64)}, "expects float32, got float64"),
        ({"x": torch.zeros(1, 4, dtype=torch.int64)}, "expects float32, got int64"),
        ({"x": np.zeros(4, np.float32)}, "expects rank 2"),
        ({"x": np.zeros((1, 5), np.float32)}, "(dim 1)"),
        (np.zeros((1, 4), np.float32), "not a dict"),
    ],
)
def test_iterable_errors_name_sample_and_problem(sample: Any, message: str) -> None:
    good: dict[str, Any] = {"x": np.zeros((1, 4), np.float32)}
    with pytest.raises(CalibrationError) as e:
        load_calibration_data([good, sample], _one_input())
    assert "sample 1" in str(e.value) and message in str(e.value)
    assert isinstance(e.value, KilnError)


def test_symbolic_dim_bound_once_per_sample() -> None:
    g = Graph()
    a = g.add_input("a", TensorType(F32, ("n", 2)))
    b = g.add_input("b", TensorType(F32, ("n", 2)))
    g.outputs = g.add("Add", [a, b])
    with pytest.raises(CalibrationError, match="'n' = 3 elsewhere, got 4"):
        load_calibration_data([{"a": np.zeros((3, 2), np.float32), "b": np.zeros((4, 2), np.float32)}], g)


def test_dir_errors(tmp_path: Path) -> None:
    with pytest.raises(CalibrationError, match=r"holds no \.npy or \.npz files"):
        load_calibration_data(tmp_path, _one_input())
    with pytest.raises(CalibrationError, match="is not a directory"):
        load_calibration_data(tmp_path / "nope", _one_input())
    with pytest.raises(CalibrationError, match="the iterable is empty"):
        load_calibration_data([], _one_input())
    with pytest.raises(CalibrationError, match="at least 1"):
        load_calibration_data([], _one_input(), limit=0)

    np.save(tmp_path / "a.npy", np.zeros((2, 3), np.float32))
    with pytest.raises(CalibrationError, match=r"a\.npy'.*model has 2 inputs"):
        load_calibration_data(tmp_path, _two_inputs())


def test_unreadable_and_bad_files_are_named(tmp_path: Path) -> None:
    (tmp_path / "0.npy").write_bytes(b"definitely not numpy")
    with pytest.raises(CalibrationError, match=r"cannot read calibration file '.*0\.npy'"):
        load_calibration_data(tmp_path, _one_input())

    other = tmp_path / "other"
    other.mkdir()
    np.savez(other / "0.npz", a=np.zeros((2, 3), np.float32))
    with pytest.raises(CalibrationError, match=r"0\.npz: missing input 'b'"):
        load_calibration_data(other, _two_inputs())

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    np.save(pickled / "0.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(CalibrationError, match="cannot read calibration file"):
        load_calibration_data(pickled, _one_input())


# --- Histogram ------------------------------------------------------------------------------------------


def test_histogram_grows_range_keeping_counts() -> None:
    h = Histogram(nbins=64)
    h.add(torch.linspace(-1.0, 1.0, 1000))
    assert h.amax == pytest.approx(1.0) and h.count == 1000
    h.add(torch.tensor([0.5, -4.0]))
    assert h.amax == pytest.approx(4.0) and h.count == 1002
    assert h.counts.sum() == pytest.approx(1002)
    # the first batch's values (|x| <= 1) now sit in the first quarter of the range, none dropped
    assert h.counts[: 64 // 4 + 1].sum() == pytest.approx(1001)
    assert h.counts[-1] == pytest.approx(1)


def test_histogram_zeros_then_values_and_nonfinite() -> None:
    h = Histogram(nbins=16, name="t")
    h.add(torch.zeros(10))
    assert h.amax == 0.0 and threshold(h, "entropy") == 0.0
    h.add(torch.tensor([2.0]))
    assert h.counts[0] == 10 and h.counts.sum() == 11 and h.amax == 2.0
    with pytest.raises(CalibrationError, match="'t' has inf or NaN"):
        h.add(torch.tensor([float("nan")]))


# --- collect --------------------------------------------------------------------------------------------


def test_collect_records_inputs_and_node_outputs() -> None:
    g = Graph()
    x = g.add_input("x", TensorType(F32, (2, 3)))
    (r,) = g.add("Relu", [x], name="relu")
    (y,) = g.add("Mul", [r, g.add_initializer("two", torch.tensor(2.0))], name="double")
    g.outputs = [y]
    samples = [{"x": np.array([[-5.0, 1.0, 2.0], [0.0, 3.0, -1.0]], np.float32)},
               {"x": np.array([[-0.5, 0.25, 0.0], [4.0, -7.0, 1.0]], np.float32)}]
    hists = collect(g, ["x", r.name, y.name], samples, CPU)
    assert hists["x"].amax == 7.0 and hists["x"].count == 12
    assert hists[r.name].amax == 4.0 and hists[y.name].amax == 8.0
    with pytest.raises(CalibrationError, match="no value 'nope'"):
        collect(g, ["nope"], samples, CPU)
    with pytest.raises(CalibrationError, match="'two' is a constant"):
        collect(g, ["two"], samples, CPU)


# --- calibrators ----------------------------------------------------------------------------------------


def _hist(x: torch.Tensor, nbins: int = 2048) -> Histogram:
    h = Histogram(nbins)
    for chunk in x.chunk(4):  # several batches, so growth is exercised too
        h.add(chunk)
    return h


@pytest.fixture(scope="module")
def gaussian_with_outliers() -> Histogram:
    x = torch.randn(1_000_000, generator=torch.Generator().manual_seed(0))
    x[250_000], x[750_000] = 30.0, -29.0  # 2 huge outliers in later batches: the range grows ~6x
    return _hist(x)


def test_minmax_is_amax(gaussian_with_outliers: Histogram) -> None:
    assert threshold(gaussian_with_outliers, "minmax") == gaussian_with_outliers.amax == 30.0


def test_percentile_of_uniform() -> None:
    x = torch.rand(1_000_000, generator=torch.Generator().manual_seed(1))
    t = threshold(_hist(x), "percentile", percentile=99.99)
    assert type(t) is float and t == pytest.approx(0.9999, abs=3e-4)
    assert threshold(_hist(x), "percentile", percentile=50.0) == pytest.approx(0.5, abs=3e-3)
    with pytest.raises(CalibrationError, match="percentile must be"):
        threshold(_hist(x), "percentile", percentile=0.0)


@pytest.mark.parametrize("method", ["entropy", "mse"])
def test_entropy_and_mse_clip_outliers(gaussian_with_outliers: Histogram, method: str) -> None:
    t = threshold(gaussian_with_outliers, method)
    assert 2.0 < t < 0.5 * gaussian_with_outliers.amax, t


@pytest.mark.parametrize("where", ["pooled", "bimodal"])
def test_entropy_does_not_clip_the_bulk(where: str) -> None:
    # values away from zero: a threshold under them all once scored KL 0 (P and Q the same one-bin spike)
    g = torch.Generator().manual_seed(3)
    if where == "pooled":  # ResNet-50's average-pooled features (random weights): 1.04 +- 0.16, none near zero
        x = 1.0 + 0.16 * torch.randn(400_000, generator=g)
    else:
        x = torch.cat([0.1 * torch.randn(200_000, generator=g), 5.0 + 0.1 * torch.randn(200_000, generator=g)])
    h = _hist(x)
    t = threshold(h, "entropy")
    assert float((x.abs() > t).double().mean()) <= ENTROPY_MAX_CLIPPED
    s = t / 127
    err = float(((x / s).round().clamp(-127, 127) * s - x).norm() / x.norm())
    assert err < 0.01, (t, err)  # without the bound: 0.73 (pooled) and 0.92 (bimodal)


def test_entropy_keeps_uniform_range() -> None:
    x = torch.rand(200_000, generator=torch.Generator().manual_seed(2)) * 2 - 1
    h = _hist(x)
    assert threshold(h, "entropy") == pytest.approx(h.amax, rel=0.02)


def test_unknown_method_and_empty_histogram() -> None:
    with pytest.raises(CalibrationError, match="unknown calibrator 'kl'"):
        threshold(_hist(torch.ones(8), nbins=8), "kl")
    with pytest.raises(CalibrationError, match="no recorded values"):
        threshold(Histogram(), "minmax")


def test_activation_scales(gaussian_with_outliers: Histogram) -> None:
    zero = Histogram()
    zero.add(torch.zeros(5))
    hists = {"g": gaussian_with_outliers, "z": zero}
    for method in CALIBRATORS:
        scales = activation_scales(hists, method)
        assert scales["g"] == pytest.approx(threshold(gaussian_with_outliers, method) / 127)
        assert scales["z"] == SCALE_FLOOR > 0


def test_weight_scales_per_channel() -> None:
    w = torch.zeros(3, 2, 2)
    w[0, 1, 0] = -254.0
    w[1] = 1.27
    s = weight_scales(w)
    assert s.dtype == torch.float32 and s.shape == (3,)
    assert s.tolist() == pytest.approx([2.0, 0.01, SCALE_FLOOR])
    assert weight_scales(w.permute(1, 2, 0), axis=-1).tolist() == pytest.approx(s.tolist())
    with pytest.raises(CalibrationError, match="axis 3 is out of range"):
        weight_scales(w, axis=3)


# --- CalibrationCache -----------------------------------------------------------------------------------


def test_cache_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "model.calib.json"
    CalibrationCache("entropy", "sha256:abc", {"b": 0.5, "a": 0.25}).save(path)
    back = CalibrationCache.load(path)
    assert back == CalibrationCache("entropy", "sha256:abc", {"a": 0.25, "b": 0.5})
    text = path.read_text()
    assert json.loads(text)["kind"] == "kiln-calibration-cache" and text.index('"a"') < text.index('"b"')
    assert "\n  " in text and list(tmp_path.iterdir()) == [path]  # indented; no temporary left behind


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe\x00", "not valid JSON"),
        (b'{"kind": "tensorrt", "version": 1}', "not a kiln calibration cache"),
        (b"[1, 2]", "not a kiln calibration cache"),
        (b'{"kind": "kiln-calibration-cache", "version": 2}', "has version 2"),
        (b'{"kind": "kiln-calibration-cache", "version": 1, "method": "mse", "model": "m", "scales": {"a": -1}}',
         "scale of 'a' is -1"),
        (b'{"kind": "kiln-calibration-cache", "version": 1, "model": "m", "scales": {}}', "field 'method'"),
    ],
)
def test_cache_foreign_or_corrupt(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "c.json"
    path.write_bytes(content)
    with pytest.raises(CalibrationError, match=r"c\.json") as e:
        CalibrationCache.load(path)
    assert message in str(e.value)


def test_cache_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CalibrationError, match="cannot read calibration cache"):
        CalibrationCache.load(tmp_path / "missing.json")
