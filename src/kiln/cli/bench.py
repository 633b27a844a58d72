"""`kiln bench MODEL.(kiln|onnx)`: a trtexec-style performance report.

Every query runs the three phases of `ExecutionContext.run` separately and times each one:
prepare (inputs -> device: "H2D"), execute (the plan's steps: "compute"; its host time is the "enqueue" time)
and finish (outputs -> numpy: "D2H"). On a GPU the phases are timed with CUDA events on the current stream and
the enqueue time with the host clock; on the CPU everything is host time and execute is synchronous, so enqueue
time equals compute time there (the report says so).
"""

from __future__ import annotations

import argparse
import json
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from kiln.cli.shapes import add_shape_args, fmt, runtime_shapes

METRICS = ("latency", "enqueue", "h2d", "compute", "d2h")
LABELS = {"latency": "Latency", "enqueue": "Enqueue time", "h2d": "H2D latency", "compute": "Compute time",
          "d2h": "D2H latency"}
ROTATE = 3  # random input sets cycled through, so caches don't flatter
MIN_QUERIES = 10
# Queries run one after another, so compute (event to event around execute) can't end before the last launch:
# compute >= enqueue always, and enqueue close to compute means the GPU spends the query waiting for launches.
ENQUEUE_BOUND = 0.9

DEFINITIONS = {
    "cpu": "on the CPU there is no separate device memory and no asynchronous launch: H2D = checking the numpy "
           "inputs and binding them as torch tensors (prepare), compute = host time of running the plan (execute), "
           "enqueue = the same host time (execute is synchronous, so no enqueue-bound check is made), D2H = exporting "
           "the outputs to numpy (finish); latency = the whole query, end to end; throughput = queries / host "
           "walltime.",
    "cuda": "H2D (prepare: inputs copied to the GPU), compute (execute) and D2H (finish: outputs copied to numpy) "
            "are CUDA-event times on the current stream; enqueue = host time of the execute call; latency = the "
            "whole query on the stream, end to end; throughput = queries / host walltime.",
}


def add_parser(sub: Any) -> None:
    from kiln.cli.common import add_device_arg, add_input_args

    p = sub.add_parser("bench", help="measure throughput and latency (trtexec-style report)",
                       description="Run MODEL repeatedly and report throughput and latency, enqueue, H2D, compute "
                                   "and D2H times (min / mean / median / percentiles / max), with warnings when the "
                                   "run is enqueue-bound or the compute time is unstable.")
    p.add_argument("model", help="a .kiln engine file or an .onnx model (built in memory first)")
    add_input_args(p)
    add_shape_args(p, profiles=False)
    how = p.add_mutually_exclusive_group()
    how.add_argument("--iterations", type=int, default=None, metavar="N", help="run exactly N timed queries")
    how.add_argument("--duration", type=float, default=None, metavar="S",
                     help=f"run timed queries for S seconds, at least {MIN_QUERIES} (default 3)")
    p.add_argument("--warmup", type=float, default=0.2, metavar="S", help="warm up for S seconds first (default 0.2)")
    p.add_argument("--percentiles", default="90,95,99", metavar="P,...",
                   help="percentiles to report (default 90,95,99)")
    p.add_argument("--cov-warn", type=float, default=5.0, metavar="PCT",
                   help="warn when the compute time's coefficient of variation exceeds PCT %% (default 5)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the report, with every query, as JSON")
    add_device_arg(p)
    p.add_argument("--retune", action="store_true", help="re-tune an engine built for another device")
    p.set_defaults(func=run)


@dataclass
class Query:
    """One timed query, in seconds."""

    start: float
    h2d: float
    enqueue: float
    compute: float
    d2h: float
    latency: float


Runner = Callable[[Any], Query]


def run(args: argparse.Namespace) -> int:
    from kiln.cli.common import input_note, make_feeds, open_model, random_spec, read_inputs
    from kiln.utils.errors import KilnError

    percentiles = _percentiles(args.percentiles)
    if args.iterations is not None and args.iterations < 1:
        raise KilnError(f"--iterations must be >= 1, got {args.iterations}")
    rand = random_spec(args)
    given = read_inputs(args.input)
    opened, feeds, made = open_model(args.model, args.device, given, runtime_shapes(args), rand, args.retune)
    engine = opened.engine
    sets = [feeds]
    if made:  # more random sets, same shapes
        shapes = {k: tuple(getattr(v, "shape", ())) for k, v in feeds.items()}
        sets += [make_feeds(engine.graph.inputs, given, shapes, rand, k)[0] for k in range(1, ROTATE)]
    ctx = engine.create_context()
    runner = make_runner(ctx, engine.device)
    print(f"kiln bench: {args.model} on {engine.device} ({engine.device_info.short()})")
    if opened.from_onnx:
        print(f"  built in memory in {opened.build_seconds:.2f} s")
    print("  inputs: " + ", ".join(f"{k}:{fmt(getattr(v, 'shape', ()))}" for k, v in feeds.items()))
    note = input_note(made, rand)
    if note:
        print(f"  note: {note}; {len(sets)} sets in rotation")
    cold, n_warm, t_warm = warm_up(runner, sets, args.warmup)
    print(f"  profile {ctx.last_profile}; first (cold) query {cold * 1e3:.1f} ms; warm-up: {n_warm} queries in "
          f"{t_warm:.2f} s")
    queries, wall = measure(runner, sets, args.iterations, args.duration)
    report = make_report(queries, wall, percentiles, engine.device.type, args.cov_warn)
    report.update({"model": args.model, "device": str(engine.device), "device_name": engine.device_info.short(),
                   "profile": ctx.last_profile, "random_inputs": made, "seed": args.seed,
                   "shapes": {k: list(getattr(v, "shape", ())) for k, v in feeds.items()}})
    print_report(report, percentiles)
    if args.json:
        report["trace_ms"] = [{k: round(v * 1e3, 6) for k, v in asdict(q).items()} for q in queries]
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"  report written to {args.json}")
    return 0


def _percentiles(text: str) -> list[float]:
    from kiln.utils.errors import KilnError

    try:
        ps = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise KilnError(f"bad --percentiles '{text}': expected numbers like 90,95,99") from None
    if not ps or any(not 0 <= p <= 100 for p in ps):
        raise KilnError(f"bad --percentiles '{text}': each must be in [0, 100]")
    return ps


# --- timing --------------------------------------------------------------------------------------------


def make_runner(ctx: Any, device: Any) -> Runner:
    return _cuda_runner(ctx) if device.type == "cuda" else _host_runner(ctx)


def _host_runner(ctx: Any) -> Runner:
    def query(feeds: Any) -> Query:
        t0 = time.perf_counter()
        call = ctx.prepare(feeds)
        t1 = time.perf_counter()
        results = ctx.execute(call.profile, call.env, call.bindings)
        t2 = time.perf_counter()
        ctx.finish(call, results)
        t3 = time.perf_counter()
        return Query(t0, t1 - t0, t2 - t1, t2 - t1, t3 - t2, t3 - t0)

    return query


def _cuda_runner(ctx: Any) -> Runner:
    import torch

    events = [torch.cuda.Event(enable_timing=True) for _ in range(4)]

    def query(feeds: Any) -> Query:
        t0 = time.perf_counter()
        events[0].record()
        call = ctx.prepare(feeds)
        events[1].record()
        h0 = time.perf_counter()
        results = ctx.execute(call.profile, call.env, call.bindings)
        h1 = time.perf_counter()
        events[2].record()
        ctx.finish(call, results)
        events[3].record()
        events[3].synchronize()
        ms = [events[i].elapsed_time(events[i + 1]) / 1e3 for i in range(3)]
        return Query(t0, ms[0], h1 - h0, ms[1], ms[2], events[0].elapsed_time(events[3]) / 1e3)

    return query


def warm_up(runner: Runner, sets: Sequence[Any], seconds: float) -> tuple[float, int, float]:
    """One cold query (it builds the kernels and the arena), then warm queries until `seconds` have passed.
    Returns (cold query seconds, warm queries, their seconds)."""
    t0 = time.perf_counter()
    runner(sets[0])
    t1 = time.perf_counter()
    n = 0
    while time.perf_counter() - t1 < seconds:
        runner(sets[(n + 1) % len(sets)])
        n += 1
    return t1 - t0, n, time.perf_counter() - t1


def measure(runner: Runner, sets: Sequence[Any], iterations: int | None, duration: float | None
            ) -> tuple[list[Query], float]:
    """Exactly `iterations` queries, or queries for `duration` seconds (default 3), at least MIN_QUERIES."""
    limit = None if iterations is not None else (3.0 if duration is None else duration)
    queries: list[Query] = []
    t0 = time.perf_counter()
    while True:
        queries.append(runner(sets[len(queries) % len(sets)]))
        elapsed = time.perf_counter() - t0
        if iterations is not None and len(queries) >= iterations:
            break
        if limit is not None and elapsed >= limit and len(queries) >= MIN_QUERIES:
            break
    return queries, time.perf_counter() - t0


# --- the report ------------------------------------------------------------------------------------------


def stats(xs: Sequence[float], percentiles: Sequence[float]) -> dict[str, float]:
    """min / mean / median / percentiles / max / std in milliseconds, and the coefficient of variation (%)."""
    import numpy as np

    a = np.asarray(xs, dtype=np.float64) * 1e3
    out = {"min": float(a.min()), "mean": float(a.mean()), "median": float(np.median(a))}
    for p in percentiles:
        out[f"p{p:g}"] = float(np.percentile(a, p))
    out.update({"max": float(a.max()), "std": float(a.std()),
                "cov_percent": float(100 * a.std() / a.mean()) if a.mean() > 0 else 0.0})
    return out


def make_report(queries: Sequence[Query], wall: float, percentiles: Sequence[float], device_kind: str,
                cov_warn: float) -> dict[str, Any]:
    metrics = {m: stats([getattr(q, m) for q in queries], percentiles) for m in METRICS}
    report: dict[str, Any] = {
        "queries": len(queries), "walltime_s": wall, "throughput_qps": len(queries) / wall if wall > 0 else 0.0,
        "total_compute_s": sum(q.compute for q in queries), "metrics_ms": metrics,
        "definitions": DEFINITIONS.get(device_kind, DEFINITIONS["cpu"]),
    }
    report["warnings"] = warnings(metrics, len(queries), device_kind, cov_warn)
    return report


def warnings(m: dict[str, dict[str, float]], n: int, device_kind: str, cov_warn: float) -> list[str]:
    out = []
    compute = m["compute"]["median"]
    enqueue = m["enqueue"]["median"]
    if device_kind == "cuda" and enqueue >= ENQUEUE_BOUND * compute:
        share = 100 * enqueue / compute
        out.append(f"enqueue-bound: launching a query takes {enqueue:.3f} ms on the host, {share:.0f} % of the "
                   f"{compute:.3f} ms compute time: the GPU waits for the host (a CUDA graph would help)")
    transfer = m["h2d"]["median"] + m["d2h"]["median"]
    if transfer > compute:
        out.append(f"transfer-bound: H2D + D2H take {transfer:.3f} ms per query, more than compute "
                   f"({compute:.3f} ms); the latency is mostly moving data")
    cov = m["compute"]["cov_percent"]
    if cov > cov_warn:
        fix = "lock the GPU clocks" if device_kind == "cuda" else "quiet the machine or pin the process to cores"
        out.append(f"compute time is unstable: coefficient of variation {cov:.1f} % (> {cov_warn:g} %); "
                   f"{fix} for steadier numbers")
    if n < MIN_QUERIES:
        out.append(f"only {n} queries were timed: the percentiles are rough")
    return out


def print_report(r: dict[str, Any], percentiles: Sequence[float]) -> None:
    cols = ["min", "mean", "median", *(f"p{p:g}" for p in percentiles), "max"]
    print(f"  timing trace: {r['queries']} queries over {r['walltime_s']:.3f} s")
    print("=== Performance summary ===")
    print(f"  Throughput: {r['throughput_qps']:.2f} qps")
    print(f"  {'(ms)':14s}" + "".join(f"{c:>11s}" for c in cols))
    for m in METRICS:
        row = r["metrics_ms"][m]
        print(f"  {LABELS[m]:14s}" + "".join(f"{row[c]:11.4f}" for c in cols))
    print(f"  Total host walltime: {r['walltime_s']:.3f} s")
    print(f"  Total compute time: {r['total_compute_s']:.3f} s")
    print(f"  Compute time coefficient of variation: {r['metrics_ms']['compute']['cov_percent']:.2f} %")
    for w in r["warnings"]:
        print(f"warning: {w}")
    print(textwrap.fill(f"note: {r['definitions']}", width=110, subsequent_indent="  "))
