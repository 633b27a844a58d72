"""The pointwise generator's rules applied to a 2-D register tile: the epilogue of a tiled kernel (the Triton GEMM
template) rendered by the same op -> expression table (`rules`) and body builder (`codegen`) as every pointwise
kernel, so an activation has one formula in kiln.

The graph is an `epilogue_graph`: input 0 is the accumulator, already a float32 tile named by the caller; every
other value it reads (an input, or a constant with more than one element) becomes an `Operand` the caller loads as
a tile named `a{k}` (upcast to float32 for float16/bfloat16), in `operands` order. Scalar constants are baked into
the text. `lines` compute the result tile `result.text` in its compute type; the caller stores it cast to
`storage(result.dtype)`.

    prog = tile_program(graph, acc="acc", tile="[BLOCK_M, BLOCK_N]")
    # kernel text: a0 = tl.load(...); *prog.lines; tl.store(out, prog.result.text.to(...))

`load_function` writes a generated source to the kernel cache once and returns one of its Triton functions.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from typing import Any

from kiln.ir.dtype import DType
from kiln.ir.graph import Graph
from kiln.kernels import pdl
from kiln.kernels.pointwise import codegen
from kiln.kernels.pointwise.codegen import Operand, _shape
from kiln.kernels.pointwise.rules import NARROW, Expr, compute, float_text
from kiln.utils.errors import UnsupportedError


@dataclass(frozen=True)
class TileProgram:
    operands: tuple[Operand, ...]
    """What the caller loads as tiles a0, a1, ...: graph input `input` (never 0) or a constant `data`."""
    lines: tuple[str, ...]
    result: Expr
    ops: tuple[str, ...]
    also: tuple[Expr, ...] = ()
    """The graph's further outputs, each stored by the caller to an output of its own (a layer that writes its
    float result and the 8-bit copy the next layer reads)."""


class _TileBody(codegen._Body):
    """The pointwise body builder, with literals shaped as the tile and the accumulator given as text. A requantizing
    epilogue multiplies by the scale's reciprocal (`rules.Builder.reciprocal_quotients`): the tuner judges 8-bit
    results within one step of the reference's, and the division was a large share of an int8 layer's epilogue."""

    reciprocal_quotients = True

    def __init__(self, graph: Graph, acc: str, tile: str) -> None:
        super().__init__(graph)
        self.tile = tile
        v = graph.inputs[0]
        # why: a float16/bfloat16 accumulator is a float32 value not yet rounded to its type, so ops that jump
        # (comparisons, Floor, Cast to an integer) round it first, as they would see the reference's rounded value
        self.env[v] = Expr(acc, v.dtype, v.dtype not in NARROW)

    def lit(self, value: float | int | bool, dtype: DType) -> Expr:
        text = float_text(float(value)) if dtype.is_float else str(int(value))
        e = self.let(f"tl.full({self.tile}, {text}, {compute(dtype)})", dtype, True)
        return Expr(e.text, dtype, True, value)


def tile_program(graph: Graph, *, acc: str, tile: str) -> TileProgram:
    """The epilogue `graph` (every value broadcasting into the accumulator's shape; outputs of the accumulator's
    shape, the first as `result`, the others as `also`) as tile text; raises UnsupportedError naming what cannot be
    generated."""
    try:
        return _build(graph, acc, tile)
    except codegen._Refused as e:
        raise UnsupportedError(str(e), hint="another tactic runs this epilogue") from None


def _build(graph: Graph, acc: str, tile: str) -> TileProgram:
    if not graph.inputs or not graph.outputs:
        raise codegen._Refused("an epilogue tile needs the accumulator as input 0 and an output")
    codegen._check_type(graph.inputs[0])
    domain = _shape(graph.inputs[0])
    body = _TileBody(graph, acc, tile)
    for n in graph.nodes:
        body.node(n)
    results = [body.value(o) for o in graph.outputs]
    for o in graph.outputs:
        if _shape(o) != domain:
            raise codegen._Refused(f"the epilogue's output shape {_shape(o)} is not the accumulator's {domain}")
    for v in body.data:
        if not codegen._fits(_shape(v), domain):
            raise codegen._Refused(f"value '{v.name}' of shape {_shape(v)} does not broadcast into {domain}")
    if body.prog.grows:
        raise codegen._Refused("Expand does not fit a tile epilogue")
    return TileProgram(tuple(body.prog.operands), tuple(body.prog.lines), results[0], tuple(body.prog.ops),
                       tuple(results[1:]))


# --- loading -------------------------------------------------------------------------------------------------

_LOCK = threading.Lock()
_FUNCTIONS: dict[tuple[str, str], Any] = {}


def load_function(source: str, prefix: str, name: str) -> Any:
    """Triton function `name` of the generated `source` (written under the kernel cache once, keyed by its hash),
    with programmatic dependent launch when it is on now (`kiln.kernels.pdl`: the module then waits first)."""
    source = pdl.with_wait(source)
    key = hashlib.sha256(source.encode()).hexdigest()[:24]
    with _LOCK:
        fn = _FUNCTIONS.get((key, name))
        if fn is None:
            fn = _FUNCTIONS[(key, name)] = pdl.launcher(getattr(codegen._import(source, f"{prefix}_{key}"), name))
    return fn
