"""`triton.conv`: a 2-D Conv, alone or anchoring an epilogue, as one generated Triton kernel (implicit GEMM).

The convolution is a GEMM that is never materialized: rows are the M = batch * OH * OW output pixels, columns the
output channels, and the reduction runs over K = KH * KW * C_in, ordered (kh, kw, c) so that a K step reads
BLOCK_K neighbouring channels of one input pixel - contiguous memory for a channels-last input, the fast case. The
input is read with its own strides (NCHW works too, more slowly); padding is a load mask, strides and dilation are
index arithmetic. Each BLOCK_M x BLOCK_N tile accumulates in float32 with `tl.dot`, then takes the conv's bias and
the Fused body's steps (residual add, activation, scale, Cast...) in registers, rendered by the pointwise
generator's rules (`kiln.kernels.pointwise.tile`, as in `triton.gemm`), and is stored once in the node's output
dtype. The output is channels-last when the input is (the layout its readers expect), else NCHW.

The weight is laid out once at build time as [KH * KW * C_in, C_out] row-major. Grouped convolutions (depthwise ones
have `triton.depthwise`),
asymmetric padding and auto_pad SAME are refused (cuDNN keeps them). Float32 products use TF32 exactly when
torch's cuDNN convolutions do (`torch.backends.cudnn.allow_tf32`, read at build time), so the tactic matches the
convolution the reference runs. The space is four tiles (`TILES`), each a compile per conv shape on the GPU.

`triton.int8_conv` runs the same template on "quantized" convs (int8 x int8 -> int32, dequantized per output
channel before the epilogue; a layer whose float result is read besides its requantized copy stores both). Its
"tma-" tile is the TMA form (`_TMA_SOURCE`): for stride-1 convs a program's rows are a BH x BW patch of one image
and each tap's input block is one rectangular load that the hardware zero-fills at the edges. `TILES` (float convs)
has no TMA tile yet: the float space stays at four tiles for build time until the form is timed.

`triton.thin_conv` runs the TMA form on float16/bfloat16 1x1 convs with few input channels (`THIN_TILES`, each
layer timed on the tiles that fit its width), and on "scaled" nodes (`kiln.passes.channel_scale`), multiplying
each loaded input tile by its image's channel scales (`PRESCALE`). The TMA form passes the output channel count and
the pixel strides divided by their vector width (`_vector_params`), so that stores of 24- to 200-channel rows are
vectors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch

from kiln.ir.dtype import DType
from kiln.ir.graph import Node
from kiln.kernels.base import Kernel
from kiln.kernels.conv.cudnn import _params
from kiln.kernels.cpu.common import prepared
from kiln.kernels.epilogue import Anchored
from kiln.kernels.gemm.triton_gemm import FP8_PROMOTE, WIDE_LIMIT, Tile, _stages, _steps, quantized_steps
from kiln.kernels.pointwise.rules import storage
from kiln.kernels.pointwise.tile import TileProgram, load_function
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

ANCHORS = frozenset({"Conv"})
Pair = tuple[int, int]

TILES: dict[str, Tile] = {
    "128x128x64-w8s3": Tile(128, 128, 64, 8, 8, 3),
    "128x64x64-w4s4": Tile(128, 64, 64, 8, 4, 4),
    "64x64x64-w4s4": Tile(64, 64, 64, 8, 4, 4),
    "32x64x128-w4s4": Tile(32, 64, 128, 4, 4, 4),
}
"""The search space (H100, float16, ResNet-50): the first for batch 128 (M of 6K-1.6M pixels, 128+ output channels),
the second for its 64-channel layers, the last two for batch 1 (M of 3136 down to 49), where the grid, not the MMA,
limits speed. A K step covers BLOCK_K channels of one tap, so convs with few input channels (the RGB stem) waste
most of each step: cuDNN is expected to keep those."""

INT8_TILES: dict[str, Tile] = {
    "128x64x64-w4s4": TILES["128x64x64-w4s4"],
    "64x64x64-w4s4": TILES["64x64x64-w4s4"],
    "128x128x64-w4s4": Tile(128, 128, 64, 8, 4, 4),
    "128x128x64-w8s3": TILES["128x128x64-w8s3"],
    "tma-128x64x64-w4s4": Tile(128, 64, 64, 8, 4, 4, tma=True),
}
"""`triton.int8_conv`'s space (also `triton.fp8_conv`'s), measured on an H100 at batch 128 (2026-11-27, ResNet-50's
3x3 convs requantizing, weights K-major): 128x64x64 and the TMA form (`_TMA_SOURCE`, stride-1 convs on channels-last
input) for the 64-channel layer1 (75.7 / 74.1 us; cuDNN's float16 conv alone 78) and for 1x1 convs with a residual
(the TMA form 170.7 us, layer1); 128x128x64 with 4 warps for layer2 and layer4 (52.8 / 46.5 us vs 61.4 / 48.6 with
128x64x64), with 8 warps for layer3 (47.9 vs 51.6). 64x64x64 is the batch-1 tile. A 128x64x128 tile (best with an
N-major weight) and 128x128x128 lost everywhere."""
assert all(t.block_k <= FP8_PROMOTE for t in INT8_TILES.values())  # triton.fp8_conv promotes once per K step



# --- what the template takes ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """A node in the template's terms; `*_at` are indices into the node's inputs."""

    x_at: int
    w_at: int
    b_at: int | None
    c: int
    """Input channels."""
    n: int
    """Output channels."""
    kernel: Pair
    stride: Pair
    pad: Pair
    """Per axis, both sides."""
    dilation: Pair
    dtype: DType
    """The input's, weight's and bias's dtype."""
    out: DType
    program: TileProgram | None
    """The epilogue steps (None: no steps)."""
    sources: tuple[int, ...]
    """Node input index of each epilogue graph input after the accumulator."""
    dq: tuple[int, int] | None = None
    """An int8 spec's node input indices of the activation's scale and the weight's per-channel scales."""
    kinds: tuple[str, ...] = ()
    """Per epilogue operand: "scalar", "row" (per output channel) or "full" (`templates.operand_kinds`)."""
    scale_at: int | None = None
    """A "scaled" node's (`kiln.passes.channel_scale`) node input index of the per-(image, channel) scale
    [N or 1, C, 1, 1] the input is multiplied by before the conv (the TMA form applies it to each loaded tile)."""

    @property
    def out2(self) -> DType | None:
        """The second output's dtype (`templates.second_output`), or None."""
        return second_output(self.program)


def spec(node: Node, depthwise: bool = False) -> Spec | None:
    """The template's view of `node`, or None when it cannot be rendered exactly. `depthwise`: the node must be a
    depthwise conv (groups = input channels = output channels, weight [C, 1, KH, KW]), else an ungrouped one."""
    a = Anchored.of(node, ANCHORS)
    return None if a is None else _spec(a, depthwise)


def scaled_spec(node: Node) -> Spec | None:
    """The template's view of a "scaled" Fused node (body: Mul(x, scale) with scale [N or 1, C, 1, 1] of x's
    dtype, then an ungrouped Conv of the product and its epilogue steps; `kiln.passes.channel_scale`), or None."""
    if node.op != "Fused" or node.attrs.get("kind") != "scaled":
        return None
    body = node.attrs["body"]
    if len(body.nodes) < 2 or body.nodes[0].op != "Mul" or body.nodes[1].op not in ANCHORS:
        return None
    mul, conv = body.nodes[0], body.nodes[1]
    m = mul.outputs[0]
    if conv.inputs[0] is not m or any(m in n.inputs for n in body.nodes[2:]) or m in conv.inputs[1:] \
            or m in body.outputs:
        return None
    if len(mul.inputs) != 2 or any(v is None for v in mul.inputs):
        return None
    x, scale = mul.inputs if mul.inputs[0].type == m.type else mul.inputs[::-1]
    if x is None or scale is None or x not in body.inputs or scale not in body.inputs or x.rank != 4:
        return None
    if scale.shape is None or len(scale.shape) != 4 or scale.shape[2:] != (1, 1) or scale.dtype is not x.dtype \
            or x.shape is None or scale.shape[1] != x.shape[1] or scale.shape[0] not in (1, x.shape[0]):
        return None
    arg: list[int | None] = [body.inputs.index(x)]
    for v in conv.inputs[1:]:
        if v is not None and v not in body.inputs:
            return None
        arg.append(None if v is None else body.inputs.index(v))
    s = _spec(Anchored(node, conv, arg, body.nodes[2:], body), False)
    return None if s is None else replace(s, scale_at=body.inputs.index(scale))


def _spec(a: Anchored, depthwise: bool) -> Spec | None:
    node = a.node
    if len(node.outputs) != 1 or not a.dtypes_ok():
        return None
    geometry = _geometry(a)
    x, w, x_at, w_at = a.input(0), a.constant(1), a.arg[0], a.arg[1]
    if geometry is None or x is None or w is None or x_at is None or w_at is None or w.numel() == 0:
        return None
    groups = int(a.anchor.attrs.get("group", 1))
    if w.dim() != 4 or (groups != w.shape[0] or w.shape[1] != 1 if depthwise else groups != 1):
        return None
    if depthwise and x.shape is not None and isinstance(x.shape[1], int) and x.shape[1] != groups:
        return None
    dtype = x.dtype
    b = a.input(2)
    if w.dtype != dtype.torch or a.anchor.outputs[0].dtype != dtype or (b is not None and b.dtype != dtype):
        return None
    steps = _steps(a)
    if steps is None:
        return None
    program, sources = steps
    out = program.result.dtype if program is not None else dtype
    if out != node.outputs[0].dtype:
        return None
    stride, pad, dilation = geometry
    b_at = a.arg[2] if b is not None else None
    c = int(w.shape[0]) if depthwise else int(w.shape[1])
    return Spec(x_at, w_at, b_at, c, int(w.shape[0]), (int(w.shape[2]), int(w.shape[3])), stride, pad, dilation, dtype,
                out, program, sources, kinds=operand_kinds(node, program, sources, 3))


def _geometry(a: Anchored) -> tuple[Pair, Pair, Pair] | None:
    """(strides, symmetric pads, dilations) of a 2-D conv; None for anything else."""
    params = _params(a)
    if params is None:
        return None
    k, strides, pads, dil, _ = params
    if k != 2:
        return None
    return (strides[0], strides[1]), (pads[0], pads[1]), (dil[0], dil[1])


# --- source text ---------------------------------------------------------------------------------------------

_SOURCE = '''"""Generated by kiln.kernels.conv.triton_conv ({what})."""
import triton
import triton.language as tl

from kiln.kernels.pointwise import mathlib as km

INF = tl.constexpr(float("inf"))


@triton.jit
def kiln_conv(x_ptr, w_ptr, out_ptr, {pointers}M, N, C, H, W, OH, OW, stride_xb, stride_xc, stride_xh,
              stride_xw, stride_wk, stride_wn, stride_ob, stride_oc, stride_oh, stride_ow,
              {strides}KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr,
              PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, PADDED: tl.constexpr, EVEN_C: tl.constexpr,
              WIDE: tl.constexpr):
{prologue}    ih0 = oh * SH - PH
    iw0 = ow * SW - PW
    x_rows = x_ptr + ob * stride_xb
    w_cols = w_ptr + (offs_n % N)[None, :] * stride_wn
    c_steps = tl.cdiv(C, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype={acc_type})
    for step in range(0, KH * KW * c_steps):
        r = step // c_steps
        c0 = (step - r * c_steps) * BLOCK_K
        ih = ih0 + (r // KW) * DH
        iw = iw0 + (r % KW) * DW
        chans = c0 + offs_k
        x_ptrs = (x_rows + ih * stride_xh + iw * stride_xw)[:, None] + chans[None, :] * stride_xc
        w_ptrs = w_cols + (r * C + chans)[:, None] * stride_wk
        if PADDED:
            inside = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            if EVEN_C:
                x = tl.load(x_ptrs, mask=inside[:, None], other={zero})
            else:
                x = tl.load(x_ptrs, mask=inside[:, None] & (chans < C)[None, :], other={zero})
        elif EVEN_C:
            x = tl.load(x_ptrs)
        else:
            x = tl.load(x_ptrs, mask=(chans < C)[None, :], other={zero})
        if EVEN_C:
            w = tl.load(w_ptrs)
        else:
            w = tl.load(w_ptrs, mask=(chans < C)[:, None], other={zero})
        acc = tl.dot(x, w, acc{precision})
{dequant}{tail}'''

PROLOGUE = "    pid = tl.program_id(0)\n" + GROUPED_TILE + """\
    offs_k = tl.arange(0, BLOCK_K)
    if WIDE:
        offs_k = offs_k.to(tl.int64)
    # why: wrapped rows and columns are real pixels and channels, so the loads need no M/N masks; the store drops them
    pix = offs_m % M
    ob = pix // (OH * OW)
    oh = (pix // OW) % OH
    ow = pix % OW
"""
"""The start of the pointer-form implicit-GEMM kernels (`triton.conv`, `triton.stem_conv`): the program's output
tile - rows `offs_m` (pixels `ob`, `oh`, `ow`, grouped GROUP_M row tiles at a time), columns `offs_n` - and its K
offsets `offs_k`."""

_TAIL = """    rm = offs_m[:, None]
    rn = offs_n[None, :]
    mask = (rm < M) & (rn < N)
{epilogue}    out_rows = (ob * stride_ob + oh * stride_oh + ow * stride_ow)[:, None]
    tl.store(out_ptr + out_rows + rn * stride_oc, {result}.to({out}), mask=mask)
{also}"""
"""The pointer form's epilogue and stores of one output tile (or column slice of it: `templates.subtiles`)."""


_TMA_SOURCE = '''"""Generated by kiln.kernels.conv.triton_conv ({what}, TMA)."""
import triton
import triton.language as tl

from kiln.kernels.pointwise import mathlib as km

INF = tl.constexpr(float("inf"))


@triton.jit
def kiln_conv(x_desc, w_desc, out_ptr, {pointers}N, C, OH, OW, tiles_w, tiles_hw, stride_ob, stride_oc, stride_oh,
              stride_ow, {strides}KH: tl.constexpr, KW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
              BH: tl.constexpr, BW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              WIDE: tl.constexpr, OVEC: tl.constexpr):
{scale}    pid = tl.program_id(0)
    grid_n = tl.cdiv(N, BLOCK_N)
    pid_n = pid % grid_n
    pid_m = pid // grid_n
    ob = pid_m // tiles_hw
    t = pid_m % tiles_hw
    oh0 = (t // tiles_w) * BH
    ow0 = (t % tiles_w) * BW
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_steps = tl.cdiv(C, BLOCK_K)
    acc = tl.zeros((BH * BW, BLOCK_N), dtype={acc_type})
    for step in range(0, KH * KW * c_steps):
        r = step // c_steps
        c0 = (step - r * c_steps) * BLOCK_K
        # why: a BH x BW patch of the input shifted by the tap; TMA fills rows, columns and channels past the
        # input's edges (the padding, negative coordinates included) with zeros
        x = x_desc.load([ob, oh0 + r // KW - PH, ow0 + r % KW - PW, c0])
        x = tl.reshape(x, [BH * BW, BLOCK_K])
        # why: past C the input's channels are zeros, so the weight columns of the next tap they meet add nothing
        w = w_desc.load([pid_n * BLOCK_N, r * C + c0])
{prescale}        acc = tl.dot(x, w.T, acc{precision})
{dequant}    offs_m = tl.arange(0, BH * BW)
    oh = oh0 + offs_m // BW
    ow = ow0 + offs_m % BW
    if WIDE:
        ob = ob.to(tl.int64)
        oh = oh.to(tl.int64)
        ow = ow.to(tl.int64)
{tail}'''

_TMA_TAIL = """    rn = offs_n[None, :]
    mask = ((oh < OH) & (ow < OW))[:, None] & (rn < N)
{epilogue}    out_rows = (ob * stride_ob + oh * stride_oh + ow * stride_ow)[:, None]
    tl.store(out_ptr + out_rows + rn * stride_oc, {result}.to({out}), mask=mask)
{also}"""
"""The TMA form for stride-1, undilated convs on channels-last input: a program's rows are a BH x BW patch of one
image's output (not a run of flattened pixels), so each tap's input block is one rectangular TMA load from the
[N, H, W, C] input, zero-filled at the edges (no address arithmetic, no masks), and the weight [C_out, KH*KW*C]
(K contiguous) is a second descriptor. BLOCK_M (= BH * BW) is passed too: the epilogue's literal constants are
tiles of [BLOCK_M, BLOCK_N] (an FP8 layer's float8 zero point)."""


def render(s: Spec, tf32: bool, tma: bool = False, subtile: int = 1) -> str:
    """The kernel source for `s` (`tf32`: float32 products in TF32; `subtile`: the epilogue on that many column
    slices, `templates.subtiles`). An int8 spec (a "quantized" node) accumulates in int32 and dequantizes the tile
    with one per-channel float32 multiply (`dq_ptr`) before its epilogue."""
    e = epilogue(s, "tl.load(b_ptr + (offs_n % N) * stride_b)")
    int8 = s.dtype is DType.INT8
    scaled = s.dq is not None  # int8 or float8 products, dequantized per output channel
    # why BLOCK_K: Triton promotes at most once per K step, and every conv tile's is <= FP8_PROMOTE
    precision = dot_options(s.dtype, tf32, "BLOCK_K")
    dequant = DEQUANTIZE if scaled else ""
    also = second_store(s.program, "out_rows + rn * stride_oc")
    pointers = ("out2_ptr, " if also else "") + ("sc_ptr, " if s.scale_at is not None else "") + \
        ("dq_ptr, " if scaled else "") + e.pointers
    tail = (_TMA_TAIL if tma else _TAIL).format(epilogue=e.lines, result=e.result, out=storage(s.out), also=also)
    if subtile > 1:
        tail = subtiles(tail, subtile)
    scale = "".join(f"    {p} = {p} * OVEC\n" for p in _vector_params(s)) if tma else ""
    strides = e.strides
    if s.scale_at is not None:
        assert tma, "a scaled conv is rendered in the TMA form only"
        strides = "stride_sb, stride_sc, " + strides
    return (_TMA_SOURCE if tma else _SOURCE).format(what=e.what, pointers=pointers, strides=strides,
                          prologue=PROLOGUE, precision=precision, acc_type="tl.int32" if int8 else "tl.float32",
                          zero="0" if int8 else "0.0", dequant=dequant, tail=tail, scale=scale,
                          prescale=PRESCALE if s.scale_at is not None else "")


PRESCALE = """\
        sc_c = c0 + tl.arange(0, BLOCK_K)
        sc = tl.load(sc_ptr + ob * stride_sb + sc_c * stride_sc, mask=sc_c < C, other=0.0)
        x = (x.to(tl.float32) * sc.to(tl.float32)[None, :]).to(x.dtype)
"""
"""A scaled conv's prologue in the TMA form's K loop: the loaded [BH * BW, BLOCK_K] input tile times the image's
scales of those channels, rounded to the input's dtype as the Mul it replaces rounds (a program's patch lies in one
image, so the scale is one row per K step)."""


def _vector_params(s: Spec) -> list[str]:
    """The TMA form's parameters passed divided by OVEC and multiplied back in the kernel, so that Triton sees them
    as multiples of OVEC (see `triton_depthwise.WINDOW`): the output channel count N, which bounds the store mask
    `rn < N`, and the pixel strides (image, row, column) of the output and the epilogue operands - without them a
    24-, 72- or 120-channel output is stored one element at a time (`_divided` divides them on the host)."""
    ops = s.program.operands if s.program is not None else ()
    return ["N", "stride_ob", "stride_oh", "stride_ow", *(f"s{j}_{a}" for j in range(len(ops)) for a in "bhw")]


def _divided(v: torch.Tensor, vec: int) -> tuple[int, ...]:
    """A TMA-form operand's strides as the kernel takes them: a 4-D one's pixel strides divided by `vec`."""
    if v.dim() != 4:
        return v.stride()
    b, h, w = pixel_strides(v, vec)
    return b, v.stride(1), h, w


@dataclass(frozen=True)
class Epilogue:
    """The source fragments of a conv tile's epilogue: extra pointer and stride parameters, the lines (indented)
    that load the operands and compute `result` from the float32 tile `acc`, and a description."""

    pointers: str
    strides: str
    lines: str
    result: str
    what: str


def epilogue(s: Spec, bias_load: str, cols_ok: str = "rn < N", row: str = "[None, :]") -> Epilogue:
    """`s`'s bias (loaded by `bias_load`, the tile's channels, broadcast over its rows by the index `row`) and
    steps, rendered for a kernel that names its tile's rows' coordinates `ob`, `oh`, `ow`, its columns' channels
    `rn`, its store mask `mask` and its valid columns `cols_ok` (either broadcast to the tile)."""
    lines: list[str] = []
    pointers, strides = [], []
    if s.b_at is not None:
        pointers.append("b_ptr")
        strides.append("stride_b")
        lines.append(f"acc = acc + {bias_load}.to(tl.float32){row}")
    result, what = "acc", str(s.dtype)
    if s.program is not None:
        for j in range(len(s.program.operands)):
            pointers.append(f"p{j}")
            strides += [f"s{j}_b", f"s{j}_c", f"s{j}_h", f"s{j}_w"]
        lines += operand_loads(s.program, s.kinds, "s{j}_c", "(ob * s{j}_b + oh * s{j}_h + ow * s{j}_w)[:, None]",
                               cols_ok)
        lines.extend(s.program.lines)
        result = s.program.result.text
        what = ", ".join([what, *sorted(set(s.program.ops))])
    return Epilogue("".join(f"{p}, " for p in pointers), "".join(f"{p}, " for p in strides),
                    "".join(f"    {line}\n" for line in lines), result, what)


def source(s: Spec, tma: bool = False, subtile: int = 1) -> str:
    """The kernel source for `s`, with float32 products in TF32 exactly when torch's cuDNN convolutions use it."""
    return render(s, bool(torch.backends.cudnn.allow_tf32), tma, subtile)


def patch_shape(block_m: int, oh: int, ow: int) -> tuple[int, int]:
    """(BH, BW) with BH * BW = block_m for the TMA form: the patch that computes the fewest pixels past an OH x OW
    output (ties: the squarer, then the wider: longer contiguous rows of channels-last input)."""
    best: tuple[float, int, int, int] | None = None
    for bw in (128, 64, 32, 16, 8):
        if bw > block_m:
            continue
        bh = block_m // bw
        covered = -(-oh // bh) * bh * -(-ow // bw) * bw
        cand = (covered / (oh * ow), abs(bh - bw), bh, bw)
        if best is None or cand[:2] < best[:2]:
            best = cand
    assert best is not None
    return best[2], best[3]


# --- the kernel ------------------------------------------------------------------------------------------------


def pixel_vec(c: int, *ts: torch.Tensor) -> int:
    """The largest of 16, 8, 4, 2, 1 dividing the channel count `c` and the image, row and column strides of every
    4-D tensor in `ts` (16 int8 elements or 8 float16 ones are one 16-byte vector)."""
    sizes = [c, *(st for t in ts for st in (t.stride(0), t.stride(2), t.stride(3)))]
    return next(v for v in (16, 8, 4, 2, 1) if all(st % v == 0 for st in sizes))


def pixel_strides(t: torch.Tensor, vec: int) -> tuple[int, int, int]:
    """`t`'s image, row and column strides divided by `vec` (see `triton_depthwise.WINDOW`)."""
    return t.stride(0) // vec, t.stride(2) // vec, t.stride(3) // vec


def _extent(t: torch.Tensor) -> int:
    """One past the largest element offset `t` reaches."""
    return 1 + sum((d - 1) * st for d, st in zip(t.shape, t.stride()))


def channels_last(x: torch.Tensor) -> bool:
    """Whether `x` is in NHWC memory order (and not also plain NCHW, as a tensor with C == 1 or H == W == 1 is)."""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


class SpecKernel:
    """What the kernels built from a `Spec` share: the epilogue's operands and the output size."""

    tactic = "triton.conv"

    def __init__(self, s: Spec) -> None:
        self.s = s
        ops = s.program.operands if s.program is not None else ()
        self.reads = [None if op.input is None else s.sources[op.input - 1] for op in ops]
        """Per operand: the node input it reads, or None for the next body constant."""
        self.consts = [op.data for op in ops if op.data is not None]
        self._on: dict[torch.device, list[torch.Tensor]] = {}
        self._moved: dict[tuple[int, torch.device], torch.Tensor] = {}

    def _on_device(self, t: torch.Tensor, device: torch.device) -> torch.Tensor:
        """A build-time tensor on the inputs' device (moved once)."""
        key = (id(t), device)
        moved = self._moved.get(key)
        if moved is None:
            moved = self._moved[key] = t.to(device)
        return moved

    def _out_size(self, h: int, w: int) -> tuple[int, int]:
        s = self.s
        sizes = tuple((size + 2 * p - d * (k - 1) - 1) // st + 1
                      for size, p, d, k, st in zip((h, w), s.pad, s.dilation, s.kernel, s.stride))
        if min(sizes) < 1:
            raise InputError(f"{self.tactic}: a {h}x{w} input is smaller than the {s.kernel} kernel's window")
        return sizes[0], sizes[1]

    def _operands(self, xs: list[Any], shape: tuple[int, ...]) -> list[torch.Tensor]:
        """Each epilogue operand as a view of the output's shape (stride 0 where it broadcasts)."""
        if not self.reads:
            return []
        device = xs[self.s.x_at].device
        consts = self._on.get(device)
        if consts is None:
            consts = self._on[device] = [c.to(device) for c in self.consts]
        it = iter(consts)
        return [(xs[i] if i is not None else next(it)).expand(shape) for i in self.reads]


class ConvKernel(SpecKernel):
    """`spec` built for one tile: a Kernel (node inputs -> [output]); keeps no per-call state."""

    def __init__(self, node: Node, s: Spec, tile: Tile, device: torch.device) -> None:
        super().__init__(s)
        self.tile = tile
        self.stages = _stages(tile, s.dtype.torch.itemsize, device)
        if tile.tma:
            _check_tma(s, device)
        self.source = self.render(s, tile)
        self.fn = load_function(self.source, "kiln_conv", "kiln_conv")
        # why: Hopper's 8-bit tensor-core MMA (wgmma) takes both operands K-major only; with an N-major weight
        # Triton falls back to the older MMA. The TMA form reads both K-major too.
        self.k_major = tile.tma or s.dtype in (DType.INT8, DType.FLOAT8_E4M3FN)
        if self.k_major:  # [C_out, KH*KW*C_in], K contiguous
            self.weight = prepared(node, s.w_at, ("triton.conv", "n_khkwc"),
                                   lambda w: w.permute(0, 2, 3, 1).reshape(w.shape[0], -1).contiguous())
        else:  # why: K ordered (kh, kw, c) so that one K step reads neighbouring channels of one input pixel
            self.weight = prepared(node, s.w_at, ("triton.conv", "khkwc"),
                                   lambda w: w.permute(2, 3, 1, 0).reshape(-1, w.shape[0]).contiguous())
        self.dequant = None if s.dq is None else dequant_vector(node, s.dq, s.n)

    def render(self, s: Spec, tile: Tile) -> str:
        """The kernel source (subclasses render another form with the same arguments)."""
        return source(s, tile.tma, tile.subtile)

    def __call__(self, xs: list[Any]) -> list[Any]:
        s = self.s
        x = xs[s.x_at]
        if x.dim() != 4 or x.shape[1] != s.c:
            raise InputError(f"triton.conv: the input is {list(x.shape)}, the weight expects [N, {s.c}, H, W]")
        w = self.weight(xs[s.w_at])
        batch, _, h, wd = x.shape
        oh, ow = self._out_size(h, wd)
        shape = (batch, s.n, oh, ow)
        fmt = torch.channels_last if channels_last(x) else torch.contiguous_format
        outs = [torch.empty(shape, dtype=d.torch, device=x.device, memory_format=fmt) for d in (s.out, s.out2)
                if d is not None]
        out = outs[0]
        m = batch * oh * ow
        if m == 0:
            return outs
        bias = [xs[s.b_at]] if s.b_at is not None else []
        views = self._operands(xs, shape)
        wide = max([_extent(x), w.numel(), _extent(out), *(_extent(v) for v in views)]) >= WIDE_LIMIT
        t = self.tile
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = s.kernel, s.stride, s.pad, s.dilation
        dq = [] if self.dequant is None else [self._on_device(self.dequant, x.device)]
        if t.tma:
            sc = None if s.scale_at is None else xs[s.scale_at].expand(batch, s.c, 1, 1)
            self._tma(x, w, outs, [*dq, *bias, *views], oh, ow, wide, sc)
            return outs
        if s.scale_at is not None:
            raise UnsupportedError("triton.conv: a scaled conv runs in the TMA form only")
        grid = (math.ceil(m / t.block_m) * math.ceil(s.n / t.block_n),)
        w_strides = (w.stride(1), w.stride(0)) if self.k_major else w.stride()  # (along K, along N)
        self.fn[grid](x, w, out, *outs[1:], *dq, *bias, *views, m, s.n, s.c, h, wd, oh, ow, *x.stride(), *w_strides,
                      *out.stride(), *(st for v in bias + views for st in v.stride()), KH=kh, KW=kw, SH=sh, SW=sw,
                      PH=ph, PW=pw, DH=dh, DW=dw, BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k,
                      GROUP_M=t.group_m, PADDED=ph > 0 or pw > 0, EVEN_C=s.c % t.block_k == 0, WIDE=wide,
                      num_warps=t.num_warps, num_stages=self.stages)
        return outs

    def _tma(self, x: torch.Tensor, w: torch.Tensor, outs: list[torch.Tensor], extra: list[torch.Tensor], oh: int,
             ow: int, wide: bool, sc: torch.Tensor | None = None) -> None:
        """The TMA form: x read as [N, H, W, C] (made channels-last if it is not), `extra` the dequantization
        vector, bias and epilogue operands in the kernel's pointer order, `sc` a scaled conv's [N, C, 1, 1]
        input scale."""
        from triton.tools.tensor_descriptor import TensorDescriptor

        s, t = self.s, self.tile
        if not channels_last(x):
            x = x.contiguous(memory_format=torch.channels_last)
        nhwc = x.permute(0, 2, 3, 1)
        bh, bw = patch_shape(t.block_m, oh, ow)
        tiles_w = -(-ow // bw)
        tiles_hw = -(-oh // bh) * tiles_w
        xd = TensorDescriptor.from_tensor(nhwc, [1, bh, bw, t.block_k])
        wd = TensorDescriptor.from_tensor(w, [t.block_n, t.block_k])
        grid = (x.shape[0] * tiles_hw * math.ceil(s.n / t.block_n),)
        bias_views = extra[1 if self.dequant is not None else 0:]
        out = outs[0]
        views = [v for v in bias_views if v.dim() == 4]
        vec = pixel_vec(s.n, *outs, *views)
        scaled = [] if sc is None else [sc]
        self.fn[grid](xd, wd, out, *outs[1:], *scaled, *extra, s.n // vec, s.c, oh, ow, tiles_w, tiles_hw,
                      *_divided(out, vec), *(st for v in scaled for st in v.stride()[:2]),
                      *(st for v in bias_views for st in _divided(v, vec)), KH=s.kernel[0], KW=s.kernel[1], PH=s.pad[0],
                      PW=s.pad[1], BH=bh, BW=bw, BLOCK_M=bh * bw, BLOCK_N=t.block_n, BLOCK_K=t.block_k, WIDE=wide,
                      OVEC=vec, num_warps=t.num_warps, num_stages=self.stages)


def _check_tma(s: Spec, device: torch.device) -> None:
    """The TMA form's reach: stride 1, no dilation, rows of C input channels a multiple of 16 bytes, an sm_90+
    GPU (the Triton interpreter emulates it on CPUs)."""
    if s.stride != (1, 1) or s.dilation != (1, 1):
        raise UnsupportedError(f"triton.conv TMA form: stride {s.stride}, dilation {s.dilation}; it takes 1 and 1")
    if (s.c * s.dtype.torch.itemsize) % 16:
        raise UnsupportedError(f"triton.conv TMA form: {s.c} input channels of {s.dtype} are not 16-byte rows")
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device) < (9, 0):
        raise UnsupportedError("triton.conv TMA form: needs an sm_90 (Hopper) or newer GPU")


class TritonConv(TemplateTactic):
    """A 2-D ungrouped Conv with its epilogue as one implicit-GEMM Triton kernel (see the module docstring)."""

    name = "triton.conv"
    # GPU-verified (H100); opt-in for build time: it wins ResNet-50's plain strided 1x1 convs (-0.3 ms at
    # batch 128) for +30 s of cold build
    min_opt_level = 4
    ops = frozenset({"Conv", "Fused"})
    devices = frozenset({"cuda"})
    tiles = TILES
    space = {"tile": tuple(TILES)}
    priority = 60

    def view(self, node: Node) -> Spec | None:
        return spec(node)

    def make(self, node: Node, view: Spec, tile: Tile, device: torch.device) -> Kernel:
        return ConvKernel(node, view, tile, device)


def quantized_spec(node: Node, dtype: DType = DType.INT8) -> Spec | None:
    """The int8 template's view of a "quantized" Fused node whose anchor is a 2-D ungrouped Conv (int8 activation
    with a per-tensor scale, int8 weight with per-output-channel scales, zero points 0), or None. `dtype`
    FLOAT8_E4M3FN: the same layout in float8 E4M3 (`precision="fp8"` builds)."""
    from kiln.kernels.gemm.int8 import zero_points_zero

    if node.op != "Fused" or node.attrs.get("kind") != "quantized" or len(node.outputs) > 2:
        return None
    body = node.attrs["body"]
    if len(body.nodes) < 3 or len(body.outputs) != len(node.outputs):
        return None
    dx, dw, anchor = body.nodes[:3]
    if (dx.op, dw.op, anchor.op) != ("DequantizeLinear", "DequantizeLinear", "Conv") or len(anchor.inputs) < 2 \
            or anchor.inputs[0] is not dx.outputs[0] or anchor.inputs[1] is not dw.outputs[0]:
        return None
    ins = body.inputs
    bias = anchor.inputs[2] if len(anchor.inputs) > 2 else None
    try:
        xq_at, sx_at, wq_at, sw_at = (ins.index(v) for v in (dx.inputs[0], dx.inputs[1], dw.inputs[0], dw.inputs[1]))
        b_at = None if bias is None else ins.index(bias)
    except ValueError:
        return None
    xq, sx, wq, sw = (node.inputs[i] for i in (xq_at, sx_at, wq_at, sw_at))
    if xq is None or wq is None or sx is None or sw is None or xq.dtype is not dtype:
        return None
    w = wq.data
    if not isinstance(w, torch.Tensor) or w.dtype != dtype.torch or w.dim() != 4:
        return None
    if not (zero_points_zero(node, dx) and zero_points_zero(node, dw)):
        return None
    if not (isinstance(sx.data, torch.Tensor) and sx.data.numel() == 1 and isinstance(sw.data, torch.Tensor)
            and sw.data.numel() == w.shape[0] and int(dw.attrs.get("axis", 1)) == 0):
        return None
    a = Anchored(node, anchor, [xq_at, wq_at, b_at], body.nodes[3:], body)
    geometry = _geometry(a)
    if geometry is None or int(anchor.attrs.get("group", 1)) != 1:
        return None
    found = quantized_steps(a, dtype)
    if found is None:
        return None
    program, sources, out = found
    stride, pad, dilation = geometry
    return Spec(xq_at, wq_at, b_at, int(w.shape[1]), int(w.shape[0]), (int(w.shape[2]), int(w.shape[3])), stride,
                pad, dilation, dtype, out, program, sources, dq=(sx_at, sw_at),
                kinds=operand_kinds(node, program, sources, 3))


class TritonInt8Conv(TritonConv):
    """A "quantized" 2-D conv (int8 activation and weight) as the implicit-GEMM template with int8 products into
    int32, dequantized per output channel in float32, then its epilogue (see `render`)."""

    name = "triton.int8_conv"
    ops = frozenset({"Fused"})
    tiles = INT8_TILES
    space = {"tile": tuple(INT8_TILES)}
    priority = 35
    min_opt_level = 0

    def view(self, node: Node) -> Spec | None:
        return quantized_spec(node)


class TritonFp8Conv(TritonInt8Conv):
    """A "quantized" 2-D conv in float8 E4M3 (`precision="fp8"`; per-tensor activation, per-output-channel weight
    scales) as the same template: float8 products summed in float32, dequantized per output channel, then its
    epilogue (up to the float8 quantize for the next layer). GPU-tested only: the Triton interpreter's float8
    conversion is wrong."""

    name = "triton.fp8_conv"

    def view(self, node: Node) -> Spec | None:
        return quantized_spec(node, DType.FLOAT8_E4M3FN)


THIN_TILES: dict[str, Tile] = {
    "tma-128x16x32-w4s4": Tile(128, 16, 32, 8, 4, 4, tma=True),
    "tma-128x32x64-w4s4": Tile(128, 32, 64, 8, 4, 4, tma=True),
    "tma-128x64x32-w4s4": Tile(128, 64, 32, 8, 4, 4, tma=True),
    "tma-128x128x64-w4s3": Tile(128, 128, 64, 8, 4, 3, tma=True),
}
"""`triton.thin_conv`'s space; each layer is timed on the tiles `thin_tiles` names for it. From MobileNetV3-Large's
1x1 layers at batch 128 float16 on an H100 (2026-11-28, `.scratch/thin_bench.py`, us; the fastest other tactic
after the slash): 40 -> 240 + HardSwish at 28x28 37.5 (128x128x64) / 50.5, 112 -> 672 + HardSwish at 14x14 33.9
(128x128x64) / 38.9, 80 -> 480 + HardSwish 21.9 (128x64x32) / 27.2 - cuBLAS (`cuda.patch_conv`) took 71.1, 46.7
and 32.3, its HardSwish another pass over the output. A tile narrower than the layer reads its input once per
column block (128x16x32 took 363.7 us on 24 -> 72, 128x128x64 78.2), so a layer of up to 128 output channels
gets the narrowest tile that covers it. Those layers were measured before the output channel count was passed
divided by its vector width (the store mask `rn < N` of a 72- or 120-channel layer kept every store one element
wide): 24 -> 72 + ReLU 78.2 / cuDNN 55.0, 40 -> 120 + ReLU 67.1 / 27.8, 120 -> 40 + residual 38.3 / cuBLAS 22.9;
not timed since."""

THIN_MAX_C = 128
"""The most input channels a `triton.thin_conv` layer has: a K of at most two steps, where the layer's time is its
memory traffic."""

THIN_MIN_PIXELS = 49
"""The fewest output pixels per image (7 x 7) a `triton.thin_conv` layer has: its programs are patches of one
image, so on a squeeze-excitation conv over 1 x 1 pixels all but one of a tile's 128 rows would be padding."""


def thin_tiles(n: int) -> list[str]:
    """The `THIN_TILES` a layer with `n` output channels is timed on: up to 128 channels the narrowest tile that
    covers them (the input read once), else the 64- and the 128-wide tile."""
    if n > 128:
        return ["tma-128x64x32-w4s4", "tma-128x128x64-w4s3"]
    return [next(name for name, t in THIN_TILES.items() if t.block_n >= n)]


class TritonThinConv(TritonConv):
    """A 1x1, stride-1 conv with few input channels on 16-bit channels-last input (MobileNets' expansions and
    projections: 16 to 128 channels in, 16 to 960 out) as the TMA form with its epilogue. Such a layer moves its
    input and output once and does little arithmetic; cuBLAS (`cuda.patch_conv`) runs it as a GEMM and then an
    epilogue that cuDNN cannot fuse (HardSwish, a residual) as more passes over the output, and `triton.conv`'s
    tiles (K steps of 64 or more, element-wise stores on rows of 72 or 200 channels) waste much of each step.
    Also a "scaled" node (`kiln.passes.channel_scale`: a squeeze-and-excitation block's channel scale fused into
    its projection, any number of input channels): the scale applied to each loaded input tile."""

    name = "triton.thin_conv"
    min_opt_level = 1
    tiles = THIN_TILES
    space = {"tile": tuple(THIN_TILES)}
    priority = 61

    def view(self, node: Node) -> Spec | None:
        s = spec(node) or scaled_spec(node)
        if s is None or s.kernel != (1, 1) or s.stride != (1, 1) or s.pad != (0, 0) or s.dilation != (1, 1):
            return None
        if s.c > THIN_MAX_C and s.scale_at is None:  # why: a scaled conv has no other kernel but the reference
            return None
        if s.dtype not in (DType.FLOAT16, DType.BFLOAT16) or (s.c * s.dtype.torch.itemsize) % 16:
            return None  # why: the TMA form reads rows of C channels as 16-byte multiples
        x = node.inputs[s.x_at]
        hw = [d for d in (x.shape[2:] if x is not None and x.shape is not None else ()) if isinstance(d, int)]
        if len(hw) != 2 or hw[0] * hw[1] < THIN_MIN_PIXELS:
            return None
        return s

    def node_configs(self, node: Node) -> list[dict[str, Any]]:
        s = self.view(node)
        return [{"tile": t} for t in thin_tiles(s.n)] if s is not None else self.configs()


INT8_NEXT_TILES: dict[str, Tile] = {
    "tma-128x128x64-w4s4-e4": Tile(128, 128, 64, 8, 4, 4, tma=True, subtile=4),
    "tma-128x256x64-w8s3-e4": Tile(128, 256, 64, 8, 8, 3, tma=True, subtile=4),
    "128x128x64-w4s4-e4": Tile(128, 128, 64, 8, 4, 4, subtile=4),
    "128x256x64-w8s3-e4": Tile(128, 256, 64, 8, 8, 3, subtile=4),
}
"""int8 conv tiles under evaluation: output tiles as wide as the layer (ResNet-50's 1x1 convs to 256 channels read
their 64-channel input once, not 4 times), the epilogue on 4 column slices. Compiled for sm_90a off the GPU
(Triton 3.9 + ptxas, 2026-11-27), layer1's 1x1 conv + int8 residual + ReLU writing float16 and int8: the whole-tile
epilogue spills 604 bytes a thread at 128x128 (TMA form, 4 warps) and 1044 at 128x256 (8 warps) - the 128x64 tile
that wins today none; in 4 slices 0 and 16. Not timed yet: opt-in (`triton.int8_conv_next`)."""


class TritonInt8ConvNext(TritonInt8Conv):
    """`triton.int8_conv` on the tiles under evaluation (`INT8_NEXT_TILES`); opt-in."""

    name = "triton.int8_conv_next"
    tiles = INT8_NEXT_TILES
    space = {"tile": tuple(INT8_NEXT_TILES)}
    priority = 36
    min_opt_level = 4


register(TritonConv())
register(TritonThinConv())
register(TritonInt8Conv())
register(TritonFp8Conv())
register(TritonInt8ConvNext())
