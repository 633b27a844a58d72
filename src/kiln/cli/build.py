"""`kiln build MODEL.onnx -o MODEL.kiln`: import, optimize, tune on this device, write the engine file.

Shows progress while it works, then a summary: layers before / after optimization, precision mix, tactics,
tuning, memory plan and engine size.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from typing import TYPE_CHECKING, Any, TextIO

from kiln.cli.shapes import add_shape_args, profiles_from_args
from kiln.utils.errors import KilnError

if TYPE_CHECKING:
    from kiln.runtime.engine import Engine

STAGES = {"import": "importing the model", "passes": "optimizing the graph", "tune": "tuning",
          "refine": "trying the close runners-up in the whole engine"}
PHASES = {"passes": "optimize"}


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "build", help="build an engine file from an ONNX model (import, optimize, tune on this device)",
        description="Import MODEL, optimize it, time the tactics of every layer on this device and write the engine. "
                    "Dynamic inputs need shapes: --shapes NAME:1x3x224x224 (min = opt = max) or "
                    "--min-shapes/--opt-shapes/--max-shapes; --profile starts another optimization profile.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  kiln build resnet.onnx -o resnet.kiln --shapes input:8x3x224x224\n"
               "  kiln build bert.onnx --min-shapes ids:1x16 --opt-shapes ids:8x128 --max-shapes ids:32x512 \\\n"
               "      --profile --shapes ids:1x16 --timing-cache bert.cache")
    p.add_argument("model", help="an .onnx file")
    p.add_argument("-o", "--output", default=None, help="the engine file to write (default: MODEL with .kiln)")
    prec = p.add_mutually_exclusive_group()
    prec.add_argument("--fp16", action="store_true", help="compute in float16 where it is safe (GPU)")
    prec.add_argument("--bf16", action="store_true", help="compute in bfloat16 where it is safe (GPU)")
    prec.add_argument("--int8", action="store_true",
                      help="int8 Conv/Gemm/MatMul inputs, calibrated on --calib data (on int8 GEMM/conv kernels "
                           "where the tuner finds them faster; float layers in FP16 on a GPU)")
    prec.add_argument("--fp8", action="store_true",
                      help="float8 E4M3 Gemm/MatMul/Conv inputs (per-tensor scales from --calib data; conv weights "
                           "per output channel) on FP8 kernels; needs an sm_89+ GPU (Ada, Hopper); float layers in "
                           "FP16")
    p.add_argument("--no-tf32", action="store_true", help="no TF32 for float32 matmuls and convolutions (GPU)")
    p.add_argument("--pdl", action=argparse.BooleanOptionalAction, default=None,
                   help="launch kiln's Triton kernels with programmatic dependent launch (sm_90+ GPUs; default: as "
                        "the KILN_PDL environment variable says where the engine runs: on unless it is 0)")
    p.add_argument("--no-refine", action="store_true",
                   help="keep the tuner's choices as timed alone (GPU; by default the close runners-up are tried "
                        "in the whole engine, captured in a CUDA graph, and kept where it gets faster)")
    p.add_argument("--calib", default=None, metavar="DIR",
                   help="calibration samples, a folder of .npy (one input) or .npz (by input name) files: int8 "
                        "scales, or with --fp16 the value ranges that decide which layers stay fp32")
    p.add_argument("--calibrator", default=None, choices=("entropy", "percentile", "mse", "minmax"),
                   help="how activation ranges are chosen (default: entropy for --int8, minmax for --fp8)")
    p.add_argument("--calib-cache", default=None, metavar="FILE",
                   help="int8 scales as JSON: written by the first build, reused by the next ones")
    p.add_argument("--accuracy-check", default=None, metavar="DIR",
                   help="int8: held-out samples (like --calib): compare the int8 graph with the float one on them")
    p.add_argument("--accuracy-target", default=None, metavar="METRIC>=X",
                   help="int8: e.g. cosine>=0.995 or top1>=0.99; the layers most responsible for the loss stay "
                        "float until it is met")
    p.add_argument("--layer-precision", action="append", default=[], metavar="NAME:fp32",
                   help="keep the layers matching NAME (a glob over layer names) in fp32 in an --fp16/--bf16 "
                        "build; repeatable")
    add_shape_args(p, profiles=True)
    p.add_argument("--timing-cache", default=None, metavar="FILE",
                   help="reuse the timings found in FILE and add the new ones")
    p.add_argument("--opt-level", type=int, default=3, choices=range(6), metavar="N",
                   help="0 = no timing, 1-2 = time the best-ranked tactics, 3 = time every tactic (default), "
                        "4-5 = also search every tactic's configurations")
    p.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                   help="stop timing after this long (untimed layers take their first tactic)")
    p.add_argument("--memory-limit", default=None, metavar="BYTES",
                   help="refuse plans whose activation arena is larger (e.g. 512M, 2G)")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    p.add_argument("--deterministic", action="store_true",
                   help="byte-identical engines for the same model and timing cache (no timings recorded)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kiln.build.builder import build
    from kiln.cli.common import is_engine_file, pick_device, require_file

    require_file(args.model, "model file")
    if is_engine_file(args.model):
        raise KilnError(f"'{args.model}' is already a kiln engine file; build takes an ONNX model",
                        hint="run it with `kiln run`, or look inside with `kiln inspect`")
    out = args.output or os.path.splitext(args.model)[0] + ".kiln"
    _check_writable(out)
    config = _config(args, pick_device(args.device))
    print(f"kiln build: {args.model} -> {out} ({config.device}, {config.precision})")
    progress = Progress(sys.stdout)
    engine = build(args.model, config, progress=progress)
    progress.finish()
    t0 = time.perf_counter()
    print("  serializing ...", flush=True)
    size = engine.save(out)
    progress.times["serialize"] = time.perf_counter() - t0
    print_summary(engine, out, size, progress.times)
    return 0


def _config(args: argparse.Namespace, device: str) -> Any:
    from kiln.build.config import BuilderConfig

    precision = ("fp16" if args.fp16 else "bf16" if args.bf16 else "int8" if args.int8 else "fp8" if args.fp8
                 else "fp32")
    pins = {}
    for spec in args.layer_precision:
        name, sep, prec = spec.rpartition(":")
        if not sep or not name:
            raise KilnError(f"--layer-precision '{spec}': expected NAME:PRECISION, e.g. '/encoder/*:fp32'")
        pins[name] = prec
    return BuilderConfig(
        precision=precision, tf32=not args.no_tf32, device=device, profiles=profiles_from_args(args),
        layer_precision=pins, calibration=args.calib, calibrator=args.calibrator, calibration_cache=args.calib_cache,
        accuracy_check=args.accuracy_check, accuracy_target=args.accuracy_target,
        timing_cache=args.timing_cache, opt_level=args.opt_level, time_budget_s=args.budget,
        memory_limit_bytes=parse_bytes(args.memory_limit), deterministic=args.deterministic, pdl=args.pdl,
        refine=not args.no_refine,
    )


def _check_writable(path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise KilnError(f"cannot write '{path}': folder '{folder}' does not exist")
    if os.path.isdir(path):
        raise KilnError(f"cannot write '{path}': it is a folder")


def parse_bytes(text: str | None) -> int | None:
    """'512M' -> 536870912; plain numbers are bytes; K/M/G/T are powers of 1024."""
    if text is None:
        return None
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = units.get(t[-1:], 1)
    try:
        value = float(t[:-1] if scale > 1 else t)
    except ValueError:
        raise KilnError(f"bad --memory-limit '{text}': expected bytes, e.g. 1048576, 512M or 2G") from None
    return int(value * scale)


class Progress:
    """The builder's progress callback: one line per stage, tuning as n/N (in place on a terminal)."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self.stage: str | None = None
        self.start = time.perf_counter()
        self.times: dict[str, float] = {}
        self.last_shown = -1

    def __call__(self, stage: str, i: int, n: int) -> None:
        if stage != self.stage:
            self._close_stage()
            self.stage, self.start = stage, time.perf_counter()
            if stage in STAGES and stage != "tune":
                print(f"  {STAGES[stage]} ...", file=self.out, flush=True)
        if stage == "tune":
            self._tune(i, n)

    def _tune(self, i: int, n: int) -> None:
        step = max(1, n // 10)
        if i == 0:
            end_line = "\n" if self.tty and self.last_shown > 0 else ""
            print(f"{end_line}  tuning {n} layers ...", file=self.out, flush=True)
        elif self.tty:
            print(f"\r  tuning {i}/{n} layers", end="", file=self.out, flush=True)
        elif i == n or i // step != self.last_shown // step:
            print(f"  tuning {i}/{n} layers", file=self.out, flush=True)
        self.last_shown = i

    def _close_stage(self) -> None:
        if self.stage is None:
            return
        self.times[self.stage] = self.times.get(self.stage, 0.0) + time.perf_counter() - self.start
        if self.stage == "tune" and self.tty:
            print(file=self.out)

    def finish(self) -> None:
        self._close_stage()
        self.stage = None


def print_summary(engine: Engine, path: str, size: int, times: dict[str, float]) -> None:
    plan = engine.plan
    stats = plan.stats
    tuning = stats.get("tuning", {})
    print("summary")
    print(f"  layers      {stats.get('nodes_imported', '?')} imported -> {stats.get('nodes_optimized', '?')} "
          f"after optimization")
    for line in pass_lines(stats.get("passes", [])):
        print(f"    {line}")
    precisions = [precision_of(n) for n in plan.graph.nodes]
    print(f"  precision   layers: {mix(precisions)}")
    flops = stats.get("flops", {})
    by = flops.get("by_precision", {})
    total = sum(by.values())
    if total:
        shares = ", ".join(f"{k} {100 * v / total:.1f} %" for k, v in sorted(by.items(), key=lambda kv: -kv[1]))
        unknown = f"; {flops['unknown']} of unknown shape" if flops.get("unknown") else ""
        print(f"              FLOPs of the matrix products: {shares} ({human_flops(total)} at profile 0's opt "
              f"shapes{unknown})")
    lowered = stats.get("precision", {})
    if lowered.get("ranges_seen_on"):
        print(f"    value ranges checked against float16's on {lowered['ranges_seen_on']}")
    for name, why in lowered.get("kept_fp32", {}).items():
        print(f"    kept in float32: {name} ({why})")
    for name in lowered.get("hiding_masks", []):
        print(f"    in float16 although beyond its range: {name} (an attention mask whose large values are all "
              f"negative: at -65504 it hides the same keys)")
    on_int8 = sum(c.tactic in INT8_TACTICS for c in plan.choices[0]) if plan.choices else 0
    if lowered.get("int8_folded_layers") and lowered.get("precision") not in ("int8", "fp8"):
        print(f"    int8: {lowered['int8_folded_layers']} Gemm/MatMul/Conv layers quantized in the model (Q/DQ), "
              f"{on_int8} of them on int8 kernels")
    if lowered.get("precision") == "fp8":
        print(f"    {fp8_summary(lowered, [c.tactic for c in plan.choices[0]] if plan.choices else [])}")
    if lowered.get("precision") == "int8":
        print(f"    int8: {lowered['int8_layers']} layers quantized ({lowered['calibrator']} calibration"
              f"{', scales from the cache' if lowered.get('calibration_cache_used') else ''}); {on_int8} run on "
              f"int8 kernels, the others compute their int8 results in float; {lowered.get('int8_outputs', 0)} "
              f"write int8 for the next layer (requantized in their epilogue)"
              + (f"; {lowered['int8_residuals']} residual adds read int8" if lowered.get("int8_residuals") else ""))
        for name, why in lowered.get("float_layers", {}).items():
            print(f"    left in float: {name} ({why})")
        acc = lowered.get("accuracy")
        if acc:
            shown = ", ".join(f"{k} {v:g}" for k, v in acc["metrics"].items())
            met = "met" if acc["met"] else "NOT met"
            verdict = "" if acc["target"] is None else f" (target {acc['target']}: {met})"
            print(f"    accuracy vs float on the check data: {shown}{verdict}")
            for name in acc["kept_float"]:
                print(f"    kept in float for accuracy: {name}")
    wanted = {"fp16": "float16", "bf16": "bfloat16"}.get(engine.metadata.get("config", {}).get("precision", ""))
    if wanted and wanted not in precisions:
        print(f"  warning: {wanted} was asked for, but no layer computes in {wanted}: this engine is "
              f"{mix(precisions)}")
    for k, per in enumerate(plan.choices):
        print(f"  tactics     {mix(c.tactic for c in per)}" + (f"  (profile {k})" if len(plan.choices) > 1 else ""))
    for k, prof in enumerate(plan.profiles):
        shapes = ", ".join(f"{name} {r}" for name, r in sorted(prof.shapes.items())) or "static shapes"
        print(f"  profile {k}   {shapes}")
    print(f"  tuning      {_tuning(tuning)}")
    for k, r in enumerate(tuning.get("refine", [])):
        print("  refine      " + (f"profile {k}: " if len(plan.choices) > 1 else "") + refine_line(r))
    for w in tuning.get("warnings", []):
        print(f"  warning: {w}")
    mem = plan.memory
    print(f"  memory      activation arena {human_bytes(mem.arena_bytes)} (naive {human_bytes(mem.naive_bytes)})")
    phases = ", ".join(f"{PHASES.get(k, k)} {v:.2f} s" for k, v in times.items() if k != "done")
    print(f"  time        {phases}")
    print(f"  engine      {path}, {human_bytes(size)}, for {engine.device_info.short()}")


def pass_lines(passes: list[dict[str, Any]]) -> list[str]:
    """One line per pass that changed something: "fold_batchnorm: 53 folded (-> 212 layers)"."""
    out = []
    for p in passes:
        counts = {k: v for k, v in p.get("counts", {}).items() if v}
        if counts:
            what = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in counts.items())
            after = f" (-> {p['nodes_after']} layers)" if "nodes_after" in p else ""
            out.append(f"{p['name']}: {what}{after}")
    return out


def _tuning(t: dict[str, Any]) -> str:
    secs = f"{t['seconds']:.2f} s: " if "seconds" in t else ""
    spent = sorted(t.get("tactic_seconds", {}).items(), key=lambda kv: -sum(kv[1]))
    where = "; ".join(f"{name} {a + b:.1f} s ({a:.1f} building)" for name, (a, b) in spent[:4] if a + b >= 0.05)
    return (f"{secs}{t.get('timed_nodes', 0)} layers timed ({t.get('candidates_timed', 0)} candidates), "
            f"{t.get('cache_hits', 0)} cache hits, {t.get('single', 0)} with one tactic, "
            f"{len(t.get('rejected', []))} candidates rejected" + (f"; time by tactic: {where}" if where else ""))


def refine_line(r: dict[str, Any]) -> str:
    """The whole-engine search of one profile (`kiln.tune.refine`) in a line."""
    if "skipped" in r:
        return f"not run: {r['skipped']}"
    kept = r.get("kept", [])
    times = f"; engine {r['before_ms']:.4f} -> {r['after_ms']:.4f} ms" if "before_ms" in r else ""
    return (f"{r.get('trials', 0)} trials over {r.get('groups', 0)} groups in {r.get('seconds', 0):.1f} s, "
            f"{len(kept)} changed{times}" + "".join(f"\n              {k}" for k in kept))


def precision_of(node: Any) -> str:
    """A step's precision: "int8" for an int8 layer (int8 x int8 products: a folded "quantized" node,
    MatMulInteger, QLinearMatMul/QLinearConv, ConvInteger), the dtype of the product for a GEMM or conv with an
    epilogue (which may end by casting, e.g. to the model's float32 output), else the dtype of its first tensor
    output."""
    if node.op == "Fused" and node.attrs.get("kind") == "quantized":
        x = node.inputs[0] if node.inputs else None
        return "fp8" if x is not None and str(x.dtype) == "float8_e4m3fn" else "int8"
    if node.op in INT8_OPS:
        return "int8"
    if node.op == "Fused" and node.attrs.get("kind") in ("epilogue", "normalized", "scaled"):
        body = node.attrs["body"]
        anchor = body.nodes[0 if node.attrs["kind"] == "epilogue" else 1]
        if anchor.outputs and anchor.outputs[0].is_tensor:
            return str(anchor.outputs[0].dtype)
    for v in node.outputs:
        if v.is_tensor:
            return str(v.dtype)
    return "other"


INT8_OPS = frozenset({"MatMulInteger", "QLinearMatMul", "QLinearConv", "ConvInteger"})
INT8_TACTICS = frozenset({"cuda.int8_gemm", "triton.int8_gemm", "triton.int8_gemm_next", "cuda.matmul_integer",
                          "triton.int8_conv", "triton.int8_conv_next", "cuda.conv_integer"})
"""The tactics that run a layer's products on int8 kernels (the build report counts them)."""
FP8_TACTICS = frozenset({"cuda.fp8_gemm", "triton.fp8_gemm", "triton.fp8_gemm_next", "triton.fp8_gemm_fast",
                         "triton.fp8_conv"})
"""The tactics that run a layer's products on float8 kernels."""


def fp8_summary(lowered: dict[str, Any], tactics: list[str]) -> str:
    """The build report's float8 line: layers quantized, how many run on FP8 kernels (`tactics`: the plan's chosen
    tactic per step) and how many of those sum without float32 promotion (`triton.fp8_gemm_fast`)."""
    on = sum(t in FP8_TACTICS for t in tactics)
    fast = sum(t == "triton.fp8_gemm_fast" for t in tactics)
    return (f"fp8: {lowered['fp8_layers']} layers quantized to float8 E4M3 ({lowered['calibrator']} calibration"
            f"{', scales from the cache' if lowered.get('calibration_cache_used') else ''}); {on} run on FP8 "
            f"kernels, the others compute their results in float"
            + (f"; {fast} of them sum their products in the tensor cores without float32 promotion (short "
               f"sums only, each layer checked against its float32 result while tuning)" if fast else ""))


def mix(items: Any) -> str:
    counts = Counter(items)
    return ", ".join(f"{k} x{n}" for k, n in counts.most_common()) or "none"


def human_flops(n: int) -> str:
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} FLOP"


def human_bytes(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:,} B"
