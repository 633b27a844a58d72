"""What several commands share: opening a model (engine file, or ONNX built in memory), reading and making
inputs, describing arrays. Heavy modules (torch, the builder) are imported inside the functions."""

from __future__ import annotations

import json
import os
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from kiln.cli.shapes import Shape, ShapeSpecError, fmt
from kiln.utils.errors import InputError, KilnError

if TYPE_CHECKING:
    from kiln.ir.graph import Graph, Value
    from kiln.runtime.engine import Engine

ENGINE_MAGIC = b"KILNENG\x00"
DEFAULT_SEED = 0


def require_file(path: str, what: str) -> str:
    if not os.path.exists(path):
        raise KilnError(f"{what} '{path}' not found")
    if os.path.isdir(path):
        raise KilnError(f"{what} '{path}' is a directory, not a file")
    return path


def is_engine_file(path: str) -> bool:
    """By content, not by name: a kiln engine starts with its magic bytes."""
    with open(path, "rb") as f:
        return f.read(len(ENGINE_MAGIC)) == ENGINE_MAGIC


def peek_header(path: str) -> dict[str, Any] | None:
    """The engine file's JSON header without reading the weights (None when unreadable: the real load reports it)."""
    try:
        with open(path, "rb") as f:
            head = f.read(20)
            (hlen,) = struct.unpack_from("<Q", head, 12)
            header: dict[str, Any] = json.loads(f.read(hlen).decode("utf-8"))
            return header
    except (OSError, ValueError, struct.error, UnicodeDecodeError):
        return None


def pick_device(requested: str | None, header: Mapping[str, Any] | None = None) -> str:
    """--device, else the engine's own kind of device, else a GPU when there is one."""
    if requested:
        return requested
    import torch

    kind = (header or {}).get("device", {}).get("kind") if header else None
    if kind == "cpu":
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_device_arg(p: Any, *, engine: bool = True) -> None:
    default = "the engine's device kind; for ONNX, cuda when available" if engine else "cuda when available"
    p.add_argument("--device", default=None, help=f"cpu or cuda[:N] (default: {default})")


def add_input_args(p: Any) -> None:
    p.add_argument("--input", action="append", default=[], metavar="NAME=FILE.npy",
                   help="an input from a .npy file (repeatable), or FILE.npz holding inputs by name; "
                        "inputs not given are random (seeded)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"seed of random inputs (default {DEFAULT_SEED})")
    p.add_argument("--int-range", action="append", default=[], metavar="[NAME:]LO,HI",
                   help="random integer inputs (all, or input NAME) uniform in [LO, HI] (repeatable; default: all "
                        "ones, valid as indices and masks)")


# --- opening a model -----------------------------------------------------------------------------------


@dataclass
class Opened:
    """A model ready to run: the engine, where it came from, and how long building it took (ONNX only)."""

    engine: Engine
    path: str
    from_onnx: bool
    build_seconds: float = 0.0


def load_engine(path: str, device: str | None, retune: bool = False) -> Engine:
    import kiln

    require_file(path, "engine file")
    dev = pick_device(device, peek_header(path))
    return kiln.load(path, dev, retune=retune)


def import_graph(path: str) -> Graph:
    import kiln

    require_file(path, "model file")
    return kiln.import_onnx(path)


def build_for_feeds(graph: Graph, feeds: Mapping[str, Any], device: str, source: str) -> Engine:
    """Build `graph` in memory with a fixed profile at the shapes of `feeds`."""
    from kiln.build.builder import build
    from kiln.build.config import BuilderConfig

    shapes = {v.name: tuple(np.shape(feeds[v.name])) for v in graph.inputs
              if v.is_tensor and v.name in feeds and not _is_static(v)}
    engine = build(graph, BuilderConfig(device=device, profiles=[shapes] if shapes else []))
    engine.metadata.setdefault("model", {})["source"] = os.path.basename(source)
    return engine


def open_model(path: str, device: str | None, given: Mapping[str, np.ndarray], shapes: Mapping[str, Shape],
               rand: RandomSpec, retune: bool = False) -> tuple[Opened, dict[str, Any], list[str]]:
    """An engine file is loaded; an ONNX model is imported and built in memory for the inputs' shapes.
    Returns the opened model, the feeds (given + random) and the names of the random ones."""
    require_file(path, "model file")
    if is_engine_file(path):
        engine = load_engine(path, device, retune)
        check_names(engine.graph, given, shapes)
        feeds, made = make_feeds(engine.graph.inputs, given, engine_shapes(engine, shapes), rand)
        return Opened(engine, path, False), feeds, made
    t0 = time.perf_counter()
    graph = import_graph(path)
    check_names(graph, given, shapes)
    feeds, made = make_feeds(graph.inputs, given, shapes, rand)
    engine = build_for_feeds(graph, feeds, pick_device(device), path)
    return Opened(engine, path, True, time.perf_counter() - t0), feeds, made


def _is_static(v: Value) -> bool:
    t = v.type
    return getattr(t, "is_static", False)


def engine_shapes(engine: Engine, override: Mapping[str, Shape]) -> dict[str, Shape]:
    """Shapes to run an engine at: --shapes, else the first profile's opt shapes."""
    out: dict[str, Shape] = {}
    if engine.plan.profiles:
        out.update({k: tuple(r.opt) for k, r in engine.plan.profiles[0].shapes.items()})
    out.update(override)
    return out


def check_names(graph: Graph, given: Mapping[str, Any], shapes: Mapping[str, Shape]) -> None:
    names = [v.name for v in graph.inputs]
    for what, keys in (("--input", given), ("--shapes", shapes)):
        for k in keys:
            if k not in names:
                raise InputError(f"{what} names input '{k}'; the model's inputs are: {', '.join(names) or 'none'}")


# --- inputs -----------------------------------------------------------------------------------------


@dataclass
class RandomSpec:
    """How to make the inputs not given: the seed, and integer ranges by input name ("" = every other input)."""

    seed: int = DEFAULT_SEED
    int_ranges: dict[str, tuple[int, int]] = field(default_factory=dict)

    def int_range(self, name: str) -> tuple[int, int] | None:
        return self.int_ranges.get(name, self.int_ranges.get(""))


def random_spec(args: Any) -> RandomSpec:
    """--seed and every --int-range [NAME:]LO,HI."""
    ranges: dict[str, tuple[int, int]] = {}
    for text in args.int_range or []:
        name, _, nums = text.rpartition(":")
        try:
            lo, hi = (int(x) for x in nums.split(","))
        except ValueError:
            raise KilnError(f"bad --int-range '{text}': expected [NAME:]LO,HI", hint="e.g. --int-range ids:0,29999")\
                from None
        if lo > hi:
            raise KilnError(f"bad --int-range '{text}': LO must be <= HI")
        ranges[name] = (lo, hi)
    return RandomSpec(args.seed, ranges)


def read_inputs(specs: Sequence[str]) -> dict[str, np.ndarray]:
    """`NAME=FILE.npy` or `FILE.npz` (arrays by input name) -> {name: array}."""
    out: dict[str, np.ndarray] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            if not spec.endswith(".npz"):
                raise KilnError(f"bad --input '{spec}': expected NAME=FILE.npy or FILE.npz")
            out.update(_load_npz(spec))
            continue
        if not name or not path:
            raise KilnError(f"bad --input '{spec}': expected NAME=FILE.npy")
        out[name] = _load_npy(path)
    return out


def _load_npy(path: str) -> np.ndarray:
    require_file(path, "input file")
    try:
        return np.asarray(np.load(path, allow_pickle=False))
    except (ValueError, OSError, EOFError) as e:
        raise KilnError(f"cannot read input file '{path}' as .npy: {e}") from None


def _load_npz(path: str) -> dict[str, np.ndarray]:
    require_file(path, "input file")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: np.asarray(z[k]) for k in z.files}
    except (ValueError, OSError, EOFError) as e:
        raise KilnError(f"cannot read input file '{path}' as .npz: {e}") from None


def make_feeds(values: Sequence[Value], given: Mapping[str, np.ndarray], shapes: Mapping[str, Shape],
               rand: RandomSpec, seed_offset: int = 0) -> tuple[dict[str, Any], list[str]]:
    """The given inputs, plus random ones (seeded) for the rest; returns (feeds, names of random inputs)."""
    rng = np.random.default_rng(rand.seed + seed_offset)
    feeds: dict[str, Any] = {}
    made = []
    for v in values:
        if v.name in given:
            feeds[v.name] = given[v.name]
            continue
        feeds[v.name] = random_input(v, _shape_of(v, shapes), rng, rand.int_range(v.name))
        made.append(v.name)
    return feeds, made


def _shape_of(v: Value, shapes: Mapping[str, Shape]) -> Shape:
    if v.name in shapes:
        return shapes[v.name]
    t = v.type
    shape = getattr(t, "shape", None)
    if shape is None or not all(isinstance(d, int) for d in shape):
        example = fmt([d if isinstance(d, int) else 1 for d in (shape or (1,))])
        raise ShapeSpecError(f"input '{v.name}' has dynamic shape {t}: give its shape",
                             hint=f"--shapes {v.name}:{example} or --input {v.name}=FILE.npy")
    return tuple(int(d) for d in shape)


def random_input(v: Value, shape: Shape, rng: np.random.Generator, int_range: tuple[int, int] | None) -> np.ndarray:
    """Normal floats; integers all ones (or uniform in int_range); booleans all True; strings empty."""
    from kiln.ir.dtype import DType
    from kiln.ir.graph import TensorType

    t = v.type
    if not isinstance(t, TensorType):
        raise KilnError(f"input '{v.name}' is a {t}: random values can't be made for it",
                        hint="inputs that are sequences or optionals can't be given on the command line yet")
    dt = t.dtype
    if dt.is_float and not dt.is_complex:
        return rng.standard_normal(shape, dtype=np.float32).astype(dt.numpy)
    if dt is DType.BOOL:
        return np.ones(shape, dtype=bool)
    if dt is DType.STRING:
        return np.full(shape, "", dtype=object)
    if dt.is_int:
        if int_range is None:
            return np.ones(shape, dtype=dt.numpy)
        return rng.integers(int_range[0], int_range[1], size=shape, endpoint=True).astype(dt.numpy)
    raise KilnError(f"input '{v.name}' is {dt}: random values of this type can't be made",
                    hint=f"give it with --input {v.name}=FILE.npy")


def input_note(made: Sequence[str], rand: RandomSpec) -> str | None:
    if not made:
        return None
    ranges = [f"{k or 'integers'} in [{lo}, {hi}]" for k, (lo, hi) in rand.int_ranges.items()]
    ints = ", ".join(ranges) + (", other integers = 1" if "" not in rand.int_ranges else "") if ranges \
        else "integers = 1"
    return f"random inputs (seed {rand.seed}; floats ~ N(0, 1), {ints}, booleans = True): {', '.join(made)}"


# --- describing arrays --------------------------------------------------------------------------------


def describe_array(a: Any, head: int = 5) -> str:
    """A one-line value summary: min / max / mean / std, NaN and Inf counts, the first values."""
    if not isinstance(a, np.ndarray):
        return type(a).__name__
    if a.dtype == object or a.dtype.kind in "USOc":
        return f"first {_head(a, head)}"
    if a.size == 0:
        return "empty"
    x = a.astype(np.float64) if a.dtype.kind in "biuf" or a.dtype.itemsize <= 2 else a
    finite = np.isfinite(x)
    parts = []
    if finite.any():
        f = x[finite]
        parts.append(f"min {_g(f.min())}  max {_g(f.max())}  mean {_g(f.mean())}  std {_g(f.std())}")
    nan, inf = int(np.isnan(x).sum()), int(np.isinf(x).sum())
    if nan or inf:
        parts.append(f"{nan} NaN, {inf} Inf")
    parts.append(f"first {_head(a, head)}")
    return "  ".join(parts)


def _g(x: Any) -> str:
    return f"{float(x):.6g}"


def _head(a: np.ndarray, n: int) -> str:
    flat = a.reshape(-1)[:n]
    floaty = a.dtype.kind == "f" or (a.dtype.kind == "V" and a.dtype.itemsize <= 2)  # ml_dtypes: bfloat16, fp8
    items = [_g(x) if floaty else repr(x) if isinstance(x, str) else str(x) for x in flat.tolist()]
    more = ", ..." if a.size > n else ""
    return "[" + ", ".join(items) + more + "]"


def dtype_name(a: Any) -> str:
    if isinstance(a, np.ndarray):
        return "string" if a.dtype == object else str(a.dtype)
    return type(a).__name__


def safe_filename(name: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return keep.strip(".") or "tensor"
