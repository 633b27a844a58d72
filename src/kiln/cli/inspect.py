"""`kiln inspect MODEL.kiln`: the engine's metadata, every plan step (the original nodes it runs, op, tactic,
precision, shapes), the memory plan, and with --profile the time of every step. --json prints it all as JSON;
--html writes a self-contained report (a table and a per-layer time chart)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import TYPE_CHECKING, Any

from kiln.cli.shapes import add_shape_args, runtime_shapes

if TYPE_CHECKING:
    from kiln.ir.graph import Node, Value
    from kiln.runtime.engine import Engine


def add_parser(sub: Any) -> None:
    from kiln.cli.common import add_device_arg, add_input_args

    p = sub.add_parser("inspect", help="show an engine's metadata, plan steps and memory plan (and time each step)",
                       description="Show what an engine file holds: metadata, every plan step (the original nodes "
                                   "it runs, op, tactic, precision, shapes) and the memory plan. --profile runs the "
                                   "engine and times every step.")
    p.add_argument("engine", help="a .kiln engine file")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    p.add_argument("--html", default=None, metavar="FILE", help="write a self-contained HTML report")
    p.add_argument("--profile", action="store_true", help="run the engine and time every step")
    p.add_argument("--runs", type=int, default=20, metavar="N", help="timed runs for --profile (default 20)")
    add_shape_args(p, profiles=False)
    add_input_args(p)
    add_device_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kiln.cli.common import require_file

    require_file(args.engine, "engine file")
    engine = _open(args)
    report = make_report(engine, args.engine)
    if args.profile:
        report["profile"] = profile(engine, args)
        _attach_times(report)
    if args.html:
        from kiln.cli.report_html import render

        with open(args.html, "w", encoding="utf-8") as f:
            f.write(render(report))
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print_report(report)
        if args.html:
            print(f"HTML report written to {args.html}")
    return 0


def _open(args: argparse.Namespace) -> Engine:
    """Without --profile the engine is only read (on the CPU, any device it was built for); with it, loaded for
    the device it will run on (checked)."""
    from kiln.cli.common import is_engine_file, load_engine
    from kiln.runtime import engine_file
    from kiln.runtime.engine import engine_from_blob
    from kiln.utils.errors import KilnError

    if not is_engine_file(args.engine):
        raise KilnError(f"'{args.engine}' is not a kiln engine file",
                        hint="build one with `kiln build MODEL.onnx -o MODEL.kiln`; `kiln check` inspects ONNX models")
    if args.profile:
        return load_engine(args.engine, args.device)
    return engine_from_blob(engine_file.read(args.engine), "cpu", args.engine, check=False)


# --- the report ------------------------------------------------------------------------------------------


def origins(node: Node) -> list[str]:
    """The original (imported) nodes a step runs: a fused step lists the nodes of its body, in order."""
    if node.op == "Fused":
        body = node.attrs["body"]
        return [name for n in body.nodes for name in origins(n)]
    return [node.name]


def op_label(node: Node) -> str:
    """The op, and for a fused step its kind and the ops of its body: "Fused[epilogue: Conv+Add+Relu]"."""
    if node.op != "Fused":
        return node.op
    return f"Fused[{node.attrs['kind']}: {'+'.join(n.op for n in node.attrs['body'].nodes)}]"


def _value(v: Value | None) -> dict[str, Any] | None:
    if v is None:
        return None
    shape = getattr(v.type, "shape", None)
    return {"name": v.name, "type": str(v.type), "dtype": str(v.dtype) if v.is_tensor else None,
            "shape": None if shape is None else [d if isinstance(d, int) else str(d) for d in shape],
            "constant": v.data is not None}


def layer_info(engine: Engine) -> list[dict[str, Any]]:
    from kiln.cli.build import precision_of

    plan = engine.plan
    out = []
    for i, node in enumerate(plan.graph.nodes):
        names = origins(node)
        out.append({
            "index": i, "name": " + ".join(names), "fused": names, "op": op_label(node),
            "tactics": [{"tactic": per[i].tactic, "config": dict(per[i].config)} for per in plan.choices],
            "precision": precision_of(node),
            "inputs": [_value(v) for v in node.inputs],
            "outputs": [_value(v) for v in node.outputs],
        })
    return out


def make_report(engine: Engine, path: str) -> dict[str, Any]:
    plan = engine.plan
    meta = dict(engine.metadata)
    mem = plan.memory
    return {
        "file": path, "size_bytes": os.path.getsize(path),
        "metadata": meta,
        "inputs": [_value(v) for v in plan.graph.inputs],
        "outputs": [_value(v) for v in plan.graph.outputs],
        "profiles": [p.to_json() for p in plan.profiles],
        "stats": plan.stats,
        "memory": {"arena_bytes": mem.arena_bytes, "naive_bytes": mem.naive_bytes, "planned_tensors": len(mem.slots),
                   "saved_percent": round(100 * (1 - mem.arena_bytes / mem.naive_bytes), 1) if mem.naive_bytes
                   else 0.0},
        "layers": layer_info(engine),
    }


# --- profiling ---------------------------------------------------------------------------------------------


def profile(engine: Engine, args: argparse.Namespace) -> dict[str, Any]:
    """Time every step of the engine. On the CPU: `args.runs` runs (after a warm-up), step i's time from the end of
    step i-1 to the end of step i (the runtime's own work between kernels included). On a GPU, where timing steps
    in sequence would mostly measure Python's launch gaps, each step is timed alone as the tuner times tactics:
    its kernels captured in a CUDA graph and replayed with L2 flushed, on the real inputs of a full run; the whole
    engine (one CUDA-graph replay per run) is timed beside it, so the sum of the steps can be checked against it."""
    from kiln.cli.common import check_names, engine_shapes, make_feeds, random_spec, read_inputs
    from kiln.utils.errors import KilnError

    if args.runs < 1:
        raise KilnError(f"--runs must be >= 1, got {args.runs}")
    given = read_inputs(args.input)
    shapes = runtime_shapes(args)
    check_names(engine.graph, given, shapes)
    feeds, made = make_feeds(engine.graph.inputs, given, engine_shapes(engine, shapes), random_spec(args))
    ctx = engine.create_context()
    call = ctx.prepare(feeds)
    out: dict[str, Any] = {
        "runs": args.runs, "device": str(engine.device), "profile_index": call.profile,
        "input_shapes": {k: list(getattr(v, "shape", ())) for k, v in feeds.items()}, "random_inputs": made,
    }
    if engine.device.type == "cuda":
        steps, captured, seen = _gpu_steps(ctx, call, args.runs)
        out.update(whole_ms_median=_whole_run_ms(ctx, feeds, args.runs), steps_ms_median=steps,
                   total_ms_median=sum(steps), uncaptured=[i for i, c in enumerate(captured) if not c],
                   output_shapes={str(i): s for i, s in seen.items()},
                   timing="each step alone: CUDA graph replays, L2 flushed")
        return out
    timer = _StepTimer()
    ctx.execute(call.profile, call.env, call.bindings)  # warm-up: builds kernels and the arena
    per_step: list[list[float]] = [[] for _ in engine.plan.graph.nodes]
    totals = []
    for _ in range(args.runs):
        call = ctx.prepare(feeds)
        timer.start()
        ctx.execute(call.profile, call.env, call.bindings, hook=timer.hook)
        steps = timer.finish()
        for i, t in enumerate(steps):
            per_step[i].append(t)
        totals.append(sum(steps))
    out.update(total_ms_median=statistics.median(totals) * 1e3,
               steps_ms_median=[statistics.median(ts) * 1e3 if ts else None for ts in per_step],
               output_shapes={str(i): s for i, s in timer.shapes.items()}, timing="host clock")
    return out


def _gpu_steps(ctx: Any, call: Any, runs: int) -> tuple[list[float], list[bool], dict[int, list[Any]]]:
    """(ms per step, whether each step could be captured, output shapes per step): one full run keeps every
    intermediate, then each step's kernel is timed alone on them (`tune.timer.timed`)."""
    from kiln.ir.interpreter import tf32_mode
    from kiln.kernels import pdl
    from kiln.runtime.engine import to_layout
    from kiln.tune.timer import timed

    plan = ctx.engine.plan
    graph = plan.graph
    seen: dict[Any, Any] = {}
    shapes: dict[int, list[Any]] = {}

    def keep(i: int, node: Node, outputs: list[Any]) -> None:
        seen.update(zip(node.outputs, outputs))
        shapes[i] = [list(o.shape) if hasattr(o, "shape") else None for o in outputs]

    env = dict(call.env)
    ctx.execute(call.profile, env, call.bindings, hook=keep)  # warm-up too: builds every kernel
    seen.update((v, env[v]) for v in graph.inputs if v in env)  # as the run placed them (layout)
    layouts = graph.layouts
    times, captured = [], []
    with tf32_mode(ctx.engine.tf32, ctx.device), pdl.mode(ctx.engine.pdl):
        for node, kernel in zip(graph.nodes, ctx.kernels(call.profile)):
            args = [None if v is None else (v.data if v.data is not None else seen[v]) for v in node.inputs]
            convert = [v.name in layouts for v in node.outputs]

            def step(kernel: Any = kernel, args: list[Any] = args, convert: list[bool] = convert) -> None:
                for c, r in zip(convert, kernel(list(args))):
                    if c:
                        to_layout(r)

            t, ok = timed(step, ctx.device, warmup=1, runs=max(runs, 5), max_seconds=0.2)
            times.append(t * 1e3)
            captured.append(ok)
    return times, captured, shapes


def _whole_run_ms(ctx: Any, feeds: Any, runs: int) -> float:
    """The median time of whole runs as users make them (one CUDA-graph replay each), inputs already on the
    device, with CUDA events."""
    import torch

    dev = {k: torch.as_tensor(v).to(ctx.device) if not isinstance(v, torch.Tensor) else v.to(ctx.device)
           for k, v in feeds.items()}
    for _ in range(3):
        ctx.run(dev)
    times = []
    for _ in range(max(runs, 5)):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        ctx.run(dev)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


class _StepTimer:
    """Marks the end of every step on the host clock (CPU engines)."""

    def __init__(self) -> None:
        self.marks: list[Any] = []
        self.shapes: dict[int, list[Any]] = {}

    def start(self) -> None:
        self.marks = [time.perf_counter()]

    def hook(self, i: int, node: Node, outputs: list[Any]) -> None:
        self.marks.append(time.perf_counter())
        self.shapes[i] = [list(o.shape) if hasattr(o, "shape") else None for o in outputs]

    def finish(self) -> list[float]:
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def _attach_times(report: dict[str, Any]) -> None:
    prof = report["profile"]
    total = sum(t for t in prof["steps_ms_median"] if t is not None) or 1.0
    for layer, t in zip(report["layers"], prof["steps_ms_median"]):
        layer["time_ms"] = t
        layer["time_percent"] = None if t is None else 100 * t / total
        layer["observed_output_shapes"] = prof["output_shapes"].get(str(layer["index"]))


# --- text ------------------------------------------------------------------------------------------------


def print_report(r: dict[str, Any]) -> None:
    from kiln.cli.build import human_bytes, mix

    meta = r["metadata"]
    model = meta.get("model", {})
    cfg = meta.get("config", {})
    dev = meta.get("device", {})
    vers = meta.get("versions", {})
    print(f"engine      {r['file']} ({human_bytes(r['size_bytes'])}, format {meta.get('format_version', '?')})")
    print(f"model       {model.get('source', '?')} (graph '{model.get('name', '?')}', opset {model.get('opset', '?')})")
    print(f"built       {meta.get('created', 'no timestamp (deterministic build)')} with kiln {vers.get('kiln')}, "
          f"torch {vers.get('torch')}")
    print(f"device      {dev.get('name', '?')} ({dev.get('arch', '?')}, {dev.get('kind', '?')})")
    print(f"config      {cfg.get('precision', '?')}, tf32 {'on' if cfg.get('tf32') else 'off'}, opt level "
          f"{cfg.get('opt_level', '?')}{', deterministic' if cfg.get('deterministic') else ''}"
          f"{'' if cfg.get('pdl') is None else ', pdl ' + ('on' if cfg['pdl'] else 'off')}")
    for what in ("inputs", "outputs"):
        print(f"{what:11s} " + ", ".join(f"{v['name']} {v['type']}" for v in r[what]))
    for k, p in enumerate(r["profiles"]):
        print(f"profile {k}   " + (", ".join(f"{n} {_range(s)}" for n, s in p.items()) or "static shapes"))
    stats = r["stats"]
    layers = r["layers"]
    print(f"layers      {len(layers)} ({stats.get('nodes_imported', '?')} imported); precision "
          f"{mix(la['precision'] for la in layers)}")
    m = r["memory"]
    print(f"memory      activation arena {human_bytes(m['arena_bytes'])} planned vs {human_bytes(m['naive_bytes'])} "
          f"naive ({m['saved_percent']:g} % less), {m['planned_tensors']} tensors in the arena")
    if "profile" in r:
        p = r["profile"]
        shapes = ", ".join(f"{k}:{'x'.join(map(str, s))}" for k, s in p["input_shapes"].items())
        if "whole_ms_median" in p:
            print(f"profiled    on {p['device']} at {shapes} ({p['timing']}): sum of steps "
                  f"{p['total_ms_median']:.4f} ms; whole engine {p['whole_ms_median']:.4f} ms per run (median of "
                  f"{max(p['runs'], 5)})")
            if p["uncaptured"]:
                print(f"            steps {p['uncaptured']} could not be captured: timed by direct launches "
                      "(their time includes launch gaps)")
        else:
            print(f"profiled    {p['runs']} runs on {p['device']} at {shapes} ({p['timing']}): median total "
                  f"{p['total_ms_median']:.4f} ms")
    print()
    _print_table(layers, "profile" in r)


def _range(s: dict[str, Any]) -> str:
    def f(x: list[int]) -> str:
        return "x".join(map(str, x)) or "scalar"

    return f(s["min"]) if s["min"] == s["max"] else f"{f(s['min'])}..{f(s['max'])} (opt {f(s['opt'])})"


def _io(vals: list[dict[str, Any] | None]) -> str:
    acts = [f"{v['name']}[{','.join(map(str, v['shape'] or []))}]" for v in vals if v and not v["constant"]]
    consts = sum(1 for v in vals if v and v["constant"])
    return ", ".join(acts) + (f" +{consts} const" if consts else "")


def _print_table(layers: list[dict[str, Any]], timed: bool) -> None:
    rows = []
    for la in layers:
        tactics = " | ".join(dict.fromkeys(_tactic(t) for t in la["tactics"]))
        row = [str(la["index"]), la["name"], la["op"], tactics, la["precision"], _io(la["inputs"]), _io(la["outputs"])]
        if timed:
            t = la.get("time_ms")
            row.append("-" if t is None else f"{t:.4f} ({la['time_percent']:.1f}%)")
        rows.append(row)
    head = ["#", "layer", "op", "tactic", "precision", "inputs", "outputs"] + (["time ms"] if timed else [])
    widths = [min(max(len(r[i]) for r in [head, *rows]), 48) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(_cut(c, w).ljust(w) for c, w in zip(r, widths)).rstrip())


def _tactic(t: dict[str, Any]) -> str:
    """A step's tactic with its configuration's values: "triton.int8_conv(128x64x64-w4s4)" (which tile won)."""
    values = ", ".join(str(v) for v in t.get("config", {}).values())
    return f"{t['tactic']}({values})" if values else t["tactic"]


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."
