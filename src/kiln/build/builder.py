"""The builder: the one place that uses everything. Model -> import -> passes -> profiles -> tuning ->
memory plan -> Engine."""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Callable
from typing import Any

import onnx
import torch

from kiln.build.config import BuilderConfig, ConfigError
from kiln.build.memory import plan_memory
from kiln.frontend.onnx import import_model
from kiln.ir import symbolic as sym
from kiln.ir.dtype import DType
from kiln.ir.graph import Graph, Node, TensorType
from kiln.kernels import pdl, registry
from kiln.passes.layout import decide_layout
from kiln.passes.manager import PassContext
from kiln.passes.pipeline import optimize, optimize_late
from kiln.precision.accuracy import Target, gate
from kiln.precision.calibration import CalibrationCache, activation_scales, collect, load_calibration_data
from kiln.precision.flops import flop_mix
from kiln.precision.lower import lower_precision
from kiln.precision.pipeline import optimize_quantized
from kiln.precision.quantize import (
    MIN_INT8_CHANNELS,
    model_fingerprint,
    quantizable_inputs,
    quantize_graph,
)
from kiln.precision.ranges import decide, observe_peaks
from kiln.runtime import engine_file
from kiln.runtime.device import describe
from kiln.runtime.engine import Engine, concrete, engine_from_blob, place_constants, tf32_mode, versions
from kiln.runtime.plan import Choice, Plan, Profile, ShapeRange
from kiln.tune import refine
from kiln.tune.cache import TimingCache
from kiln.tune.tuner import TuneReport, TuneSettings, sample_inputs, tune
from kiln.utils.errors import KilnError

Progress = Callable[[str, int, int], None]
Model = str | os.PathLike[str] | bytes | onnx.ModelProto | Graph


LOW_PRECISION = {"fp16": DType.FLOAT16, "bf16": DType.BFLOAT16}


class MemoryLimitError(KilnError):
    """The planned activation memory exceeds the configured limit."""


def _fmt(shape: Any) -> str:
    return "x".join(str(d) for d in shape)


def resolve_profiles(graph: Graph, profiles: list[Profile]) -> list[Profile]:
    """Check the given profiles against the graph's inputs; a static model needs none."""
    tensor_inputs = [v for v in graph.inputs if isinstance(v.type, TensorType)]
    dynamic = [v for v in tensor_inputs if v.type.shape is None or not v.type.is_static]  # type: ignore[union-attr]
    if not profiles:
        if dynamic:
            v = dynamic[0]
            raise ConfigError(
                f"input '{v.name}' has dynamic shape {v.type}: give its shapes",
                hint=f"kiln build --shapes {v.name}:{_fmt(_example(v.type))} (or --min/--opt/--max-shapes); "
                     f"in Python, profiles=[{{'{v.name}': (min, opt, max)}}]",
            )
        return [Profile({})]
    names = {v.name: v for v in tensor_inputs}
    out = []
    for k, p in enumerate(profiles):
        for name in p.shapes:
            if name not in names:
                raise ConfigError(f"profile {k} names input '{name}'; the model's inputs are: {', '.join(names)}")
        shapes = dict(p.shapes)
        for v in dynamic:
            if v.name not in shapes:
                raise ConfigError(f"profile {k} gives no shapes for dynamic input '{v.name}' {v.type}")
        for name, r in shapes.items():
            _check_range(k, names[name], r)
        _check_symbols(k, [names[n] for n in shapes], shapes)
        out.append(Profile(shapes))
    return out


def _example(t: Any) -> list[int]:
    return [d if isinstance(d, int) else 1 for d in (t.shape or [1])]


def _check_range(k: int, v: Any, r: ShapeRange) -> None:
    shape = v.type.shape
    if shape is None:
        return
    if len(shape) != len(r.min):
        raise ConfigError(f"profile {k}: input '{v.name}' has rank {len(shape)} ({v.type}), the profile gives "
                          f"rank {len(r.min)} ({r})")
    for i, d in enumerate(shape):
        if isinstance(d, int) and not (r.min[i] == r.opt[i] == r.max[i] == d):
            raise ConfigError(f"profile {k}: input '{v.name}' dim {i} is fixed at {d}, the profile gives {r}")


def _check_symbols(k: int, values: list[Any], shapes: dict[str, ShapeRange]) -> None:
    for which in ("min", "opt", "max"):
        seen: dict[str, tuple[int, str]] = {}
        for v in values:
            if v.type.shape is None:
                continue
            for d, n in zip(v.type.shape, getattr(shapes[v.name], which)):
                if isinstance(d, str) and sym.symbols(d) == {d}:
                    if d in seen and seen[d][0] != n:
                        raise ConfigError(f"profile {k}: dim '{d}' is {seen[d][0]} in input '{seen[d][1]}' but "
                                          f"{n} in input '{v.name}' ({which} shapes)")
                    seen[d] = (n, v.name)


def build(model: Model, config: BuilderConfig | None = None, *, progress: Progress | None = None) -> Engine:
    """Build an engine for `config.device` from an ONNX model (path, bytes, ModelProto) or a kiln Graph."""
    config = config or BuilderConfig()
    t_start = time.perf_counter()
    say = progress or (lambda stage, i, n: None)
    say("import", 0, 1)
    graph = model if isinstance(model, Graph) else import_model(model)
    nodes_in = len(graph.nodes)
    profiles = resolve_profiles(graph, list(config.profiles))  # type: ignore[arg-type]
    say("passes", 0, 1)
    device = config.torch_device
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" and torch.cuda.is_available() \
        else None
    context = PassContext(static_dims=static_dims(graph, profiles), device=device.type, opt_level=config.opt_level,
                          capability=capability, runnable=lambda node: _runnable(node, device))
    records = optimize(graph, context)
    lowered = None
    if config.precision in LOW_PRECISION:
        say("precision", 0, 1)
        lowered = _lower(graph, config, profiles)
    elif config.precision in ("int8", "fp8"):
        say("calibrate", 0, 1)
        graph, lowered = _quantize(graph, config)
        if config.torch_device.type == "cuda":  # the layers left in float compute in FP16, as TensorRT's --int8 --fp16
            say("precision", 0, 1)
            lowered = {**_lower(graph, config, profiles, DType.FLOAT16), **lowered, "float_precision": "fp16"}
    if any(n.op == "DequantizeLinear" for n in graph.nodes):  # int8 builds, and models quantized before import
        quantized = optimize_quantized(graph, context)
        records = records + quantized
        done = {r.name: r.result.counts for r in quantized}
        folded = done["fold_quantized"]["folded"]
        if folded or lowered is not None:
            lowered = {**(lowered or {}), "int8_folded_layers": folded,
                       "int8_outputs": done["fuse_requantize"]["requantized"]}
    records = records + optimize_late(graph, context)
    return _finish(graph, config, nodes_in, records, say, t_start, source=_source(model), lowered=lowered)


def _runnable(node: Node, device: torch.device) -> bool:
    """`PassContext.runnable`: a kernel other than the reference takes `node` on `device`."""
    return any(t.name != "reference" for t in registry.candidates(node, device))


RANGE_SAMPLES = 64
"""At most this many calibration samples are run to find the values that leave FP16's range."""


def range_feeds(graph: Graph, calibration: Any, profiles: list[Profile], device: torch.device) -> \
        tuple[list[Any], str]:
    """The inputs an FP16 build runs to find values beyond FP16's range, and what they are: the calibration data
    when given (up to RANGE_SAMPLES samples), else one random sample at each profile's opt shapes."""
    if calibration is not None:
        feeds: list[Any] = load_calibration_data(calibration, graph, limit=RANGE_SAMPLES)
        return feeds, f"{len(feeds)} calibration sample{'s' if len(feeds) != 1 else ''}"
    feeds = [sample_inputs(graph, p, device) for p in profiles]
    return feeds, f"random inputs at {len(feeds)} profile opt shape{'s' if len(feeds) != 1 else ''}"


def _lower(graph: Graph, config: BuilderConfig, profiles: list[Profile], to: DType | None = None) -> dict[str, Any]:
    """FP16/BF16 (`to`, else the config's precision) everywhere it is safe: the values seen on the calibration data
    (when given, else on random inputs of every profile's opt shapes) decide which layers stay FP32 (with the
    user's pins)."""
    to = to or LOW_PRECISION[config.precision]
    device = config.torch_device
    feeds, seen_on = range_feeds(graph, config.calibration, profiles, device) if to is DType.FLOAT16 else ([], None)
    return lower_graph(graph, to, feeds, device, dict(config.layer_precision), seen_on)


def lower_graph(graph: Graph, to: DType, feeds: list[Any], device: torch.device, pins: dict[str, str],
                seen_on: str | None = None) -> dict[str, Any]:
    """The optimized `graph` lowered to `to` in place, the layers whose values on `feeds` leave FP16's range (and
    the `pins`) kept FP32; returns the lowering report (`seen_on` says what the feeds were)."""
    peaks: dict[Any, float] = {}
    highs: dict[Any, float] = {}
    if to is DType.FLOAT16:
        with tf32_mode(False, device):
            peaks = observe_peaks(graph, feeds, device, highs)
    decision = decide(graph, to, peaks, pins, highs)
    report = lower_precision(graph, to, decision.kept).to_json()
    if decision.masks:
        report["hiding_masks"] = decision.masks
    if seen_on is not None:
        report["ranges_seen_on"] = seen_on
    return report


def _quantize(graph: Graph, config: BuilderConfig) -> tuple[Graph, dict[str, Any]]:
    """INT8: activation scales from the calibration cache when it was made for this graph and calibrator, else
    calibrated on the data (and written to the cache); then Q/DQ placement."""
    fingerprint = model_fingerprint(graph)
    path = config.calibration_cache
    scales = None
    cached = False
    if path is not None and os.path.exists(path):
        cache = CalibrationCache.load(path)
        if cache.model == fingerprint and cache.method == config.calibrator:
            scales, cached = dict(cache.scales), True
    if scales is None:
        if config.calibration is None:
            raise ConfigError(f"the calibration cache '{path}' was made for another model or calibrator",
                              hint="give calibration data (--calib DIR) to calibrate again")
        samples = load_calibration_data(config.calibration, graph)
        hists = collect(graph, quantizable_inputs(graph), samples, config.torch_device)
        assert config.calibrator is not None  # resolved by BuilderConfig
        scales = activation_scales(hists, config.calibrator)
        if path is not None:
            CalibrationCache(method=config.calibrator, model=fingerprint, scales=scales).save(path)
    info: dict[str, Any] = {"precision": config.precision, "calibrator": config.calibrator,
                            "calibration_cache_used": cached}
    floor = MIN_INT8_CHANNELS if config.torch_device.type == "cuda" else 1  # why: see MIN_INT8_CHANNELS
    fp8 = config.precision == "fp8"
    if config.accuracy_check is None:
        return graph, {**info, **quantize_graph(graph, scales, min_channels=floor, fp8=fp8).to_json()}
    held = load_calibration_data(config.accuracy_check, graph)
    target = Target.parse(config.accuracy_target) if config.accuracy_target else None
    last: dict[str, Any] = {}

    def quantizer(g: Graph, skip: set[str]) -> list[str]:  # the gate quantizes copies, leaving `skip` float
        report = quantize_graph(g, scales, skip=skip, min_channels=floor, fp8=fp8)
        last.update(report.to_json())
        return report.layers

    quantized, acc = gate(graph, quantizer, held, config.torch_device, target)
    return quantized, {**info, **last, "accuracy": acc.to_json()}


def static_dims(graph: Graph, profiles: list[Profile]) -> dict[str, int]:
    """Symbols that have one size in every profile (min = max everywhere): passes may treat them as constants."""
    sizes: dict[str, set[int]] = {}
    varying: set[str] = set()
    for p in profiles:
        for v in graph.inputs:
            r = p.shapes.get(v.name)
            if r is None or not isinstance(v.type, TensorType) or v.type.shape is None:
                continue
            for d, lo, hi in zip(v.type.shape, r.min, r.max):
                if isinstance(d, str) and sym.symbols(d) == {d}:
                    if lo != hi:
                        varying.add(d)
                    sizes.setdefault(d, set()).add(lo)
    return {d: next(iter(s)) for d, s in sizes.items() if d not in varying and len(s) == 1}


def _source(model: Model) -> str:
    if isinstance(model, (str, os.PathLike)):
        return os.path.basename(os.fspath(model))
    return "<model>"


def _finish(graph: Graph, config: BuilderConfig, nodes_in: int, records: list[Any], say: Progress,
            t_start: float, source: str, lowered: dict[str, Any] | None = None) -> Engine:
    profiles = resolve_profiles(graph, list(config.profiles))  # type: ignore[arg-type]
    cache = TimingCache(config.timing_cache)
    device = config.torch_device
    settings = TuneSettings(device, config.opt_level, config.deterministic, config.time_budget_s,
                            has_cache=config.timing_cache is not None, refined=config.refine)
    # why: the engine holds its weights on the device; tuned there already, every candidate gets the very tensors it
    # will run with, so a weight a kernel prepares once (a transposed or folded copy) is not remade in its timing
    place_constants(graph, concrete(device))
    with tf32_mode(config.tf32, device), pdl.mode(config.pdl):
        choices, report = tune(graph, profiles, settings, cache, progress=say)
    memory = plan_memory(graph, profiles)
    in_place = set(memory.concats_in_place)
    for i, node in enumerate(graph.nodes):  # their inputs are written in place: the step copies nothing
        if node.op == "Concat" and node.outputs[0].name in in_place:
            for per in choices:
                per[i] = Choice("concat.in_place")
    if config.memory_limit_bytes is not None and memory.arena_bytes > config.memory_limit_bytes:
        raise MemoryLimitError(
            f"the activation arena needs {memory.arena_bytes:,} bytes, over the limit of "
            f"{config.memory_limit_bytes:,}", hint="raise the limit, or build with smaller max shapes")
    refined = None
    if config.refine and settings.opt_level >= 3 and device.type == "cuda" and not config.deterministic and \
            refine.open_groups(report.groups):
        say("refine", 0, 1)
        budget = refine.BUDGET_S if config.time_budget_s is None else \
            max(0.0, min(refine.BUDGET_S, config.time_budget_s - report.seconds))
        with tf32_mode(config.tf32, device), pdl.mode(config.pdl):
            choices, refined = _refine(graph, profiles, choices, memory, config, cache, report, budget)
    if config.timing_cache is not None:
        cache.save()
    stats: dict[str, Any] = {
        "nodes_imported": nodes_in,
        "nodes_optimized": len(graph.nodes),
        "passes": [{"name": r.name, "counts": r.result.counts, "nodes_after": r.nodes_after} for r in records],
        "tuning": report.to_json(),
    }
    if refined is not None:
        stats["tuning"]["refine"] = refined
    if lowered is not None:
        stats["precision"] = lowered
    stats["flops"] = flop_mix(graph, {k: tuple(r.opt) for k, r in profiles[0].shapes.items()} if profiles else {})
    meta: dict[str, Any] = {
        "versions": versions(),
        "device": describe(device).to_json(),
        "config": config.to_json(),
        "model": {"source": source, "name": graph.name, "opset": graph.opset, "metadata": dict(graph.metadata)},
        "format_version": engine_file.FORMAT_VERSION,
    }
    if not config.deterministic:
        stats["tuning"]["seconds"] = round(report.seconds, 3)
        stats["build_seconds"] = round(time.perf_counter() - t_start, 3)
        meta["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    say("done", 1, 1)
    return Engine(Plan(graph, profiles, choices, memory, stats), meta, device)


def _refine(graph: Graph, profiles: list[Profile], choices: list[list[Choice]], memory: Any, config: BuilderConfig,
            cache: TimingCache, report: TuneReport, budget_s: float) -> tuple[list[list[Choice]], list[Any]]:
    """The tuner's choices refined in the whole engine (`kiln.tune.refine`), profile by profile, on sample inputs
    at each profile's opt shapes (a profile whose opt shapes an earlier profile takes is left as tuned)."""
    device = config.torch_device
    meta = {"config": config.to_json()}
    out = [list(c) for c in choices]
    reports: list[Any] = []
    deadline = time.perf_counter() + budget_s
    for p, profile in enumerate(profiles):
        try:
            feeds = sample_inputs(graph, profile, device)
        except ValueError as e:
            reports.append({"skipped": str(e)})
            continue
        shapes = {k: tuple(x.shape) for k, x in feeds.items() if isinstance(x, torch.Tensor)}
        if Plan(graph, profiles, out, memory).select_profile(shapes) != p:
            reports.append({"skipped": "another profile takes its opt shapes"})
            continue

        def make(per: list[Choice], p: int = p) -> Engine:
            return Engine(Plan(graph, profiles, [per if q == p else c for q, c in enumerate(out)], memory), meta,
                          device)

        left = max(0.0, deadline - time.perf_counter())
        out[p], rep = refine.refine(report.groups[p], out[p], make, feeds, cache, left)
        reports.append(rep.to_json())
    return out, reports


def retune(blob: engine_file.EngineBlob, device: str | torch.device, where: str,
           timing_cache: str | None = None) -> Engine:
    """Re-tune an engine file's stored graph for `device` (an engine built elsewhere)."""
    old = engine_from_blob(blob, "cpu", where, check=False)
    decide_layout(old.plan.graph, torch.device(device).type)  # the memory formats are the target device's choice
    cfg = dict(old.metadata.get("config", {}))
    config = BuilderConfig(
        precision=cfg.get("precision", "fp32"), tf32=cfg.get("tf32", True), device=str(torch.device(device)),
        profiles=old.plan.profiles, timing_cache=timing_cache, opt_level=cfg.get("opt_level", 3),
        time_budget_s=cfg.get("time_budget_s"), memory_limit_bytes=cfg.get("memory_limit_bytes"),
        deterministic=cfg.get("deterministic", False), pdl=cfg.get("pdl"), refine=cfg.get("refine", True),
    )
    say: Progress = lambda stage, i, n: None  # noqa: E731
    return _finish(old.plan.graph, config, int(old.plan.stats.get("nodes_imported", len(old.plan.graph.nodes))),
                   [], say, time.perf_counter(), source=str(old.metadata.get("model", {}).get("source", where)))
