"""`triton.depthwise`: a 2-D depthwise Conv (groups = input channels = output channels), alone or anchoring an
epilogue, as one generated Triton kernel.

A depthwise conv has no reduction over channels: each output element is a KH x KW window of one channel, so it is
bound by memory, not by the tensor cores, and cuDNN's channels-last kernels for it are slow (on an H100 at batch
128, a 3x3 depthwise layer of MobileNetV3 took 0.66 ms through cuDNN against ~0.1 ms of memory traffic). Each
program here computes a BLOCK_M x BLOCK_N tile of output pixels x channels: per tap it loads BLOCK_N neighbouring
channels of BLOCK_M input pixels (contiguous for a channels-last input) and one weight row, multiplies in float32,
then adds the bias and renders the Fused body's steps in registers with the pointwise generator's rules (as
`triton.conv` does), and stores once. Padding is a load mask; strides and dilation are index arithmetic. The input
must be channels-last (the layout pass makes it so on GPUs); an NCHW input is refused when called. The output is
channels-last. A flat tile (FLAT_WINDOW) instead takes BLOCK_M (pixel, group of VEC channels) pairs in memory
order, so no lane idles on a channel count that is not a power of two.

The weight is laid out once at build time as [KH * KW, C] row-major. The window (kernel, stride, padding,
dilation) is passed at run time, not compiled in: one compile per epilogue and tile serves every layer (with the
window as compile-time constants, MobileNetV3's depthwise layers took 50 s of compiles on an H100 machine). The
space is `TILES`.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from kiln.ir.graph import Node
from kiln.kernels.base import Kernel
from kiln.kernels.conv.triton_conv import (
    WIDE_LIMIT,
    Spec,
    SpecKernel,
    _extent,
    epilogue,
    pixel_strides,
    pixel_vec,
    spec,
)
from kiln.kernels.cpu.common import prepared
from kiln.kernels.pointwise.rules import storage
from kiln.kernels.pointwise.tile import load_function
from kiln.kernels.registry import register
from kiln.kernels.templates import TemplateTactic
from kiln.utils.errors import InputError, UnsupportedError


class Tile(NamedTuple):
    block_m: int
    """Output pixels per program (flat: (pixel, channel group) pairs)."""
    block_n: int
    """Channels per program; 0 for a flat tile (FLAT_WINDOW), whose rows are each one pixel's group of VEC
    channels."""
    num_warps: int


TILES: dict[str, Tile] = {
    "64x64-w4": Tile(64, 64, 4),
    "16x64-w2": Tile(16, 64, 2),
    "32x32-w2": Tile(32, 32, 2),
    "flat512-w4": Tile(512, 0, 4),
    "flat256-w4": Tile(256, 0, 4),
    "flat64-w2": Tile(64, 0, 2),
}
"""64 channels of float16 are one 128-byte line per pixel. (32x128, 128x32 and 256x16 tiles were in the space too;
on an H100 they never won a MobileNetV3 layer once the flat tiles came, and every tile is a compile per layer
shape.) The two small
tiles are for batch 1, where a layer is too small to fill the GPU with large tiles: MobileNetV3's 5x5 layer at
7x7 x 672 channels is 11 programs of 64x64 on 132 SMs, 44 of 16x64. The flat tiles hold BLOCK_M groups of VEC
channels (8 for float16 channel counts that are multiples of 8: 4096 elements for flat512)."""

_SCALE = """\
    C = C * VEC
    stride_xb = stride_xb * VEC
    stride_xh = stride_xh * VEC
    stride_xw = stride_xw * VEC
    stride_ob = stride_ob * VEC
    stride_oh = stride_oh * VEC
    stride_ow = stride_ow * VEC
"""
_PIXELS = """\
    ob = offs_m // (OH * OW)
    oh = (offs_m // OW) % OH
    ow = offs_m % OW
    ih0 = oh * SH - PH
    iw0 = ow * SW - PW
    x_rows = x_ptr + ob * stride_xb
"""
WINDOW = _SCALE + """\
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    if WIDE:
        offs_m = offs_m.to(tl.int64)
        offs_n = offs_n.to(tl.int64)
    m_ok = offs_m < M
    n_ok = offs_n < C
""" + _PIXELS
"""The start of a sliding-window kernel over a channels-last input (`triton.depthwise`, `triton.maxpool`): a tile
of BLOCK_M output pixels (`offs_m`, at image `ob`, row `oh`, column `ow`) x BLOCK_N channels (`offs_n`), the
window's top-left input pixel (`ih0`, `iw0`) and the row pointers of each pixel's image (`x_rows`). The kernel
takes the channel count and its pixel strides (image, row, column of input and output) divided by VEC
(`pixel_vec`) and multiplies them back here, so that Triton knows they are multiples of VEC: a channels-last row of
72 or 120 channels is a multiple of 8 elements but not of 16, the only divisibility Triton finds in an argument by
itself, and without it every load and store (masked by `offs_n < C`) is one element wide. On an H100 at batch 128
(2026-11-28) MobileNetV3's 3x3 depthwise layer on 72 x 56 x 56 took 290.8 us so, 123.7 with the hint (cuDNN 186.7);
its 120-channel 5x5 layer 197.9 -> 70.1 (cuDNN 83.0)."""

FLAT_WINDOW = """\
    CG = C
""" + _SCALE + """\
    offs_g = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    if WIDE:
        offs_g = offs_g.to(tl.int64)
    offs_m = offs_g // CG
    m_ok = offs_m < M
    offs_n = (offs_g % CG)[:, None] * VEC + tl.arange(0, VEC)[None, :]
    n_ok = offs_n < C
""" + _PIXELS
"""WINDOW for a flat tile: BLOCK_M (pixel, group of VEC channels) pairs in channels-last order (`offs_m` the
pixel of each row, `offs_n` [BLOCK_M, VEC] the channels), so that every lane holds a real channel whatever the
channel count and a warp's loads cover one contiguous span of a channels-last row of pixels (the 2-D tile of
WINDOW leaves 56 of 128 lanes idle on a 72-channel layer with 64-channel columns, and each of its loads is a
16-byte piece of every pixel's row)."""


_SOURCE = '''"""Generated by kiln.kernels.conv.triton_depthwise ({what})."""
import triton
import triton.language as tl

from kiln.kernels.pointwise import mathlib as km

INF = tl.constexpr(float("inf"))


@triton.jit
def kiln_depthwise(x_ptr, w_ptr, out_ptr, {pointers}M, C, H, W, OH, OW, stride_xb, stride_xc, stride_xh, stride_xw,
                   stride_ob, stride_oc, stride_oh, stride_ow, {strides}KH, KW, SH, SW, PH, PW, DH, DW,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WIDE: tl.constexpr, VEC: tl.constexpr):
{window}    x_cols = {cols} * stride_xc
    acc = tl.zeros((BLOCK_M, {width}), dtype=tl.float32)
    for kh in range(KH):
        ih = ih0 + kh * DH
        row_ok = m_ok & (ih >= 0) & (ih < H)
        for kw in range(KW):
            iw = iw0 + kw * DW
            inside = row_ok & (iw >= 0) & (iw < W)
            x = tl.load((x_rows + ih * stride_xh + iw * stride_xw)[:, None] + x_cols, mask={x_mask}, other=0.0)
            w = {w_load}
            acc += x.to(tl.float32) * w.to(tl.float32)
    rn = {cols}
    mask = m_ok[:, None] & {cols_ok}
{epilogue}    out_rows = (ob * stride_ob + oh * stride_oh + ow * stride_ow)[:, None]
    tl.store(out_ptr + out_rows + rn * stride_oc, {result}.to({out}), mask=mask)
'''


_FORMS = {
    False: {"window": WINDOW, "cols": "offs_n[None, :]", "width": "BLOCK_N", "cols_ok": "n_ok[None, :]",
            "x_mask": "inside[:, None] & n_ok[None, :]", "row": "[None, :]",
            "w_load": "tl.load(w_ptr + (kh * KW + kw) * C + offs_n, mask=n_ok, other=0.0)[None, :]"},
    True: {"window": FLAT_WINDOW, "cols": "offs_n", "width": "VEC", "cols_ok": "n_ok", "x_mask": "inside[:, None]",
           "row": "", "w_load": "tl.load(w_ptr + (kh * KW + kw) * C + offs_n)"},
}
"""The 2-D tile's and the flat tile's spellings of the kernel's channel index, accumulator width and masks (the flat
tile's channels are always in range: only its pixels can run past the end)."""


def render(s: Spec, flat: bool = False) -> str:
    """The kernel source for `s`, with a 2-D or a flat tile."""
    form = _FORMS[flat]
    e = epilogue(s, "tl.load(b_ptr + offs_n * stride_b, mask=n_ok, other=0.0)", form["cols_ok"], form["row"])
    return _SOURCE.format(what=e.what, pointers=e.pointers, strides=e.strides, epilogue=e.lines, result=e.result,
                          out=storage(s.out), **{k: v for k, v in form.items() if k != "row"})


class DepthwiseKernel(SpecKernel):
    """`spec` built for one tile: a Kernel (node inputs -> [output]); keeps no per-call state."""

    tactic = "triton.depthwise"

    def __init__(self, node: Node, s: Spec, tile: Tile) -> None:
        super().__init__(s)
        self.tile = tile
        self.source = render(s, tile.block_n == 0)
        self.fn = load_function(self.source, "kiln_depthwise", "kiln_depthwise")
        self.weight = prepared(node, s.w_at, ("triton.depthwise", "taps_c"),
                               lambda w: w.reshape(w.shape[0], -1).t().contiguous())

    def __call__(self, xs: list[Any]) -> list[Any]:
        s = self.s
        x = xs[s.x_at]
        if x.dim() != 4 or x.shape[1] != s.c:
            raise InputError(f"triton.depthwise: the input is {list(x.shape)}, the weight expects [N, {s.c}, H, W]")
        if x.stride(1) != 1 and s.c > 1:
            # why: channels are the tile's contiguous axis; in NCHW each load is a gather (measured 10-50x slower
            # than cuDNN on an H100), so refuse before compiling and let the tuner move on
            raise UnsupportedError("triton.depthwise reads channels-last inputs only; cuDNN runs NCHW ones")
        w = self.weight(xs[s.w_at])
        batch, _, h, wd = x.shape
        oh, ow = self._out_size(h, wd)
        shape = (batch, s.c, oh, ow)
        out = torch.empty(shape, dtype=s.out.torch, device=x.device, memory_format=torch.channels_last)
        m = batch * oh * ow
        if m == 0:
            return [out]
        bias = [xs[s.b_at]] if s.b_at is not None else []
        views = self._operands(xs, shape)
        wide = max([_extent(x), _extent(out), *(_extent(v) for v in views)]) >= WIDE_LIMIT
        t = self.tile
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = s.kernel, s.stride, s.pad, s.dilation
        vec = pixel_vec(s.c, x, out)
        if t.block_n == 0:  # flat: rows are (pixel, group of vec channels) pairs
            grid: tuple[int, ...] = (math.ceil(m * (s.c // vec) / t.block_m),)
        else:
            grid = (math.ceil(m / t.block_m), math.ceil(s.c / t.block_n))
        (xb, xh, xw), (ob, oh_, ow_) = pixel_strides(x, vec), pixel_strides(out, vec)
        self.fn[grid](x, w, out, *bias, *views, m, s.c // vec, h, wd, oh, ow, xb, x.stride(1), xh, xw, ob,
                      out.stride(1), oh_, ow_, *(st for v in bias + views for st in v.stride()), kh, kw, sh, sw,
                      ph, pw, dh, dw,
                      BLOCK_M=t.block_m, BLOCK_N=max(t.block_n, 1), WIDE=wide, VEC=vec, num_warps=t.num_warps)
        return [out]


class TritonDepthwise(TemplateTactic):
    """A 2-D depthwise Conv with its epilogue as one Triton kernel (see the module docstring)."""

    name = "triton.depthwise"
    ops = frozenset({"Conv", "Fused"})
    devices = frozenset({"cuda"})
    tiles = TILES
    space = {"tile": tuple(TILES)}
    priority = 45

    def view(self, node: Node) -> Spec | None:
        return spec(node, depthwise=True)

    def make(self, node: Node, view: Spec, tile: Tile, device: torch.device) -> Kernel:
        return DepthwiseKernel(node, view, tile)


register(TritonDepthwise())
