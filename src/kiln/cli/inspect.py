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
    """Run the engine `args.runs` times (after one warm-up run) and time every step. Step i's time is from the
    end of step i-1 to the end of step i, so it includes the runtime's own work between kernels (arena placement,
    freeing); on a GPU the marks are CUDA events on the current stream."""
    from kiln.cli.common import check_names, engine_shapes, make_feeds, random_spec, read_inputs
    from kiln.utils.errors import KilnError

    if args.runs < 1:
        raise KilnError(f"--runs must be >= 1, got {args.runs}")
    given = read_inputs(args.input)
    shapes = runtime_shapes(args)
    check_names(engine.graph, given, shapes)
    feeds, made = make_feeds(engine.graph.inputs, given, engine_shapes(engine, shapes), random_spec(args))
    ctx = engine.create_context()
    timer = _StepTimer(engine)
    call = ctx.prepare(feeds)
    ctx.execute(call.profile, call.env, call.bindings)  # warm-up: builds kernels and the arena
    per_step: list[list[float]] = [[] for _ in engine.plan.graph.nodes]
    totals = []
    shapes_seen: dict[int, list[Any]] = {}
    for _ in range(args.runs):
        call = ctx.prepare(feeds)
        timer.start()
        ctx.execute(call.profile, call.env, call.bindings, hook=timer.hook)
        steps = timer.finish()
        for i, t in enumerate(steps):
            per_step[i].append(t)
        totals.append(sum(steps))
        shapes_seen = timer.shapes
    return {
        "runs": args.runs, "device": str(engine.device), "profile_index": call.profile,
        "input_shapes": {k: list(getattr(v, "shape", ())) for k, v in feeds.items()}, "random_inputs": made,
        "total_ms_median": statistics.median(totals) * 1e3,
        "steps_ms_median": [statistics.median(ts) * 1e3 if ts else None for ts in per_step],
        "output_shapes": {str(i): s for i, s in shapes_seen.items()},
        "timing": "CUDA events" if engine.device.type == "cuda" else "host clock",
    }


class _StepTimer:
    """Marks the end of every step: host clock on the CPU, CUDA events on a GPU (read after the run)."""

    def __init__(self, engine: Engine) -> None:
        self.cuda = engine.device.type == "cuda"
        self.marks: list[Any] = []
        self.shapes: dict[int, list[Any]] = {}

    def _mark(self) -> Any:
        if self.cuda:
            import torch

            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def start(self) -> None:
        self.marks = [self._mark()]

    def hook(self, i: int, node: Node, outputs: list[Any]) -> None:
        self.marks.append(self._mark())
        self.shapes[i] = [list(o.shape) if hasattr(o, "shape") else None for o in outputs]

    def finish(self) -> list[float]:
        if self.cuda:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
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
          f"{cfg.get('opt_level', '?')}{', deterministic' if cfg.get('deterministic') else ''}")
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
        tactics = " | ".join(dict.fromkeys(t["tactic"] for t in la["tactics"]))
        row = [str(la["index"]), la["name"], la["op"], tactics, la["precision"], _io(la["inputs"]), _io(la["outputs"])]
        if timed:
            t = la.get("time_ms")
            row.append("-" if t is None else f"{t:.4f} ({la['time_percent']:.1f}%)")
        rows.append(row)
    head = ["#", "layer", "op", "tactic", "precision", "inputs", "outputs"] + (["time ms"] if timed else [])
    widths = [min(max(len(r[i]) for r in [head, *rows]), 48) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(_cut(c, w).ljust(w) for c, w in zip(r, widths)).rstrip())


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."
