"""`python -m benchmarks.run`: PyTorch eager / CUDA graph / torch.compile / kiln on one card, in one process.

    PYTHONPATH=src python3 -m benchmarks.run --models resnet50,bert_base --batch 1,128 --precision fp16

Prints a Markdown table per (model, batch), appends a dated section to benchmarks/RESULTS.md and, with --json, writes
every number (all per-iteration samples included). A mode that fails is recorded as an error and the run goes on.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import shlex
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks import checks, modes, report
from benchmarks.models import DEFAULT_MODELS, OPSET, SPECS, ModelSpec, export_onnx, make_inputs, onnx_input_dtypes
from benchmarks.results import ERROR, FAILED, SKIPPED, CaseResult, ModeResult
from benchmarks.timing import choose_iters, measure, sync, timed, warm_up

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
HERE = Path(__file__).resolve().parent


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(DEFAULT_MODELS),
                   help=f"comma-separated, from {', '.join(DEFAULT_MODELS)} (default: all)")
    p.add_argument("--batch", default="1,128", help="comma-separated batch sizes (default 1,128)")
    p.add_argument("--precision", default="fp16", choices=sorted(DTYPES), help="default fp16")
    p.add_argument("--modes", default=",".join(modes.DEFAULT_MODES),
                   help=f"comma-separated, from {', '.join(modes.ALL_MODES)} (default: all but max-autotune)")
    p.add_argument("--device", default="cuda", help="cuda[:N] (default) or cpu (smoke runs)")
    p.add_argument("--warmup", type=int, default=20, help="warm-up iterations per mode (default 20)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--iters", type=int, default=None, help="timed iterations per mode (default 200)")
    how.add_argument("--seconds", type=float, default=None,
                     help="instead of --iters: time about this long per mode (iterations estimated after warm-up)")
    p.add_argument("--rotate", type=int, default=4, help="pre-made input sets cycled through (default 4)")
    p.add_argument("--results", type=Path, default=HERE / "RESULTS.md",
                   help="Markdown file the dated section is appended to (default benchmarks/RESULTS.md)")
    p.add_argument("--no-results", action="store_true", help="only print; append nothing to --results")
    p.add_argument("--json", type=Path, default=None, help="also write every number to this JSON file")
    p.add_argument("--workdir", type=Path, default=HERE / "work",
                   help="ONNX exports, kiln timing caches, the fresh inductor cache (default benchmarks/work)")
    p.add_argument("--kiln-opt-level", type=int, default=3, help="kiln BuilderConfig.opt_level (default 3)")
    p.add_argument("--kiln-time-budget", type=float, default=None, help="kiln BuilderConfig.time_budget_s")
    p.add_argument("--kiln-calibrator", default=None, choices=("entropy", "percentile", "mse", "minmax"),
                   help="kiln-int8/kiln-fp8: the calibrator (default: kiln's, entropy for int8, minmax for fp8)")
    p.add_argument("--kiln-accuracy-target", default=None, metavar="METRIC>=X",
                   help="kiln-int8/kiln-fp8: e.g. cosine>=0.99; calibrates on all input sets but the last, checks "
                        "on the last, and keeps the layers most responsible for the loss float until it holds")
    p.add_argument("--kiln-save", type=Path, default=None, metavar="DIR",
                   help="save every kiln engine built here (to profile it with `kiln inspect --profile`)")
    p.add_argument("--min-cosine", type=float, default=None,
                   help="cosine bar vs eager (default: 0.999 for fp16/bf16, 0.9999 for fp32)")
    p.add_argument("--no-tf32", dest="tf32", action="store_false",
                   help="fp32: no TF32 in PyTorch matmuls/convolutions nor in kiln (default: TF32 on for both)")
    p.add_argument("--no-cudnn-benchmark", dest="cudnn_benchmark", action="store_false",
                   help="leave torch.backends.cudnn.benchmark off (default: on, as for fixed-shape inference)")
    p.add_argument("--channels-last", action="store_true",
                   help="PyTorch vision models in channels_last memory format (inputs stay NCHW-contiguous)")
    p.add_argument("--exporter", choices=("torchscript", "dynamo"), default="torchscript",
                   help="the ONNX export kiln builds from: torch.onnx.export's TorchScript tracer (default, opset "
                        f"{OPSET}) or torch.export (dynamo=True, torch's own default since 2.9; needs onnxscript)")
    p.add_argument("--as-built", action="store_true",
                   help="export each model as PyTorch runs it, not its export variant (BERT: transformers' "
                        "default SDPA attention instead of the eager attention TensorRT users export)")
    p.add_argument("--inductor-cache", choices=("fresh", "default"), default="fresh",
                   help="fresh (default): a new TORCHINDUCTOR_CACHE_DIR/TRITON_CACHE_DIR under --workdir, so "
                        "compile and cold-build times are cold; default: whatever the environment says")
    args = p.parse_args(argv)
    args.model_list = _names(args.models, SPECS, "model")
    args.batch_list = [int(b) for b in args.batch.split(",") if b.strip()]
    args.mode_list = _names(args.modes, modes.ALL_MODES, "mode")
    if args.iters is None and args.seconds is None:
        args.iters = 200
    return args


def _names(text: str, known: Any, what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown {what}(s): {', '.join(unknown)}; choose from {', '.join(known)}")
    return names


def command_line(argv: Sequence[str] | None) -> str:
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python -m benchmarks.run", *(shlex.quote(a) for a in args)])


def settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"models": args.model_list, "batches": args.batch_list, "modes": args.mode_list,
            "precision": args.precision, "warmup": args.warmup, "iters": args.iters, "seconds": args.seconds,
            "rotate": args.rotate, "tf32": args.tf32, "cudnn_benchmark": args.cudnn_benchmark,
            "channels_last": args.channels_last, "exporter": args.exporter, "as_built": args.as_built,
            "kiln_opt_level": args.kiln_opt_level,
            "kiln_time_budget_s": args.kiln_time_budget, "kiln_calibrator": args.kiln_calibrator,
            "kiln_accuracy_target": args.kiln_accuracy_target,
            "min_cosine": args.min_cosine or checks.MIN_COSINE[args.precision],
            "inductor_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR")}


def configure(args: argparse.Namespace) -> None:
    """Process-wide settings, before anything compiles."""
    if args.inductor_cache == "fresh":
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        cache = (args.workdir / f"inductor-{stamp}-{os.getpid()}").resolve()
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
        os.environ["TRITON_CACHE_DIR"] = str(cache / "triton")
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    torch.backends.cudnn.benchmark = args.cudnn_benchmark


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- one model ---------------------------------------------------------------------------------------------------


def run_model(name: str, args: argparse.Namespace, device: torch.device) -> list[CaseResult]:
    spec = SPECS[name]
    modes.reset_compiled()
    cpu_model = spec.build()
    onnx_path, export_s, export_error = None, None, None
    if any(m in args.mode_list for m in modes.KILN_MODES):
        try:
            how = ("-as-built" if args.as_built else "") + ("-dynamo" if args.exporter == "dynamo" else "")
            path = args.workdir / f"{name}{how}.onnx"
            onnx_path, export_s = timed(lambda: export_onnx(spec, cpu_model, path, exporter=args.exporter,
                                                            as_built=args.as_built), torch.device("cpu"))
            log(f"[{name}] exported to {onnx_path} in {export_s:.1f} s")
        except Exception as e:
            export_error = f"export: {type(e).__name__}: {e}"
            log(f"[{name}] ONNX export failed: {export_error}")
    model = _on_device(cpu_model, device, DTYPES[args.precision], args.channels_last and _is_image(spec))
    ref32 = copy.deepcopy(cpu_model).to(device) if args.precision != "fp32" else None
    dtypes = onnx_input_dtypes(onnx_path) if onnx_path else {}
    results = []
    for batch in args.batch_list:
        case = _case(spec, model, batch, args, device, onnx_path, dtypes)
        result = run_case(case, ref32, args, export_error)
        result.export_s = export_s
        results.append(result)
        del case
        _free(device)
    del model, ref32
    modes.reset_compiled()
    _free(device)
    return results


def _is_image(spec: ModelSpec) -> bool:
    return len(spec.inputs) == 1 and len(spec.inputs[0].shape) == 3


def _on_device(cpu_model: torch.nn.Module, device: torch.device, dtype: torch.dtype,
               channels_last: bool) -> torch.nn.Module:
    model = copy.deepcopy(cpu_model).to(device=device, dtype=dtype).eval()
    return model.to(memory_format=torch.channels_last) if channels_last else model  # type: ignore[call-overload]


def _case(spec: ModelSpec, model: torch.nn.Module, batch: int, args: argparse.Namespace, device: torch.device,
          onnx_path: Path | None, onnx_dtypes: dict[str, torch.dtype]) -> modes.Case:
    """The input sets: PyTorch's in the benchmarked precision; kiln's the same values in the ONNX inputs' dtypes."""
    dtype = DTYPES[args.precision]
    sets = [[x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)
             for x in make_inputs(spec, batch, k)] for k in range(args.rotate)]
    kiln_sets = [[x.to(onnx_dtypes.get(i.name, x.dtype)) for i, x in zip(spec.inputs, s)] for s in sets]
    options = modes.KilnOptions(args.kiln_opt_level, args.tf32, args.workdir, args.kiln_time_budget, args.kiln_save,
                                args.kiln_calibrator, args.kiln_accuracy_target)
    return modes.Case(spec, model, sets, device, batch, args.precision, onnx_path, kiln_sets, options)


def run_case(case: modes.Case, ref32: torch.nn.Module | None, args: argparse.Namespace,
             export_error: str | None) -> CaseResult:
    tag = f"[{case.spec.name} bs{case.batch} {case.precision}]"
    names = list(case.spec.outputs)
    with torch.inference_mode():
        ref = [o.clone() for o in case.model(*case.sets[0])]
        ref_fp32 = _fp32_outputs(ref32, case) if ref32 is not None else None
    sync(case.device)
    bar = args.min_cosine or checks.MIN_COSINE[case.precision]
    result = CaseResult(case.spec.name, case.batch, case.precision, str(case.device), min_cosine=bar)
    if ref_fp32 is not None:
        result.eager_vs_fp32 = checks.compare(names, ref, ref_fp32)
    for mode in args.mode_list:
        if mode in modes.KILN_MODES and export_error:
            result.modes.append(ModeResult(mode, ERROR, error=export_error))
            continue
        mode_bar = min(bar, checks.MIN_COSINE_INT8) if mode in modes.QUANTIZED_MODES else bar
        m = run_mode(mode, case, ref, ref_fp32, args, mode_bar)
        result.modes.append(m)
        log(f"{tag} {mode}: {_progress(m)}")
    return result


def _fp32_outputs(ref32: torch.nn.Module, case: modes.Case) -> list[torch.Tensor]:
    """Eager fp32 (TF32 off) on the first input set, as rounded to the benchmarked precision."""
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        inputs = [x.float() if x.is_floating_point() else x for x in case.sets[0]]
        return [o.clone() for o in ref32(*inputs)]
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def _progress(m: ModeResult) -> str:
    if m.stats is None:
        return f"{m.status}: {m.error}"
    setup = ", ".join(f"{k} {v:.2f}" for k, v in m.setup_s.items())
    w = checks.worst(m.checks)
    check = f"; min cos {w.cosine:.6f}" if w else ""
    return f"{m.status}: median {m.stats.median_ms:.3f} ms over {m.stats.iters}{check}" + (
        f" ({setup})" if setup else "")


def run_mode(mode: str, case: modes.Case, ref: list[torch.Tensor], ref_fp32: list[torch.Tensor] | None,
             args: argparse.Namespace, bar: float) -> ModeResult:
    """Set a mode up, check its outputs, time it. Any failure becomes an error result; the run goes on."""
    result = ModeResult(mode)
    prepared: modes.Prepared | None = None
    phase = "build" if mode in modes.KILN_MODES else "setup"
    try:
        with modes.grad_mode(mode):
            _reset_peak(case.device)
            prepared = modes.prepare(mode, case)
            result.setup_s = prepared.setup_s
            phase = "run"
            _check_and_time(prepared, case, ref, ref_fp32, args, result)
        if not checks.passes(result.checks, case.precision, bar):
            result.status = FAILED
    except modes.Skip as e:
        result.status, result.error = SKIPPED, str(e)
    except Exception as e:
        result.status, result.error = ERROR, f"{phase}: {type(e).__name__}: {e}"
        result.traceback = traceback.format_exc()
    finally:
        if prepared is not None:
            _release(prepared)
        del prepared
        _free(case.device)
    return result


def _check_and_time(prepared: modes.Prepared, case: modes.Case, ref: list[torch.Tensor],
                    ref_fp32: list[torch.Tensor] | None, args: argparse.Namespace, result: ModeResult) -> None:
    names = list(case.spec.outputs)
    n = len(case.sets)
    warm_up(prepared.step, n, args.warmup, case.device)
    outputs = [o.clone() for o in prepared.step(0)]
    sync(case.device)
    result.checks = checks.compare(names, outputs, ref)
    if ref_fp32 is not None:
        result.checks_fp32 = checks.compare(names, outputs, ref_fp32)
    del outputs
    iters = args.iters or choose_iters(prepared.step, n, case.device, args.seconds)
    result.stats = measure(prepared.step, n, case.device, iters)
    result.peak_mem_mb = _peak_mb(case.device)


def _release(prepared: modes.Prepared) -> None:
    try:
        prepared.release()
    except Exception as e:  # a failed clean-up must not hide the measurement
        log(f"  (clean-up failed: {type(e).__name__}: {e})")


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _run_model_safely(name: str, args: argparse.Namespace, device: torch.device) -> list[CaseResult]:
    """run_model, with a failure outside any one mode (building the model, moving it) recorded for every case."""
    try:
        return run_model(name, args, device)
    except Exception as e:
        error = f"model: {type(e).__name__}: {e}"
        log(f"[{name}] failed: {error}")
        tb = traceback.format_exc()
        _free(device)
        return [CaseResult(name, b, args.precision, str(device),
                           modes=[ModeResult(m, ERROR, error=error, traceback=tb) for m in args.mode_list])
                for b in args.batch_list]


# --- main --------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for, but torch sees no CUDA GPU (use --device cpu for a smoke run)")
    args.workdir.mkdir(parents=True, exist_ok=True)
    configure(args)
    env = report.environment(device, command_line(argv), settings(args))
    cases: list[CaseResult] = []
    interrupted = False
    try:
        for name in args.model_list:
            cases += _run_model_safely(name, args, device)
            if args.json:
                report.write_json(args.json, env, cases, interrupted=True)  # kept if a later model crashes
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: reporting the cases that finished")
    text = report.section(env, cases, interrupted)
    print(text)
    if not args.no_results:
        report.append_results(args.results, text)
        log(f"appended to {args.results}")
    if args.json:
        report.write_json(args.json, env, cases, interrupted)
        log(f"wrote {args.json}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
