"""`kiln compare MODEL.onnx [--engine MODEL.kiln]`: run kiln and onnxruntime on the same inputs and compare.

Per output: error statistics (max / mean / median absolute and relative error, cosine similarity) and PASSED or
FAILED. The check follows Polygraphy's: with `--check-error-stat elemwise` (the default) an element fails only
when it exceeds both atol and rtol; with max / mean / median, that statistic of the absolute error must be within
atol or the same statistic of the relative error within rtol. The relative error is |kiln - ort| / |ort|.
Unless --atol is given, atol is scaled per tensor: the default tolerance times the root mean square of
onnxruntime's values, because rounding errors grow with the values (an absolute 1e-4 fails correct fp32 engines
on tensors of magnitude 100, and says nothing on tensors of magnitude 1e-6). The RMS, not the max, so that one
outlier does not excuse large errors on the other values.

`--per-layer` also compares every intermediate tensor that survives optimization: onnxruntime exposes them as
extra graph outputs of a copy of the model, and the first layer (in execution order) that fails is named.
Exit code 0 only when everything compared passes; 1 when something fails; 2 on a usage error.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kiln.cli.shapes import add_shape_args, fmt, runtime_shapes

if TYPE_CHECKING:
    import numpy as np

    from kiln.runtime.engine import Engine

STATS = ("elemwise", "max", "mean", "median")
# Default tolerances by what the engine computes in: (rtol, atol).
# (rtol, atol as a fraction of the tensor's RMS) by what the engine computes in. fp32: correct CPU engines
# (ResNet-18, MiniLM, every intermediate tensor) reach 3e-4 absolute where the relative error is also > 1e-5, so
# Polygraphy's 1e-5 fails them; the GPU rows are wider by the formats' epsilon.
DEFAULT_TOL = {"fp32": (1e-4, 1e-4), "tf32": (1e-2, 1e-2), "fp16": (2e-2, 2e-2), "bf16": (1e-1, 1e-1)}


@dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float
    scaled: bool
    """atol is a fraction of each reference tensor's root mean square (the default), not absolute."""
    stat: str = "elemwise"

    def atol_for(self, ref: Any) -> float:
        import numpy as np

        if not self.scaled:
            return self.atol
        r = np.asarray(ref)
        if r.dtype.kind not in "biufc" or not r.size:
            return self.atol
        finite = np.abs(r[np.isfinite(r)] if r.dtype.kind in "fc" else r).astype(np.float64)
        return self.atol * float(np.sqrt(np.mean(finite**2))) if finite.size else self.atol

    def check(self, a: Any, b: Any) -> dict[str, Any]:
        atol = self.atol_for(b)
        r = compare_arrays(a, b, self.rtol, atol, self.stat)
        r["atol"] = atol
        return r

    def __str__(self) -> str:
        atol = f"{self.atol:g} x RMS of each onnxruntime tensor" if self.scaled else f"{self.atol:g}"
        return f"rtol {self.rtol:g}, atol {atol}, check {self.stat}"


def add_parser(sub: Any) -> None:
    from kiln.cli.common import add_device_arg, add_input_args

    p = sub.add_parser("compare", help="compare kiln's outputs with onnxruntime's on the same inputs",
                       description="Run kiln (an engine file, or MODEL built in memory) and onnxruntime on the same "
                                   "inputs and compare every output; --per-layer compares every intermediate tensor "
                                   "that survives optimization and names the first layer that diverges. Exit code 0 "
                                   "only when all pass.")
    p.add_argument("model", help="the .onnx model (onnxruntime runs it)")
    p.add_argument("--engine", default=None, metavar="FILE",
                   help="a .kiln engine built from MODEL (default: build MODEL in memory)")
    p.add_argument("--rtol", type=float, default=None,
                   help="relative tolerance (default by the engine's precision: fp32 1e-4, tf32 1e-2, fp16 2e-2, "
                        "bf16 1e-1)")
    p.add_argument("--atol", type=float, default=None,
                   help="absolute tolerance (default: the --rtol default times each reference tensor's RMS)")
    p.add_argument("--check-error-stat", choices=STATS, default="elemwise",
                   help="elemwise (default): every element within atol or rtol; max/mean/median: that statistic")
    p.add_argument("--per-layer", action="store_true",
                   help="compare every intermediate tensor that survives optimization; name the first divergence")
    add_input_args(p)
    add_shape_args(p, profiles=False)
    add_device_arg(p)
    p.add_argument("--retune", action="store_true", help="re-tune an engine built for another device")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kiln.cli.common import input_note, is_engine_file, open_model, random_spec, read_inputs, require_file
    from kiln.utils.errors import KilnError

    require_file(args.model, "model file")
    if is_engine_file(args.model):
        raise KilnError(f"'{args.model}' is a kiln engine; compare takes the ONNX model it was built from",
                        hint=f"kiln compare MODEL.onnx --engine {args.model}")
    io = onnx_io(args.model)
    if args.engine:
        require_file(args.engine, "engine file")
        if not is_engine_file(args.engine):
            raise KilnError(f"--engine '{args.engine}' is not a kiln engine file",
                            hint="build one with `kiln build MODEL.onnx -o MODEL.kiln`, or leave --engine out")
    rand = random_spec(args)
    opened, feeds, made = open_model(args.engine or args.model, args.device, read_inputs(args.input),
                                     runtime_shapes(args), rand, args.retune)
    engine = opened.engine
    stale = check_match(engine, io, args.engine, args.model)
    tol = tolerances(engine, args.rtol, args.atol, args.check_error_stat)
    print(f"kiln compare: {args.model}: kiln ({args.engine or 'built in memory'}, {engine.device}) vs onnxruntime "
          f"(CPU)")
    if stale:
        print(f"  note: {stale}")
    note = input_note(made, rand)
    if note:
        print(f"  note: {note}")
    print("  inputs: " + ", ".join(f"{k}:{fmt(getattr(v, 'shape', ()))}" for k, v in feeds.items()))
    print(f"  tolerance: {tol}")
    outputs, steps = run_kiln(engine, feeds, per_layer=args.per_layer)
    extra = layer_tensors(steps, io) if args.per_layer else []
    ref = run_ort(args.model, feeds, [name for _, _, name in extra])
    failed = compare_outputs(outputs, ref, tol)
    layers = compare_layers(steps, extra, ref, tol) if args.per_layer else []
    return verdict(failed, layers, len(outputs), len(extra), args.per_layer)


def verdict(failed: list[str], layers: list[tuple[str, str]], n_out: int, n_layers: int, per_layer: bool) -> int:
    if not failed and not layers:
        print(f"PASSED | all {n_out} outputs matched" + (f" and {n_layers} intermediate tensors" if per_layer else ""))
        return 0
    parts = [f"mismatched outputs: {failed}"] if failed else [f"all {n_out} outputs matched"]
    if layers:
        parts.append(f"{len(layers)} of {n_layers} intermediate tensors differ, the first at layer '{layers[0][0]}'")
    print("FAILED | " + "; ".join(parts))
    return 1


# --- the model's I/O and the engine -----------------------------------------------------------------------


def onnx_io(path: str) -> dict[str, Any]:
    """The ONNX model's inputs (initializers excluded), outputs, and every tensor a node produces."""
    import onnx

    from kiln.utils.errors import ModelLoadError

    try:
        m = onnx.load(path, load_external_data=False)
    except Exception as e:
        raise ModelLoadError(f"cannot read '{path}' as an ONNX model: {type(e).__name__}: {e}") from None
    inits = {t.name for t in m.graph.initializer}
    produced = {o for n in m.graph.node for o in n.output if o}
    inputs = [v for v in m.graph.input if v.name not in inits]
    return {"inputs": [v.name for v in inputs], "outputs": [v.name for v in m.graph.output], "produced": produced,
            "types": {v.name: _onnx_type(v) for v in inputs}}


def _onnx_type(v: Any) -> tuple[str | None, int | None]:
    """(numpy dtype name, rank) of a tensor input; None where the model does not say."""
    import onnx

    t = v.type.tensor_type if v.type.HasField("tensor_type") else None
    if t is None:
        return None, None
    try:
        dtype: str | None = str(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type))
    except (KeyError, ValueError, TypeError):
        dtype = None
    return dtype, len(t.shape.dim) if t.HasField("shape") else None


def check_match(engine: Engine, io: Mapping[str, Any], engine_path: str | None, model: str) -> str | None:
    """An engine for other inputs or outputs is a usage error, named; one built from a file of another name is
    worth a note (returned)."""
    from kiln.utils.errors import KilnError

    ins = [v.name for v in engine.graph.inputs]
    outs = [v.name for v in engine.graph.outputs]
    if sorted(ins) != sorted(io["inputs"]) or sorted(outs) != sorted(io["outputs"]):
        raise KilnError(f"engine '{engine_path}' does not match '{model}': the engine takes {ins} -> {outs}, the "
                        f"model {io['inputs']} -> {io['outputs']}",
                        hint="rebuild the engine from this model with `kiln build`")
    for v in engine.graph.inputs:
        dtype, rank = io["types"].get(v.name, (None, None))
        mine = (str(v.dtype.numpy), v.rank) if v.is_tensor else (None, None)
        if (dtype and mine[0] and dtype != mine[0]) or (rank is not None and mine[1] is not None and rank != mine[1]):
            raise KilnError(f"engine '{engine_path}' does not match '{model}': input '{v.name}' is {v.type} in the "
                            f"engine, {dtype} of rank {rank} in the model",
                            hint="rebuild the engine from this model with `kiln build`")
    src = engine.metadata.get("model", {}).get("source")
    if engine_path and src and src != os.path.basename(model):
        return f"the engine was built from '{src}', not '{os.path.basename(model)}'"
    return None


def tolerances(engine: Engine, rtol: float | None, atol: float | None, stat: str) -> Tolerance:
    cfg = engine.metadata.get("config", {})
    key = cfg.get("precision", "fp32")
    if key == "fp32" and cfg.get("tf32", True) and engine.device.type == "cuda":
        key = "tf32"
    r, a = DEFAULT_TOL.get(key, DEFAULT_TOL["fp32"])
    return Tolerance(r if rtol is None else rtol, a if atol is None else atol, atol is None, stat)


# --- running both -----------------------------------------------------------------------------------------


Step = tuple[int, Any, dict[str, Any]]
"""(step index, node, {output name: value as numpy})"""


def run_kiln(engine: Engine, feeds: Mapping[str, Any], per_layer: bool) -> tuple[dict[str, Any], list[Step]]:
    """The outputs by name, and with per_layer every step's outputs (copied as they are made: the arena reuses
    their memory later)."""
    from kiln.ir.convert import to_numpy

    ctx = engine.create_context()
    if not per_layer:
        return ctx.run(dict(feeds)), []
    steps: list[Step] = []

    def hook(i: int, node: Any, outs: list[Any]) -> None:
        got = {}
        for v, x in zip(node.outputs, outs):
            if v.is_tensor and hasattr(x, "detach"):
                got[v.name] = to_numpy(x.detach().cpu().clone(), v.dtype)
        steps.append((i, node, got))

    call = ctx.prepare(dict(feeds))
    results = ctx.execute(call.profile, call.env, call.bindings, hook=hook)
    return ctx.finish(call, results), steps


def layer_tensors(steps: Sequence[Step], io: Mapping[str, Any]) -> list[tuple[int, Any, str]]:
    """(step, node, tensor) for every step output that onnxruntime can expose: a tensor some ONNX node produces
    under the same name, that is not already a model output."""
    outs = set(io["outputs"])
    return [(i, node, name) for i, node, got in steps for name in got if name in io["produced"] and name not in outs]


def run_ort(path: str, feeds: Mapping[str, Any], extra: Sequence[str]) -> dict[str, Any]:
    """onnxruntime's outputs (and the `extra` intermediate tensors, as added graph outputs) by name."""
    import onnxruntime as ort

    from kiln.utils.errors import KilnError

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        sess = ort.InferenceSession(_with_outputs(path, extra), opts, providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]
        missing = [n for n in names if n not in feeds]
        if missing:
            raise KilnError(f"onnxruntime needs input '{missing[0]}', which kiln's engine does not take")
        out_names = [o.name for o in sess.get_outputs()]
        values = sess.run(out_names, {n: feeds[n] for n in names})
    except KilnError:
        raise
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise KilnError(f"onnxruntime could not run '{path}': {msg}") from None
    return dict(zip(out_names, values))


def _with_outputs(path: str, extra: Sequence[str]) -> Any:
    """The model path as is, or a copy with `extra` tensors added as graph outputs (bytes; a temporary file with
    external data when it is too large for one protobuf)."""
    if not extra:
        return path
    import onnx

    m = onnx.load(path)
    m.graph.output.extend(onnx.ValueInfoProto(name=n) for n in extra)
    if m.ByteSize() < 1_900_000_000:
        return m.SerializeToString()
    import tempfile

    folder = tempfile.mkdtemp(prefix="kiln-compare-")
    out = os.path.join(folder, "model.onnx")
    onnx.save(m, out, save_as_external_data=True, location="model.data")
    return out


# --- comparing ---------------------------------------------------------------------------------------------


def compare_arrays(a: Any, b: Any, rtol: float, atol: float, stat: str = "elemwise") -> dict[str, Any]:
    """Error statistics of kiln's `a` against the reference `b`, and whether they pass."""
    import numpy as np

    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return {"passed": False, "reason": f"shape {list(a.shape)} vs onnxruntime {list(b.shape)}"}
    if a.dtype.kind in "USO" or b.dtype.kind in "USO":
        same = bool(np.array_equal(a, b))
        return {"passed": same, "reason": None if same else "values differ (exact comparison)"}
    x, y = _as_float(a), _as_float(b)
    absd = _abs_diff(x, y)
    with np.errstate(divide="ignore", invalid="ignore"):
        reld = np.where(absd == 0, 0.0, absd / np.abs(y))
    out: dict[str, Any] = {"numel": int(a.size), "cosine": _cosine(x, y)}
    if a.size:
        k = int(np.argmax(absd))
        out.update({
            "max_abs": float(absd.max()), "max_abs_at": [int(i) for i in np.unravel_index(k, a.shape)],
            "mean_abs": float(absd.mean()), "median_abs": float(np.median(absd)),
            "max_rel": float(reld.max()), "mean_rel": float(reld.mean()), "median_rel": float(np.median(reld)),
        })
    bad = (absd > atol) & (reld > rtol)
    out["mismatched"] = int(bad.sum())
    out["passed"] = not bad.any() if stat == "elemwise" or not a.size else bool(
        out[f"{stat}_abs"] <= atol or out[f"{stat}_rel"] <= rtol)
    if a.dtype != b.dtype:
        out["note"] = f"dtypes differ: kiln {a.dtype}, onnxruntime {b.dtype}"
    return out


def _as_float(a: np.ndarray) -> np.ndarray:
    import numpy as np

    return a.astype(np.complex128 if a.dtype.kind == "c" else np.float64)


def _abs_diff(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """|x - y|, with NaN == NaN and equal infinities counting as no error, a lone NaN as an infinite one."""
    import numpy as np

    with np.errstate(invalid="ignore", over="ignore"):
        d = np.asarray(np.abs(x - y), dtype=np.float64)
    both_nan = np.isnan(x) & np.isnan(y)
    same_inf = np.isinf(x) & np.isinf(y) & (x == y)
    d[both_nan | same_inf] = 0.0
    d[np.isnan(d)] = np.inf
    return d


def _cosine(x: np.ndarray, y: np.ndarray) -> float:
    import numpy as np

    ok = np.isfinite(x) & np.isfinite(y)
    xf, yf = x[ok].ravel(), y[ok].ravel()
    nx, ny = float(np.linalg.norm(xf)), float(np.linalg.norm(yf))
    if nx == 0 and ny == 0:
        return 1.0
    if nx == 0 or ny == 0:
        return 0.0
    return float(np.real(np.vdot(yf, xf)) / (nx * ny))


def compare_outputs(kiln_out: Mapping[str, Any], ref: Mapping[str, Any], tol: Tolerance) -> list[str]:
    from kiln.cli.common import describe_array, dtype_name

    failed = []
    for name, a in kiln_out.items():
        b = ref[name]
        if isinstance(a, list) or isinstance(b, list):
            r = _compare_sequences(a, b, tol)
        else:
            r = tol.check(a, b)
        shape = fmt(getattr(b, "shape", None)) if not isinstance(b, list) else f"sequence of {len(b)}"
        print(f"output '{name}'  {dtype_name(b)} [{shape}]")
        if not isinstance(a, list) and r.get("numel"):
            print(f"  kiln         {describe_array(a, 3)}")
            print(f"  onnxruntime  {describe_array(b, 3)}")
        _print_errors(r)
        verdict = "PASSED" if r["passed"] else "FAILED"
        why = "within tolerance" if r["passed"] else (r.get("reason") or "exceeds tolerance")
        atol = f", atol {r['atol']:.3g}" if "atol" in r else ""
        print(f"  {verdict} | output '{name}' | {why} (rtol {tol.rtol:g}{atol}, {tol.stat})")
        if not r["passed"]:
            failed.append(name)
    return failed


def _compare_sequences(a: Any, b: Any, tol: Tolerance) -> dict[str, Any]:
    if not (isinstance(a, list) and isinstance(b, list)) or len(a) != len(b):
        return {"passed": False, "reason": "sequence lengths or kinds differ"}
    parts = [tol.check(x, y) for x, y in zip(a, b)]
    bad = [i for i, p in enumerate(parts) if not p["passed"]]
    return {"passed": not bad, "reason": f"elements {bad} differ" if bad else None}


def _print_errors(r: Mapping[str, Any]) -> None:
    if "max_abs" not in r:
        return
    at = ",".join(map(str, r["max_abs_at"]))
    print(f"  abs error    max {r['max_abs']:.4g} (at [{at}])  mean {r['mean_abs']:.4g}  median {r['median_abs']:.4g}")
    print(f"  rel error    max {r['max_rel']:.4g}  mean {r['mean_rel']:.4g}  median {r['median_rel']:.4g}")
    print(f"  cosine similarity {r['cosine']:.8f}; {r['mismatched']} of {r['numel']} elements exceed both "
          f"tolerances")
    if r.get("note"):
        print(f"  note: {r['note']}")


def compare_layers(steps: Sequence[Step], extra: Sequence[tuple[int, Any, str]], ref: Mapping[str, Any],
                   tol: Tolerance) -> list[tuple[str, str]]:
    """Compare every exposed intermediate tensor in execution order; returns the failed (layer, tensor)."""
    got = {name: vals[name] for _, _, vals in steps for name in vals}
    print(f"per-layer: {len(extra)} intermediate tensors that survive optimization, compared in execution order")
    print(f"  {'#':>4}  {'layer':32s} {'tensor':32s} {'shape':16s} {'max abs':>10s} {'max rel':>10s} {'cosine':>11s}")
    failed = []
    for i, node, name in extra:
        r = tol.check(got[name], ref[name])
        row = (f"  {i:>4}  {_cut(node.name, 32):32s} {_cut(name, 32):32s} "
               f"{_cut(fmt(getattr(ref[name], 'shape', None)), 16):16s}")
        if "max_abs" in r:
            row += f" {r['max_abs']:10.3g} {r['max_rel']:10.3g} {r['cosine']:11.8f}"
        print(f"{row}  {'PASSED' if r['passed'] else 'FAILED'}" + (f" ({r['reason']})" if r.get("reason") else ""))
        if not r["passed"]:
            failed.append((node.name, name))
    if failed:
        layer, name = failed[0]
        node = next(n for _, n, t in extra if t == name)
        print(f"first divergence: layer '{layer}' ({node.op}), tensor '{name}'")
    elif extra:
        print("no layer diverges")
    return failed


def _cut(text: str, n: int) -> str:
    """Long ONNX names differ at their ends ('/layer4/layer4.1/conv2/Conv'): keep the end."""
    return text if len(text) <= n else "..." + text[len(text) - n + 3:]
