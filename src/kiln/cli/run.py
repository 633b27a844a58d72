"""`kiln run MODEL.(kiln|onnx) --input NAME=FILE.npy ...`: run once, describe the outputs, save them as .npy.

An ONNX model is built in memory first, at the shapes of its inputs. Inputs not given are random (seeded), and
the command says so.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from kiln.cli.shapes import add_shape_args, fmt, runtime_shapes


def add_parser(sub: Any) -> None:
    from kiln.cli.common import add_device_arg, add_input_args

    p = sub.add_parser("run", help="run an engine (or an ONNX model, built in memory) once and show its outputs",
                       description="Run MODEL once on the given inputs (random, seeded, for those not given), print "
                                   "every output's name, shape, dtype and a value summary, and with --output-dir save "
                                   "them as .npy (and the inputs used as inputs.npz).")
    p.add_argument("model", help="a .kiln engine file or an .onnx model")
    add_input_args(p)
    add_shape_args(p, profiles=False)
    p.add_argument("--output-dir", default=None, metavar="DIR", help="save outputs as DIR/NAME.npy")
    add_device_arg(p)
    p.add_argument("--retune", action="store_true", help="re-tune an engine built for another device")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kiln.cli.common import input_note, open_model, random_spec, read_inputs

    rand = random_spec(args)
    given = read_inputs(args.input)
    opened, feeds, made = open_model(args.model, args.device, given, runtime_shapes(args), rand, args.retune)
    engine = opened.engine
    print(f"kiln run: {args.model} on {engine.device}")
    if opened.from_onnx:
        print(f"  built in memory in {opened.build_seconds:.2f} s (fixed shapes of the inputs below)")
    note = input_note(made, rand)
    if note:
        print(f"  note: {note}")
    for name, x in feeds.items():
        print(f"  input   {name}  {_kind(x)}")
    ctx = engine.create_context()
    t0 = time.perf_counter()
    outputs = ctx.run(feeds)
    seconds = time.perf_counter() - t0
    print(f"  ran in {seconds * 1e3:.2f} ms (one cold run, not a benchmark: `kiln bench` times it)")
    for name, y in outputs.items():
        print(f"  output  {name}  {_kind(y)}")
        print(f"          {_summary(y)}")
    if args.output_dir:
        saved = save_outputs(args.output_dir, outputs, feeds)
        print(f"saved {len(saved)} outputs to {args.output_dir}: {', '.join(saved)} (inputs in inputs.npz)")
    return 0


def _kind(x: Any) -> str:
    from kiln.cli.common import dtype_name

    if isinstance(x, list):
        return f"sequence of {len(x)}" + (f" ({_kind(x[0])}, ...)" if x else "")
    if x is None:
        return "None (empty optional)"
    shape = getattr(x, "shape", None)
    return f"{dtype_name(x)} [{fmt(shape) if shape is not None else '?'}]"


def _summary(y: Any) -> str:
    from kiln.cli.common import describe_array

    if isinstance(y, list):
        return "; ".join(f"[{i}] {describe_array(e)}" for i, e in enumerate(y[:3])) + (" ..." if len(y) > 3 else "")
    return describe_array(y) if y is not None else "-"


def save_outputs(folder: str, outputs: dict[str, Any], feeds: dict[str, Any]) -> list[str]:
    """Each output as FOLDER/NAME.npy (a sequence as NAME.npz), the inputs as FOLDER/inputs.npz."""
    import numpy as np

    from kiln.cli.common import safe_filename

    os.makedirs(folder, exist_ok=True)
    saved: list[str] = []
    used: set[str] = set()
    for name, y in outputs.items():
        if y is None:
            continue
        base = _unique(safe_filename(name), used)
        if isinstance(y, list):
            file = f"{base}.npz"
            np.savez(os.path.join(folder, file), *y)
        else:
            file = f"{base}.npy"
            np.save(os.path.join(folder, file), y, allow_pickle=False)
        saved.append(file)
    arrays = {k: v for k, v in feeds.items() if isinstance(v, np.ndarray) and v.dtype != object}
    np.savez(os.path.join(folder, "inputs.npz"), **arrays)  # type: ignore[arg-type]
    return saved


def _unique(base: str, used: set[str]) -> str:
    name, k = base, 1
    while name in used or name == "inputs":
        name, k = f"{base}_{k}", k + 1
    used.add(name)
    return name
