"""What the Triton template tactics share (GEMM, implicit-GEMM and int8 convolution, depthwise convolution, max
pool): applicable when Triton is installed and the template can render the node, one configuration per tile of a
named tile table, and a kernel built from the node's rendered view and the chosen tile."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from kiln.ir.dtype import DType
from kiln.ir.graph import Node
from kiln.kernels.base import Kernel, SubgraphRunner, Tactic
from kiln.kernels.pointwise import triton_available
from kiln.kernels.pointwise.rules import NARROW, storage
from kiln.kernels.pointwise.tile import TileProgram
from kiln.utils.errors import UnsupportedError


class TemplateTactic(Tactic):
    """Subclasses set `tiles` (name -> tile) and `space = {"tile": ...}` (names from `tiles`), and implement
    `view` (the node in the template's terms, None when it cannot be rendered) and `make`."""

    tiles: ClassVar[Mapping[str, Any]]

    def view(self, node: Node) -> Any | None:
        raise NotImplementedError

    def make(self, node: Node, view: Any, tile: Any, device: torch.device) -> Kernel:
        raise NotImplementedError

    def applicable(self, node: Node, device: torch.device) -> bool:
        return super().applicable(node, device) and triton_available() and self.view(node) is not None

    def build(self, node: Node, config: dict[str, Any], device: torch.device,
              run_subgraph: SubgraphRunner | None = None) -> Kernel:
        view = self.view(node)
        if view is None:
            raise UnsupportedError(f"{self.name} cannot render node '{node.name}'", op=node.op, node=node.name)
        return self.make(node, view, self.tiles[config.get("tile", self.space["tile"][0])], device)


def operand_kinds(node: Node, program: TileProgram | None, sources: tuple[int, ...], channel: int) -> tuple[str, ...]:
    """How each epilogue operand broadcasts over the output tile, from its static shape: "scalar" (one value,
    loaded once), "row" (varies only along the output's channels - axis -`channel`: 1 for a GEMM's N, 3 for
    NCHW - like a bias or a per-channel scale: one load per tile column) or "full" (a residual; also whenever a
    dimension is symbolic). `sources[k]` is the node input of the epilogue graph's input k + 1."""
    if program is None:
        return ()
    out: list[str] = []
    for op in program.operands:
        if op.data is not None:
            shape: tuple[Any, ...] | None = tuple(op.data.shape)
        else:
            assert op.input is not None
            v = node.inputs[sources[op.input - 1]]
            shape = v.shape if v is not None else None
        if shape is None or not all(isinstance(d, int) for d in shape):
            out.append("full")
        elif all(d == 1 for d in shape):
            out.append("scalar")
        elif len(shape) >= channel and all(d == 1 for i, d in enumerate(shape) if i != len(shape) - channel):
            out.append("row")
        else:
            out.append("full")
    return tuple(out)


def operand_loads(program: TileProgram, kinds: tuple[str, ...], channel_stride: str, rows: str, cols_ok: str) \
        -> list[str]:
    """The lines loading each epilogue operand `a{j}` (pointer `p{j}`) into a template's [BLOCK_M, BLOCK_N] tile by
    its broadcast kind (`operand_kinds`): once for a scalar, one [1, BLOCK_N] row masked by `cols_ok` for a per-
    channel operand, the full tile (store mask `mask`) otherwise. `channel_stride` and `rows` are format strings
    of `j`: the operand's stride along the tile's columns (`rn`) and its offset term for the tile's rows."""
    lines = []
    for j, op in enumerate(program.operands):
        up = ".to(tl.float32)" if op.dtype in NARROW else ""
        kind = kinds[j] if j < len(kinds) else "full"
        col = f"rn * {channel_stride.format(j=j)}"
        if kind == "scalar":  # why: a broadcast load of one value per element costs address math and registers
            lines.append(f"a{j} = tl.load(p{j}){up}")
        elif kind == "row":
            lines.append(f"a{j} = tl.load(p{j} + {col}, mask={cols_ok}, other=0.0){up}")
        else:
            lines.append(f"a{j} = tl.load(p{j} + {rows.format(j=j)} + {col}, mask=mask, other=0.0){up}")
    return lines


def second_output(program: TileProgram | None) -> DType | None:
    """The dtype of an epilogue's second output (`TileProgram.also`: a layer that writes its float result and the
    8-bit copy for the next layer), or None."""
    return program.also[0].dtype if program is not None and program.also else None


def second_store(program: TileProgram | None, offsets: str) -> str:
    """The kernel line storing the epilogue's second output through `out2_ptr` at `offsets` (laid out as the first
    output), or "" without one."""
    out2 = second_output(program)
    if program is None or out2 is None:
        return ""
    return f"    tl.store(out2_ptr + {offsets}, {program.also[0].text}.to({storage(out2)}), mask=mask)\n"


def dequant_vector(node: Node, dq: tuple[int, int], n: int) -> torch.Tensor:
    """The float32 factor per output channel of an 8-bit layer: the activation's scale times the weight's scale
    for each of the `n` channels (one weight scale - float8 GEMMs - applies to all)."""
    sx, sw = (node.inputs[i] for i in dq)
    assert sx is not None and sw is not None
    assert isinstance(sx.data, torch.Tensor) and isinstance(sw.data, torch.Tensor)
    return (sx.data.float().reshape(()) * sw.data.float().reshape(-1).expand(n)).contiguous()


def dot_options(dtype: DType, tf32: bool, promote: str) -> str:
    """The extra arguments of a template's `tl.dot` for products in `dtype`: an int32 accumulator for int8 (tl.dot
    defaults to float32); for float8, `max_num_imprecise_acc=promote` (float32 partial sums every `promote`
    products: on sm_90 Triton otherwise sums a whole K loop in the tensor cores' ~14-bit accumulator, and over
    K=3072 the result drifts past float16's tolerance; cuBLASLt without fast accumulation does the same), or none
    where `promote` is "" (that whole-loop sum, asked for: `Tile.fast`); the float32 product precision otherwise
    (`tf32`; half-precision operands take none)."""
    if dtype is DType.INT8:
        return ", out_dtype=tl.int32"
    if dtype is DType.FLOAT8_E4M3FN:
        return f", max_num_imprecise_acc={promote}" if promote else ""
    return "" if dtype in NARROW else f', input_precision="{"tf32" if tf32 else "ieee"}"'


DEQUANTIZE = "    acc = acc.to(tl.float32) * tl.load(dq_ptr + offs_n % N)[None, :]\n"
"""The line scaling an 8-bit layer's accumulator by its per-channel factor (`dequant_vector`) before the epilogue."""


_HALVES = "    {a}, {b} = tl.split(tl.permute(tl.reshape({whole}, (BLOCK_M, 2, {width})), (0, 2, 1)))\n"


def subtiles(tail: str, parts: int) -> str:
    """A template's `tail` (the epilogue and stores of a [BLOCK_M, BLOCK_N] tile `acc` whose columns are `offs_n`,
    `pid_n * BLOCK_N + tl.arange(0, BLOCK_N)`, widened when the constexpr `WIDE` is set) once per column slice of
    BLOCK_N // parts: the accumulator split into slices (halves of halves for 4), each slice's columns `offs_n`,
    and the epilogue's literals shaped as the slice. The same arithmetic per element, fewer values live at once
    (a residual or an erf GELU on a whole 128 x 256 tile spills)."""
    if parts not in (2, 4):
        raise ValueError(f"an epilogue runs on 2 or 4 column slices, not {parts}")
    text = _HALVES.format(a="acc_0", b="acc_1", whole="acc", width="BLOCK_N // 2")
    if parts == 4:
        text = _HALVES.format(a="half_0", b="half_1", whole="acc", width="BLOCK_N // 2") \
            + _HALVES.format(a="acc_0", b="acc_1", whole="half_0", width="BLOCK_N // 4") \
            + _HALVES.format(a="acc_2", b="acc_3", whole="half_1", width="BLOCK_N // 4")
    width = f"BLOCK_N // {parts}"
    sliced = tail.replace("[BLOCK_M, BLOCK_N]", f"[BLOCK_M, {width}]")  # the epilogue's tl.full literals
    for j in range(parts):
        text += (f"    acc = acc_{j}\n"
                 f"    offs_n = pid_n * BLOCK_N + {j} * ({width}) + tl.arange(0, {width})\n"
                 "    if WIDE:\n        offs_n = offs_n.to(tl.int64)\n" + sliced)
    return text


GROUPED_TILE = """    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * grid_n
    first_m = (pid // group) * GROUP_M
    rows = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % rows
    pid_n = (pid % group) // rows
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if WIDE:
        offs_m = offs_m.to(tl.int64)
        offs_n = offs_n.to(tl.int64)
"""
"""Program `pid`'s output tile: GROUP_M rows of tiles per column sweep; its rows `offs_m` and columns `offs_n`
(int64 when the constexpr WIDE is set). The GEMM templates' and the implicit-GEMM conv templates' first lines."""
