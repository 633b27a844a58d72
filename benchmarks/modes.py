"""The compared modes: how each one is set up, and the one step that is timed.

Every mode turns into a `step(k)` that runs one inference on pre-made input set k and returns the outputs:

- eager: `model(*inputs[k])`.
- cudagraph: eager captured once in a torch.cuda.CUDAGraph over static input buffers (after a warm-up on a side
  stream); a step copies inputs[k] into the static buffers, then replays the graph.
- compile / reduce-overhead / max-autotune: `torch.compile(model, mode=...)`, called on inputs[k]. The last two run
  CUDA graphs (CUDA-graph trees), which copy inputs[k] into their static buffers inside the call, so every
  graph-based mode pays the same input copy inside the timed region.
- kiln: the fp32 ONNX export built with `kiln.build` at the requested precision; a step is `ctx.run(feeds[k])`, the
  feeds already on the device in the ONNX inputs' dtype (casts are done beforehand, not timed).
- kiln-int8 (opt-in): the same export built with precision="int8", calibrated on the case's input sets (entropy);
  on a GPU its float layers compute in FP16. Compared with the kiln row for INT8's speed-up, and with eager for
  its accuracy (its own cosine bar, `checks.MIN_COSINE_INT8`).
- kiln-fp8 (opt-in): the same with precision="fp8" (float8 E4M3 GEMMs; sm_89+ GPUs), same bar as kiln-int8.
- kiln-nopdl (opt-in): the kiln build without programmatic dependent launch (`BuilderConfig.pdl=False`), from
  the kiln mode's timing cache when that mode ran first (the same tactics: what differs is the launch alone).
  The kiln mode itself follows KILN_PDL (on unless it is 0; PDL needs sm_90+).
- kiln-norefine (opt-in): the kiln build with the tuner's choices as timed alone (`BuilderConfig.refine=False`: no
  whole-engine search, `kiln.tune.refine`), from the kiln mode's timing cache when that mode ran first (the same
  timings, without the search's decisions).
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.models import ModelSpec
from benchmarks.timing import Step, timed

TORCH_MODES = ("eager", "cudagraph", "compile", "reduce-overhead", "max-autotune")
KILN_MODES = ("kiln", "kiln-nopdl", "kiln-norefine", "kiln-int8", "kiln-fp8")
QUANTIZED_MODES = {"kiln-int8": "int8", "kiln-fp8": "fp8"}
ALL_MODES = (*TORCH_MODES, *KILN_MODES)
DEFAULT_MODES = tuple(m for m in ALL_MODES if m not in ("max-autotune", "kiln-nopdl", "kiln-norefine",
                                                       *QUANTIZED_MODES))
GRAPH_MODES = frozenset({"cudagraph", "reduce-overhead", "max-autotune"})
COMPILE_MODES = {"compile": None, "reduce-overhead": "reduce-overhead", "max-autotune": "max-autotune"}
GRAPH_WARMUP = 3  # eager runs on a side stream before capture (cuDNN/cuBLAS handles and autotuning happen there)


class Skip(Exception):
    """The mode does not apply here (e.g. CUDA graphs on the CPU)."""


@dataclass
class KilnOptions:
    opt_level: int = 3
    tf32: bool = True
    cache_dir: Path = Path("benchmarks/work")
    time_budget_s: float | None = None
    save_dir: Path | None = None
    """Where to save each built engine (for `kiln inspect --profile`); None: not saved."""
    calibrator: str | None = None
    """kiln-int8/kiln-fp8: the calibrator (None: kiln's default for the precision)."""
    accuracy_target: str | None = None
    """kiln-int8/kiln-fp8: an accuracy gate target ("cosine>=0.99"); the last input set is held out to check it."""


@dataclass
class Case:
    """One (model, batch, precision) on one device: what every mode is set up from."""

    spec: ModelSpec
    model: nn.Module  # on the device, in the benchmarked precision
    sets: list[list[torch.Tensor]]  # PyTorch's input sets, on the device
    device: torch.device
    batch: int
    precision: str
    onnx_path: Path | None = None
    kiln_sets: list[list[torch.Tensor]] = field(default_factory=list)  # the same values in the ONNX inputs' dtypes
    kiln: KilnOptions = field(default_factory=KilnOptions)


@dataclass
class Prepared:
    step: Step
    setup_s: dict[str, float]
    release: Callable[[], None] = lambda: None


def prepare(mode: str, case: Case) -> Prepared:
    """Set `mode` up for `case` (compiling, capturing or building as needed). Raises Skip where it can't apply."""
    if mode in GRAPH_MODES and case.device.type != "cuda":
        raise Skip("CUDA graphs need a CUDA device")
    if mode == "eager":
        return Prepared(lambda k: case.model(*case.sets[k]), {})
    if mode == "cudagraph":
        return _cudagraph(case)
    if mode in COMPILE_MODES:
        return _compiled(case, COMPILE_MODES[mode])
    if mode in KILN_MODES:
        return _kiln(case, QUANTIZED_MODES.get(mode), pdl=False if mode == "kiln-nopdl" else None,
                     refine=mode != "kiln-norefine")
    raise ValueError(f"unknown mode '{mode}'")


def grad_mode(mode: str) -> Any:
    """PyTorch modes run under inference_mode; kiln under no_grad (its engine and arena live outside it)."""
    return torch.no_grad() if mode in KILN_MODES else torch.inference_mode()


def _cudagraph(case: Case) -> Prepared:
    static = [x.clone() for x in case.sets[0]]
    graph = torch.cuda.CUDAGraph()

    def capture() -> Any:
        side = torch.cuda.Stream(case.device)
        side.wait_stream(torch.cuda.current_stream(case.device))
        with torch.cuda.stream(side):
            for _ in range(GRAPH_WARMUP):
                case.model(*static)
        torch.cuda.current_stream(case.device).wait_stream(side)
        with torch.cuda.graph(graph):
            return case.model(*static)

    outputs, seconds = timed(capture, case.device)

    def step(k: int) -> Any:
        for dst, src in zip(static, case.sets[k]):
            dst.copy_(src, non_blocking=True)
        graph.replay()
        return outputs

    return Prepared(step, {"capture_s": seconds}, graph.reset)


def reset_compiled() -> None:
    """Forget everything torch.compile made: nothing compiled for an earlier model, batch or mode is reused, and
    the CUDA-graph trees' memory pool is released."""
    torch._dynamo.reset()
    try:
        from torch._inductor import cudagraph_trees

        cudagraph_trees.reset_cudagraph_trees()
    except (ImportError, AttributeError):  # private API; newer torch resets them in dynamo.reset()
        pass


def _compiled(case: Case, mode: str | None) -> Prepared:
    reset_compiled()
    fn = torch.compile(case.model, mode=mode)
    graphs = mode is not None  # reduce-overhead and max-autotune run CUDA-graph trees

    def step(k: int) -> Any:
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        return fn(*case.sets[k])

    _, seconds = timed(lambda: step(0), case.device)
    return Prepared(step, {"compile_s": seconds}, reset_compiled)


def kiln_cache_path(case: Case, precision: str | None = None) -> Path:
    name = f"{case.spec.name}-bs{case.batch}-{precision or case.precision}-O{case.kiln.opt_level}.tcache"
    return case.kiln.cache_dir / name


def _kiln(case: Case, quantized: str | None = None, pdl: bool | None = None, refine: bool = True) -> Prepared:
    import kiln
    from kiln.cli.build import refine_line

    if case.onnx_path is None:
        raise RuntimeError("no ONNX export to build from")
    names = [i.name for i in case.spec.inputs]
    precision = quantized or case.precision
    cache = kiln_cache_path(case, precision)
    sets = [dict(zip(names, s)) for s in case.kiln_sets]
    calibration = sets if quantized else None
    held = None
    if quantized and case.kiln.accuracy_target:
        if len(sets) < 2:
            raise RuntimeError("an accuracy target needs at least 2 input sets (--rotate): one is held out")
        calibration, held = sets[:-1], sets[-1:]
    cache.parent.mkdir(parents=True, exist_ok=True)
    # kiln-nopdl / kiln-norefine after kiln: its timings, so what differs is the launch or the search alone
    reused = (pdl is not None or not refine) and cache.exists()
    if not reused:
        cache.unlink(missing_ok=True)  # the first build is cold: no timings to reuse
    profile = {n: tuple(x.shape) for n, x in zip(names, case.kiln_sets[0])}

    def build() -> Any:
        config = kiln.BuilderConfig(device=str(case.device), precision=precision, opt_level=case.kiln.opt_level,
                                    tf32=case.kiln.tf32, timing_cache=str(cache), profiles=[profile],
                                    time_budget_s=case.kiln.time_budget_s, calibration=calibration,
                                    calibrator=case.kiln.calibrator if quantized else None, accuracy_check=held,
                                    accuracy_target=case.kiln.accuracy_target if held else None, pdl=pdl,
                                    refine=refine)
        return kiln.build(str(case.onnx_path), config)

    engine, cold = timed(build, case.device)
    spent = engine.plan.stats.get("tuning", {}).get("tactic_seconds", {})
    top = sorted(spent.items(), key=lambda kv: -sum(kv[1]))[:6]
    print(f"[{case.spec.name} bs{case.batch} {precision}] kiln cold build, seconds by tactic [building, timing]: "
          + ", ".join(f"{k} {a:.1f}+{b:.1f}" for k, (a, b) in top), file=sys.stderr, flush=True)
    gate = engine.plan.stats.get("precision", {}).get("accuracy")
    if gate:  # what the accuracy gate kept float to meet its target
        print(f"[{case.spec.name} bs{case.batch} {precision}] accuracy gate {gate.get('target')}: "
              f"{'met' if gate.get('met') else 'NOT met'} ({gate.get('metrics')}); {len(gate.get('kept_float', []))} "
              f"layers kept float", file=sys.stderr, flush=True)
    rejected = engine.plan.stats.get("tuning", {}).get("rejected", [])
    if rejected:  # a candidate that failed or mismatched: a kernel bug or a refusal, worth seeing beside the time
        print(f"[{case.spec.name} bs{case.batch} {precision}] {len(rejected)} candidates rejected, first: "
              + " | ".join(r[:300] for r in rejected[:6]), file=sys.stderr, flush=True)
    for r in engine.plan.stats.get("tuning", {}).get("refine", []):  # what the whole-engine search changed
        print(f"[{case.spec.name} bs{case.batch} {precision}] refine: {refine_line(r)}", file=sys.stderr, flush=True)
    del engine
    _free(case.device)
    engine, warm = timed(build, case.device)  # the same build, its tactic timings now in the cache
    if case.kiln.save_dir is not None:
        case.kiln.save_dir.mkdir(parents=True, exist_ok=True)
        suffix = ("-nopdl" if pdl is False else "") + ("" if refine else "-norefine")
        engine.save(case.kiln.save_dir / f"{case.spec.name}-bs{case.batch}-{precision}{suffix}.kiln")
    ctx = engine.create_context()
    feeds = [dict(zip(names, s)) for s in case.kiln_sets]
    outputs = list(case.spec.outputs)

    def step(k: int) -> Any:
        out = ctx.run(feeds[k])
        return [out[n] for n in outputs]

    _, first = timed(lambda: step(0), case.device)
    built = {"build_warm_s": warm} if reused else {"build_cold_s": cold, "build_warm_s": warm}
    return Prepared(step, {**built, "first_run_s": first})


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
