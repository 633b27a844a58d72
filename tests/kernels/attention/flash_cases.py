"""`triton.flash_attention` against the op table's reference, run on the CPU by Triton's interpreter.

The test module starts this file as a worker process (`python flash_cases.py GROUP OUT.jsonl`) with
TRITON_INTERPRET=1 set before triton is imported; an out-of-bounds access can kill the process, so every case
writes its own result line as soon as it is done. Importing this module (to list the cases) imports no triton.
The interpreter's tl.dot is exact only for float32/float16 operands, so the groups are those two dtypes."""

from __future__ import annotations

import json
import math
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kiln.ir import DType, Graph, Node, TensorType
from kiln.ir.graph import Value

CUDA = torch.device("cuda")  # what the tactic is built for; the interpreter runs it on CPU tensors
TACTIC = "triton.flash_attention"
F32, F16 = torch.float32, torch.float16
GROUPS = {"f32": F32, "f16": F16}
BOTH = ("f32", "f16")
ALL = (0, 1, 2, 3, 4, 5)
"""Every config of the space (indices into CONFIGS), checked on the cases big enough not to shrink them."""

Maker = Callable[[torch.Generator, torch.dtype], list[torch.Tensor]]


@dataclass
class Case:
    id: str
    make: Maker
    """Q, K, V and optionally attn_mask (a generator and the dtype in, tensors out)."""
    attrs: dict[str, Any] = field(default_factory=dict)
    configs: Sequence[int] = (0,)
    zero_rows: Sequence[str] = ()
    """The groups in which some query rows have no allowed key: the reference (and the kernel) give exact zeros
    there."""
    dtypes: Sequence[str] = ("f32", "f16")
    strided: bool = False
    """Q/K/V are views the kernel must read in place: its Q argument must share Q's memory."""
    outputs: int = 1
    """The node's outputs: 3 with a key/value cache (Y, present_key, present_value), each compared."""


def rand(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=g)


def qkv(b: int, h: int, hkv: int, sq: int, skv: int, d: int, dv: int | None = None, packed: bool = False) -> Maker:
    dv = d if dv is None else dv

    def make(g: torch.Generator, dt: torch.dtype) -> list[torch.Tensor]:
        if packed:
            return [rand(g, b, sq, h * d).to(dt), rand(g, b, skv, hkv * d).to(dt), rand(g, b, skv, hkv * dv).to(dt)]
        return [rand(g, b, h, sq, d).to(dt), rand(g, b, hkv, skv, d).to(dt), rand(g, b, hkv, skv, dv).to(dt)]

    return make


def with_mask(base: Maker, mask: Callable[[torch.Generator, torch.dtype], torch.Tensor]) -> Maker:
    return lambda g, dt: [*base(g, dt), mask(g, dt)]


def with_cache(base: Maker, b: int, hkv: int, p: int, d: int) -> Maker:
    """`base`'s inputs (no mask: None in its place, when it has none) and a [B, Hkv, P, D] past key and value."""

    def make(g: torch.Generator, dt: torch.dtype) -> list[torch.Tensor | None]:
        ins: list[torch.Tensor | None] = list(base(g, dt))
        return [*ins, *([None] if len(ins) == 3 else []), rand(g, b, hkv, p, d).to(dt), rand(g, b, hkv, p, d).to(dt)]

    return make


def key_padding(b: int, skv: int, value: float = -65504.0) -> Callable[[torch.Generator, torch.dtype], torch.Tensor]:
    """A [B, 1, 1, Skv] additive mask as exported BERTs build it: `value` on padded keys (key 0 always kept)."""

    def make(g: torch.Generator, dt: torch.dtype) -> torch.Tensor:
        hide = torch.rand(b, 1, 1, skv, generator=g) < 0.3
        hide[..., 0] = False
        return torch.where(hide, value, 0.0).to(dt)

    return make


def float_bias(shape: tuple[int, ...], hidden_row: float | None = None, mask_dtype: torch.dtype | None = None
               ) -> Callable[[torch.Generator, torch.dtype], torch.Tensor]:
    """A random additive bias with some -inf; with `hidden_row`, query row 1 holds that value on every key."""

    def make(g: torch.Generator, dt: torch.dtype) -> torch.Tensor:
        m = rand(g, *shape)
        m[torch.rand(shape, generator=g) < 0.2] = -math.inf
        m[..., 0] = 0.0
        if hidden_row is not None:
            m[..., 1, :] = hidden_row
        return m.to(mask_dtype or dt)

    return make


def bool_mask(shape: tuple[int, ...], dead_row: int | None = None) -> Callable[[torch.Generator, torch.dtype],
                                                                              torch.Tensor]:
    """A random boolean mask (True = keep), key 0 kept; `dead_row` hides every key of that query row."""

    def make(g: torch.Generator, dt: torch.dtype) -> torch.Tensor:
        m = torch.rand(shape, generator=g) < 0.6
        m[..., 0] = True
        if dead_row is not None:
            m[..., dead_row, :] = False
        return m

    return make


def fused_qkv(b: int, s: int, h: int, d: int) -> Maker:
    """Packed Q, K, V as column slices of one [B, S, 3*H*D] projection (row stride 3*H*D, not contiguous)."""

    def make(g: torch.Generator, dt: torch.dtype) -> list[torch.Tensor]:
        x = rand(g, b, s, 3 * h * d).to(dt)
        return [x[..., : h * d], x[..., h * d: 2 * h * d], x[..., 2 * h * d:]]

    return make


def heads_last(b: int, s: int, h: int, d: int) -> Maker:
    """4-D Q/K/V as [B, S, H, D] tensors seen as [B, H, S, D] (transposed views)."""

    def make(g: torch.Generator, dt: torch.dtype) -> list[torch.Tensor]:
        return [rand(g, b, s, h, d).to(dt).transpose(1, 2) for _ in range(3)]

    return make


def packed(h: int, hkv: int, **attrs: Any) -> dict[str, Any]:
    return {"q_num_heads": h, "kv_num_heads": hkv, **attrs}


def all_cases() -> list[Case]:
    return [
        Case("bert-4d-keypad-mask", with_mask(qkv(2, 3, 3, 128, 128, 64), key_padding(2, 128)), configs=ALL),
        Case("vit-4d-197", qkv(1, 2, 2, 197, 197, 64), configs=ALL),
        Case("vit-packed-197", qkv(2, 2, 2, 197, 197, 64, packed=True), packed(2, 2), configs=(2,)),
        Case("packed-gqa-4to2-causal", qkv(2, 4, 2, 37, 37, 64, packed=True), packed(4, 2, is_causal=1),
             configs=(2, 5)),
        Case("packed-mqa-4to1-mask-d8", with_mask(qkv(2, 4, 1, 20, 20, 8, packed=True), key_padding(2, 20)),
             packed(4, 1, scale=0.3)),
        Case("gqa-4to1-causal-150", qkv(1, 4, 1, 150, 150, 64), {"is_causal": 1}, configs=(2, 4)),
        Case("gqa-4to2-d40", qkv(2, 4, 2, 33, 33, 40), configs=(0, 3)),
        Case("causal-sq-lt-skv", qkv(1, 2, 2, 21, 70, 32), {"is_causal": 1}, configs=(5,)),
        Case("causal-sq-gt-skv", qkv(1, 2, 2, 90, 30, 32), {"is_causal": 1}, configs=(2, 5)),
        Case("cross-7x93-d40-dv24", qkv(2, 2, 2, 7, 93, 40, dv=24)),
        Case("decode-1x77", qkv(2, 4, 2, 1, 77, 64)),
        Case("decode-1x1", qkv(1, 2, 2, 1, 1, 64, packed=True), packed(2, 2)),
        Case("d100-d256", qkv(1, 2, 2, 19, 24, 100, dv=256), {"scale": 0.05}),
        Case("bool-mask-dead-row", with_mask(qkv(2, 2, 2, 9, 40, 64), bool_mask((2, 1, 9, 40), dead_row=3)),
             configs=(2, 5), zero_rows=BOTH),
        Case("bool-mask-causal", with_mask(qkv(1, 2, 2, 45, 45, 16), bool_mask((45, 45))), {"is_causal": 1},
             configs=(5,)),
        Case("bool-mask-narrow", with_mask(qkv(1, 2, 2, 6, 30, 32), bool_mask((6, 11), dead_row=2)),
             zero_rows=BOTH),
        # the same for every query (a padding mask [B, 1, 1, Skv]): one row per key block (KEY_MASK)
        Case("bool-key-mask", with_mask(qkv(2, 2, 2, 70, 70, 32), bool_mask((2, 1, 1, 70))), configs=(0, 5)),
        Case("float-mask-per-head", with_mask(qkv(2, 3, 3, 12, 50, 64), float_bias((1, 3, 12, 50))),
             configs=(5,)),
        Case("float-mask-dead-row", with_mask(qkv(1, 2, 2, 5, 18, 64), float_bias((5, 18), -math.inf)),
             zero_rows=BOTH),
        Case("float-mask-hidden-row-65504", with_mask(qkv(1, 2, 2, 5, 18, 64), float_bias((5, 18), -65504.0))),
        # float32's finfo.min hides row 1 by a finite bias (a near-uniform row) for float32 inputs; rounded to
        # float16 (as the reference rounds the mask to Q's dtype) it is -inf, and the row is zeros
        Case("float-mask-hidden-row-finfo-min", with_mask(qkv(1, 2, 2, 5, 18, 64),
                                                          float_bias((5, 18), torch.finfo(F32).min, F32)),
             zero_rows=("f16",)),
        Case("float-mask-narrow-rank1", with_mask(qkv(2, 2, 2, 4, 20, 64), float_bias((13,)))),
        Case("float-scalar-mask", with_mask(qkv(1, 2, 2, 4, 9, 64), lambda g, dt: torch.tensor(0.5, dtype=dt))),
        # Gemma-2's softcap: cap * tanh(score / cap) before the mask and the softmax (small caps, so it bites)
        Case("softcap-causal-gqa", qkv(1, 4, 2, 40, 40, 64), {"is_causal": 1, "softcap": 1.5}, configs=(2, 5)),
        Case("softcap-bool-mask-decode", with_mask(qkv(2, 4, 2, 1, 30, 32, packed=True), bool_mask((2, 1, 1, 30))),
             packed(4, 2, softcap=2.0)),
        Case("softcap-float-mask", with_mask(qkv(1, 2, 2, 5, 18, 64), float_bias((5, 18))), {"softcap": 3.0}),
        # a key/value cache (ONNX Attention's past_key/past_value): concatenated, the causal diagonal shifted
        Case("cache-causal-prefill", with_cache(qkv(1, 4, 2, 20, 20, 32), 1, 2, 13, 32), {"is_causal": 1},
             configs=(2, 5), outputs=3),
        Case("cache-causal-decode-packed", with_cache(qkv(2, 4, 2, 1, 1, 32, packed=True), 2, 2, 70, 32),
             packed(4, 2, is_causal=1), outputs=3),
        Case("cache-bool-mask-y-only", with_cache(with_mask(qkv(2, 2, 2, 3, 3, 16), bool_mask((2, 1, 3, 9))), 2, 2,
                                                  6, 16)),
        Case("strided-fused-qkv", fused_qkv(2, 31, 2, 64), packed(2, 2, is_causal=1), strided=True),
        Case("strided-heads-last", heads_last(2, 27, 2, 64), strided=True),
    ]


# --- the checks (run in the worker) ----------------------------------------------------------------------------


def tolerance(dt: torch.dtype) -> dict[str, float]:
    """float32: rounding noise. float16: the reference rounds the scores and runs its softmax in float16, the
    kernel keeps both in float32, so results differ by a few float16 units of the output's scale."""
    return {"rtol": 2e-4, "atol": 2e-5} if dt == F32 else {"rtol": 1e-2, "atol": 4e-3}


def node_of(inputs: Sequence[torch.Tensor | None], attrs: dict[str, Any], outputs: int = 1) -> Node:
    g = Graph()
    vals: list[Value | None] = []
    for i, x in enumerate(inputs):
        vals.append(None if x is None else g.add_input(f"in{i}", TensorType(DType.from_torch(x.dtype),
                                                                             tuple(x.shape))))
    g.outputs.extend(g.add("Attention", vals, attrs, name="attn", outputs=outputs))
    return g.nodes[0]


class Launches:
    """Wraps the module's kernel getter to record what each launch was given."""

    def __init__(self, module: Any) -> None:
        self.args: list[tuple[Any, ...]] = []
        real = module._kernel

        def kernel() -> Any:
            jitted = real()

            class Grid:
                def __getitem__(_, grid: Any) -> Callable[..., Any]:
                    def launch(*a: Any, **k: Any) -> Any:
                        self.args.append(a)
                        return jitted[grid](*a, **k)

                    return launch

            return Grid()

        module._kernel = kernel


def run_case(case: Case, group: str, seed: int, launches: Launches) -> None:
    from kiln.ir.ops import get_op
    from kiln.ir.ops.base import RefCtx
    from kiln.kernels import registry
    from kiln.kernels.attention.triton_flash import CONFIGS
    from kiln.tune.tuner import _close

    dt = GROUPS[group]
    inputs = case.make(torch.Generator().manual_seed(seed), dt)
    node = node_of(inputs, case.attrs, case.outputs)
    tactic = registry.get(TACTIC)
    assert tactic.applicable(node, CUDA), "the tactic should take this node"
    assert not tactic.applicable(node, torch.device("cpu"))
    wants = get_op("Attention").ref(RefCtx(node), list(inputs))[:case.outputs]
    want = wants[0]
    before = [None if x is None else x.clone() for x in inputs]
    dead = (want == 0).all(dim=-1)
    assert bool(dead.any()) == (group in case.zero_rows), f"{int(dead.sum())} all-zero reference rows"
    for i in case.configs:
        cfg = dict(CONFIGS[i])
        n = len(launches.args)
        gots = tactic.build(node, cfg, CUDA)(list(inputs))
        assert len(gots) == case.outputs, f"{len(gots)} outputs"
        for j, (g_out, w_out) in enumerate(zip(gots[1:], wants[1:])):
            assert torch.equal(g_out, w_out), f"present output {j + 1} differs"
        got = gots[0]
        assert len(launches.args) == n + 1, "the kernel did not run"
        assert got.dtype == want.dtype and got.shape == want.shape and got.is_contiguous(), (got.dtype, got.shape)
        try:
            torch.testing.assert_close(got, want, **tolerance(dt))
        except AssertionError as e:
            raise AssertionError(f"under {cfg}: {e}") from None
        assert _close(got, want), f"the tuner would reject {cfg}"
        assert bool((got[dead] == 0).all()), f"rows without an allowed key are not zero under {cfg}"
        if case.strided:
            for name, arg, x in zip("QKV", launches.args[-1][:3], inputs):
                assert arg.data_ptr() == x.data_ptr() and not arg.is_contiguous(), f"{name} was copied"
    for x, x0 in zip(inputs, before):
        assert x is None or x0 is None or torch.equal(x, x0), "the kernel modified an input"


def main(group: str, out_path: str) -> int:
    from kiln.kernels.attention import triton_flash

    launches = Launches(triton_flash)
    with open(out_path, "w") as out:
        for k, case in enumerate(c for c in all_cases() if group in c.dtypes):
            rid = f"{case.id}-{group}"
            out.write(json.dumps({"id": rid, "status": "started"}) + "\n")
            out.flush()
            try:
                run_case(case, group, k, launches)
                result = {"id": rid, "status": "passed"}
            except Exception as e:  # every failure is reported, then the next case runs
                tb = traceback.format_exc(limit=-3)
                result = {"id": rid, "status": "failed", "message": f"{type(e).__name__}: {e}\n{tb}"}
            out.write(json.dumps(result) + "\n")
            out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
