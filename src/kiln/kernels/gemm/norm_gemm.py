"""A "normalized" Fused node (`kiln.passes.fuse_norm_gemm`: a LayerNorm/RMSNorm, then the MatMul/Gemm reading
its rows and that GEMM's epilogue) two ways, both tuned:

- `triton.norm_gemm` (opt-in): one kernel, the GEMM template (`triton_gemm`) on the norm's raw input rows and the
  weight folded with the norm's scale, each program computing its rows' statistics (in a pass of their own
  before or after the main loop, or inside it from the A tiles the product loads: `stats` in the space) and
  applying them to the product (`NormPrologue`); programs of the first tile column also write the normalized rows
  when the node outputs them (one more pass over their rows, after the main loop when the statistics are made in
  it). Meant for few rows (batch 1, where the norm's own kernel and its launch cost more), not large M.
- `split.norm_gemm`: the node's two parts as before the fusion - the norm on its best-ranked kernel (its default
  configuration), then the GEMM part on cuBLAS or one of the GEMM template's tiles (`gemm` in the space), so the
  tuner never loses what the graph ran unfused.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from kiln.ir.graph import Graph, Node, Value
from kiln.kernels.base import Kernel, SubgraphRunner, Tactic
from kiln.kernels.cpu.common import prepared
from kiln.kernels.gemm.triton_gemm import TILES, GemmKernel, NormPrologue, Spec, Tile, spec
from kiln.kernels.registry import register
from kiln.kernels.templates import TemplateTactic
from kiln.utils.errors import InputError, UnsupportedError

NORMS = frozenset({"LayerNormalization", "RMSNormalization"})


def _parts(node: Node) -> tuple[Node, Graph] | None:
    if node.op != "Fused" or node.attrs.get("kind") != "normalized":
        return None
    body: Graph = node.attrs["body"]
    if len(body.nodes) < 2 or body.nodes[0].op not in NORMS or len(body.outputs) not in (1, 2):
        return None
    return body.nodes[0], body


def gemm_part(node: Node) -> Node | None:
    """The GEMM of a "normalized" node as a node of its own: a Fused[epilogue] reading the node's inputs and then
    the norm's result (one more input, last) and making the node's last output; None if `node` is not one."""
    found = _parts(node)
    if found is None:
        return None
    norm, body = found
    y = norm.outputs[0]
    part = Graph(body.name, parent=body)
    part.inputs = [*body.inputs, y]
    part.nodes = body.nodes[1:]
    part.outputs = [body.outputs[-1]]
    return Node("Fused", [*node.inputs, y], [node.outputs[-1]], {"body": part, "kind": "epilogue"}, node.name)


def norm_part(node: Node) -> tuple[Node, list[int]] | None:
    """The norm of a "normalized" node alone (reading the node's inputs, making the norm's result) and the node
    input index of each of its inputs (-1: omitted)."""
    found = _parts(node)
    if found is None:
        return None
    norm, body = found
    at = {v: i for i, v in enumerate(body.inputs)}
    if any(v is not None and v not in at for v in norm.inputs):
        return None
    index = [-1 if v is None else at[v] for v in norm.inputs]
    inputs: list[Value | None] = [None if i < 0 else node.inputs[i] for i in index]
    return Node(norm.op, inputs, [norm.outputs[0]], dict(norm.attrs), norm.name), index


def normalized_spec(node: Node) -> Spec | None:
    """The GEMM template's view of a "normalized" node (its norm folded in: `NormPrologue`), or None."""
    part, found = gemm_part(node), norm_part(node)
    if part is None or found is None:
        return None
    norm, index = found
    s = spec(part)
    x = norm.inputs[0]
    if s is None or s.x_at != len(node.inputs) or s.trans_a or x is None or x.shape is None:
        return None
    if norm.outputs[0].dtype != s.dtype or x.shape[-1] != s.k or norm.attrs["stash_type"].torch != torch.float32:
        return None
    rms = norm.op == "RMSNormalization"
    b_at = index[2] if not rms and len(index) > 2 and index[2] >= 0 else None
    prologue = NormPrologue(index[1], b_at, float(norm.attrs["epsilon"]), rms, len(node.outputs) == 2)
    return dataclasses.replace(s, x_at=index[0], norm=prologue)


class NormGemmKernel(GemmKernel):
    """A normalized spec built for one tile: node inputs -> [normalized rows,] result. The weight is folded with
    the norm's scale once (`NormPrologue`); the column sums c and B W are float32 vectors made at the same time."""

    def __init__(self, node: Node, s: Spec, tile: Tile, device: torch.device) -> None:
        super().__init__(node, s, tile, device)
        norm = s.norm
        assert norm is not None
        gamma, beta = node.inputs[norm.g_at], None if norm.b_at is None else node.inputs[norm.b_at]
        g = gamma.data if gamma is not None else None
        b = beta.data if beta is not None else None
        if not isinstance(g, torch.Tensor) or (norm.b_at is not None and not isinstance(b, torch.Tensor)):
            raise UnsupportedError(f"triton.norm_gemm: the norm's scale and B of '{node.name}' must be constants",
                                   node=node.name)
        trans_b = s.trans_b
        scale = g.reshape(-1, 1).float()

        def fold(w: torch.Tensor) -> torch.Tensor:  # [K, N], each row k times scale[k]
            kn = (w.t() if trans_b else w).float()
            folded = (kn * scale.to(kn.device)).to(w.dtype)
            # a TMA tile reads the weight as [N, K] with K contiguous (seen as [K, N]), a pointer tile row-major
            return folded.t().contiguous().t() if tile.tma else folded.contiguous()

        self.weight = prepared(node, s.w_at, ("triton.norm_gemm", trans_b, id(g), tile.tma), fold)
        w = node.inputs[s.w_at]
        assert w is not None and isinstance(w.data, torch.Tensor)
        folded = self.weight(w.data)
        vectors = [] if norm.rms else [folded.double().sum(0).float()]
        if isinstance(b, torch.Tensor):
            kn = (w.data.t() if trans_b else w.data).double()
            vectors.append((b.reshape(1, -1).double() @ kn).reshape(-1).float())
        self.vectors = vectors
        self._vectors_on: dict[torch.device, list[torch.Tensor]] = {}

    def __call__(self, xs: list[Any]) -> list[Any]:
        s = self.s
        norm = s.norm
        assert norm is not None
        x = xs[s.x_at]
        x2 = x.reshape(-1, x.shape[-1])
        if x2.shape[1] != s.k:
            raise InputError(f"triton.norm_gemm: the norm's input has {x2.shape[1]} columns, the weight {s.k} rows")
        m, n = x2.shape[0], s.n
        out = torch.empty((m, n), dtype=s.out.torch, device=x.device)
        vectors = self._vectors_on.get(x.device)
        if vectors is None:
            vectors = self._vectors_on[x.device] = [v.to(x.device) for v in self.vectors]
        extra = list(vectors)
        y = None
        if norm.keep:
            y = torch.empty((m, s.k), dtype=s.dtype.torch, device=x.device)
            extra += [xs[norm.g_at], *([xs[norm.b_at]] if norm.b_at is not None else []), y]
        if m and n:
            self._launch(xs, x2, self.weight(xs[s.w_at]), [out], (*x.shape[:-1], n), extra,
                         [s.k] if y is not None else [])
        result = out.view(*x.shape[:-1], n)
        return [result] if y is None else [y.view(x.shape), result]


NORM_TILES: dict[str, Tile] = {name: TILES[name] for name in
                               ("16x64x256-w4s3", "32x64x128-w4s4", "64x64x64-w4s4", "64x128x64-w4s4",
                                "128x128x64-w4s4")}
"""The pointer tiles (A is normalized in registers, so it is not read by TMA), the small ones first: the fused
form pays where rows are few (batch 1)."""


class TritonNormGemm(TemplateTactic):
    """A "normalized" node as one GEMM template kernel that normalizes A as it loads it (module docstring)."""

    name = "triton.norm_gemm"
    # why: opt-in until it wins somewhere. Measured on an H200 (2026-11-27, bs1 ViT-B/16 and BERT-base, every one of
    # the 24 normalized nodes of each), statistics before the main loop: best fused tile 16-19 us against the
    # split's 10.7-13.7 us (cuBLAS or a template tile after the norm kernel); `stats="after"` the same (17.1 vs 17.4
    # before for BERT's first). `stats="loop"` (no pass of their own: the statistics from the product's A tiles) is
    # not measured yet.
    min_opt_level = 4
    ops = frozenset({"Fused"})
    devices = frozenset({"cuda"})
    tiles = NORM_TILES
    space = {"tile": tuple(NORM_TILES), "stats": ("loop", "before", "after")}
    priority = 60

    def view(self, node: Node) -> Spec | None:
        return normalized_spec(node)

    def build(self, node: Node, config: dict[str, Any], device: torch.device,
              run_subgraph: SubgraphRunner | None = None) -> Kernel:
        s = normalized_spec(node)
        if s is None or s.norm is None:
            raise UnsupportedError(f"{self.name} cannot render node '{node.name}'", op=node.op, node=node.name)
        stats = str(config.get("stats", self.space.get("stats", ("loop",))[0]))
        s = dataclasses.replace(s, norm=dataclasses.replace(s.norm, stats=stats))
        return NormGemmKernel(node, s, self.tiles[config.get("tile", self.space["tile"][0])], device)


NORM_TMA_TILES: dict[str, Tile] = {
    **{name: TILES[name] for name in ("tma-128x256x64-w8s3-e2", "ptma-128x256x64-w8s3-e4")},
    "tma-128x128x64-w8s4-e2": Tile(128, 128, 64, 8, 8, 4, tma=True, subtile=2),
}
"""`triton.norm_gemm_tma`'s tiles: TMA tiles that win large GEMMs (BERT-base and ViT-B/16 at batch 128), with the
statistics made from the A tiles they load. Compiled for sm_90a off the GPU (Triton 3.9, 2026-11-27; BERT bs128 LN +
QKV with the rows kept, LN + FFN-up + GELU): none spills (128-244 registers a thread against 90-228 for the plain
GEMM on the same tile); the persistent 128x128 4-warp tile, which spilled 136 bytes, is left out."""


class TritonNormGemmTma(TritonNormGemm):
    """A "normalized" node as one TMA GEMM kernel, the statistics from the A tiles the main loop loads
    (`NormPrologue.stats` "loop"): for large batches, where the split form's norm kernel is a pass over the rows of
    its own (BERT-base bs128: two a layer, each reading and writing 25 MB). Opt-in until measured."""

    name = "triton.norm_gemm_tma"
    tiles = NORM_TMA_TILES
    space = {"tile": tuple(NORM_TMA_TILES)}
    priority = 61


GEMMS: dict[str, tuple[str, dict[str, Any]]] = {
    **{f"cuda.linear/{w}" + ("" if lt else "/no-lt"): ("cuda.linear", {"lt_epilogue": lt, "weight": w})
       for lt in (True, False) for w in ("kn", "nk")},
    **{f"triton.gemm/{t}": ("triton.gemm", {"tile": t}) for t in TILES},
}
"""The split's GEMM choices: every configuration of cuBLAS (`cuda.linear`, its first one first) and of the GEMM
template - 12, so the default level times them all, as it timed the unfused GEMM's."""


class SplitNormGemm(Tactic):
    """A "normalized" node as its norm's kernel, then its GEMM part's (`gemm`: a configuration of cuBLAS or of the
    GEMM template, `GEMMS`), the normalized rows in a buffer of their own (module docstring)."""

    name = "split.norm_gemm"
    ops = frozenset({"Fused"})
    devices = frozenset({"cuda"})
    space = {"gemm": tuple(GEMMS)}
    priority = 40  # first: untimed builds keep what the unfused graph ran

    def applicable(self, node: Node, device: torch.device) -> bool:
        return super().applicable(node, device) and gemm_part(node) is not None and norm_part(node) is not None

    def build(self, node: Node, config: dict[str, Any], device: torch.device,
              run_subgraph: SubgraphRunner | None = None) -> Kernel:
        from kiln.kernels import registry

        part, found = gemm_part(node), norm_part(node)
        if part is None or found is None:
            raise UnsupportedError(f"{self.name} takes a normalized Fused node", op=node.op, node=node.name)
        norm, index = found
        choice = str(config.get("gemm", self.space["gemm"][0]))
        if choice not in GEMMS:
            raise UnsupportedError(f"{self.name}: no GEMM configuration '{choice}'", node=node.name)
        name, gemm_config = GEMMS[choice]
        tactic = registry.get(name)
        if not tactic.applicable(part, device):
            raise UnsupportedError(f"{self.name}: {name} cannot run the GEMM of '{node.name}'", node=node.name)
        gemm = tactic.build(part, gemm_config, device)
        normalize = registry.first_kernel(norm, device)
        keep = len(node.outputs) == 2

        def run(xs: list[Any]) -> list[Any]:
            y = normalize([None if i < 0 else xs[i] for i in index])[0]
            result = gemm([*xs, y])[0]
            return [y, result] if keep else [result]

        return run


register(TritonNormGemm())
register(TritonNormGemmTma())
register(SplitNormGemm())
