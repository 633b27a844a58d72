"""Static dims in the bodies of fused groups, once the fusions are done.

`shape_arithmetic` substitutes the static symbols (`PassContext.static_dims`: one size in every profile) in every
value's type early, but leaves the model's own inputs and outputs as declared. A fusion that later makes a body
reading a model input copies that input's declared type into the body: BERT's mask group (Cast to bool, Where)
read `attention_mask` as (batch, seq) in a domain of (1, 128), which the pointwise generator then could not
broadcast, so the group ran on torch as two kernels instead of one generated kernel. (The generator now takes a
named dim under a known size and checks the real shapes at run time, as it must for a lone node reading a model
input; the static body still serves what decides from shapes at build time, like an epilogue's operand loads.)

Rewrite: in every graph and every Fused body (nested ones too), every value but the model's inputs and outputs
gets the static symbols substituted (`types.specialize` with `fused_bodies`, run at the end). Nothing else changes;
a build without static dims (dynamic profiles) is left as it is.
"""

from __future__ import annotations

from kiln.ir.graph import Graph
from kiln.passes.manager import Pass, PassContext, PassResult
from kiln.passes.types import specialize


def specialize_bodies(ctx: PassContext) -> Pass:
    dims = dict(ctx.static_dims)

    def run(graph: Graph) -> PassResult:
        return PassResult.of(specialized=specialize(graph, dims, fused_bodies=True))

    return run
