"""INT8 post-training calibration: the calibration data, per-tensor histograms of |x|, and the calibrators that
turn a histogram into a clipping threshold and a symmetric int8 scale (scale = threshold / 127).

    samples = load_calibration_data("calib/", graph, limit=512)
    hists = collect(graph, names, samples, torch.device("cuda"))
    scales = activation_scales(hists, "entropy")
    CalibrationCache("entropy", fingerprint, scales).save("model.calib.json")

Calibrators: `minmax` (the largest |x| seen), `percentile` (clip the rarest 100-p % of values), `entropy`
(TensorRT's KL-divergence search) and `mse` (the least expected squared quantization error). Weights are
quantized per output channel from their own values (`weight_scales`) and need no data.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kiln.ir.convert import from_numpy, to_numpy
from kiln.ir.dtype import DType
from kiln.ir.graph import Graph, Node, TensorType, Value
from kiln.ir.interpreter import Interpreter, check_shape
from kiln.utils.errors import InputError, KilnError

CALIBRATORS = ("minmax", "entropy", "percentile", "mse")
QMAX = 127
SCALE_FLOOR = 2.0**-24
"""The smallest scale handed out (all-zero tensors, all-zero channels): positive, and representable in float16."""
ENTROPY_LEVELS = 128
"""Quantized levels of the non-negative half of the int8 range, as in TensorRT's entropy calibrator."""
ENTROPY_MAX_CLIPPED = 0.01
"""The entropy search only weighs thresholds that clip at most this share of the values. It is meant to cut
outliers (on ReLU, Gaussian, Laplace or GELU activations it clips under 0.1 %); its divergence, though, does not see
how far clipped values move, only that they land in the last bin, so on a tensor whose values sit away from zero
(pooled features around 1.0, a bimodal tensor) a threshold under the bulk makes P and Q one and the same spike:
KL 0, every value clipped. ResNet-50's pooled features (random weights) came out with an error of 59 % of their
norm that way."""
CACHE_KIND = "kiln-calibration-cache"
CACHE_VERSION = 1


class CalibrationError(KilnError):
    """Calibration data or a calibration cache that does not fit the model or cannot be read."""


# --- calibration data -----------------------------------------------------------------------------------


def load_calibration_data(
    source: str | os.PathLike[str] | Iterable[Mapping[str, Any]], graph: Graph, *, limit: int | None = None
) -> list[dict[str, np.ndarray]]:
    """Calibration samples for `graph`, each a dict {input name: numpy array}, checked against `graph.inputs`.

    `source` is a directory of `.npy` files (one sample per file; only for a model with one input) and/or `.npz`
    files (one sample per file, keys = input names), read in sorted file-name order, other files ignored; or an
    iterable of {input name: numpy array or torch tensor}. At most `limit` samples are read. Raises
    CalibrationError naming the file or sample and the problem.
    """
    if limit is not None and limit < 1:
        raise CalibrationError(f"calibration limit must be at least 1, got {limit}")
    inputs = _tensor_inputs(graph)
    if isinstance(source, (str, os.PathLike)):
        items: Iterator[tuple[str, dict[str, Any]]] = _read_dir(Path(source), inputs)
    else:
        items = ((f"sample {i}", _as_dict(s, f"sample {i}")) for i, s in enumerate(source))
    out: list[dict[str, np.ndarray]] = []
    for where, sample in items:
        out.append(_check_sample(where, sample, inputs))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise CalibrationError("no calibration samples: the iterable is empty", hint="pass at least one sample")
    return out


def _tensor_inputs(graph: Graph) -> list[Value]:
    for v in graph.inputs:
        if not isinstance(v.type, TensorType):
            raise CalibrationError(f"input '{v.name}' is a {v.type}; calibration supports tensor inputs only")
    if not graph.inputs:
        raise CalibrationError(f"graph '{graph.name}' has no inputs: there is nothing to calibrate with")
    return list(graph.inputs)


def _read_dir(root: Path, inputs: list[Value]) -> Iterator[tuple[str, dict[str, Any]]]:
    if not root.is_dir():
        raise CalibrationError(f"calibration data '{root}' is not a directory",
                               hint="pass a directory of .npy/.npz files or an iterable of {input: array} dicts")
    files = sorted(p for p in root.iterdir() if p.suffix in (".npy", ".npz") and p.is_file())
    if not files:
        raise CalibrationError(f"calibration directory '{root}' holds no .npy or .npz files",
                               hint="write one sample per file: .npz with one array per input name, or .npy")
    for path in files:
        yield str(path), _read_file(path, inputs)


def _read_file(path: Path, inputs: list[Value]) -> dict[str, Any]:
    if path.suffix == ".npy" and len(inputs) != 1:
        names = ", ".join(v.name for v in inputs)
        raise CalibrationError(f"'{path}': a .npy file holds one array, but the model has {len(inputs)} inputs "
                               f"({names})", hint="save each sample as .npz with one array per input name")
    try:
        # why: allow_pickle=False: calibration files are data; loading them must never run code
        if path.suffix == ".npy":
            return {inputs[0].name: np.load(path, allow_pickle=False)}
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:
        raise CalibrationError(f"cannot read calibration file '{path}': {type(e).__name__}: {e}",
                               hint="check that it was written by numpy.save / numpy.savez") from e


def _as_dict(sample: Any, where: str) -> dict[str, Any]:
    if not isinstance(sample, Mapping):
        raise CalibrationError(f"{where} is a {type(sample).__name__}, not a dict of {{input name: array}}")
    return dict(sample)


def _check_sample(where: str, sample: dict[str, Any], inputs: list[Value]) -> dict[str, np.ndarray]:
    names = [v.name for v in inputs]
    unknown = [k for k in sample if k not in names]
    if unknown:
        raise CalibrationError(f"{where}: unknown input '{unknown[0]}'; the model's inputs are: {', '.join(names)}")
    missing = [n for n in names if n not in sample]
    if missing:
        raise CalibrationError(f"{where}: missing input '{missing[0]}' (the model needs: {', '.join(names)})")
    bindings: dict[str, int] = {}  # why: one sample binds each symbolic dim once, across all its inputs
    return {v.name: _check_array(where, v, sample[v.name], bindings) for v in inputs}


def _check_array(where: str, v: Value, x: Any, bindings: dict[str, int]) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        try:
            x = to_numpy(x)
        except TypeError as e:
            raise CalibrationError(f"{where}: input '{v.name}' has unsupported torch dtype {x.dtype}") from e
    arr = np.asarray(x)
    try:
        got: DType | None = DType.from_numpy(arr.dtype)
    except TypeError:
        got = None
    if got is not v.dtype:
        raise CalibrationError(f"{where}: input '{v.name}' expects {v.dtype}, got {arr.dtype}",
                               hint="convert the calibration data to the model's input dtype")
    try:
        check_shape(v.name, v.shape, tuple(arr.shape), bindings, what="input")
    except InputError as e:
        raise CalibrationError(f"{where}: {e.message}") from None
    return arr


# --- histograms -----------------------------------------------------------------------------------------


class Histogram:
    """A histogram of |x| for one tensor across calibration batches: `nbins` equal bins over [0, amax].

    When a batch exceeds the range, the range grows to the new amax and the counts seen so far are re-binned
    (spread by their cumulative distribution, so totals are kept and early batches are not clipped).
    """

    def __init__(self, nbins: int = 2048, name: str = "") -> None:
        if nbins < 1:
            raise CalibrationError(f"histogram of '{name}': nbins must be at least 1, got {nbins}")
        self.nbins = nbins
        self.name = name
        self.counts = np.zeros(nbins, dtype=np.float64)
        self.amax = 0.0
        self.count = 0

    @property
    def bin_width(self) -> float:
        return self.amax / self.nbins

    def add(self, x: torch.Tensor) -> None:
        """Record the values of one batch (any device; integer or float)."""
        a = x.detach().reshape(-1).abs().float()
        if a.numel() == 0:
            return
        if not bool(torch.isfinite(a).all()):
            raise CalibrationError(f"tensor '{self.name or '?'}' has inf or NaN values on the calibration data",
                                   hint="check the calibration inputs, or keep this tensor out of INT8")
        hi = float(a.max())
        if hi > self.amax:
            self._grow(hi)
        if self.amax == 0.0:
            self.counts[0] += a.numel()
        else:
            self.counts += torch.histc(a, self.nbins, 0.0, self.amax).double().cpu().numpy()
        self.count += a.numel()

    def _grow(self, amax: float) -> None:
        if self.amax == 0.0:  # why: everything so far was exactly zero, which stays in the first bin
            total = self.counts.sum()
            self.counts = np.zeros(self.nbins, dtype=np.float64)
            self.counts[0] = total
        else:
            old_edges = np.linspace(0.0, self.amax, self.nbins + 1)
            cdf = np.concatenate([[0.0], np.cumsum(self.counts)])
            new_edges = np.linspace(0.0, amax, self.nbins + 1)
            self.counts = np.diff(np.interp(new_edges, old_edges, cdf))  # past the old range: cdf stays at total
        self.amax = amax


def collect(
    graph: Graph, names: Sequence[str], samples: Iterable[Mapping[str, Any]], device: torch.device
) -> dict[str, Histogram]:
    """Run `graph` on `device` over `samples` and return a histogram of each named value (node outputs,
    subgraph values included, and graph inputs)."""
    wanted = _calibration_values(graph, names)
    hists = {n: Histogram(name=n) for n in names}
    input_names = [v.name for v in graph.inputs if v.name in hists]

    def observe(node: Node, args: list[Any], results: list[Any]) -> None:
        for v, r in zip(node.outputs, results):
            if v.name in hists and wanted[v.name] is v:
                hists[v.name].add(r)

    interp = Interpreter(graph, check=False, device=device, observer=observe)
    n = 0
    with torch.inference_mode():
        for sample in samples:
            for name in input_names:
                x = sample[name]
                hists[name].add(x if isinstance(x, torch.Tensor) else _as_tensor(x))
            interp.run(sample)
            n += 1
    if n == 0:
        raise CalibrationError("no calibration samples to run", hint="pass at least one sample")
    return hists


def _as_tensor(x: Any) -> torch.Tensor:
    t, _ = from_numpy(np.asarray(x))
    assert isinstance(t, torch.Tensor)
    return t


def _calibration_values(graph: Graph, names: Sequence[str]) -> dict[str, Value]:
    values = {v.name: v for v in graph.inputs}
    for node in graph.all_nodes():
        values.update((v.name, v) for v in node.outputs)
    out: dict[str, Value] = {}
    for name in names:
        if name in graph.initializers:
            raise CalibrationError(f"'{name}' is a constant, not an activation",
                                   hint="quantize weights with weight_scales; calibrate activations only")
        if name not in values:
            raise CalibrationError(f"no value '{name}' in graph '{graph.name}' to calibrate",
                                   hint="name a graph input or a node output of the graph being calibrated")
        v = values[name]
        if not isinstance(v.type, TensorType) or not v.dtype.is_float:
            raise CalibrationError(f"value '{name}' is {v.type}: only float tensors are calibrated for INT8")
        out[name] = v
    return out


# --- calibrators ----------------------------------------------------------------------------------------


def threshold(hist: Histogram, method: str, *, percentile: float = 99.99) -> float:
    """The clipping threshold for `hist` by `method` (one of CALIBRATORS); 0.0 for an all-zero tensor."""
    if method not in CALIBRATORS:
        raise CalibrationError(f"unknown calibrator '{method}'", hint=f"use one of: {', '.join(CALIBRATORS)}")
    if hist.count == 0:
        raise CalibrationError(f"tensor '{hist.name or '?'}' has no recorded values",
                               hint="run collect() over at least one non-empty sample first")
    if hist.amax == 0.0 or method == "minmax":
        return hist.amax
    if method == "percentile":
        return _percentile(hist, percentile)
    if method == "entropy":
        return _entropy(hist)
    return _mse(hist)


def _percentile(hist: Histogram, p: float) -> float:
    if not 0.0 < p <= 100.0:
        raise CalibrationError(f"percentile must be in (0, 100], got {p}")
    cdf = np.cumsum(hist.counts)
    target = cdf[-1] * p / 100.0
    i = min(int(np.searchsorted(cdf, target, side="left")), hist.nbins - 1)
    before = cdf[i - 1] if i > 0 else 0.0
    frac = (target - before) / hist.counts[i] if hist.counts[i] > 0 else 1.0  # why: linear within the bin
    return float(min(hist.amax, (i + frac) * hist.bin_width))


def _entropy(hist: Histogram) -> float:
    """TensorRT's search: for each candidate i, P = bins[:i] with the clipped mass added to its last bin;
    Q = bins[:i] merged into 128 levels and spread back over the non-empty bins; keep the i minimizing KL(P||Q),
    among the thresholds that clip at most ENTROPY_MAX_CLIPPED of the values."""
    bins = hist.counts.copy()
    if hist.nbins <= ENTROPY_LEVELS:
        return hist.amax
    if bins[0] > bins[1] > 0:  # exact zeros (a ReLU's output) would dominate both distributions and pull the
        bins[0] = bins[1]      # threshold far down; as NVIDIA's quantization toolkit does, weigh bin 0 like bin 1
    suffix = np.concatenate([np.cumsum(bins[::-1])[::-1], [0.0]])  # suffix[i] = bins[i:].sum()
    most_clipped = ENTROPY_MAX_CLIPPED * hist.counts.sum()
    best_i, best_kl = hist.nbins, math.inf
    for i in range(ENTROPY_LEVELS, hist.nbins + 1):
        if suffix[i] > most_clipped or not bins[:i].any():
            continue  # clips too much, or nothing lies below it (sparse, discrete-valued inputs): no candidate
        p = bins[:i].copy()
        p[-1] += suffix[i]
        kl = _kl(p, _quantized(bins[:i]))
        if kl < best_kl:
            best_i, best_kl = i, kl
    return best_i * hist.bin_width


def _quantized(ref: np.ndarray) -> np.ndarray:
    level = np.arange(len(ref)) * ENTROPY_LEVELS // len(ref)
    nonzero = ref > 0
    mass = np.bincount(level, weights=ref, minlength=ENTROPY_LEVELS)
    used = np.bincount(level, weights=nonzero, minlength=ENTROPY_LEVELS)
    q = np.where(nonzero, mass[level] / np.maximum(used[level], 1.0), 0.0)
    return _smooth(q)


def _smooth(q: np.ndarray, eps: float = 1e-4) -> np.ndarray:
    """Move a little mass onto the zero bins so KL(P||Q) stays finite where P > 0 and Q == 0."""
    total = q.sum()
    if total <= 0:
        return np.full_like(q, 1.0 / len(q))
    q = q / total
    zeros = q == 0
    nz = len(q) - int(zeros.sum())
    if zeros.any():
        q = q + eps * zeros - (eps * zeros.sum() / nz) * ~zeros
    return q


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    p = p / p.sum()
    m = p > 0
    return float(np.sum(p[m] * np.log(p[m] / np.maximum(q[m], 1e-300))))


def _mse(hist: Histogram) -> float:
    """Expected squared error over the histogram for each candidate threshold T = i * bin width: values above T
    are clipped to T; values below are rounded to a grid of step T/127, error ~ step^2/12 (or x^2 when x is
    smaller than that, since it rounds to zero)."""
    w = hist.bin_width
    centers = (np.arange(hist.nbins) + 0.5) * w
    best_t, best_err = hist.amax, math.inf
    for i in range(1, hist.nbins + 1):
        t = i * w
        step2 = (t / QMAX) ** 2 / 12.0
        kept = hist.counts[:i] @ np.minimum(centers[:i] ** 2, step2)
        clipped = hist.counts[i:] @ (centers[i:] - t) ** 2
        err = float(kept + clipped)
        if err < best_err:
            best_t, best_err = t, err
    return best_t


def activation_scales(
    hists: Mapping[str, Histogram], method: str, *, percentile: float = 99.99
) -> dict[str, float]:
    """Symmetric per-tensor int8 scales: threshold / 127, at least SCALE_FLOOR (for all-zero tensors)."""
    return {n: max(threshold(h, method, percentile=percentile) / QMAX, SCALE_FLOOR) for n, h in hists.items()}


def weight_scales(w: torch.Tensor, axis: int = 0) -> torch.Tensor:
    """Symmetric per-channel int8 scales along `axis` (the output channels): absmax over every other axis / 127,
    at least SCALE_FLOOR; float32, shape (w.shape[axis],)."""
    if w.ndim == 0:
        raise CalibrationError("weight_scales needs a tensor with a channel axis, got a scalar")
    if not -w.ndim <= axis < w.ndim:
        raise CalibrationError(f"channel axis {axis} is out of range for a weight of shape {list(w.shape)}")
    a = w.detach().float().abs().movedim(axis, 0).reshape(w.shape[axis], -1)
    amax = a.amax(dim=1) if a.shape[1] > 0 else torch.zeros(a.shape[0], device=a.device)
    return (amax / QMAX).clamp_min(SCALE_FLOOR).to(torch.float32)


# --- the calibration cache ------------------------------------------------------------------------------


@dataclass
class CalibrationCache:
    """Scales by tensor name, saved as human-readable JSON so a build can skip calibration. `model` is a
    fingerprint of the model chosen by the caller; a cache for another model or method should not be reused."""

    method: str
    model: str
    scales: dict[str, float] = field(default_factory=dict)

    @staticmethod
    def load(path: str | os.PathLike[str]) -> CalibrationCache:
        """Read a cache written by `save`; CalibrationError for an unreadable, foreign or other-version file."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as e:
            raise CalibrationError(f"cannot read calibration cache '{path}': {e.strerror or e}") from e
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CalibrationError(f"calibration cache '{path}' is not valid JSON ({e})",
                                   hint="it is corrupt: delete it and calibrate again") from e
        if not isinstance(data, dict) or data.get("kind") != CACHE_KIND:
            raise CalibrationError(f"'{path}' is not a kiln calibration cache",
                                   hint="pass a file written by CalibrationCache.save")
        if data.get("version") != CACHE_VERSION:
            raise CalibrationError(f"calibration cache '{path}' has version {data.get('version')!r}; "
                                   f"this kiln reads version {CACHE_VERSION}", hint="delete it and calibrate again")
        return CalibrationCache(_str_field(path, data, "method"), _str_field(path, data, "model"),
                                _scales_field(path, data.get("scales")))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically (a temporary file in the same directory, then rename): a reader never sees half."""
        text = json.dumps({"kind": CACHE_KIND, "version": CACHE_VERSION, "method": self.method,
                           "model": self.model, "scales": {k: float(v) for k, v in self.scales.items()}},
                          sort_keys=True, indent=2)
        target = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text + "\n")
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _str_field(path: Any, data: dict[str, Any], key: str) -> str:
    v = data.get(key)
    if not isinstance(v, str):
        raise CalibrationError(f"calibration cache '{path}': field '{key}' should be a string, got {v!r}",
                               hint="it is corrupt: delete it and calibrate again")
    return v


def _scales_field(path: Any, scales: Any) -> dict[str, float]:
    bad = "it is corrupt: delete it and calibrate again"
    if not isinstance(scales, dict):
        raise CalibrationError(f"calibration cache '{path}': 'scales' should be an object", hint=bad)
    out: dict[str, float] = {}
    for name, s in scales.items():
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s <= 0:
            raise CalibrationError(f"calibration cache '{path}': scale of '{name}' is {s!r}, not a positive number",
                                   hint=bad)
        out[name] = float(s)
    return out
