"""Shared by the "quantizing" kernel cases (`tests/kernels/norm/quantize_cases.py`,
`tests/kernels/attention/quantize_cases.py`): the QuantizeLinear after the op under test, and the check of a
tactic's outputs as the tuner checks a candidate's."""

from __future__ import annotations

from typing import Any

import torch

from kiln.ir import DType, Graph, Value
from kiln.ir.graph import Node
from kiln.ir.ops import OPS
from kiln.ir.ops.base import RefCtx
from kiln.kernels import registry
from kiln.precision.quantize import fuse_output_quantize

CUDA = torch.device("cuda")


def quantized_output(g: Graph, y: Value, dt: torch.dtype, out: DType, amax: float, *, zero: int = 0,
                     keep_y: bool = True) -> Node:
    """Quantizes `y` (the op's result) to `out` with the scale that maps `amax` onto the type's top (larger values
    saturate), makes it a graph output (and `y` too when `keep_y`), fuses the two and returns the fused node."""
    top = 448.0 if out is DType.FLOAT8_E4M3FN else 127.0
    ins = [y, g.add_initializer("s", torch.tensor(amax / top, dtype=dt))]
    if out is not DType.FLOAT8_E4M3FN or zero:
        ins.append(g.add_initializer("z", torch.tensor(zero).to(out.torch)))
    (yq,) = g.add("QuantizeLinear", ins, {"output_dtype": out} if len(ins) == 2 else {}, name="quant")
    g.outputs.append(yq)
    if keep_y:
        g.outputs.append(y)
    producer = y.producer
    assert producer is not None and fuse_output_quantize(g) == [producer.name]
    return g.nodes[0]


def run(tactic: str, node: Node, args: list[Any], configs: list[dict[str, Any]],
        device: str = "cpu") -> dict[str, str | None]:
    """{config: why the tuner would reject `tactic`'s outputs for `node`, or None}: each output against the
    node's reference, and (a float16 reference rounds where the kernel does not) the layer computed from
    float32-widened inputs as a second opinion."""
    from kiln.tune.tuner import _as_accurate, _close, _codes_as_accurate, _one_step, _Widened

    t = registry.get(tactic)
    if not t.applicable(node, CUDA):
        return {"applicable": "refused"}
    want = OPS["Fused"].ref(RefCtx(node), list(args))
    second = _Widened()  # the body in float32, as the tuner's second opinion
    wide = [second.get(node, list(args), k) for k in range(len(want))]
    moved = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    out: dict[str, str | None] = {}
    for cfg in configs:
        label = ",".join(f"{k}={v}" for k, v in cfg.items())
        got = [g.cpu() for g in t.build(node, cfg, CUDA)(list(moved))]
        if len(got) != len(want) or any(a.dtype != b.dtype or a.shape != b.shape for a, b in zip(got, want)):
            out[label] = f"got {[(a.dtype, tuple(a.shape)) for a in got]}"
            continue
        problems = []
        for k, (a, b, w) in enumerate(zip(got, want, wide)):
            w = w.to(b.dtype) if b.element_size() > 1 else w  # a float output: the widened one rounded back
            if not (_close(a, b) or _one_step(a, b) or _as_accurate(a, b, w) or _codes_as_accurate(a, b, w)):
                diff = (a.double() - b.double()).abs() if b.element_size() > 1 else (a.int() - b.int()).abs()
                share = float((diff > 0).double().mean())
                problems.append(f"output {k}: max |diff| {float(diff.max()):.4g}, {share:.4f} differ")
        out[label] = "; ".join(problems) or None
    return out
