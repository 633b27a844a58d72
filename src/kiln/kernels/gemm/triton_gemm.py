"""`triton.gemm`: MatMul / Gemm by a constant weight, alone or anchoring an epilogue, as one generated Triton kernel.

One template: C[M, N] = A[M, K] @ B[K, N] over BLOCK_M x BLOCK_N output tiles (GROUP_M rows of tiles per column
sweep so that neighbouring programs share B in L2), float32 accumulation with `tl.dot`, then the epilogue on the
accumulator tile in registers and a single store in the node's output dtype. The epilogue is data: Gemm's alpha
and beta * C, then the Fused body's steps (bias, activation, residual, scale, Cast...) rendered by the pointwise
generator's rules (`kiln.kernels.pointwise.tile`), so every activation has the one formula kiln uses everywhere.
Operands of the steps are read as [M, N] views with their own strides (0 where they broadcast): a bias [N], a
per-row scale, a full residual.

As in `cuda.linear`, the leading axes of A fold into rows ([batch, seq, K] @ [K, N] is one GEMM) and the weight is
laid out once at build time, as [K, N] row-major (as [N, K] for the TMA tiles, which read both operands K-major
through host-made tensor descriptors on sm_90+). Float32 inputs use TF32 exactly when torch's matmuls do
(`torch.backends.cuda.matmul.allow_tf32`, read at build time). The space is a short list of tiles (`TILES`), each a
compile on the GPU: large TMA tiles for BERT/ViT-sized M (16K-25K rows), narrow ones for batch-1 (M of 1 to ~200).

`triton.int8_gemm` is the same template on a "quantized" node (`kiln.precision.quantize.fold_quantized`): int8
activation x int8 weight into an int32 accumulator (exact), one float32 multiply per output channel by the
activation's scale times the weight's scale, then the epilogue - bias, activation, residual and, for a layer whose
only reader quantizes it, the QuantizeLinear that writes int8 for the next layer - before the one store. The weight
is kept [N, K] (K contiguous, as int8 tensor cores read both operands) and the K step is 128 bytes.
`triton.fp8_gemm` is the same on float8 E4M3 layers (`precision="fp8"`): float32 sums, the two per-tensor scales
in the one multiply, and an epilogue that may end in the QuantizeLinear writing float8.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch

from kiln.ir.dtype import DType
from kiln.ir.graph import Graph, Node
from kiln.kernels.base import Kernel
from kiln.kernels.cpu.common import prepared
from kiln.kernels.epilogue import Anchored, steps_view
from kiln.kernels.pointwise.codegen import epilogue_graph
from kiln.kernels.pointwise.layout import WIDE_LIMIT
from kiln.kernels.pointwise.rules import NARROW, float_text, storage
from kiln.kernels.pointwise.tile import TileProgram, load_function, tile_program
from kiln.kernels.registry import register
from kiln.kernels.templates import (
    DEQUANTIZE,
    GROUPED_TILE,
    TemplateTactic,
    dequant_vector,
    dot_options,
    operand_kinds,
    operand_loads,
    second_output,
    second_store,
    subtiles,
)
from kiln.utils.errors import InputError, UnsupportedError

ANCHORS = frozenset({"MatMul", "Gemm"})


@dataclass(frozen=True)
class Tile:
    """One configuration: the output tile, K step, tile rows per L2 group, warps and pipeline stages."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int
    tma: bool = False
    """Operands read through Hopper's tensor memory accelerator (host-made descriptors, both K-major: the weight
    is kept [N, K])."""
    persistent: bool = False
    """One program per SM, each looping over output tiles (`render`'s persistent form): the loop is flattened for
    the pipeliner, so the next tile's first loads overlap this tile's epilogue."""
    subtile: int = 1
    """The epilogue runs on this many column slices of the tile, one after the other (1, 2 or 4): a residual or an
    erf GELU on a whole 128 x 256 tile holds too many values at once and spills (`templates.subtiles`)."""
    split_k: int = 1
    """The K steps shared among this many programs per output tile, each writing a float32 partial tile, then one
    program per tile summing them in order and running the epilogue (`render`'s split form): for few rows (batch
    1), where the output tiles alone leave most SMs idle and each program streams a long K."""
    last_sums: bool = False
    """With split_k: one kernel - the last program of a tile to finish its share (a counter per tile) sums the
    shares in order and runs the epilogue - instead of a second kernel doing that."""
    fast: bool = False
    """Float8 only: the tensor cores sum the whole K loop in their own accumulator (about 14 significant bits),
    without adding a partial sum into float32 every FP8_PROMOTE products - faster, less accurate, so offered
    (`triton.fp8_gemm_fast`) only for reductions of at most FP8_FAST_MAX_K products."""


TILES: dict[str, Tile] = {
    "tma-128x256x64-w8s4": Tile(128, 256, 64, 8, 8, 4, tma=True),
    "tma-128x256x64-w8s3": Tile(128, 256, 64, 8, 8, 3, tma=True),
    "tma-128x256x64-w8s3-e2": Tile(128, 256, 64, 8, 8, 3, tma=True, subtile=2),
    "ptma-128x256x64-w8s3-e4": Tile(128, 256, 64, 8, 8, 3, tma=True, persistent=True, subtile=4),
    "ptma-128x128x64-w4s4-e4": Tile(128, 128, 64, 8, 4, 4, tma=True, persistent=True, subtile=4),
    "128x256x64-w8s3": Tile(128, 256, 64, 8, 8, 3),
    "128x128x64-w4s4": Tile(128, 128, 64, 8, 4, 4),
    "64x128x64-w4s4": Tile(64, 128, 64, 8, 4, 4),
    "64x64x64-w4s4": Tile(64, 64, 64, 4, 4, 4),
    "32x64x128-w4s4": Tile(32, 64, 128, 4, 4, 4),
    "16x64x256-w4s3": Tile(16, 64, 256, 1, 4, 3),
}
"""The search space (H100, float16). Large M (BERT/ViT at batch 128: 16K-25K rows): the two TMA tiles (weight kept
[N, K]); measured on an H100 (2026-11-27, triton.testing.do_bench medians, L2 flushed; `tests/kernels/gemm/
bench_gpu.py` times every tile against cuda.linear in-repo) against cuBLAS plus kiln's separate epilogue pass: BERT-base
attention-output + residual 53 vs 65 us, FFN-down + residual 127 vs 140 us, FFN-up + erf GELU 198 vs 199 us; the
main loop alone is still 10-25 % slower than cuBLAS (QKV + bias 109-123 vs 97 us), so a bias-only GEMM stays with
cuBLAS. The pointer 128x256 / 128x128 tiles serve GPUs without TMA. Small M (batch 1: M of ~1-200) the last four,
where the grid, not the MMA, limits speed (fused residual: 8.2 us vs cuBLAS + pass 11.1 us at M=128, N=K=768).
The three with "-e"/"p" (epilogue on column slices, persistent programs; `NEXT_TILES` until measured) joined after
an H200 run (2026-11-27, `bench_gpu.py`, CUDA-graph medians): BERT-base bs128 FFN-up + erf GELU + residual 190 us
(persistent, 4 slices) vs 224 for the best whole-tile TMA tile, FFN-down + GELU + residual 137 (2 slices) vs 159,
ViT-B/16 bs128 QKV 147 (persistent 128x128) vs 173. With the erf GELU as `km.gelu_narrow` (H100, 2026-11-27,
CUDA-graph medians, old and new epilogue in one process): BERT-base bs128 FFN-up + bias + GELU best 169.1 us (the
pointer 128x256 tile; persistent 4-slice 170.9) against 197.0 with libdevice's erf and cuBLAS + GELU pass 190.3;
ViT-B/16 268.8 (persistent 4-slice) against 307.7 and 300.7."""

INT8_TILES: dict[str, Tile] = {
    "64x128x128-w4s4": Tile(64, 128, 128, 8, 4, 4),
    "16x64x256-w4s3": Tile(16, 64, 256, 1, 4, 3),
    "tma-128x256x128-w8s3": Tile(128, 256, 128, 8, 8, 3, tma=True),
    "tma-64x128x128-w4s4": Tile(64, 128, 128, 8, 4, 4, tma=True),
    "tma-128x128x64-w4s4": Tile(128, 128, 64, 8, 4, 4, tma=True),
    "tma-128x128x64-w4s4-e2": Tile(128, 128, 64, 8, 4, 4, tma=True, subtile=2),
    "tma-128x128x128-w4s3-e2": Tile(128, 128, 128, 8, 4, 3, tma=True, subtile=2),
}
"""int8 tiles: mostly the float tiles' shapes with twice the K step (the same bytes per stage). The "tma-" tiles load
both operands with TMA (zero-filled past the edges) where the GPU has it (sm_90+) and the rows are 16-byte aligned; the
two pointer tiles serve the rest and batch 1 (M of ~1-200). Measured at batch 128 (H100 and H200, 2026-11-27): the
two TMA tiles won every BERT-base GEMM and 27 of ResNet-50's 28 int8 GEMM/1x1-conv shapes, "16x64x256" the small
ones; pointer 128x256 / 128x128 tiles and a TMA 128x128x128 tile never won and were dropped (a cold ResNet-50
INT8 build spent 53 s compiling seven tiles). "tma-128x128x64-w4s4" (two programs fit an SM, so one's epilogue
overlaps the other's main loop) measured later the same day (H100, bs128, requantizing and residual epilogues):
best on BERT-base's attention output + residual (43.1 vs 45.2 us), FFN-up + GELU + quantize (197.9 vs 202.0),
QKV (tie), and ResNet-50's 1x1 downsample (115.5 vs 117.9) and 512->128 1x1 (35.8 vs 39.2). Its form with the
epilogue on 2 column slices (from `INT8_NEXT_TILES`) was best on all four BERT-base bs128 GEMMs on an H200
(2026-11-27, CUDA-graph medians: QKV 64.9 vs 72.0 us, FFN-up + GELU + quantize 173.4 vs 176.8, FFN-down + residual
77.3 vs 81.0, attention output + residual 32.5 vs 33.8), not on ResNet-50's 1x1 + int8 residual (278 vs 216).
Requantizing by float adds and the narrow GELU (H100, 2026-11-27): BERT-base bs128 FFN-up + GELU + quantize 139.3 us
on that tile, from 182.2 (best) and 200.9 (that tile). "tma-128x128x128-w4s3-e2" (4 warps, 3 stages of 32 KiB: two
programs an SM) joined after an H100 run (2026-11-27, CUDA-graph medians, BERT-base bs128): FFN-down + residual 90.8
vs 104.2 us, attention output + residual 40.9 vs 42.6, QKV a tie (85.3 vs 85.5), FFN-up + GELU + quantize 143.6
vs 139.6."""



# --- what the template takes ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class NormPrologue:
    """The LayerNormalization / RMSNormalization of a "normalized" Fused node (`kiln.passes.fuse_norm_gemm`), folded
    into the GEMM: with W' = diag(scale) W (made once, in W's dtype), c = the column sums of W' and d = B W,

        LayerNorm(x) W = rstd * (x W' - mean * c) + d,   RMSNorm(x) W = rstd * (x W'),

    so the main loop is the plain GEMM on the raw rows x (pipelined as ever), each program first computes its rows'
    mean and rstd over K in float32, and one multiply-add per output element applies them before the epilogue.
    `*_at` index the node's inputs."""

    g_at: int
    b_at: int | None
    eps: float
    rms: bool
    keep: bool
    """The node also outputs the normalized rows (its first output): the programs of the first tile column write
    them as they go."""
    stats: str = "before"
    """Where the rows' statistics are computed: "before" the main loop, in a pass of their own; "after" it (the rows
    are then in L2, and the weight's first loads, the long pole at a few rows, start at once); or in the "loop",
    from the A tiles the product loads (no pass of their own: at batch 1 each program's extra pass over its rows
    adds its latency to every wave)."""


@dataclass(frozen=True)
class Spec:
    """A node in the template's terms; `*_at` are indices into the node's inputs."""

    x_at: int
    w_at: int
    trans_a: bool
    trans_b: bool
    alpha: float
    c_at: int | None
    """Gemm's C (None when absent or beta is 0)."""
    beta: float
    n: int
    k: int
    dtype: DType
    """A's and B's dtype."""
    out: DType
    program: TileProgram | None
    """The epilogue steps (None: no steps)."""
    sources: tuple[int, ...]
    """Node input index of each epilogue graph input after the accumulator."""
    dq: tuple[int, int] | None = None
    """An int8 spec's node input indices of the activation's scale and the weight's per-channel scales."""
    kinds: tuple[str, ...] = ()
    """Per epilogue operand, how it broadcasts over the [M, N] tile: "scalar" (one value: loaded once), "row" (one
    value per column, e.g. a bias or a per-channel scale: one [1, BLOCK_N] load) or "full" (a residual)."""
    conv: bool = False
    """A 1x1 stride-1 convolution read as a GEMM: A is the channels-last input seen as [N*H*W, C], B the weight
    [K, C], C the conv's bias; the output is written channels-last."""
    norm: NormPrologue | None = None
    """A "normalized" node's norm, applied to A's rows as they are loaded (`x_at` is then the norm's X)."""

    @property
    def out2(self) -> DType | None:
        """The dtype of the second output (`templates.second_output`), or None."""
        return second_output(self.program)


def spec(node: Node) -> Spec | None:
    """The template's view of `node`, or None when it cannot be rendered exactly."""
    a = Anchored.of(node, ANCHORS)
    if a is None or len(node.outputs) != 1 or not a.dtypes_ok():
        return None
    x, b, w = a.input(0), a.input(1), a.constant(1)
    x_at, w_at = a.arg[0], a.arg[1]
    if x is None or b is None or w is None or x_at is None or w_at is None or w.dim() != 2 or (x.rank or 0) < 1:
        return None
    dtype = x.dtype
    if b.dtype != dtype or a.anchor.outputs[0].dtype != dtype:
        return None
    gemm = _gemm_form(a)
    if gemm is None:
        return None
    trans_a, trans_b, alpha, c_at, beta = gemm
    k, n = (w.shape[1], w.shape[0]) if trans_b else (w.shape[0], w.shape[1])
    if k == 0 or (x.rank != 2 and a.anchor.op == "Gemm"):
        return None
    steps = _steps(a)
    if steps is None:
        return None
    program, sources = steps
    out = program.result.dtype if program is not None else dtype
    if out != node.outputs[0].dtype:
        return None
    return Spec(x_at, w_at, trans_a, trans_b, alpha, c_at, beta, int(n), int(k), dtype, out, program, sources,
                kinds=operand_kinds(node, program, sources, 1))


def _gemm_form(a: Anchored) -> tuple[bool, bool, float, int | None, float] | None:
    """(transA, transB, alpha, node index of C, beta); MatMul is the plain form."""
    if a.anchor.op == "MatMul":
        return False, False, 1.0, None, 0.0
    at = a.anchor.attrs
    c = a.input(2)
    c_at = a.arg[2] if c is not None and at["beta"] != 0 else None
    if c_at is not None and (c is None or c.rank is None or c.rank > 2):
        return None
    return bool(at["transA"]), bool(at["transB"]), float(at["alpha"]), c_at, float(at["beta"])


def _steps(a: Anchored) -> tuple[TileProgram | None, tuple[int, ...]] | None:
    """(the steps as a tile program or None without steps, their graph inputs' node indices); None: refused."""
    if not a.steps or a.body is None:
        return None, ()
    found = epilogue_graph(cast(Graph, steps_view(a)))
    if found is None:
        return None
    graph, sources = found
    try:
        program = tile_program(graph, acc="acc", tile="[BLOCK_M, BLOCK_N]")
    except UnsupportedError:
        return None
    return program, tuple(sources)


# --- source text ---------------------------------------------------------------------------------------------


_SOURCE = '''"""Generated by kiln.kernels.gemm.triton_gemm ({what})."""
import triton
import triton.language as tl

from kiln.kernels.pointwise import mathlib as km

INF = tl.constexpr(float("inf"))


@triton.jit
def kiln_gemm({operands}, out_ptr, {pointers}M, N, K, {operand_strides}stride_om, stride_on, {strides}
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
              EVEN_K: tl.constexpr, WIDE: tl.constexpr):
    pid = tl.program_id(0)
''' + GROUPED_TILE + '''    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype={acc_type})
{mainloop}{dequant}{tail}'''

_TAIL = """    rm = offs_m[:, None]
    rn = offs_n[None, :]
    mask = (rm < M) & (rn < N)
{epilogue}    tl.store(out_ptr + rm * stride_om + rn * stride_on, {result}.to({out}), mask=mask)
{also}"""
"""The epilogue and the stores of one output tile (or column slice of it: `templates.subtiles`)."""


_POINTER_LOOP = """    offs_k = tl.arange(0, BLOCK_K)
    # why: wrapped rows and columns read valid memory, so the loads need no M/N masks; the store drops them
    x_ptrs = x_ptr + (offs_m % M)[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + (offs_n % N)[None, :] * stride_wn
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            x = tl.load(x_ptrs)
            w = tl.load(w_ptrs)
        else:
            left = K - k * BLOCK_K
            x = tl.load(x_ptrs, mask=offs_k[None, :] < left, other={zero})
            w = tl.load(w_ptrs, mask=offs_k[:, None] < left, other={zero})
        acc = tl.dot(x, w, acc{precision})
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
"""
"""The main loop on pointers: A [M, K] and B [K, N] with any strides."""

_TMA_LOOP = """    for k in range(0, tl.cdiv(K, BLOCK_K)):
        x = x_desc.load([pid_m * BLOCK_M, k * BLOCK_K])
        w = w_desc.load([pid_n * BLOCK_N, k * BLOCK_K])
        acc = tl.dot(x, w.T, acc{precision})
"""
"""The main loop on TMA descriptors: A [M, K] and B kept as [N, K], both K-major, read in whole blocks that the
hardware zero-fills past M, N and K (no masks, no K tail)."""

_PARTS = """    parts = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
    ok = (offs_m[:, None] < M) & (offs_n[None, :] < N)
"""
"""The tile's place in the split's float32 workspace [SPLIT, M, N] (`parts` + share * M * N), and its bounds."""

_STORE_SHARE = _PARTS + "    tl.store(parts + part * M * N, acc, mask=ok)\n"
"""This program's share of the tile, summed over its K steps, stored in the workspace."""

_SPLIT_SUM = """    # the partial tiles of the K split (kiln_gemm_part, below), summed in split order
""" + _PARTS + """    for part in range(0, SPLIT):
        acc += tl.load(parts + part * M * N, mask=ok, other=0.0)
"""
"""The split form's main loop: the tile's sum over the workspace [SPLIT, M, N] the partial kernel wrote."""

_PARTIAL = '''

@triton.jit
def kiln_gemm_part(x_ptr, w_ptr, ws_ptr, M, N, K, KSTEPS, stride_xm, stride_xk, stride_wk, stride_wn,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                   EVEN_K: tl.constexpr, WIDE: tl.constexpr):
    # K steps [part * KSTEPS, (part + 1) * KSTEPS) of output tile pid, the float32 sum to the workspace
    pid = tl.program_id(0)
    part = tl.program_id(1)
''' + GROUPED_TILE + '''    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
{mainloop}''' + _STORE_SHARE
"""The split form's first kernel: one program per output tile and share of K (grid [tiles, SPLIT])."""

_LOOP_HEAD = "    for k in range(0, tl.cdiv(K, BLOCK_K)):\n"

_LAST_SUMS = """    # this share's float32 partial to the workspace; the tile's last program to arrive sums the shares
""" + _STORE_SHARE + """    tl.debug_barrier()  # why: every thread's stores are issued before the one release below
    arrived = tl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel", scope="gpu")
    if arrived == SPLIT - 1:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for q in range(0, SPLIT):  # in split order, this program's own share read back too: the same sums always
            acc += tl.load(parts + q * M * N, mask=ok, other=0.0, cache_modifier=".cg")
        tl.atomic_xchg(cnt_ptr + pid, 0)  # why: ready for the next launch or graph replay
"""
"""The one-kernel split form, after the share's main loop: the counter per output tile (`cnt_ptr`, zero between
launches) tells the last program, which sums the shares in order and runs the epilogue (the tail, indented under
the `if`)."""

_SPLIT_LOOP = """    first = part * KSTEPS
    start = first * BLOCK_K
    if WIDE:
        start = start.to(tl.int64)
    x_ptrs += start * stride_xk
    w_ptrs += start * stride_wk
    for k in range(first, tl.minimum(first + KSTEPS, tl.cdiv(K, BLOCK_K))):
"""
"""The pointer main loop's `for` line in the partial kernel: its share of the K steps (k stays the absolute step,
so a ragged last step keeps its mask)."""


_NORM_ROWS = """    # the rows' statistics in float32, in wide chunks (4096 values a program: many loads in flight)
    x_rows = x_ptr + (offs_m % M)[:, None] * stride_xm
    offs_s = tl.arange(0, 4096 // BLOCK_M)
"""
"""A "normalized" node's own pass over its rows (the statistics before or after the main loop, which multiplies the
raw rows by the folded weight, see `NormPrologue`; the normalized rows, written by the first tile column, when the
node outputs them): where the rows are, `4096 // BLOCK_M` columns at a time."""

_LN_INIT = """    mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
"""

_CHAN_MERGE = """{i}{p}seen = {start} * 1.0
{i}{p}count = tl.minimum(K - {start}, {chunk}) * 1.0
{i}{p}part = tl.sum({x}, axis=1) / {p}count
{i}{p}d = tl.where({inside}, {x} - {p}part[:, None], 0.0)
{i}{p}delta = {p}part - mean
{i}mean += {p}delta * ({p}count / ({p}seen + {p}count))
{i}m2 += tl.sum({p}d * {p}d, axis=1) + {p}delta * {p}delta * ({p}seen * {p}count / ({p}seen + {p}count))
"""
"""LayerNorm's statistics, one chunk of columns `{x}` (float32, zero past K; `{inside}`: the columns before K)
merged into the running mean and centred sum of squares (Chan et al.); with one chunk, exactly the two-pass
formula of the op's reference. `{p}` prefixes its temporaries (the main loop's names stay untouched)."""

_LN_RSTD = "    rstd = tl.div_rn(1.0, tl.sqrt_rn(m2 / K + {eps}))\n"

_LN_STATS = _LN_INIT + """    for k in range(0, tl.cdiv(K, 4096 // BLOCK_M)):
        ks = k * (4096 // BLOCK_M) + offs_s
        inside = ks[None, :] < K
        x = tl.load(x_rows + ks[None, :] * stride_xk, mask=inside, other=0.0).to(tl.float32)
""" + _CHAN_MERGE.format(i="        ", p="", start="k * (4096 // BLOCK_M)", chunk="4096 // BLOCK_M", x="x",
                         inside="inside") + _LN_RSTD
"""LayerNorm's statistics in a pass of their own over the rows."""

_RMS_INIT = "    total = tl.zeros((BLOCK_M,), dtype=tl.float32)\n"
_RMS_RSTD = "    rstd = tl.div_rn(1.0, tl.sqrt_rn(total / K + {eps}))\n"
_RMS_STATS = _RMS_INIT + """    for k in range(0, tl.cdiv(K, 4096 // BLOCK_M)):
        ks = k * (4096 // BLOCK_M) + offs_s
        x = tl.load(x_rows + ks[None, :] * stride_xk, mask=ks[None, :] < K, other=0.0).to(tl.float32)
        total += tl.sum(x * x, axis=1)
""" + _RMS_RSTD

_LOOP_STATS = {
    False: "        st_x = x.to(tl.float32)\n" + _CHAN_MERGE.format(
        i="        ", p="st_", start="k * BLOCK_K", chunk="BLOCK_K", x="st_x",
        inside="k * BLOCK_K + tl.arange(0, BLOCK_K)[None, :] < K"),
    True: "        st_x = x.to(tl.float32)\n        total += tl.sum(st_x * st_x, axis=1)\n",
}
"""The statistics inside the main loop, from the A tile it has just loaded for the product (`NormPrologue.stats`
"loop": no pass of their own; the rows' reads are the product's), for LayerNorm (False) and RMSNorm (True). A TMA
tile past K is zero-filled, a pointer tile's masked to zero: the padding adds nothing to the sums."""

_LOOP_ANCHOR = "        acc = tl.dot("
"""The main loop's product line (pointer and TMA loops): the in-loop statistics go right after it."""

_KEEP_ROWS = """    if pid_n == 0:
        for k in range(0, tl.cdiv(K, 4096 // BLOCK_M)):
            ks = k * (4096 // BLOCK_M) + offs_s
            inside = ks[None, :] < K
            x = tl.load(x_rows + ks[None, :] * stride_xk, mask=inside, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + ks, mask=ks < K, other=0.0).to(tl.float32)
            y = {normalized}
            tl.store(y_ptr + offs_m[:, None] * stride_ym + ks[None, :], y.to({dtype}),
                     mask=(offs_m[:, None] < M) & inside)
"""


def _norm_prologue(s: Spec) -> tuple[tuple[str, str, str], str, list[str], list[str]]:
    """A normalized spec's statistics text (before the main loop, inside it, after it), the accumulator's correction
    line, the extra operands after the weight and their strides."""
    norm = s.norm
    assert norm is not None
    operands, strides = [] if norm.rms else ["nc_ptr"], []
    if norm.rms:
        fix = "acc = acc * rstd[:, None]"
        normalized = "x * rstd[:, None] * g[None, :]"
    else:
        fix = "acc = (acc - mean[:, None] * tl.load(nc_ptr + rn, mask=rn < N, other=0.0)) * rstd[:, None]"
        normalized = "(x - mean[:, None]) * rstd[:, None] * g[None, :]"
    if norm.b_at is not None:
        operands.append("nd_ptr")
        fix += " + tl.load(nd_ptr + rn, mask=rn < N, other=0.0)"
        normalized += " + tl.load(b_ptr + ks, mask=ks < K, other=0.0).to(tl.float32)[None, :]"
    keep = ""
    if norm.keep:
        operands += ["g_ptr", *(["b_ptr"] if norm.b_at is not None else []), "y_ptr"]
        strides.append("stride_ym")
        keep = _KEEP_ROWS.format(normalized=normalized, dtype=storage(s.dtype))
    eps = float_text(norm.eps)
    if norm.stats == "loop":
        before = _NORM_ROWS + (_RMS_INIT if norm.rms else _LN_INIT)
        after = (_RMS_RSTD if norm.rms else _LN_RSTD).format(eps=eps) + keep
        return (before, _LOOP_STATS[norm.rms], after), fix, operands, strides
    stats = _NORM_ROWS + (_RMS_STATS if norm.rms else _LN_STATS).format(eps=eps) + keep
    return ((stats, "", "") if norm.stats == "before" else ("", "", stats)), fix, operands, strides


FP8_PROMOTE = 128
"""Float8 products a tensor-core accumulation takes before its partial sum is added into the float32 accumulator."""
FP8_TILES = {name: t for name, t in INT8_TILES.items() if t.block_k >= FP8_PROMOTE}
"""`triton.fp8_gemm`'s space: the int8 tiles whose K step holds FP8_PROMOTE products (Triton promotes at most once
per K step). Among them the 128x128 tile of 4 warps in 3 stages (96 KiB: two programs an SM, so one's promotions
and epilogue overlap the other's products) with the epilogue in 2 column slices, timed on an H100 (2026-11-27,
CUDA-graph medians, BERT-base bs128 layers): it won three of the four - attention output + residual 43.4 us (best
before 45.8), FFN-up + GELU + float8 quantize 153.0 (157.1; cuBLASLt + a pass 167.0), FFN-down + residual 100.5
(cuBLASLt 104.1) - and was second on QKV + bias (93.2; cuBLASLt 80.7). The same shape with 4 stages (two programs
no longer fit) took 133-244 us."""

FP8_FAST_MAX_K = 1024
"""The longest reduction `triton.fp8_gemm_fast` takes. Measured on an H100 (BERT-base bs128, 2026-11-27): over
K=768 the unpromoted sums passed the tuner's check (QKV's largest error 1.2e-3 of the output range against 6.1e-4
promoted; FFN-up's float8 codes off the float32 result 1.66 % against 1.33 %), over K=3072 they failed it (2.7e-3
against 4.8e-4)."""

FP8_FAST_TILES: dict[str, Tile] = {
    "tma-128x128x64-w4s4-e2-fast": Tile(128, 128, 64, 8, 4, 4, tma=True, subtile=2, fast=True),
    "tma-128x128x64-w4s4-fast": Tile(128, 128, 64, 8, 4, 4, tma=True, fast=True),
}
"""`triton.fp8_gemm_fast`'s space: the int8 winners' shapes (a 64-deep K step: no promotion to fit) summing the
whole K loop in the tensor cores. On an H100 (as above): FFN-up + GELU + quantize 136.8 us (the int8 layer 137.8),
QKV 86.3, attention output + residual 42.6."""



def render(s: Spec, tf32: bool, tma: bool = False, persistent: bool = False, subtile: int = 1,
           split: bool = False, last_sums: bool = False, fast: bool = False) -> str:
    """The kernel source for `s` (`tf32`: float32 products in TF32; `tma`: operands through TMA descriptors;
    `persistent`: the body in a loop over output tiles, `_persistent`; `subtile`: the epilogue on that many column
    slices, `templates.subtiles`; `split`: K shared among programs - `kiln_gemm_part` writes each share's float32
    partial tile, then `kiln_gemm` sums a tile's partials and runs the epilogue; with `last_sums`, one kernel whose
    last program per tile does that, `_LAST_SUMS`). An int8 spec accumulates in int32 and dequantizes the tile with
    one per-channel float32 multiply (`dq_ptr`) before its epilogue; a float8 spec sums in float32, promoting the
    tensor cores' partial sum every FP8_PROMOTE products unless `fast` (`Tile.fast`)."""
    if fast and s.dtype is not DType.FLOAT8_E4M3FN:
        raise ValueError("fast accumulation is a float8 form")
    int8 = s.dtype is DType.INT8
    scaled = s.dq is not None  # int8 or float8 products: dequantized by one multiply per output channel
    lines: list[str] = []
    pointers, strides = (["out2_ptr"] if s.out2 is not None else []) + (["dq_ptr"] if scaled else []), []
    if s.alpha != 1.0:
        lines.append(f"acc = acc * {float_text(s.alpha)}")
    if s.c_at is not None:
        pointers.append("c_ptr")
        strides += ["stride_cm", "stride_cn"]
        up = ".to(tl.float32)" if s.dtype in NARROW or scaled else ""
        if s.conv:  # the conv's bias: one value per output channel
            lines.append(f"c = tl.load(c_ptr + rn * stride_cn, mask=rn < N, other=0.0){up}")
        else:
            lines.append(f"c = tl.load(c_ptr + rm * stride_cm + rn * stride_cn, mask=mask, other=0.0){up}")
        lines.append("acc = acc + c" if s.beta == 1.0 else f"acc = acc + c * {float_text(s.beta)}")
    result, out, what = "acc", storage(s.out), str(s.dtype)
    if s.program is not None:
        for j in range(len(s.program.operands)):
            pointers.append(f"p{j}")
            strides += [f"s{j}_m", f"s{j}_n"]
        lines += operand_loads(s.program, s.kinds, "s{j}_n", "rm * s{j}_m", "rn < N")
        lines.extend(s.program.lines)
        result = s.program.result.text
        what = ", ".join([what, *sorted(set(s.program.ops))])
    precision = dot_options(s.dtype, tf32, "" if fast else str(FP8_PROMOTE))
    dequant = DEQUANTIZE if scaled else ""
    zero = "0" if int8 else "0.0"
    mainloop = (_TMA_LOOP if tma else _POINTER_LOOP).format(precision=precision, zero=zero)
    operands, operand_strides = ("x_desc, w_desc", "") if tma else \
        ("x_ptr, w_ptr", "stride_xm, stride_xk, stride_wk, stride_wn, ")
    partial = ""
    if split:
        if tma or persistent or subtile > 1 or s.norm is not None or scaled or s.conv:
            raise ValueError("the split-K form is the pointer main loop of a float GEMM, one tile per program")
        share = mainloop.replace(_LOOP_HEAD, _SPLIT_LOOP)
        if last_sums:
            mainloop, operands = share + _LAST_SUMS, "x_ptr, w_ptr, ws_ptr, cnt_ptr"
            operand_strides = "KSTEPS, SPLIT, " + operand_strides
        else:
            partial = _PARTIAL.format(mainloop=share)
            mainloop, operands, operand_strides = _SPLIT_SUM, "ws_ptr", "SPLIT, "
    elif last_sums:
        raise ValueError("last_sums is a form of the split-K kernel")
    if s.norm is not None:  # the rows' statistics first; the product of the raw rows is corrected before the epilogue
        assert not tma or s.norm.stats == "loop", "a TMA tile takes the statistics from the tiles it loads"
        (before, inside, after), fix, extra, extra_strides = _norm_prologue(s)
        if inside:
            at = mainloop.index(_LOOP_ANCHOR)
            at = mainloop.index("\n", at) + 1
            mainloop = mainloop[:at] + inside + mainloop[at:]
        if tma:  # the rows' pointer too: the kept normalized rows are written from them
            operands += ", x_ptr"
            operand_strides = "stride_xm, stride_xk, " + operand_strides
        mainloop = before + mainloop + after
        lines.insert(0, fix)
        operands += "".join(f", {p}" for p in extra)
        operand_strides += "".join(f"{p}, " for p in extra_strides)
        what += ", RMSNormalization" if s.norm.rms else ", LayerNormalization"
    also = second_store(s.program, "rm * stride_om + rn * stride_on")
    tail = _TAIL.format(epilogue="".join(f"    {line}\n" for line in lines), result=result, out=out, also=also)
    if subtile > 1:
        tail = subtiles(tail, subtile)
    if last_sums:  # the epilogue runs in the last program only
        tail = "".join(f"    {line}" if line.strip() else line for line in tail.splitlines(True))
    text = _SOURCE.format(what=what + (", TMA" if tma else "") + (", persistent" if persistent else "")
                          + (", split K" if split else "") + (", last program sums" if last_sums else ""),
                          pointers="".join(f"{p}, " for p in pointers),
                          strides="".join(f"{p}, " for p in strides), operands=operands,
                          operand_strides=operand_strides, mainloop=mainloop, tail=tail,
                          acc_type="tl.int32" if int8 else "tl.float32", dequant=dequant)
    if last_sums:
        text = text.replace(_FIRST, _FIRST + "    part = tl.program_id(1)\n", 1)
    return (_persistent(text) if persistent else text) + partial


_FIRST = "    pid = tl.program_id(0)\n"
_TILE_LOOP = """    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for pid in tl.range(tl.program_id(0), tiles, tl.num_programs(0), flatten=True):
"""


def _persistent(text: str) -> str:
    """The kernel `text` with its body - everything after the program id, up to the stores - run once per output
    tile `pid` of a loop striding by the number of programs (the launch makes about one per SM)."""
    head, body = text.split(_FIRST)
    return head + _TILE_LOOP + "".join(f"    {line}" if line.strip() else line for line in body.splitlines(True))


def source(s: Spec, tma: bool = False, persistent: bool = False, subtile: int = 1, split: bool = False,
           last_sums: bool = False, fast: bool = False) -> str:
    """The kernel source for `s`, with float32 products in TF32 exactly when torch's matmuls use it now."""
    return render(s, bool(torch.backends.cuda.matmul.allow_tf32), tma, persistent, subtile, split, last_sums, fast)


# --- the kernel ------------------------------------------------------------------------------------------------


def _stages(tile: Tile, itemsize: int, device: torch.device) -> int:
    """The tile's pipeline depth, cut to what the GPU's shared memory holds (float32 tiles are twice the size)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return tile.num_stages
    props = torch.cuda.get_device_properties(device)
    limit = getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024
    per_stage = (tile.block_m + tile.block_n) * tile.block_k * itemsize
    return max(1, min(tile.num_stages, (limit - 8 * 1024) // per_stage))


@functools.cache
def _programs(device: torch.device) -> int:
    """Programs a persistent launch makes: the GPU's SM count (3 off the GPU, so that the interpreter's programs
    loop over several tiles); asked once per device, not per launch."""
    if device.type != "cuda":
        return 3
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


def _extent(shape: tuple[int, int], stride: tuple[int, ...]) -> int:
    """One past the largest element offset a 2-D view reaches."""
    return 1 + sum((d - 1) * st for d, st in zip(shape, stride))


def _check_tma(s: Spec, device: torch.device) -> None:
    """TMA tiles: GPUs that have TMA (sm_90+), rows of A and of the [N, K] weight a multiple of 16 bytes."""
    if (s.k * s.dtype.torch.itemsize) % 16:
        raise UnsupportedError(f"triton.gemm: TMA needs rows of a multiple of 16 bytes (K = {s.k}, {s.dtype})")
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device) < (9, 0):
        raise UnsupportedError("triton.gemm: TMA needs an sm_90 (Hopper) or newer GPU")


def _tma_ready(t: torch.Tensor) -> bool:
    """A 2-D operand TMA can read: unit stride along K, 16-byte aligned start and row stride."""
    size = t.element_size()
    return t.dim() == 2 and t.stride(1) == 1 and (t.stride(0) * size) % 16 == 0 and t.data_ptr() % 16 == 0


class GemmKernel:
    """`spec` built for one tile: a Kernel (node inputs -> [output]); keeps no per-call state (a one-kernel split-K
    tile keeps its per-tile counters, zero between launches: `_counters`)."""

    def __init__(self, node: Node, s: Spec, tile: Tile, device: torch.device) -> None:
        self.s = s
        self.tile = tile
        self.stages = _stages(tile, s.dtype.torch.itemsize, device)
        if tile.tma:
            _check_tma(s, device)
        if tile.fast and s.k > FP8_FAST_MAX_K:
            raise UnsupportedError(f"triton.gemm: a reduction of {s.k} float8 products is promoted to float32 "
                                   f"(fast accumulation only up to K = {FP8_FAST_MAX_K})")
        self.source = source(s, tile.tma, tile.persistent, tile.subtile, tile.split_k > 1, tile.last_sums,
                             tile.fast)
        self.fn = load_function(self.source, "kiln_gemm", "kiln_gemm")
        two = tile.split_k > 1 and not tile.last_sums
        self._part_fn = load_function(self.source, "kiln_gemm", "kiln_gemm_part") if two else None
        self._counters: dict[tuple[torch.device, int], torch.Tensor] = {}
        self._pointer_fn: Any = None
        """For a TMA tile: the pointer kernel, compiled on first need (an operand TMA cannot read); for a split-K
        tile, the unsplit kernel (a shape with output tiles enough to fill the GPU)."""
        trans_b = s.trans_b
        if s.dq is None and tile.tma:  # [N, K] with K contiguous, seen as [K, N]: what the TMA loop reads
            self.weight = prepared(node, s.w_at, ("triton.gemm", trans_b, "nk"),
                                   lambda w: (w if trans_b else w.t()).contiguous().t())
        elif s.dq is None:
            self.weight = prepared(node, s.w_at, ("triton.gemm", trans_b),
                                   lambda w: (w.t() if trans_b else w).contiguous())
        elif s.conv:  # [K, C, 1, 1] is already [N, K] with K contiguous
            self.weight = prepared(node, s.w_at, ("triton.quantized_gemm", "conv1x1"),
                                   lambda w: w.reshape(w.shape[0], -1).contiguous().t())
        else:  # [N, K] with K contiguous, seen as [K, N]: int8 tensor cores take both operands K-major
            self.weight = prepared(node, s.w_at, ("triton.int8_gemm", trans_b),
                                   lambda w: (w if trans_b else w.t()).contiguous().t())
        self.dequant = None if s.dq is None else dequant_vector(node, s.dq, s.n)
        ops = s.program.operands if s.program is not None else ()
        self.reads = [None if op.input is None else s.sources[op.input - 1] for op in ops]
        """Per operand: the node input it reads, or None for the next body constant."""
        self.consts = [op.data for op in ops if op.data is not None]
        self._on: dict[torch.device, list[torch.Tensor]] = {}

    def __call__(self, xs: list[Any]) -> list[Any]:
        if self.s.conv:
            return self._conv(xs)
        s = self.s
        x = xs[s.x_at]
        w = self.weight(xs[s.w_at])
        x2 = x.t() if s.trans_a else x.reshape(-1, x.shape[-1])
        if x2.shape[1] != s.k:
            raise InputError(f"triton.gemm: A has {x2.shape[1]} columns, the weight {s.k} rows")
        m, n = x2.shape[0], s.n
        shape = (m, n) if s.trans_a else (*x.shape[:-1], n)
        outs = [torch.empty((m, n), dtype=d.torch, device=x.device) for d in (s.out, s.out2) if d is not None]
        if m and n:
            self._launch(xs, x2, w, outs, shape)
        return [o.view(shape) for o in outs]

    def _conv(self, xs: list[Any]) -> list[Any]:
        """A 1x1 stride-1 conv: the channels-last input as rows of C channels, the output channels-last."""
        s = self.s
        x = xs[s.x_at]
        if x.dim() != 4 or x.shape[1] != s.k:
            raise InputError(f"triton.int8_gemm: the conv input is {list(x.shape)}, the weight expects "
                             f"[N, {s.k}, H, W]")
        if not x.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)
        batch, c, h, wd = x.shape
        m = batch * h * wd
        x2 = x.permute(0, 2, 3, 1).reshape(m, c)  # a view: channels are the innermost axis
        outs = [torch.empty((batch, h, wd, s.n), dtype=d.torch, device=x.device) for d in (s.out, s.out2)
                if d is not None]
        if m:
            self._launch(xs, x2, self.weight(xs[s.w_at]), [o.view(m, s.n) for o in outs], (batch, s.n, h, wd))
        return [o.permute(0, 3, 1, 2) for o in outs]

    def _launch(self, xs: list[Any], x2: torch.Tensor, w: torch.Tensor, outs: list[torch.Tensor],
                shape: tuple[int, ...], extra: Sequence[torch.Tensor] = (), extra_strides: Sequence[int] = ()) -> None:
        """Runs the kernel: A [m, K] (`x2`), B [K, N], `outs` [m, N] (the result, then the second output when the
        spec has one, laid out alike); epilogue operands of logical `shape`; `extra`: the pointer main loop's
        operands after B (a norm's scale, B and normalized rows), `extra_strides` theirs after B's."""
        s = self.s
        out = outs[0]
        m, n = out.shape
        views = ([xs[s.c_at].expand(m, n)] if s.c_at is not None else []) + self._operands(xs, shape, m, n)
        wide = max([_extent((m, s.k), x2.stride()), w.numel(), out.numel(),
                    *(_extent((m, n), v.stride()) for v in views)]) >= WIDE_LIMIT
        t = self.tile
        grid = (math.ceil(m / t.block_m) * math.ceil(n / t.block_n),)
        if t.persistent:  # one program per SM at most, each looping over tiles
            grid = (min(grid[0], _programs(x2.device)),)
        dq = [] if self.dequant is None else [self._on_device(self.dequant, x2.device)]
        consts = dict(BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k, GROUP_M=t.group_m,
                      EVEN_K=s.k % t.block_k == 0, WIDE=wide, num_warps=t.num_warps, num_stages=self.stages)
        tail = [*outs[1:], *dq, *views, m, n, s.k]
        strides = [*out.stride(), *(st for v in views for st in v.stride())]
        if t.split_k > 1 and not extra:
            split = self._split(m, n, grid[0], wide, x2.device)
            if split > 1:
                ksteps = math.ceil(math.ceil(s.k / t.block_k) / split)
                split = math.ceil(math.ceil(s.k / t.block_k) / ksteps)  # no program without a K step
                ws = torch.empty((split, m, n), dtype=torch.float32, device=x2.device)
                if t.last_sums:
                    counts = self._counts(grid[0], x2.device)
                    self.fn[(grid[0], split)](x2, w, ws, counts, out, *tail, ksteps, split, *x2.stride(),
                                              *w.stride(), *strides, **consts)
                    return
                assert self._part_fn is not None
                self._part_fn[(grid[0], split)](x2, w, ws, m, n, s.k, ksteps, *x2.stride(), *w.stride(), **consts)
                self.fn[grid](ws, out, *tail, split, *strides, **consts)
                return
        if t.tma and _tma_ready(x2) and _tma_ready(w.t()):
            from triton.tools.tensor_descriptor import TensorDescriptor

            xd = TensorDescriptor.from_tensor(x2, [t.block_m, t.block_k])
            wd = TensorDescriptor.from_tensor(w.t(), [t.block_n, t.block_k])  # the [N, K] weight itself
            if s.norm is not None:  # a normalized GEMM: A's pointer and the norm's operands too
                self.fn[grid](xd, wd, x2, *extra, out, *tail, *x2.stride(), *extra_strides, *strides, **consts)
            else:
                self.fn[grid](xd, wd, out, *tail, *strides, **consts)
        else:
            fn = self.fn
            if t.tma or t.split_k > 1:  # e.g. a strided A view: the same arithmetic on pointers
                if self._pointer_fn is None:
                    self._pointer_fn = load_function(
                        source(s, persistent=t.persistent, subtile=t.subtile, fast=t.fast), "kiln_gemm", "kiln_gemm")
                fn = self._pointer_fn
            fn[grid](x2, w, *extra, out, *tail, *x2.stride(), *w.stride(), *extra_strides, *strides, **consts)

    def _split(self, m: int, n: int, tiles: int, wide: bool, device: torch.device) -> int:
        """How many programs share each output tile's K steps at this shape: the tile's `split_k` while the output
        tiles leave the GPU short of programs (fewer than two per SM; always off the GPU, for the interpreter),
        else 1 (the workspace would be large and the grid is full anyway)."""
        t = self.tile
        few = device.type != "cuda" or tiles < 2 * _programs(device)
        return t.split_k if few and not wide and t.split_k * m * n < WIDE_LIMIT else 1

    def _counts(self, tiles: int, device: torch.device) -> torch.Tensor:
        """The one-kernel split's arrival counters, one per output tile, zero between launches (the last program
        of each tile resets its own). One set per stream: launches on one stream never overlap, and contexts
        running side by side on streams of their own (their CUDA graphs captured there) never share a set."""
        stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
        c = self._counters.get((device, stream))
        if c is None or c.numel() < tiles:
            c = self._counters[(device, stream)] = torch.zeros(max(tiles, 64), dtype=torch.int32, device=device)
        return c

    def _on_device(self, t: torch.Tensor, device: torch.device) -> torch.Tensor:
        if t.device != device:
            t = self.dequant = t.to(device)
        return t

    def _operands(self, xs: list[Any], shape: tuple[int, ...], m: int, n: int) -> list[torch.Tensor]:
        """Each epilogue operand as an [M, N] view (a copy only where its broadcast cannot fold into rows)."""
        if not self.reads:
            return []
        device = xs[self.s.x_at].device
        consts = self._on.get(device)
        if consts is None:
            consts = self._on[device] = [c.to(device) for c in self.consts]
        it = iter(consts)
        ts = [xs[i] if i is not None else next(it) for i in self.reads]
        if self.s.conv:  # NCHW logical operands, read in the output's channels-last order
            return [t.expand(shape).permute(0, 2, 3, 1).reshape(m, n) for t in ts]
        return [t.expand(shape).reshape(m, n) for t in ts]


class TritonGemm(TemplateTactic):
    """MatMul/Gemm by a constant 2-D weight, with its epilogue, as one Triton kernel (see the module docstring)."""

    name = "triton.gemm"
    min_opt_level = 3  # GPU-verified (H100); fused residual/GELU epilogues beat cuBLAS + a pass (see TILES)
    ops = frozenset({"MatMul", "Gemm", "Fused"})
    devices = frozenset({"cuda"})
    tiles = TILES
    space = {"tile": tuple(TILES)}
    priority = 60

    def view(self, node: Node) -> Spec | None:
        return spec(node)

    def make(self, node: Node, view: Spec, tile: Tile, device: torch.device) -> Kernel:
        return GemmKernel(node, view, tile, device)


def quantized_steps(a: Anchored, dtype: DType) -> tuple[TileProgram | None, tuple[int, ...], DType] | None:
    """A "quantized" node's epilogue (after the dequantized product, `dtype` its operands') as (tile program or
    None, its inputs' node indices, the output dtype: float, or int8/uint8 - float8 for a float8 layer - when it
    requantizes for the next layer), or None."""
    steps = _steps(a)
    if steps is None:
        return None
    program, sources = steps
    out = program.result.dtype if program is not None else a.anchor.outputs[0].dtype
    if out != a.node.outputs[0].dtype or out not in (DType.FLOAT32, DType.FLOAT16, DType.BFLOAT16, DType.INT8,
                                                     DType.UINT8, DType.FLOAT8_E4M3FN):
        return None
    if out is DType.FLOAT8_E4M3FN and dtype is not DType.FLOAT8_E4M3FN:
        return None  # float8 outputs: written by float8 layers only
    also = [] if program is None else [e.dtype for e in program.also]
    if len(a.node.outputs) != 1 + len(also) or len(also) > 1 \
            or any(d not in (DType.INT8, DType.UINT8) or d != o.dtype for d, o in zip(also, a.node.outputs[1:])):
        return None  # a second output: the 8-bit copy of the float result (`fuse_requantize`)
    return program, sources, out


def quantized_spec(node: Node, dtype: DType = DType.INT8) -> Spec | None:
    """The int8 template's view of a "quantized" Fused node whose anchor is a MatMul/Gemm (the layouts
    `cuda.int8_gemm` takes: int8 activation with a per-tensor scale, constant int8 2-D weight with per-output-channel
    scales, zero points 0), or None. `dtype` FLOAT8_E4M3FN: the float8 layers `cuda.fp8_gemm` takes (one weight
    scale)."""
    from kiln.kernels.gemm.int8 import quantized_layout

    found = quantized_layout(node, dtype)
    if found is None:
        return None
    xq_at, sx_at, wq_at, sw_at, _, trans_b, c_at = found
    body: Graph = node.attrs["body"]
    anchor = body.nodes[2]
    xq, wq = node.inputs[xq_at], node.inputs[wq_at]
    assert xq is not None and wq is not None and isinstance(wq.data, torch.Tensor)
    w = wq.data
    k, n = (w.shape[1], w.shape[0]) if trans_b else (w.shape[0], w.shape[1])
    if k == 0 or len(node.outputs) != 1:
        return None
    beta = float(anchor.attrs.get("beta", 1.0)) if anchor.op == "Gemm" else 0.0
    if c_at is not None:
        c = node.inputs[c_at]
        if c is None or c.rank is None or c.rank > 2 or beta == 0.0:
            return None
    a = Anchored(node, anchor, [xq_at, wq_at, c_at], body.nodes[3:], body)
    steps = quantized_steps(a, dtype)
    if steps is None:
        return None
    program, sources, out = steps
    return Spec(xq_at, wq_at, False, bool(trans_b), 1.0, c_at, beta, int(n), int(k), dtype, out, program,
                sources, dq=(sx_at, sw_at), kinds=operand_kinds(node, program, sources, 1))


def conv1x1_spec(node: Node, dtype: DType = DType.INT8) -> Spec | None:
    """A "quantized" 1x1 conv with stride 1, no padding, one group (ResNet's bottleneck convs) in the GEMM
    template's terms (`Spec.conv`), or None; `dtype` as in `triton_conv.quantized_spec`."""
    from kiln.kernels.conv.triton_conv import quantized_spec as conv_spec

    cs = conv_spec(node, dtype)
    if cs is None or cs.kernel != (1, 1) or cs.stride != (1, 1) or cs.pad != (0, 0) or cs.dilation != (1, 1):
        return None
    return Spec(cs.x_at, cs.w_at, False, True, 1.0, cs.b_at, 1.0, cs.n, cs.c, cs.dtype, cs.out, cs.program,
                cs.sources, dq=cs.dq, kinds=cs.kinds, conv=True)


class TritonInt8Gemm(TritonGemm):
    """A "quantized" MatMul/Gemm (int8 activation and weight) as the GEMM template with int8 products into int32,
    dequantized per output channel in float32, then its epilogue in the same kernel (see the module docstring)."""

    name = "triton.int8_gemm"
    min_opt_level = 0
    ops = frozenset({"Fused"})
    tiles = INT8_TILES
    space = {"tile": tuple(INT8_TILES)}
    priority = 25  # before cuda.int8_gemm (30): the fused epilogue saves the int32 round trip through memory

    def view(self, node: Node) -> Spec | None:
        return quantized_spec(node) or conv1x1_spec(node)


class TritonFp8Gemm(TritonGemm):
    """A "quantized" float8 E4M3 MatMul/Gemm (`precision="fp8"`) as the GEMM template: float8 products summed in
    float32 by the tensor cores, one multiply by the two scales, then the epilogue in the same kernel - up to the
    QuantizeLinear that writes float8 for the next layer (an FFN's bias + GELU + quantize in one pass over the
    tile, where `cuda.fp8_gemm` writes float16 and runs them as a second kernel). The int8 tiles (same bytes per
    K step). GPU-tested only: the Triton interpreter's float8 conversion is wrong."""

    name = "triton.fp8_gemm"
    min_opt_level = 0
    ops = frozenset({"Fused"})
    tiles = FP8_TILES
    space = {"tile": tuple(FP8_TILES)}
    priority = 25  # before cuda.fp8_gemm (30)

    def view(self, node: Node) -> Spec | None:
        return quantized_spec(node, DType.FLOAT8_E4M3FN) or conv1x1_spec(node, DType.FLOAT8_E4M3FN)


NEXT_TILES: dict[str, Tile] = {
    "tma-128x256x64-w8s3-e4": Tile(128, 256, 64, 8, 8, 3, tma=True, subtile=4),
    "tma-128x128x64-w4s4-e4": Tile(128, 128, 64, 8, 4, 4, tma=True, subtile=4),
    "p-128x128x64-w4s4-e2": Tile(128, 128, 64, 8, 4, 4, persistent=True, subtile=2),
    "tma-128x128x64-w8s4-e2": Tile(128, 128, 64, 8, 8, 4, tma=True, subtile=2),
    "ptma-128x128x64-w8s4-e2": Tile(128, 128, 64, 8, 8, 4, tma=True, persistent=True, subtile=2),
    "tma-256x128x64-w8s3-e2": Tile(256, 128, 64, 8, 8, 3, tma=True, subtile=2),
}
"""Tiles under evaluation for the large float GEMMs (BERT/ViT at batch 128): the TMA tiles with the epilogue on
column slices, and persistent forms. Compiled for sm_90a off the GPU (Triton 3.9 and its ptxas, 2026-11-27; the
device has Triton 3.6), BERT's FFN-up + erf GELU + residual spills 572 bytes a thread on the whole 128x256 tile (8
warps) and 642 on 128x128 (4 warps) - a bias alone none, the residual or the GELU alone 72-132; in 2 slices 8 and
68, in 4 none (persistent: 850/920 whole, none in 4). Timed on an H200 (2026-11-27, `bench_gpu.py`): the winners
moved into TILES; these three won no shape there (BERT bs128 FFN-up 206 / 268 / 665 us against 190 for the
persistent 4-slice tile, FFN-down 157 / 185 / 567 against 137) and stay opt-in (`triton.gemm_next`). Added later the
same day from an offline sm_90a compile, not yet timed: 128x128 in 2 slices with 8 warps (106-140 registers a thread
on BERT's FFN-up + GELU and FFN-down + residual, no spill) and a 256-row tile in 2 slices (205-244, no spill)."""

INT8_NEXT_TILES: dict[str, Tile] = {
    "tma-128x256x128-w8s3-e2": Tile(128, 256, 128, 8, 8, 3, tma=True, subtile=2),
    "tma-128x256x128-w8s3-e4": Tile(128, 256, 128, 8, 8, 3, tma=True, subtile=4),
    "tma-128x128x64-w4s4-e4": Tile(128, 128, 64, 8, 4, 4, tma=True, subtile=4),
    "ptma-128x256x128-w8s3-e4": Tile(128, 256, 128, 8, 8, 3, tma=True, persistent=True, subtile=4),
    "ptma-128x128x64-w4s4-e4": Tile(128, 128, 64, 8, 4, 4, tma=True, persistent=True, subtile=4),
    "tma-128x128x64-w8s4-e2": Tile(128, 128, 64, 8, 8, 4, tma=True, subtile=2),
    "tma-128x128x128-w8s3-e2": Tile(128, 128, 128, 8, 8, 3, tma=True, subtile=2),
}
"""The same for the int8 TMA tiles that win BERT-base and ResNet-50 at batch 128, whose requantizing epilogues
cost as much as their main loops (BERT FFN-up + GELU + quantize: 0.186 ms a layer, FFN-down 0.095 at the same
FLOPs). Off the GPU as above: GELU + quantize spills 108 bytes (128x256x128, 8 warps) and 176 (128x128x64, 4
warps) on the whole tile, a float16 residual 208 and 20; none in 2 or 4 slices (persistent: none in 4). Timed on
an H200 (2026-11-27): the 128x128 tile in 2 slices won and moved into INT8_TILES; these won no BERT-base or
ResNet-50 shape (within 1-3 % at best, the persistent ones up to 2x slower) and stay opt-in
(`triton.int8_gemm_next`). Added later the same day from an offline sm_90a compile, not yet timed: the 128x128 tiles
in 2 slices with 8 warps (127 registers a thread on BERT's FFN epilogues, no spill; the 4-warp winner takes
233-255)."""


FP8_NEXT_TILES: dict[str, Tile] = {
    "tma-128x128x128-w8s3-e2": Tile(128, 128, 128, 8, 8, 3, tma=True, subtile=2),
    "tma-128x128x128-w8s4-e2": Tile(128, 128, 128, 8, 8, 4, tma=True, subtile=2),
    "tma-128x128x128-w4s3-e4": Tile(128, 128, 128, 8, 4, 3, tma=True, subtile=4),
    "tma-128x256x128-w8s3-e4": Tile(128, 256, 128, 8, 8, 3, tma=True, subtile=4),
}
"""Float8 tiles with the epilogue on column slices (the form that made INT8 faster on BERT-base at batch 128), with
the K step FP8_PROMOTE needs. Compiled for sm_90a off the GPU (Triton 3.9 and its ptxas, 2026-11-27; BERT's FFN-up
+ GELU + float8 quantize, and FFN-down + float16 residual): the default `tma-128x256x128-w8s3` spills 208 and 328
bytes a thread, in 4 slices 112 and 112; the 128x128 tiles here spill none (8 warps: 142-160 registers). Not yet
timed (`triton.fp8_gemm_next`, opt-in)."""


class TritonGemmNext(TritonGemm):
    """`triton.gemm` on the tiles under evaluation (`NEXT_TILES`: sliced epilogues, persistent programs); opt-in."""

    name = "triton.gemm_next"
    min_opt_level = 4
    tiles = NEXT_TILES
    space = {"tile": tuple(NEXT_TILES)}
    priority = 61


class TritonInt8GemmNext(TritonInt8Gemm):
    """`triton.int8_gemm` on the tiles under evaluation (`INT8_NEXT_TILES`); opt-in."""

    name = "triton.int8_gemm_next"
    min_opt_level = 4
    tiles = INT8_NEXT_TILES
    space = {"tile": tuple(INT8_NEXT_TILES)}
    priority = 26


class TritonFp8GemmNext(TritonFp8Gemm):
    """`triton.fp8_gemm` on the tiles under evaluation (`FP8_NEXT_TILES`); opt-in."""

    name = "triton.fp8_gemm_next"
    min_opt_level = 4
    tiles = FP8_NEXT_TILES
    space = {"tile": tuple(FP8_NEXT_TILES)}
    priority = 26


class TritonFp8GemmFast(TritonFp8Gemm):
    """`triton.fp8_gemm` without the float32 promotion (`Tile.fast`), for layers of at most FP8_FAST_MAX_K
    products: its results still pass the tuner's accuracy check against the float32-widened layer or are dropped.
    Ranked after `cuda.fp8_gemm` and the promoted tiles, and timed from the default optimization level up."""

    name = "triton.fp8_gemm_fast"
    min_opt_level = 3
    tiles = FP8_FAST_TILES
    space = {"tile": tuple(FP8_FAST_TILES)}
    priority = 31

    def view(self, node: Node) -> Spec | None:
        s = super().view(node)
        return s if s is not None and s.k <= FP8_FAST_MAX_K else None


SPLIT_TILES: dict[str, Tile] = {
    "64x64x64-w4s4-k2": Tile(64, 64, 64, 4, 4, 4, split_k=2),
    "64x64x64-w4s4-k4": Tile(64, 64, 64, 4, 4, 4, split_k=4),
    "64x64x64-w4s4-k8": Tile(64, 64, 64, 4, 4, 4, split_k=8),
    "32x64x128-w4s4-k4": Tile(32, 64, 128, 4, 4, 4, split_k=4),
    "64x128x64-w4s4-k4": Tile(64, 128, 64, 8, 4, 4, split_k=4),
    "16x64x256-w4s3-k4": Tile(16, 64, 256, 1, 4, 3, split_k=4),
    "64x64x64-w4s4-k4-last": Tile(64, 64, 64, 4, 4, 4, split_k=4, last_sums=True),
    "64x128x64-w4s4-k4-last": Tile(64, 128, 64, 8, 4, 4, split_k=4, last_sums=True),
    "16x64x256-w4s3-k4-last": Tile(16, 64, 256, 1, 4, 3, split_k=4, last_sums=True),
}
"""Split-K tiles, for few rows: BERT-base / ViT-B/16 at batch 1 (M = 128 / 197) have 24-48 output tiles of 64 x
64 in their N=768 GEMMs (attention output, FFN-down: K up to 3072) on a GPU of 132 SMs. Measured on an H200
(2026-11-27, float16, `bench_gpu.py`: CUDA graphs of 20 calls, L2 warm) they tie at best: BERT bs1 FFN-down +
GELU + residual 8.7 us (64x64, 4 shares) vs 9.1 for the best unsplit tile and 8.8 for cuBLAS + pass; ViT bs1
attention output + residual 7.2 vs 5.5; QKV and FFN-up (K=768) 8.9-19 vs 5.1-5.6. Timed by the tuner (one replay,
L2 flushed) in BERT-base bs1 they lost every node (FFN-down 14.5 us vs 13.3 unsplit): the second kernel's launch
costs what the shared K saves. Opt-in (level 4). The "-last" tiles are one kernel (`Tile.last_sums`: the last
program of a tile to finish sums the shares and runs the epilogue): not yet run on a GPU."""

SPLIT_GRID = 512
"""`triton.gemm_splitk` takes a node whose output, in 64 x 64 tiles, is at most this many tiles (a few waves of
programs on the largest GPUs): past that the unsplit grid fills the GPU."""


def static_rows(node: Node, s: Spec) -> int | None:
    """The GEMM's M when the node's A has a static shape, else None."""
    x = node.inputs[s.x_at]
    shape = x.shape if x is not None else None
    if shape is None or not all(isinstance(d, int) for d in shape):
        return None
    if s.trans_a:
        return int(shape[1])
    return math.prod(int(d) for d in shape[:-1])


class TritonGemmSplitK(TritonGemm):
    """`triton.gemm` with each output tile's K steps shared among programs (`SPLIT_TILES`, `render`'s split form):
    for the float GEMMs whose output tiles are too few to fill the GPU (`SPLIT_GRID`), at static shapes. At run
    time a shape with enough tiles runs the unsplit kernel."""

    name = "triton.gemm_splitk"
    min_opt_level = 4  # measured: no batch-1 node won (SPLIT_TILES)
    tiles = SPLIT_TILES
    space = {"tile": tuple(SPLIT_TILES)}
    priority = 62

    def view(self, node: Node) -> Spec | None:
        s = spec(node)
        if s is None or s.dq is not None or s.norm is not None or s.conv or s.k < 256:
            return None
        m = static_rows(node, s)
        if m is None or math.ceil(m / 64) * math.ceil(s.n / 64) > SPLIT_GRID:
            return None
        return s


register(TritonGemm())
register(TritonInt8Gemm())
register(TritonFp8Gemm())
register(TritonGemmNext())
register(TritonInt8GemmNext())
register(TritonFp8GemmNext())
register(TritonFp8GemmFast())
register(TritonGemmSplitK())
