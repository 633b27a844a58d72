"""THE ordered list of graph rewrites after Q/DQ placement (an INT8/FP8 build, or a model quantized before import).

`passes/pipeline.py` optimizes the float graph; precision then places Q/DQ pairs (`quantize.quantize_graph`) and
lowers the float parts; these rewrites turn the Q/DQ graph into the layers the 8-bit kernels take. They run under
the same pass manager (re-sorted and verified after each change, recorded in the engine's stats, written out with
KILN_DUMP_GRAPHS=DIR as `quantized_NN_name.txt`).
"""

from __future__ import annotations

from kiln.ir.graph import Graph
from kiln.passes.layout import layout
from kiln.passes.manager import Pass, PassContext, PassFactory, PassRecord, PassResult, run_passes
from kiln.precision.quantize import fold_quantized, fuse_output_quantize, fuse_requantize, hoist_quantize


def _plain(fn: Pass) -> PassFactory:
    return lambda ctx: fn


def _fold(graph: Graph) -> PassResult:
    return PassResult.of(folded=len(fold_quantized(graph)))


def _hoist(graph: Graph) -> PassResult:
    return PassResult.of(pools_moved=len(hoist_quantize(graph)))


def _requantize(graph: Graph) -> PassResult:
    return PassResult.of(requantized=len(fuse_requantize(graph)))


def _output_quantize(ctx: PassContext) -> Pass:
    # why: only the GPU has kernels for the fused node (Triton norms and attention); a CPU build keeps its tactics
    return lambda graph: PassResult.of(outputs_quantized=len(fuse_output_quantize(graph)) if ctx.device == "cuda"
                                       else 0)


QUANTIZED: list[tuple[str, PassFactory]] = [
    # Each DequantizeLinear-fed Conv/Gemm/MatMul (and its epilogue) becomes one "quantized" layer.
    ("fold_quantized", _plain(_fold)),
    # Before fuse_requantize: a max pool read only by a QuantizeLinear moves after it, so the pool's producer
    # can requantize too.
    ("hoist_quantize", _plain(_hoist)),
    # A layer whose only reader quantizes it writes int8 itself.
    ("fuse_requantize", _plain(_requantize)),
    # A LayerNorm/RMSNorm/Attention read by a QuantizeLinear writes the 8-bit values itself (and its float result
    # when something else reads it). GPU builds only.
    ("fuse_output_quantize", _output_quantize),
    # Last: the Q/DQ values are new, so channels-last regions are decided again (GPU builds only).
    ("layout", layout),
]


def optimize_quantized(graph: Graph, context: PassContext) -> list[PassRecord]:
    """Run the list on `graph` in place; returns what each rewrite did."""
    return run_passes(graph, [(name, factory(context)) for name, factory in QUANTIZED], stage="quantized")
