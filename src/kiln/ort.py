"""`kiln.ort`: onnxruntime's Python API on kiln engines. Code written for onnxruntime runs on kiln by changing
one import:

    import kiln.ort as onnxruntime      # instead of `import onnxruntime`
    sess = onnxruntime.InferenceSession("model.onnx", providers=["CUDAExecutionProvider"])
    [out] = sess.run(None, {"x": x})    # numpy in, a list of numpy arrays out, in output order

What is mirrored (onnxruntime 1.32 as the reference; tests compare against it field by field):
- `InferenceSession(path_or_bytes, sess_options=None, providers=None, provider_options=None, **kwargs)`
  (onnxruntime's argument order; a path, `os.PathLike`, the model's bytes, or an `onnx.ModelProto`).
- `get_inputs()` / `get_outputs()` / `get_overridable_initializers()`: `NodeArg`s with `.name`, `.shape` (ints,
  dim-param strings, None for unnamed dims; [] for scalars, non-tensors and tensors of unknown rank) and `.type`
  ("tensor(float)", "seq(tensor(int64))", "optional(...)", "map(string,tensor(float))"). Inputs backed by an
  initializer are not inputs (as in onnxruntime). Output shapes are the declared ones completed by ONNX shape
  inference, as onnxruntime reports them; dims that inference cannot name are None.
- `get_modelmeta()`: producer_name, graph_name, domain, description (the model's doc string),
  graph_description, version (2**63 - 1 when the model sets none, as onnxruntime) and custom_metadata_map.
- `run(output_names | None, input_feed, run_options=None)`: None or [] means every output.
- `get_providers()`, `get_provider_options()`, `set_providers()`, `get_session_options()`, `disable_fallback()`,
  `enable_fallback()`, `end_profiling()`; module-level `get_available_providers()`, `get_device()`,
  `set_default_logger_severity()`, `SessionOptions`, `RunOptions`, `GraphOptimizationLevel`, `ExecutionMode`.

Providers pick kiln's device: the first usable entry wins. "CUDAExecutionProvider" / "TensorrtExecutionProvider"
-> "cuda:<device_id>" when torch sees a GPU; "CPUExecutionProvider" -> "cpu". An unknown or unusable provider is a
warning (as in onnxruntime), never a crash; with none usable, or providers=None, kiln takes the GPU if there is one,
else the CPU. `get_providers()` answers with onnxruntime's names for what runs (CPU is always listed last).

Session options: accepted (onnxruntime's own `SessionOptions` too) and returned by `get_session_options()`, but
none changes kiln's behaviour. Thread counts in particular are not applied: torch's thread pool is global to the
process, so one session setting it would change every other session and the application's own torch code.

Errors are KilnError subclasses: a wrong feed (unknown or missing name, dtype, rank, a fixed dim, two inputs
disagreeing on a shared dim) is `kiln.InputError` naming the input, what the model expects and what came; misuse of
the session API (providers, arguments) is `SessionError`, also a `ValueError` as onnxruntime's are.

Engines are built lazily, for the shapes fed (fully static models are built when the session is created):
- Profile policy: a fixed dim is fixed; a dynamic dim (named or not) gets min 1 (0 if fed 0), opt = the fed size,
  max = the next power of two >= 2x the fed size. Each new profile also covers every shape fed before (its ranges
  grow an envelope over the session's history), so a session needs about log2(largest/first) builds per dynamic
  dim, not one per length. A shape no engine covers builds another; lookups try engines oldest first.
- If a bucketed build fails (e.g. `memory_limit_bytes` exceeded at the larger max), the session falls back to exact
  profiles (min = opt = max = the fed shape) from then on.
- Disk cache: `KILN_CACHE_DIR/ort/<model sha256>/<key>.kiln`, the key hashing the profile's min/max per input, the
  device fingerprint, kiln/torch/triton/CUDA versions and the builder options (not opt: an engine tuned at another
  opt size of the same range is reused). Entries are loaded with `kiln.load`; one that cannot be loaded is rebuilt
  and overwritten, with a warning. A timing cache is kept beside them (`KILN_CACHE_DIR/ort/timing-cache.json`;
  one that cannot be read is left out, with a warning). `kiln_cache=False` turns both off.

kiln extensions: keyword `kiln_options` (BuilderConfig fields: precision, tf32, opt_level, time_budget_s,
memory_limit_bytes, deterministic, timing_cache), `kiln_cache`, and `session.kiln_stats` (builds, disk loads,
rejected cache entries, the profiles held).

Not mirrored: IO binding, `run_with_ort_values`, `run_async`, OrtValue, overriding initializers by feeding them
(kiln bakes initializers in: feeding one is an InputError), free-dimension overrides, profiling output, custom op
libraries, onnxruntime's exception classes (catch KilnError / ValueError instead).
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
import re
import threading
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch

import kiln
from kiln.build.builder import build
from kiln.build.config import BuilderConfig
from kiln.ir.graph import Graph, TensorType, Value
from kiln.ir.interpreter import bind_input, name_feeds
from kiln.runtime.device import describe
from kiln.runtime.engine import Engine, ExecutionContext, versions
from kiln.runtime.plan import Profile, ShapeRange
from kiln.tune.cache import TimingCacheError
from kiln.utils.env import env
from kiln.utils.errors import InputError, KilnError
from kiln.utils.log import logger

NO_VERSION = 2**63 - 1
"""onnxruntime's model version when the model sets none."""
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
CPU_PROVIDER = "CPUExecutionProvider"
_ORT_KWARGS = {"disabled_optimizers", "read_config_from_model"}
_OPTION_FIELDS = {"precision", "tf32", "opt_level", "time_budget_s", "memory_limit_bytes", "deterministic",
                  "timing_cache"}
_INFERRED_DIM = re.compile(r"unk__\d+")

Dim = int | str | None
ModelInput = str | os.PathLike[str] | bytes | onnx.ModelProto


class SessionError(KilnError, ValueError):
    """The session API was misused: a bad model argument, providers or options."""


# --- onnxruntime's small types ------------------------------------------------------------------------


class GraphOptimizationLevel(enum.IntEnum):
    ORT_DISABLE_ALL = 0
    ORT_ENABLE_BASIC = 1
    ORT_ENABLE_EXTENDED = 2
    ORT_ENABLE_LAYOUT = 3
    ORT_ENABLE_ALL = 99


class ExecutionMode(enum.IntEnum):
    ORT_SEQUENTIAL = 0
    ORT_PARALLEL = 1


class SessionOptions:
    """onnxruntime's SessionOptions: every field is kept and reported back; none changes how kiln runs."""

    def __init__(self) -> None:
        self.intra_op_num_threads = 0
        self.inter_op_num_threads = 0
        self.graph_optimization_level = GraphOptimizationLevel.ORT_ENABLE_ALL
        self.execution_mode = ExecutionMode.ORT_SEQUENTIAL
        self.log_severity_level = 2
        self.log_verbosity_level = 0
        self.logid = ""
        self.enable_profiling = False
        self.profile_file_prefix = "onnxruntime_profile_"
        self.optimized_model_filepath = ""
        self.enable_cpu_mem_arena = True
        self.enable_mem_pattern = True
        self.enable_mem_reuse = True
        self.use_deterministic_compute = False
        self.use_per_session_threads = True
        self.config_entries: dict[str, str] = {}
        self.free_dimension_overrides: dict[str, int] = {}

    def add_session_config_entry(self, key: str, value: str) -> None:
        self.config_entries[key] = value

    def get_session_config_entry(self, key: str) -> str:
        return self.config_entries[key]

    def add_free_dimension_override_by_name(self, name: str, value: int) -> None:
        self.free_dimension_overrides[name] = value


class RunOptions:
    """onnxruntime's RunOptions: accepted by `run`, not used."""

    def __init__(self) -> None:
        self.log_severity_level = 2
        self.log_verbosity_level = 0
        self.logid = ""
        self.terminate = False
        self.only_execute_path_to_fetches = False
        self.config_entries: dict[str, str] = {}

    def add_run_config_entry(self, key: str, value: str) -> None:
        self.config_entries[key] = value


@dataclass(frozen=True)
class NodeArg:
    """An input or output as onnxruntime describes it."""

    name: str
    type: str
    shape: list[Dim]

    def __str__(self) -> str:
        return f"NodeArg(name={self.name!r}, type={self.type!r}, shape={self.shape!r})"


@dataclass(frozen=True)
class ModelMetadata:
    producer_name: str
    graph_name: str
    domain: str
    description: str
    graph_description: str
    version: int
    custom_metadata_map: dict[str, str]


@dataclass
class KilnStats:
    """What a session did: engines built, loaded from the disk cache, cache entries that had to be rebuilt."""

    builds: int = 0
    disk_loads: int = 0
    rejected_cache_entries: int = 0
    profiles: list[Profile] = field(default_factory=list)


def get_available_providers() -> list[str]:
    return ["CUDAExecutionProvider", CPU_PROVIDER] if torch.cuda.is_available() else [CPU_PROVIDER]


def get_device() -> str:
    return "GPU" if torch.cuda.is_available() else "CPU"


def set_default_logger_severity(level: int) -> None:
    """Accepted for compatibility; kiln logs through the `kiln` logger."""


# --- reading the model ------------------------------------------------------------------------------


@dataclass
class _Model:
    """What the session keeps of the model: where to build it from, a name for messages, and its digest."""

    source: str | bytes | onnx.ModelProto
    name: str
    digest: str = ""


def _source(model: ModelInput) -> _Model:
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        return _Model(path, os.path.basename(path))
    if isinstance(model, (bytes, bytearray, memoryview)):
        return _Model(bytes(model), "<bytes>")
    if isinstance(model, onnx.ModelProto):
        return _Model(model, "<ModelProto>")
    raise SessionError(f"cannot load a model from a {type(model).__name__}",
                       hint="pass a path, the model's bytes or an onnx.ModelProto")


def _read(model: _Model) -> onnx.ModelProto:
    """The model without its external data (for the reports), and its digest (for the disk cache)."""
    if isinstance(model.source, onnx.ModelProto):
        model.digest = _digest(model.source.SerializeToString(), [])
        return model.source
    if isinstance(model.source, bytes):
        model.digest = _digest(model.source, [])
        return onnx.load_from_string(model.source)
    with open(model.source, "rb") as f:
        data = f.read()
    proto = onnx.load_from_string(data)
    model.digest = _digest(data, _external_files(proto, os.path.dirname(os.path.abspath(model.source))))
    return proto


def _external_files(proto: onnx.ModelProto, base: str) -> list[str]:
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    files = {ExternalDataInfo(t).location for t in _get_all_tensors(proto) if uses_external_data(t)}
    return [os.path.join(base, f) for f in sorted(files)]


def _digest(data: bytes, external: list[str]) -> str:
    h = hashlib.sha256(data)
    for path in external:
        with open(path, "rb") as f:
            while block := f.read(1 << 24):
                h.update(block)
    return h.hexdigest()


def _graph_inputs(model: _Model) -> Graph:
    """The model's inputs as kiln types them (only the inputs: the weights are not kept). Importing here makes
    a missing, malformed or unsupported model fail when the session is created, as onnxruntime's would."""
    graph = kiln.import_onnx(model.source)
    shell = Graph(graph.name)
    shell.inputs = [Value(v.name, v.type) for v in graph.inputs]
    return shell


# --- what onnxruntime reports ----------------------------------------------------------------------------


def _elem(code: int) -> str:
    return onnx.TensorProto.DataType.Name(code).lower()


def type_string(tp: onnx.TypeProto) -> str:
    """onnxruntime's name for a type: tensor(float), seq(tensor(int64)), map(string,tensor(float)), ..."""
    which = tp.WhichOneof("value")
    if which == "tensor_type":
        return f"tensor({_elem(tp.tensor_type.elem_type)})"
    if which == "sparse_tensor_type":
        return f"sparse_tensor({_elem(tp.sparse_tensor_type.elem_type)})"
    if which == "sequence_type":
        return f"seq({type_string(tp.sequence_type.elem_type)})"
    if which == "optional_type":
        return f"optional({type_string(tp.optional_type.elem_type)})"
    if which == "map_type":
        return f"map({_elem(tp.map_type.key_type)},{type_string(tp.map_type.value_type)})"
    return "undefined"


def shape_list(tp: onnx.TypeProto, unnamed: frozenset[str] = frozenset()) -> list[Dim]:
    """onnxruntime's shape of a type: ints, dim params, None for unknown dims (and for params in `unnamed`)."""
    which = tp.WhichOneof("value")
    if which == "optional_type":
        return shape_list(tp.optional_type.elem_type, unnamed)
    if which not in ("tensor_type", "sparse_tensor_type"):
        return []
    tt = getattr(tp, which)
    if not tt.HasField("shape"):
        return []
    return [_dim(d, unnamed) for d in tt.shape.dim]


def _dim(d: onnx.TensorShapeProto.Dimension, unnamed: frozenset[str]) -> Dim:
    if d.HasField("dim_value"):
        return int(d.dim_value)
    if d.HasField("dim_param") and d.dim_param not in unnamed:
        return str(d.dim_param)
    return None


def _node_args(values: Sequence[onnx.ValueInfoProto], unnamed: frozenset[str] = frozenset()) -> list[NodeArg]:
    return [NodeArg(v.name, type_string(v.type), shape_list(v.type, unnamed)) for v in values]


def _params(values: Sequence[onnx.ValueInfoProto]) -> set[str]:
    out = set()
    for v in values:
        if v.type.WhichOneof("value") == "tensor_type":
            out |= {d.dim_param for d in v.type.tensor_type.shape.dim if d.HasField("dim_param")}
    return out


def _outputs(proto: onnx.ModelProto) -> list[NodeArg]:
    """Declared outputs completed by shape inference; the placeholder names inference invents become None."""
    try:
        inferred = onnx.shape_inference.infer_shapes(proto).graph.output
    except Exception:  # inference is best effort: onnxruntime also falls back to what is declared
        return _node_args(proto.graph.output)
    g = proto.graph
    declared = _params([*g.input, *g.output, *g.value_info])
    invented = frozenset(p for p in _params(inferred)
                         if _INFERRED_DIM.fullmatch(p) and p not in declared)
    return _node_args(inferred, invented)


def _metadata(proto: onnx.ModelProto) -> ModelMetadata:
    return ModelMetadata(
        producer_name=proto.producer_name, graph_name=proto.graph.name, domain=proto.domain,
        description=proto.doc_string, graph_description=proto.graph.doc_string,
        version=proto.model_version if proto.HasField("model_version") else NO_VERSION,
        custom_metadata_map={p.key: p.value for p in proto.metadata_props},
    )


def _reports(proto: onnx.ModelProto) -> tuple[list[NodeArg], list[NodeArg], list[NodeArg], ModelMetadata]:
    inits = {t.name for t in proto.graph.initializer} | {s.values.name for s in proto.graph.sparse_initializer}
    inputs = [v for v in proto.graph.input if v.name not in inits]
    overridable = [v for v in proto.graph.input if v.name in inits] if proto.ir_version >= 4 else []
    return _node_args(inputs), _outputs(proto), _node_args(overridable), _metadata(proto)


# --- providers -> device -------------------------------------------------------------------------------


def _provider_list(providers: Sequence[Any] | None,
                   provider_options: Sequence[Mapping[str, Any]] | None) -> list[tuple[str, dict[str, str]]]:
    if providers is None:
        return []
    if isinstance(providers, str):
        raise SessionError("providers must be a list of provider names, got a string",
                           hint=f"providers=[{providers!r}]")
    if provider_options is not None and len(provider_options) != len(providers):
        raise SessionError(f"'providers' and 'provider_options' should be the same length if both are given "
                           f"({len(providers)} vs {len(provider_options)})")
    out = []
    for i, p in enumerate(providers):
        name, opts = (p, {}) if isinstance(p, str) else _provider_pair(p)
        if provider_options is not None:
            opts = {**opts, **provider_options[i]}
        out.append((name, {str(k): str(v) for k, v in opts.items()}))
    return out


def _provider_pair(p: Any) -> tuple[str, Mapping[str, Any]]:
    if isinstance(p, (tuple, list)) and len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], Mapping):
        return p[0], p[1]
    raise SessionError(f"a provider must be a name or a (name, options dict) pair, got {p!r}")


def _gpu_device(opts: Mapping[str, str]) -> str | None:
    if not torch.cuda.is_available():
        return None
    try:
        index = int(opts.get("device_id", "0"))
    except ValueError:
        raise SessionError(f"provider option device_id must be an integer, got {opts['device_id']!r}") from None
    return f"cuda:{index}" if 0 <= index < torch.cuda.device_count() else None


def _provider_device(name: str, opts: Mapping[str, str]) -> str | None:
    if name in GPU_PROVIDERS:
        return _gpu_device(opts)
    return "cpu" if name == CPU_PROVIDER else None


def choose_device(providers: list[tuple[str, dict[str, str]]]) -> tuple[str, list[str], dict[str, dict[str, str]]]:
    """(kiln device, onnxruntime's provider names for it, their options) for a providers list: the first usable
    provider picks the device; unusable ones are warned about; CPU is always listed, last."""
    device: str | None = None
    chosen: dict[str, dict[str, str]] = {}
    for name, opts in providers:
        here = _provider_device(name, opts)
        if here is None:
            warnings.warn(f"Specified provider '{name}' is not in available provider names. Available providers: "
                          f"'{', '.join(get_available_providers())}'", UserWarning, stacklevel=4)
            continue
        device = device or here
        if here in (device, "cpu"):  # onnxruntime reports no options for its CPU provider
            chosen[name] = {**opts, "device_id": str(torch.device(here).index)} if here != "cpu" else {}
    if device is None:  # onnxruntime's default is every provider there is; with providers given, the CPU
        device = "cuda:0" if torch.cuda.is_available() and not providers else "cpu"
        if device != "cpu":
            chosen["CUDAExecutionProvider"] = {"device_id": "0"}
    chosen.pop(CPU_PROVIDER, None)
    return device, [*chosen, CPU_PROVIDER], {**chosen, CPU_PROVIDER: {}}


# --- profiles ---------------------------------------------------------------------------------------------


def bucket_max(d: int) -> int:
    """The next power of two >= 2 * d (2 for d <= 1)."""
    return 1 << max(2 * d - 1, 1).bit_length()


def static_shapes(inputs: Sequence[Value]) -> dict[str, tuple[int, ...]] | None:
    """Every input's shape when all are static tensors, else None."""
    out = {}
    for v in inputs:
        t = v.type
        if not isinstance(t, TensorType) or t.shape is None or not t.is_static:
            return None
        out[v.name] = tuple(int(d) for d in t.shape)
    return out


def exact_profile(shapes: Mapping[str, tuple[int, ...]]) -> Profile:
    return Profile({n: ShapeRange.fixed(s) for n, s in shapes.items()})


def grow_profile(inputs: Sequence[Value], shapes: Mapping[str, tuple[int, ...]],
                 envelope: dict[tuple[str, int], tuple[int, int]]) -> Profile:
    """A profile for `shapes`: fixed dims fixed, dynamic ones bucketed and widened to the session's envelope
    (every range seen so far), which is updated."""
    ranges = {}
    for v in inputs:
        if v.name not in shapes:
            continue
        declared = v.type.shape if isinstance(v.type, TensorType) else None
        lo, hi = [], []
        for i, d in enumerate(shapes[v.name]):
            if declared is not None and isinstance(declared[i], int):
                lo.append(d)
                hi.append(d)
                continue
            prev = envelope.get((v.name, i), (1, 0))
            envelope[(v.name, i)] = (min(prev[0], 1 if d > 0 else 0), max(prev[1], bucket_max(d)))
            lo.append(envelope[(v.name, i)][0])
            hi.append(envelope[(v.name, i)][1])
        ranges[v.name] = ShapeRange(tuple(lo), tuple(shapes[v.name]), tuple(hi))
    return Profile(ranges)


def _ranges_json(p: Profile) -> dict[str, list[list[int]]]:
    return {n: [list(r.min), list(r.max)] for n, r in sorted(p.shapes.items())}


def _same_ranges(a: Profile, b: Profile) -> bool:
    return _ranges_json(a) == _ranges_json(b)


# --- the disk cache -----------------------------------------------------------------------------------------


class EngineCache:
    """Engines on disk under `root/<model digest>/<key>.kiln`; a file that will not load is rebuilt."""

    def __init__(self, root: str, digest: str, device: str, options: Mapping[str, Any]) -> None:
        self.dir = os.path.join(root, digest[:32])
        dev = describe(device).to_json()
        self.base = {"model": digest, "device": {k: dev[k] for k in ("kind", "name", "arch", "sm_count")},
                     "versions": versions(), "options": {k: v for k, v in options.items() if k != "timing_cache"}}

    def path(self, profile: Profile) -> str:
        blob = json.dumps({**self.base, "ranges": _ranges_json(profile)}, sort_keys=True, default=str)
        return os.path.join(self.dir, hashlib.sha256(blob.encode()).hexdigest()[:32] + ".kiln")

    def load(self, profile: Profile, device: str, stats: KilnStats) -> Engine | None:
        path = self.path(profile)
        if not os.path.exists(path):
            return None
        try:
            engine = kiln.load(path, device)
            if len(engine.plan.profiles) != 1 or not _same_ranges(engine.plan.profiles[0], profile):
                raise KilnError("the engine's profile is not the one its name promises")
        except Exception as e:  # the cache is only an optimization: whatever is wrong with an entry, rebuild it
            stats.rejected_cache_entries += 1
            warnings.warn(f"kiln.ort: rebuilding the cached engine '{path}', which cannot be used: "
                          f"{type(e).__name__}: {e}", RuntimeWarning, stacklevel=5)
            return None
        stats.disk_loads += 1
        return engine

    def save(self, profile: Profile, engine: Engine) -> None:
        path = self.path(profile)
        try:
            os.makedirs(self.dir, exist_ok=True)
            engine.save(path)
        except OSError as e:
            warnings.warn(f"kiln.ort: could not cache the engine in '{path}': {e}", RuntimeWarning, stacklevel=5)


# --- the session --------------------------------------------------------------------------------------------


@dataclass
class _Entry:
    """One engine and its execution contexts, one per thread (contexts are not thread-safe; engines are)."""

    profile: Profile
    engine: Engine
    local: threading.local = field(default_factory=threading.local)

    def context(self) -> ExecutionContext:
        ctx = getattr(self.local, "ctx", None)
        if ctx is None:
            ctx = self.local.ctx = self.engine.create_context()
        return ctx


def _builder_options(options: Mapping[str, Any] | None, cache: bool) -> dict[str, Any]:
    opts = dict(options or {})
    bad = sorted(set(opts) - _OPTION_FIELDS)
    if bad:
        raise SessionError(f"kiln_options: unknown or session-managed field(s) {', '.join(bad)}",
                           hint=f"allowed: {', '.join(sorted(_OPTION_FIELDS))}; the device comes from `providers`, "
                                f"profiles from the shapes fed")
    if cache and "timing_cache" not in opts:
        opts["timing_cache"] = os.path.join(env().cache_dir, "ort", "timing-cache.json")
    BuilderConfig(**opts)  # validate now, not at the first run
    return opts


class InferenceSession:
    """onnxruntime.InferenceSession on kiln: engines built for the shapes fed, cached in memory and on disk."""

    def __init__(self, path_or_bytes: ModelInput, sess_options: Any = None, providers: Sequence[Any] | None = None,
                 provider_options: Sequence[Mapping[str, Any]] | None = None, *,
                 kiln_options: Mapping[str, Any] | None = None, kiln_cache: bool = True, **kwargs: Any) -> None:
        unknown = sorted(set(kwargs) - _ORT_KWARGS)
        if unknown:
            warnings.warn(f"kiln.ort.InferenceSession ignores argument(s) {', '.join(unknown)}", UserWarning,
                          stacklevel=2)
        self._sess_options = sess_options if sess_options is not None else SessionOptions()
        self._model = _source(path_or_bytes)
        self._graph = _graph_inputs(self._model)
        self._tensor_inputs = [v for v in self._graph.inputs if isinstance(v.type, TensorType)]
        self._inputs, self._outputs, self._overridable, self._meta = _reports(_read(self._model))
        self._initializer_inputs = {o.name for o in self._overridable}
        self._options = _builder_options(kiln_options, kiln_cache)
        self._use_disk = kiln_cache
        self._lock = threading.Lock()
        self.kiln_stats = KilnStats()
        self.set_providers(providers, provider_options)

    # --- onnxruntime's API -------------------------------------------------------------------------------

    def get_inputs(self) -> list[NodeArg]:
        return list(self._inputs)

    def get_outputs(self) -> list[NodeArg]:
        return list(self._outputs)

    def get_overridable_initializers(self) -> list[NodeArg]:
        return list(self._overridable)

    def get_modelmeta(self) -> ModelMetadata:
        return self._meta

    def get_providers(self) -> list[str]:
        return list(self._providers)

    def get_provider_options(self) -> dict[str, dict[str, str]]:
        return {k: dict(v) for k, v in self._provider_options.items()}

    def get_session_options(self) -> Any:
        return self._sess_options

    def set_providers(self, providers: Sequence[Any] | None = None,
                      provider_options: Sequence[Mapping[str, Any]] | None = None) -> None:
        """Choose the device again; engines built for another device are dropped."""
        device, self._providers, self._provider_options = choose_device(_provider_list(providers, provider_options))
        with self._lock:
            if getattr(self, "device", None) == device:
                return
            self.device = device
            self._entries: list[_Entry] = []
            self._envelope: dict[tuple[str, int], tuple[int, int]] = {}
            self._exact = False
            root = os.path.join(env().cache_dir, "ort")
            self._disk = EngineCache(root, self._model.digest, device, self._options) if self._use_disk else None
        static = static_shapes(self._graph.inputs)
        if static is not None:  # nothing to wait for: build now, as onnxruntime loads the model now
            self._engine_for(static)

    def disable_fallback(self) -> None:
        """Accepted for compatibility (kiln has no provider fallback)."""

    def enable_fallback(self) -> None:
        """Accepted for compatibility (kiln has no provider fallback)."""

    def end_profiling(self) -> str:
        return ""

    def run(self, output_names: Sequence[str] | None, input_feed: Mapping[str, Any],
            run_options: Any = None) -> list[Any]:
        """Run once: a list of numpy arrays (lists for sequence outputs), in the order of `output_names` (all
        outputs for None or [])."""
        names = self._output_names(output_names)
        feeds = self._feeds(input_feed)
        shapes = {v.name: tuple(feeds[v.name].shape) for v in self._tensor_inputs if v.name in feeds}
        entry = self._find(shapes) or self._prepare_build(feeds, shapes)
        out = entry.context().run(feeds, names)
        return [np.asarray(out[n]) if isinstance(out[n], np.generic) else out[n] for n in names]

    # --- internals ---------------------------------------------------------------------------------------

    def _output_names(self, output_names: Sequence[str] | None) -> list[str]:
        known = [o.name for o in self._outputs]
        if not output_names:
            return known
        unknown = [n for n in output_names if n not in known]
        if unknown:  # checked here too, so that a typo does not cost a build first
            raise InputError(f"unknown output '{unknown[0]}'; the model's outputs are: {', '.join(known)}")
        return list(output_names)

    def _feeds(self, input_feed: Mapping[str, Any]) -> dict[str, Any]:
        if not isinstance(input_feed, Mapping):
            raise InputError(f"input_feed must be a dict of input name -> array, got {type(input_feed).__name__}")
        overridden = [k for k in input_feed if k in self._initializer_inputs]
        if overridden:
            raise InputError(f"'{overridden[0]}' is an initializer of the model; kiln builds initializers into the "
                             f"engine and cannot override them", hint="remove it from the feeds, or make it a "
                                                                     "graph input without an initializer")
        tensors = {v.name for v in self._tensor_inputs}
        return {k: np.asarray(x) if k in tensors and not isinstance(x, np.ndarray) else x
                for k, x in input_feed.items()}

    def _find(self, shapes: Mapping[str, tuple[int, ...]]) -> _Entry | None:
        for entry in self._entries:
            if entry.profile.mismatch(shapes) is None:
                return entry
        return None

    def _prepare_build(self, feeds: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> _Entry:
        """No engine covers these shapes: check the feeds as an engine would (clear errors, not a failed build),
        then build one."""
        named = name_feeds(self._graph, feeds)
        bindings: dict[str, int] = {}
        for v in self._graph.inputs:
            bind_input(v, named[v.name], bindings)
        return self._engine_for(shapes)

    def _engine_for(self, shapes: Mapping[str, tuple[int, ...]]) -> _Entry:
        with self._lock:
            entry = self._find(shapes)
            if entry is not None:  # another thread built it meanwhile
                return entry
            engine, profile = self._build_or_load(shapes)
            entry = _Entry(profile, engine)
            self._entries.append(entry)
            self.kiln_stats.profiles.append(profile)
            return entry

    def _build_or_load(self, shapes: Mapping[str, tuple[int, ...]]) -> tuple[Engine, Profile]:
        if not self._exact:
            envelope = dict(self._envelope)
            profile = grow_profile(self._tensor_inputs, shapes, envelope)
            try:
                engine = self._load_or_build(profile)
                self._envelope = envelope
                return engine, profile
            except KilnError as e:
                logger.warning("kiln.ort: building for %s failed (%s); trying the exact shapes",
                               _ranges_json(profile), e.message)
                profile = exact_profile(shapes)
                engine = self._load_or_build(profile)
                self._exact = True  # the bucket, not the model, was the problem: no more buckets
                return engine, profile
        profile = exact_profile(shapes)
        return self._load_or_build(profile), profile

    def _load_or_build(self, profile: Profile) -> Engine:
        engine = self._disk.load(profile, self.device, self.kiln_stats) if self._disk is not None else None
        if engine is not None:
            return engine
        logger.info("kiln.ort: building %s for %s on %s", self._model.name, _ranges_json(profile), self.device)
        try:
            engine = build(self._model.source, self._config(profile))
        except TimingCacheError as e:
            warnings.warn(f"kiln.ort: building without the timing cache, which cannot be read: {e.message}",
                          RuntimeWarning, stacklevel=2)
            self._options["timing_cache"] = None
            engine = build(self._model.source, self._config(profile))
        self.kiln_stats.builds += 1
        if self._disk is not None:
            self._disk.save(profile, engine)
        return engine

    def _config(self, profile: Profile) -> BuilderConfig:
        opts = dict(self._options)
        cache = opts.get("timing_cache")
        if cache is not None:
            try:
                os.makedirs(os.path.dirname(os.path.abspath(cache)), exist_ok=True)
            except OSError as e:
                warnings.warn(f"kiln.ort: building without a timing cache ({e})", RuntimeWarning, stacklevel=2)
                opts["timing_cache"] = None
        return BuilderConfig(device=self.device, profiles=[profile], **opts)
