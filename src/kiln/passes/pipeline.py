"""THE ordered list of graph passes. Each entry is (name, pass factory); a comment on every ordering constraint.

Every pass is a file in this package with its own tests on hand-built graphs; the manager re-sorts and verifies
the graph after each pass that changed it, and KILN_DUMP_GRAPHS=DIR writes the graph after each one, numbered.
"""

from __future__ import annotations

from kiln.ir.graph import Graph
from kiln.passes.attention_batch import fold_attention_batch
from kiln.passes.channel_scale import channel_scale
from kiln.passes.concat_add import distribute_adds
from kiln.passes.constant_folding import fold_constants
from kiln.passes.cse import eliminate_common_subexpressions
from kiln.passes.dead_nodes import dead_nodes
from kiln.passes.einsum_matmul import einsum_matmul
from kiln.passes.epilogue_fusion import epilogue_fusion, extend_epilogues
from kiln.passes.fold_affine import fold_affine
from kiln.passes.fuse_attention import fuse_attention
from kiln.passes.fuse_embeddings import fuse_embeddings
from kiln.passes.fuse_gelu import fuse_gelu
from kiln.passes.fuse_norm_gemm import fuse_norm_gemm
from kiln.passes.fuse_normalization import fuse_normalization
from kiln.passes.fuse_reductions import fuse_reductions
from kiln.passes.fuse_rotary import fuse_rotary
from kiln.passes.fuse_softmax import fuse_softmax
from kiln.passes.layout import layout
from kiln.passes.manager import Pass, PassContext, PassFactory, PassRecord, PassResult, run_passes
from kiln.passes.merge_siblings import merge_siblings
from kiln.passes.narrow_masks import narrow_masks
from kiln.passes.noops import remove_noops
from kiln.passes.pack_attention import pack_attention
from kiln.passes.patch_embedding import patch_embedding
from kiln.passes.pointwise_fusion import pointwise_fusion
from kiln.passes.pool_means import pool_means
from kiln.passes.reshape_sinking import sink_reshapes
from kiln.passes.residual_norm import fuse_residual_norm
from kiln.passes.shape_arithmetic import shape_arithmetic
from kiln.passes.specialize_bodies import specialize_bodies
from kiln.passes.transpose_sinking import sink_transposes


def _plain(fn: Pass) -> PassFactory:
    return lambda ctx: fn


PIPELINE: list[tuple[str, PassFactory]] = [
    # --- cleanup --------------------------------------------------------------------------------------------
    # First: fixes the profile's static dims in the types, so every later pass sees static shapes; needs the profile.
    ("shape_arithmetic", shape_arithmetic),
    # Folds what shape arithmetic made constant (Range(0, seq), If conditions) and every computed weight; before
    # no-op removal, whose rules need constant operands, and before the fusions, which need weights as initializers.
    ("fold_constants", _plain(fold_constants)),
    # Before no-op removal: that turns size-1-only Transposes into Reshapes, which sinking cannot follow.
    ("sink_transposes", _plain(sink_transposes)),
    # Before CSE: removing Identity makes duplicated biases the same value, so their readers merge.
    ("remove_noops", _plain(remove_noops)),
    ("cse", _plain(eliminate_common_subexpressions)),
    ("dead_nodes", _plain(dead_nodes)),
    # --- patterns: single ops for what exporters decompose ----------------------------------------------------
    # All of these before any fusion: a fused node hides its pieces from the matchers.
    # Einsum matrix products as MatMul first: every later pattern (epilogues, attention) reads MatMul.
    ("einsum_matmul", _plain(einsum_matmul)),
    # Reductions before normalization (the norm rules look for ReduceMean).
    ("fuse_reductions", _plain(fuse_reductions)),
    ("fuse_normalization", _plain(fuse_normalization)),
    # After the norms (their patterns read ReduceMean): a spatial mean as GlobalAveragePool, a pooling op.
    ("pool_means", _plain(pool_means)),
    # Softmax before attention (attention matches from the Softmax op).
    ("fuse_softmax", _plain(fuse_softmax)),
    ("fuse_gelu", _plain(fuse_gelu)),
    # RoPE before attention: on a head split's packed input, it leaves attention its packed form.
    ("fuse_rotary", _plain(fuse_rotary)),
    # 5-D attention (MaxViT) on 4-D operands: after the Softmax exists, before attention recognition reads it.
    ("fold_attention_batch", _plain(fold_attention_batch)),
    ("fuse_attention", _plain(fuse_attention)),
    # Reads the Attention nodes; before sibling merging and epilogue fusion, which then see BERT's shape.
    ("pack_attention", _plain(pack_attention)),
    # Reads the Attention nodes' masks; before pointwise fusion, which would take the And into the mask's kernel.
    ("narrow_masks", _plain(narrow_masks)),
    # Lookups summed and normalized as one node (GPU builds); after norm recognition (it ends at a LayerNorm) and
    # before epilogue and pointwise fusion, which would take its Adds.
    ("fuse_embeddings", fuse_embeddings),
    # --- weights and layers -------------------------------------------------------------------------------------
    # A ViT's patch conv + flatten + transpose as patch rows and one GEMM (GPU builds); before epilogue fusion, which
    # puts the bias into that GEMM.
    ("patch_embedding", patch_embedding),
    # A constant added to a Concat goes onto its pieces; after patch_embedding (ViT: the position embedding then
    # joins the patch GEMM's epilogue) and before the fusions that take each piece's Add.
    ("distribute_adds", _plain(distribute_adds)),
    # BN folding before sibling merging (a merged conv's output is read by a Split, so its BN could not fold).
    ("fold_affine", _plain(fold_affine)),
    # Sibling merging before epilogue fusion (the fused anchors would hide the shared input's readers).
    ("merge_siblings", _plain(merge_siblings)),
    ("dead_nodes_2", _plain(dead_nodes)),
    # --- fusion into kernels -------------------------------------------------------------------------------------
    # A Reshape between two elementwise ops moves below the second; before the fusions, which then see the two
    # ops adjacent (one kernel).
    ("sink_reshapes", _plain(sink_reshapes)),
    # Epilogues before pointwise groups, so activations join their Conv/MatMul rather than a kernel of their own.
    ("epilogue_fusion", _plain(epilogue_fusion)),
    ("pointwise_fusion", _plain(pointwise_fusion)),
    ("dead_nodes_3", _plain(dead_nodes)),
    # --- layout: last, on the final nodes (it only records memory formats; GPU builds only) -----------------------
    ("layout", layout),
]


def optimize(graph: Graph, context: PassContext | None = None) -> list[PassRecord]:
    """Run the pipeline on `graph` in place; returns what each pass did."""
    ctx = context or PassContext()
    return run_passes(graph, [(name, factory(ctx)) for name, factory in PIPELINE])


def _gpu_only(fn: Pass) -> PassFactory:
    return lambda ctx: fn if ctx.device == "cuda" else (lambda graph: PassResult.of())


LATE: list[tuple[str, PassFactory]] = [
    # After precision (the builder runs this list last, before tuning): FP16 lowering, Q/DQ placement and the
    # norm's quantize fusion read the float graph's norms and epilogues, and these fusions want the final dtypes.
    # The float32 Casts FP16 lowering puts before model outputs join the epilogue before them (GPU builds: the
    # kernels take a Cast step; one kernel less per output at batch 1).
    ("extend_epilogues", _gpu_only(extend_epilogues)),
    # A squeeze-and-excitation scale into the 1x1 conv reading the scaled activation (GPU builds, opt-in at level 4).
    ("channel_scale", channel_scale),
    # The residual Add a norm normalizes, into the norm's kernel (GPU builds); after the epilogues are final (it
    # takes their last Add) and before fuse_norm_gemm, which leaves such norms as they are.
    ("fuse_residual_norm", _gpu_only(fuse_residual_norm)),
    # A norm and the GEMM reading its rows, as one node (GPU builds only: the kernels are Triton).
    ("fuse_norm_gemm", _gpu_only(fuse_norm_gemm)),
    # Last: the bodies fused after shape_arithmetic that read a model input copied its declared (symbolic) type;
    # the static dims go into them too, so the kernel generators see the shapes the profiles fix.
    ("specialize_bodies", specialize_bodies),
]


def optimize_late(graph: Graph, context: PassContext) -> list[PassRecord]:
    """Run the late list on `graph` in place (after precision); returns what each pass did."""
    return run_passes(graph, [(name, factory(context)) for name, factory in LATE], stage="late")
