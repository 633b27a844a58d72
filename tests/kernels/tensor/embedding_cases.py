"""Cases for the "embedding" node's tactics (`triton.embedding`, `split.embedding`): lookups and terms summed, then
a LayerNorm, fused by the real pass (`fuse_embeddings`) and run against the op table's reference (the body, node by
node). BERT's three-term form, one lookup with a per-token term, negative indices, a row that is not a power of two,
float16 tables, GPT-2's form (one lookup, no B, the sum an output too), and out-of-range indices (clamped reads, the
lookup's check set and cleared once read). Shared by the interpreter test (CPU) and the GPU tier."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from kiln.ir import DType, Graph, TensorType
from kiln.ir.graph import Node
from kiln.ir.ops import OPS
from kiln.ir.ops.base import RefCtx
from kiln.kernels import registry
from kiln.passes.fuse_embeddings import rewrite

CUDA = torch.device("cuda")
TACTICS = ("triton.embedding", "split.embedding")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def bert(dt: torch.dtype, tokens: tuple[int, int], hidden: int, vocab: int = 50,
         position: str = "constant") -> tuple[Node, list[Any]]:
    """word[ids] + type[type_ids] + position rows, then LayerNorm: the fused node and its input values (indices
    in range; callers may replace them)."""
    g = Graph()
    b, s = tokens
    ids = g.add_input("ids", TensorType(DType.INT64, (b, s)))
    types = g.add_input("types", TensorType(DType.INT32, (b, s)))
    word = g.add_initializer("word", torch.randn(vocab, hidden, generator=_gen(1)).to(dt))
    kind = g.add_initializer("kind", torch.randn(2, hidden, generator=_gen(2)).to(dt))
    scale = g.add_initializer("scale", (1 + 0.1 * torch.randn(hidden, generator=_gen(3))).to(dt))
    bias = g.add_initializer("bias", (0.1 * torch.randn(hidden, generator=_gen(4))).to(dt))
    (w,) = g.add("Gather", [word, ids], {"axis": 0}, name="word_lookup")
    (k,) = g.add("Gather", [kind, types], {"axis": 0}, name="type_lookup")
    (x,) = g.add("Add", [w, k])
    rows = torch.randn(1, s, hidden, generator=_gen(5)).to(dt)
    if position == "constant":
        pos = g.add_initializer("pos", rows)
    else:  # a computed term with the sum's shape
        pos = g.add_input("pos", TensorType(DType.from_torch(dt), (b, s, hidden)))
    (x,) = g.add("Add", [x, pos])
    (y,) = g.add("LayerNormalization", [x, scale, bias], {"axis": -1, "epsilon": 1e-12}, name="ln", outputs=1)
    g.outputs.append(y)
    assert rewrite(g).counts == {"embeddings": 1}, "the pass did not fuse the case"
    (node,) = g.nodes
    feeds = {"ids": torch.randint(-vocab, vocab, (b, s), generator=_gen(6)),
             "types": torch.randint(0, 2, (b, s), generator=_gen(7), dtype=torch.int32),
             "pos": torch.randn(b, s, hidden, generator=_gen(8)).to(dt)}
    args = [v.data if v.data is not None else feeds[v.name] for v in node.inputs]
    return node, args


def gpt2(dt: torch.dtype, tokens: tuple[int, int], hidden: int, vocab: int = 40) -> tuple[Node, list[Any]]:
    """word[ids] + position rows [seq, hidden], then LayerNorm - the sum read elsewhere too (the residual stream):
    the node outputs [sum, norm]."""
    g = Graph()
    b, s = tokens
    ids = g.add_input("ids", TensorType(DType.INT32, (b, s)))
    word = g.add_initializer("word", torch.randn(vocab, hidden, generator=_gen(11)).to(dt))
    (w,) = g.add("Gather", [word, ids], {"axis": 0}, name="word_lookup")
    (x,) = g.add("Add", [w, g.add_initializer("pos", torch.randn(s, hidden, generator=_gen(12)).to(dt))],
                 outputs=["h"])
    scale = g.add_initializer("scale", torch.ones(hidden, dtype=dt))
    (y,) = g.add("LayerNormalization", [x, scale], {"axis": -1, "epsilon": 1e-5}, name="ln", outputs=1)
    g.outputs.extend([y, x])
    assert rewrite(g).counts == {"embeddings": 1}, "the pass did not fuse the case"
    (node,) = g.nodes
    args = [v.data if v.data is not None else torch.randint(-vocab, vocab, (b, s), generator=_gen(13),
                                                             dtype=torch.int32) for v in node.inputs]
    return node, args


def run(node: Node, args: list[Any], device: str = "cpu", bad: str | None = None) -> dict[str, str | None]:
    """{tactic: what differs, or None} against the reference (on the indices as the kernel clamps them when `bad`
    names the lookup given out-of-range ones); the right check set exactly then, and cleared once read."""
    body = node.attrs["body"]
    clamped = list(args)
    for n in body.nodes:
        if n.op == "Gather":
            t_at, i_at = body.inputs.index(n.inputs[0]), body.inputs.index(n.inputs[1])
            size = args[t_at].shape[0]
            i = args[i_at].to(torch.int64)
            i = torch.where(i < 0, i + size, i).clamp(0, size - 1)
            clamped[i_at] = i.to(args[i_at].dtype)
    wants = [w.double() for w in OPS["Fused"].ref(RefCtx(node), clamped)]
    out: dict[str, str | None] = {}
    for name in TACTICS:
        tactic = registry.get(name)
        if not tactic.applicable(node, CUDA):
            out[name] = "not applicable"
            continue
        kernel = tactic.build(node, {}, CUDA)
        gots = [g.cpu() for g in kernel([a.to(device) for a in args])]
        problems = [] if len(gots) == len(wants) else [f"{len(gots)} outputs, expected {len(wants)}"]
        for got, want in zip(gots, wants):
            if got.dtype != args[0].dtype or tuple(got.shape) != tuple(want.shape):
                problems.append(f"got {got.dtype}{list(got.shape)}, expected {args[0].dtype}{list(want.shape)}")
                continue
            tol = 1e-4 if got.dtype == torch.float32 else 2e-2
            err = float((got.double() - want).abs().max())
            if err > tol * max(1.0, float(want.abs().max())):
                problems.append(f"max |diff| {err:.3g}")
        said = [c.raised() for c in kernel.checks]  # type: ignore[attr-defined]
        hit = [s for s in said if s is not None]
        if (bad is None) != (not hit) or (bad is not None and not any(f"node '{bad}' (Gather)" in s for s in hit)):
            problems.append(f"checks said {hit}, expected {bad or 'nothing'}")
        if any(c.raised() is not None for c in kernel.checks):  # type: ignore[attr-defined]
            problems.append("a check did not clear once read")
        out[name] = "; ".join(problems) or None
    return out


def _bad(node_args: tuple[Node, list[Any]]) -> tuple[Node, list[Any]]:
    node, args = node_args
    body = node.attrs["body"]
    at = body.inputs.index(next(n for n in body.nodes if n.name == "word_lookup").inputs[1])
    ids = args[at].clone()
    ids[0, 1], ids[-1, 0] = 50, -51  # past both ends of the 50-row table
    return node, [ids if i == at else a for i, a in enumerate(args)]


CASES: dict[str, Callable[[str], dict[str, str | None]]] = {
    "bert-f32": lambda d: run(*bert(torch.float32, (2, 7), 64), device=d),
    "bert-f16-odd-row": lambda d: run(*bert(torch.float16, (3, 5), 100), device=d),
    "computed-term": lambda d: run(*bert(torch.float32, (2, 4), 48, position="input"), device=d),
    "out-of-range": lambda d: run(*_bad(bert(torch.float32, (2, 6), 32)), device=d, bad="word_lookup"),
    "gpt2-sum-kept-f16": lambda d: run(*gpt2(torch.float16, (2, 9), 48), device=d),
}


def run_case(name: str, device: str = "cpu") -> Any:
    return CASES[name](device)
