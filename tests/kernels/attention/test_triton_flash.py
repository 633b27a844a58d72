"""`triton.flash_attention`: which nodes it takes (no kernel runs), its launch plans, that it loads without triton,
and its results against the op table's reference under Triton's CPU interpreter (worker processes, see
flash_cases)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from kiln.ir import DType, Graph, TensorType
from kiln.ir.graph import Node, Value
from kiln.kernels import registry
from kiln.kernels.attention import triton_flash
from kiln.kernels.attention.triton_flash import CONFIGS, SMEM_BUDGET, plan
from tests.kernels.attention.flash_cases import GROUPS, all_cases
from tests.kernels.interpreted import run_workers

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
CUDA, CPU = torch.device("cuda"), torch.device("cpu")
F16, F32 = DType.FLOAT16, DType.FLOAT32
NAME = "triton.flash_attention"


def attention(dims: tuple[Any, ...] = (2, 4, 16, 64), *, dtype: DType = F16, kv_heads: Any = None,
              mask: TensorType | None = None, extra: int = 0, outputs: int = 1, v_dtype: DType | None = None,
              **attrs: Any) -> Node:
    """An Attention node on 4-D [B, H, S, D] inputs, or packed [B, S, H*D] ones when `dims` has three entries
    (then q_num_heads/kv_num_heads come in `attrs`). `extra` adds past_key/past_value (2) or nonpad_kv_seqlen (3)."""
    g = Graph()
    if len(dims) == 4:
        b, h, s, d = dims
        kv_heads = h if kv_heads is None else kv_heads
        kv = (b, kv_heads, s, d)
    else:
        b, s, hd = dims
        kv_heads = attrs["kv_num_heads"]
        kv = (b, s, hd // attrs["q_num_heads"] * kv_heads if isinstance(hd, int) else hd)
    q = g.add_input("q", TensorType(dtype, dims))
    k = g.add_input("k", TensorType(dtype, kv))
    v = g.add_input("v", TensorType(v_dtype or dtype, kv))
    ins: list[Value | None] = [q, k, v, None if mask is None else g.add_input("m", mask)]
    if extra == 2:
        past = TensorType(dtype, (dims[0], kv_heads, 3, dims[-1]))
        ins += [g.add_input("pk", past), g.add_input("pv", past)]
    elif extra == 3:
        ins += [None, None, g.add_input("n", TensorType(DType.INT64, (dims[0],)))]
    g.outputs.extend(g.add("Attention", ins, attrs, name="attn", outputs=outputs))
    return g.nodes[0]


def takes(node: Node) -> bool:
    return registry.get(NAME).applicable(node, CUDA)


# --- applicability -----------------------------------------------------------------------------------------------


def test_cuda_only_after_sdpa_and_before_the_reference() -> None:
    node = attention()
    t = registry.get(NAME)
    assert t.devices == frozenset({"cuda"}) and takes(node) and not t.applicable(node, CPU)
    names = [c.name for c in registry.candidates(node, CUDA)]
    assert names.index("cuda.sdpa") < names.index(NAME) < len(names) - 1
    assert NAME not in [c.name for c in registry.candidates(node, CPU)]


def test_the_space_is_six_distinct_configs() -> None:
    cfgs = registry.get(NAME).configs()
    assert 1 < len(cfgs) <= 6 and cfgs == [dict(c) for c in CONFIGS]
    assert len({tuple(sorted(c.items())) for c in cfgs}) == len(cfgs)
    space = registry.get(NAME).space
    for c in cfgs:
        assert set(c) == {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"}
        assert all(c[k] in space[k] for k in c)


def test_takes_the_layouts_dtypes_and_masks_it_implements() -> None:
    assert takes(attention(dtype=DType.BFLOAT16)) and takes(attention(dtype=F32))
    assert takes(attention(kv_heads=2)) and takes(attention(kv_heads=1))
    assert takes(attention(is_causal=1, scale=0.25))
    assert takes(attention((2, 9, 4 * 64), q_num_heads=4, kv_num_heads=2))
    assert takes(attention(("batch", 4, "seq", 64)))  # symbolic batch and sequence
    assert takes(attention((1, 2, 8, 256))) and takes(attention((1, 2, 8, 40)))
    assert takes(attention(softmax_precision=F32))
    assert takes(attention(softcap=30.0))  # Gemma-2
    assert takes(attention(extra=2)) and takes(attention(extra=2, outputs=3))  # a key/value cache, presents
    for mask in (TensorType(F16, (2, 1, 1, 16)), TensorType(F32, (16, 16)), TensorType(DType.BOOL, (2, 1, 16, 16)),
                 TensorType(F16, ()), TensorType(DType.FLOAT64, (1, 4, 16, 16))):
        assert takes(attention(mask=mask, is_causal=1)), mask


def test_refuses_what_it_does_not_implement() -> None:
    assert not takes(attention(extra=2, outputs=4))  # the QK output
    lone = attention(extra=2)
    lone.inputs[5] = None  # past_key without past_value
    assert not takes(lone)
    assert not takes(attention(outputs=3))  # presents without a cache
    assert not takes(attention(extra=3))  # nonpad_kv_seqlen
    assert not takes(attention(outputs=2))  # present_key
    assert not takes(attention(left_window_size=4)) and not takes(attention(right_window_size=0))
    assert not takes(attention(qk_matmul_output_mode=1))
    assert not takes(attention(softmax_precision=F16)) and not takes(attention(softmax_precision=DType.FLOAT64))
    assert not takes(attention(dtype=DType.FLOAT64))
    assert not takes(attention(dtype=F16, v_dtype=F32))
    assert not takes(attention((1, 2, 8, 320)))
    assert not takes(attention(mask=TensorType(DType.INT64, (2, 1, 16, 16))))
    assert not takes(attention(mask=TensorType(F16, None)))
    assert not takes(attention((2, 9, "hidden"), q_num_heads=4, kv_num_heads=2))  # head size unknown


def test_nothing_applies_without_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(triton_flash, "triton_available", lambda: False)
    assert not takes(attention())


def test_loads_without_triton() -> None:
    """With triton impossible to import the tactic still registers (and applies to nothing); with triton present,
    registering and checking it imports no triton (it is loaded when a kernel is built)."""
    code = (
        "import sys, torch\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'triton' or name.startswith('triton.'):\n"
        "            raise ModuleNotFoundError(name)\n"
        "if sys.argv[1] == 'block':\n"
        "    sys.meta_path.insert(0, Block())\n"
        "from kiln.ir import DType, Graph, TensorType\n"
        "from kiln.kernels import registry\n"
        "g = Graph()\n"
        "q = g.add_input('q', TensorType(DType.FLOAT16, (1, 2, 8, 64)))\n"
        "g.add('Attention', [q, q, q], {}, outputs=1)\n"
        "names = [t.name for t in registry.candidates(g.nodes[-1], torch.device('cuda'))]\n"
        "assert registry.get('triton.flash_attention') is not None\n"
        "print(int('triton.flash_attention' in names), int('triton' in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    blocked = subprocess.run([sys.executable, "-c", code, "block"], env=env, capture_output=True, text=True,
                             timeout=120)
    assert blocked.returncode == 0, blocked.stderr
    assert blocked.stdout.split() == ["0", "0"]
    if triton_flash.triton_available():
        present = subprocess.run([sys.executable, "-c", code, "allow"], env=env, capture_output=True, text=True,
                                 timeout=120)
        assert present.returncode == 0, present.stderr
        assert present.stdout.split() == ["1", "0"]


# --- launch plans ------------------------------------------------------------------------------------------------


def test_plans_shrink_tiles_to_short_sequences() -> None:
    base = dict(CONFIGS[0])
    decode = plan(base, sq=1, skv=4096, block_d=64, block_dv=64, elem=2)
    assert decode.block_m == 16 and decode.block_n == base["BLOCK_N"]
    short = plan(base, sq=20, skv=9, block_d=64, block_dv=64, elem=2)
    assert (short.block_m, short.block_n) == (32, 16)
    bert = plan(base, sq=128, skv=128, block_d=64, block_dv=64, elem=2)
    assert (bert.block_m, bert.block_n, bert.num_warps, bert.num_stages) == tuple(base.values())


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "x".join(str(v) for v in c.values()))
@pytest.mark.parametrize("d,elem", [(64, 2), (128, 2), (256, 2), (64, 4), (256, 4)])
def test_plans_fit_the_register_and_shared_memory_budgets(cfg: dict[str, int], d: int, elem: int) -> None:
    p = plan(dict(cfg), sq=4096, skv=4096, block_d=d, block_dv=d, elem=elem)
    assert p.block_m * d <= 2048 * p.num_warps  # at most 64 float32 accumulator registers a thread
    assert (p.block_m * d + p.num_stages * p.block_n * 2 * d) * elem <= SMEM_BUDGET
    assert p.block_m >= 16 and p.block_n >= 16 and p.num_stages >= 1 and p.num_warps <= max(8, cfg["num_warps"])


# --- against the reference, under the interpreter ----------------------------------------------------------------


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every case's result, from one worker process per dtype (run side by side)."""
    pytest.importorskip("triton")
    workers = {g: [str(HERE / "flash_cases.py"), g] for g in GROUPS}
    results, ended = run_workers(workers, tmp_path_factory.mktemp("flash"), key="id")
    for g, e in ended.items():
        results[f"<{g}>"] = {"returncode": e["returncode"], "stderr": e["log"]}
    return results


CASES = [(case, g) for case in all_cases() for g in GROUPS if g in case.dtypes]


def test_case_ids_are_unique_and_cover_every_config() -> None:
    ids = [c.id for c in all_cases()]
    assert len(ids) == len(set(ids))
    assert {i for c in all_cases() for i in c.configs} == set(range(len(CONFIGS)))


@pytest.mark.parametrize("case,group", CASES, ids=lambda x: x if isinstance(x, str) else x.id)
def test_matches_reference(interpreted: dict[str, Any], case: Any, group: str) -> None:
    worker = interpreted[f"<{group}>"]
    rec = interpreted.get(f"{case.id}-{group}")
    if rec is None or rec["status"] == "started":
        where = "in this case" if rec else "before this case"
        pytest.fail(f"the {group} worker died {where} (exit {worker['returncode']}):\n{worker['stderr']}")
    assert rec["status"] == "passed", rec.get("message")
