"""The report: environment header, a Markdown table per (model, batch), RESULTS.md and the JSON file."""

from __future__ import annotations

import ctypes
import datetime as dt
import json
import platform
import subprocess
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from benchmarks.checks import OutputCheck, worst
from benchmarks.results import ERROR, FAILED, KILN_GOAL, SKIPPED, CaseResult, ModeResult
from benchmarks.timing import Stats

REPO = Path(__file__).resolve().parent.parent
MAX_ERROR_CHARS = 160

INTRO = """# kiln benchmark results

Produced by `python -m benchmarks.run` (see `benchmarks/README.md`); each run appends a dated section below.
Every number in a section was measured in that run, on the card named in its header. Nothing is copied in by hand.

How the numbers are made:

- All modes run in one process, on one card, one after another, on the same seeded random-weight models and
  inputs (several pre-made input sets, rotated between iterations so caches don't flatter).
- **eager**: the PyTorch model (`eval()`, `torch.inference_mode()`) at the requested precision.
- **cudagraph**: the eager model captured once in a `torch.cuda.CUDAGraph` over static input buffers; each
  iteration copies the next input set into those buffers and replays the graph.
- **compile**, **reduce-overhead**, **max-autotune**: `torch.compile(model, mode=...)`. The last two use CUDA
  graphs, which copy each iteration's input into their static buffers inside the call, as the cudagraph mode does.
- **kiln**: the fp32 model exported to ONNX (opset 17, TorchScript exporter), built with `kiln.build` at the
  requested precision (fixed shapes), run with `ctx.run`. Its inputs are prepared beforehand in the ONNX inputs'
  dtype; that cast is not timed.
- Timing: CUDA events around every iteration (no host synchronization between iterations), after a warm-up;
  median, p10 and p90 over all iterations. On the CPU (smoke runs) the host clock.
- "vs best torch": a mode's median over the fastest PyTorch mode's median (of the modes whose outputs pass the
  check). For kiln this is the "kiln / best torch" ratio; the goal is <= 0.75.
- Setup times: torch.compile's is the wall time of the first call (tracing, code generation, autotuning);
  cudagraph's is the side-stream warm-up plus the capture; kiln's are a cold build (empty timing cache), a warm
  rebuild from that timing cache and the first run; the ONNX export is timed once per model.
- Correctness, before timing: each mode's outputs on the first input set against eager at the same precision
  (max abs error, cosine similarity per output; a mode below the cosine bar, 0.999 for fp16/bf16, 0.9999 for
  fp32, is marked FAILED, still timed); as context, eager at the requested precision against eager fp32.
"""


# --- environment -----------------------------------------------------------------------------------------------


def environment(device: torch.device, command: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Date, card, driver, library versions, the command line and the run's settings."""
    env: dict[str, Any] = {
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "device": str(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton": _version("triton"),
        "torchvision": _version("torchvision"),
        "transformers": _version("transformers"),
        "onnx": _version("onnx"),
        "kiln": _kiln_version(),
        "git": _git_commit(),
        "settings": settings,
    }
    env.update(_card(device))
    return env


def _version(module: str) -> str | None:
    try:
        return str(__import__(module).__version__)
    except Exception:
        return None


def _kiln_version() -> str | None:
    try:
        from kiln.utils.version import __version__

        return __version__
    except Exception:
        return None


def _git_commit() -> str | None:
    """The checked-out commit (read only), '+dirty' when the tree has changes; None outside a git checkout."""
    try:
        head = _cmd(["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"])
        dirty = _cmd(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"])
    except Exception:
        return None
    return head + ("+dirty" if dirty else "")


def _cmd(argv: list[str]) -> str:
    return subprocess.run(argv, capture_output=True, text=True, timeout=20, check=True).stdout.strip()


def _card(device: torch.device) -> dict[str, Any]:
    if device.type != "cuda":
        return {"card": platform.processor() or platform.machine(), "driver": None, "cuda_driver": None}
    props = torch.cuda.get_device_properties(device)
    return {"card": torch.cuda.get_device_name(device), "capability": f"{props.major}.{props.minor}",
            "sms": props.multi_processor_count, "memory_gib": round(props.total_memory / 2**30, 1),
            "driver": _driver_version(), "cuda_driver": _cuda_driver_version()}


def _driver_version() -> str | None:
    try:
        out = _cmd(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    except Exception:
        return None
    return out.splitlines()[0].strip() if out else None


def _cuda_driver_version() -> str | None:
    """The CUDA version the driver supports (cuDriverGetVersion), e.g. '13.0'."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        v = ctypes.c_int()
        if lib.cuDriverGetVersion(ctypes.byref(v)) != 0:
            return None
    except OSError:
        return None
    return f"{v.value // 1000}.{v.value % 1000 // 10}"


# --- Markdown --------------------------------------------------------------------------------------------------


def section(env: dict[str, Any], cases: Sequence[CaseResult], interrupted: bool = False) -> str:
    """One dated section of RESULTS.md: header, summary, then a table per case."""
    parts = [header(env), summary(cases)]
    if interrupted:
        parts.append("**The run was interrupted; the cases above and below are the ones that finished.**\n")
    parts += [case_table(c) for c in cases]
    return "\n".join(parts)


def header(env: dict[str, Any]) -> str:
    s = env["settings"]
    lines = [f"## {env['date_utc']} — {env['card']}", ""]
    card = env["card"] + (f" (sm_{env['capability'].replace('.', '')}, {env['sms']} SMs, {env['memory_gib']} GiB)"
                          if env.get("capability") else "")
    lines += [
        f"- card: {card}; device `{env['device']}`",
        f"- driver: {env.get('driver') or 'n/a'} (CUDA {env.get('cuda_driver') or 'n/a'}); torch built with CUDA "
        f"{env['torch_cuda'] or 'n/a'}, cuDNN {env['cudnn'] or 'n/a'}",
        f"- versions: torch {env['torch']}, triton {env['triton'] or 'n/a'}, kiln {env['kiln'] or 'n/a'}, "
        f"torchvision {env['torchvision'] or 'n/a'}, transformers {env['transformers'] or 'n/a'}, "
        f"onnx {env['onnx'] or 'n/a'}, Python {env['python']}; repo {env['git'] or 'n/a'}",
        f"- command: `{env['command']}`",
        f"- settings: precision {s['precision']}; warm-up {s['warmup']} iterations; "
        f"{_iters_text(s)}; {s['rotate']} input sets rotated; TF32 {_on(s['tf32'])}; cudnn.benchmark "
        f"{_on(s['cudnn_benchmark'])}; channels_last {_on(s['channels_last'])}; kiln opt_level {s['kiln_opt_level']}"
        f"{_export_text(s)}; cosine bar {s['min_cosine']}",
        "",
    ]
    return "\n".join(lines)


def _export_text(s: dict[str, Any]) -> str:
    """How the ONNX file was made, when not the default (runs recorded before these settings existed had none)."""
    parts = [f"exporter {s['exporter']}"] if s.get("exporter", "torchscript") != "torchscript" else []
    if s.get("as_built"):
        parts.append("models exported as built")
    return "".join(f"; {p}" for p in parts)


def _iters_text(s: dict[str, Any]) -> str:
    return f"about {s['seconds']} s per measurement" if s.get("seconds") else f"{s['iters']} timed iterations"


def _on(flag: bool) -> str:
    return "on" if flag else "off"


def summary(cases: Sequence[CaseResult]) -> str:
    rows = ["| model | batch | best PyTorch | best ms | kiln ms | kiln / best torch | goal <= 0.75 | kiln check |",
            "|---|---|---|---|---|---|---|---|"]
    for c in cases:
        best, k = c.best_torch(), c.mode("kiln")
        best_ms = _ms(best.stats.median_ms) if best and best.stats else "—"
        kiln_ms = _ms(k.stats.median_ms) if k and k.stats else "—"
        ratio = c.ratio("kiln")
        rows.append(f"| {c.model} | {c.batch} | {best.mode if best else '—'} | {best_ms} | {kiln_ms} | "
                    f"{_ratio(ratio)} | {_goal(ratio, k)} | {_check_text(k) if k else '—'} |")
    return "\n".join(["### Summary", "", *rows, ""])


def _goal(ratio: float | None, k: ModeResult | None) -> str:
    if k is None or ratio is None:
        return "—"
    if k.status == FAILED:
        return "no (FAILED check)"
    return "yes" if ratio <= KILN_GOAL else "no"


def case_table(c: CaseResult) -> str:
    lines = [f"### {c.model} · batch {c.batch} · {c.precision} · {c.device}", "",
             "| mode | median ms | p10 ms | p90 ms | items/s | vs best torch | setup | check vs eager |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [_mode_row(c, m) for m in c.modes]
    lines.append("")
    lines += _notes(c)
    return "\n".join(lines) + "\n"


def _mode_row(c: CaseResult, m: ModeResult) -> str:
    if m.stats is None:
        what = "skipped" if m.status == SKIPPED else "ERROR"
        return f"| {m.mode} | {what} | | | | | {_setup(m, c)} | {_cell(m.error or '')} |"
    st = m.stats
    ratio = c.ratio(m.mode)
    ratio_text = f"**{_ratio(ratio)}**" if m.mode == "kiln" else _ratio(ratio)
    items = f"{c.batch / st.median_ms * 1e3:,.0f}"
    return (f"| {m.mode} | {_ms(st.median_ms)} | {_ms(st.p10_ms)} | {_ms(st.p90_ms)} | {items} | {ratio_text} | "
            f"{_setup(m, c)} | {_check_text(m)} |")


def _setup(m: ModeResult, c: CaseResult) -> str:
    s = m.setup_s
    parts = []
    if m.mode == "kiln" and c.export_s is not None:
        parts.append(f"export {_s(c.export_s)}")
    if "build_cold_s" in s:
        parts.append(f"build {_s(s['build_cold_s'])} cold, {_s(s['build_warm_s'])} warm")
    elif "build_warm_s" in s:  # from another mode's timing cache (kiln-nopdl, kiln-norefine after kiln): no cold build
        parts.append(f"build {_s(s['build_warm_s'])} warm")
    if "first_run_s" in s:
        parts.append(f"first run {_s(s['first_run_s'])}")
    if "compile_s" in s:
        parts.append(f"compile {_s(s['compile_s'])}")
    if "capture_s" in s:
        parts.append(f"capture {_s(s['capture_s'])}")
    return "; ".join(parts) or "—"


def _check_text(m: ModeResult) -> str:
    if m.status == ERROR:
        return "ERROR"
    if m.mode == "eager":
        return "reference"
    w = worst(m.checks)
    if w is None:
        return "—"
    verdict = "**FAILED**" if m.status == FAILED else "ok"
    return f"{verdict}: min cos {_cos(w.cosine)}, max abs {max(c.max_abs for c in m.checks):.3g}{_top1(m.checks)}"


def _top1(checks: list[OutputCheck]) -> str:
    """", top-1 as eager 99.2 %" for classifier outputs (the lowest share), else ""."""
    shares = [c.top1 for c in checks if c.top1 is not None]
    return f", top-1 as eager {100 * min(shares):.1f} %" if shares else ""


def _notes(c: CaseResult) -> list[str]:
    out = []
    best, ratio, k = c.best_torch(), c.ratio("kiln"), c.mode("kiln")
    if k is not None and ratio is not None and best is not None and best.stats is not None:
        flag = " (**FAILED** correctness check)" if k.status == FAILED else ""
        verdict = "met" if ratio <= KILN_GOAL and k.status != FAILED else "not met"
        out.append(f"kiln / best torch ({best.mode}, {_ms(best.stats.median_ms)} ms): **{_ratio(ratio)}**{flag}; "
                   f"goal <= {KILN_GOAL}: {verdict}.")
    elif k is not None and k.error:
        out.append(f"kiln: {_cell(k.error)}")
    for name in ("kiln-nopdl", "kiln-norefine", "kiln-int8", "kiln-fp8"):
        q = c.mode(name)
        if q is not None and q.stats is not None and k is not None and k.stats is not None:
            w = worst(q.checks)
            acc = f"; its min cosine to eager {_cos(w.cosine)}{_top1(q.checks)}" if w is not None else ""
            out.append(f"{name} / kiln {c.precision}: **{_ratio(q.stats.median_ms / k.stats.median_ms)}**{acc}.")
        elif q is not None and q.error:
            out.append(f"{name}: {_cell(q.error)}")
    if k is not None and k.checks:
        out += ["", _checks_table(k, c)]
    if c.eager_vs_fp32:
        text = "; ".join(f"{x.output} cos {_cos(x.cosine)}, max abs {x.max_abs:.3g}" for x in c.eager_vs_fp32)
        out += ["", f"Context, eager {c.precision} vs eager fp32 (TF32 off): {text}."]
    return [*out, ""] if out else []


def _checks_table(k: ModeResult, c: CaseResult) -> str:
    fp32 = {x.output: x for x in k.checks_fp32}
    head = f"| kiln output | max abs vs eager {c.precision} | rel L2 | cosine |"
    rule = "|---|---|---|---|"
    if fp32:
        head, rule = head + " max abs vs eager fp32 | cosine vs fp32 |", rule + "---|---|"
    rows = [head, rule]
    for x in k.checks:
        row = f"| {x.output} | {x.max_abs:.3g} | {x.rel_l2:.3g} | {_cos(x.cosine)} |"
        y: OutputCheck | None = fp32.get(x.output)
        if fp32:
            row += f" {f'{y.max_abs:.3g}' if y else '—'} | {_cos(y.cosine) if y else '—'} |"
        rows.append(row)
    return "\n".join(rows)


def _ms(x: float) -> str:
    return f"{x:.3f}" if x < 100 else f"{x:.1f}"


def _s(x: float) -> str:
    return f"{x:.2f} s" if x < 10 else f"{x:.1f} s"


def _cos(x: float) -> str:
    return f"{x:.6f}"


def _ratio(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}x"


def _cell(text: str) -> str:
    """One line, no pipes, short enough for a table cell."""
    t = " ".join(text.split()).replace("|", "/")
    return t if len(t) <= MAX_ERROR_CHARS else t[:MAX_ERROR_CHARS - 1] + "…"


# --- files -----------------------------------------------------------------------------------------------------


def append_results(path: Path, text: str) -> None:
    """Append a section to RESULTS.md, creating it with its introduction first if it does not exist."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_text(INTRO)
    with path.open("a") as f:
        f.write("\n" + text.rstrip() + "\n")


def write_json(path: Path, env: dict[str, Any], cases: Sequence[CaseResult], interrupted: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"environment": env, "interrupted": interrupted, "kiln_goal": KILN_GOAL,
           "cases": [_case_json(c) for c in cases]}
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")


def _case_json(c: CaseResult) -> dict[str, Any]:
    d = asdict(c)
    best = c.best_torch()
    d["best_torch_mode"] = best.mode if best else None
    d["kiln_over_best_torch"] = c.ratio("kiln")
    return d


def read_json(path: Path) -> tuple[dict[str, Any], list[CaseResult], bool]:
    """(environment, cases, interrupted) of a file `write_json` wrote: a run made with --no-results can still be
    rendered as a RESULTS.md section afterwards (`python -m benchmarks.render`)."""
    doc = json.loads(path.read_text())
    cases = []
    for d in doc["cases"]:
        modes = [ModeResult(m["mode"], m["status"], Stats(**m["stats"]) if m.get("stats") else None,
                            dict(m.get("setup_s") or {}), [OutputCheck(**k) for k in m.get("checks") or []],
                            [OutputCheck(**k) for k in m.get("checks_fp32") or []], m.get("peak_mem_mb"),
                            m.get("error"), m.get("traceback")) for m in d["modes"]]
        cases.append(CaseResult(d["model"], d["batch"], d["precision"], d["device"], modes,
                                [OutputCheck(**k) for k in d.get("eager_vs_fp32") or []], d.get("export_s"),
                                d.get("min_cosine", 0.0)))
    return doc["environment"], cases, bool(doc.get("interrupted"))

