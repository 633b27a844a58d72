"""`triton.gemm`: every case of `cases.py` run under the Triton CPU interpreter against the op table's reference (in
one subprocess), plus what needs no kernel run: the space, applicability, and the generated source's shape."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from kiln.ir import DType, Graph, TensorType
from kiln.ir.graph import Node
from kiln.kernels import registry, templates
from kiln.kernels.gemm import triton_gemm
from kiln.kernels.gemm.triton_gemm import TILES, spec
from kiln.passes.epilogue_fusion import epilogue_fusion
from kiln.passes.rewrite import fuse
from kiln.tune.tuner import SMALL_SPACE
from tests.kernels.gemm import next_cases
from tests.kernels.gemm.cases import ALL, CASES, CUDA, F16, F32, Maker, bias_gelu_residual, local_constants
from tests.kernels.interpreted import case_result, run_cases

ROOT = Path(__file__).resolve().parents[3]

# --- every case, interpreted ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    """{case name: its JSON record} from one interpreter worker, and its log."""
    return run_cases("tests.kernels.gemm.cases", tmp_path_factory.mktemp("gemm"))


@pytest.mark.parametrize("name", list(CASES))
def test_interpreted_case(name: str, interpreted: tuple[dict[str, Any], str]) -> None:
    problems = case_result(interpreted, name)
    assert problems and all(p is None for p in problems.values()), problems


def test_the_cases_run_every_tile_of_the_space() -> None:
    assert set(ALL) == set(TILES)
    # constructing the cases is cheap (no kernel runs); their tiles together cover the space
    covered = {t for make in CASES.values() for t in make().tiles} | set(next_cases.FLOAT)
    assert covered >= set(TILES)


# --- the space ------------------------------------------------------------------------------------------------


def test_the_space_is_a_short_list_of_tiles() -> None:
    t = registry.get("triton.gemm")
    configs = t.configs()
    # the default level times a space of up to SMALL_SPACE whole; the split norm-GEMM's is cuBLAS's 4 plus these
    assert len(configs) > 1 and len(registry.get("split.norm_gemm").configs()) <= SMALL_SPACE
    assert [c["tile"] for c in configs] == list(TILES)
    for name, tile in TILES.items():
        for block in (tile.block_m, tile.block_n, tile.block_k):
            assert block >= 16 and block & (block - 1) == 0, name  # tl.dot needs power-of-two dims >= 16
        assert tile.num_warps in (1, 2, 4, 8) and 1 <= tile.num_stages <= 5 and tile.group_m >= 1


# --- applicability ----------------------------------------------------------------------------------------------


def _node(g: Graph) -> Node:
    epilogue_fusion(g)
    (node,) = [n for n in g.nodes if n.op in ("Fused", "MatMul", "Gemm")]
    return node


def test_applicable_on_cuda_only_and_after_cublas() -> None:
    node = bias_gelu_residual(F16, "tanh", ALL).node
    t = registry.get("triton.gemm")
    assert t.applicable(node, CUDA)
    assert not t.applicable(node, torch.device("cpu"))
    names = [c.name for c in registry.candidates(node, CUDA)]
    assert names.index("cuda.linear") < names.index("triton.gemm")


def test_not_applicable_without_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    node = bias_gelu_residual(F32, "none", ALL).node
    monkeypatch.setattr(templates, "triton_available", lambda: False)  # the template tactics ask there
    assert not registry.get("triton.gemm").applicable(node, CUDA)


def test_the_module_imports_without_triton() -> None:
    code = ("import sys\nsys.modules['triton'] = None\n"
            "from kiln.kernels import registry\n"
            "from tests.kernels.gemm.cases import CASES, CUDA\n"
            "node = CASES['bias-gelu-tanh-residual-f16']().node\n"
            "assert not registry.get('triton.gemm').applicable(node, CUDA)\n"
            "print('ok')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout + done.stderr


def test_refuses_a_weight_that_is_not_a_constant() -> None:
    m = Maker()
    y = m.g.add("MatMul", [m.input("x", (4, 8), F32), m.input("b", (8, 6), F32)], name="mm")[0]
    assert not registry.get("triton.gemm").applicable(m.finish(y, ()).node, CUDA)


def test_refuses_a_step_the_rules_do_not_generate() -> None:
    m = Maker()
    mm = m.g.add("MatMul", [m.input("x", (4, 8), F32), m.weight(8, 6, F32)], name="mm")[0]
    y = m.g.add("Mod", [mm, m.const("d", (6,), F32)], {"fmod": 1}, name="mod")[0]  # float32 fmod: not generated
    m.g.outputs.append(y)
    node = fuse(m.g, [mm.producer, y.producer], "epilogue")  # type: ignore[list-item]
    assert [n.op for n in node.attrs["body"].nodes] == ["MatMul", "Mod"]
    assert not registry.get("triton.gemm").applicable(node, CUDA)


def test_refuses_an_epilogue_with_an_extra_output() -> None:
    m = Maker()
    y = m.g.add("MatMul", [m.input("x", (4, 8), F32), m.weight(8, 6, F32)], name="mm")[0]
    y = m.g.add("Add", [y, m.const("b", (6,), F32)], name="bias")[0]
    m.g.outputs.append(y)  # the pre-activation value is read outside: a second output of the fused node
    node = m.finish(m.g.add("Relu", [y], name="relu")[0], ()).node
    assert node.op == "Fused" and len(node.outputs) == 2
    assert not registry.get("triton.gemm").applicable(node, CUDA)


@pytest.mark.parametrize("dt", [DType.FLOAT64, DType.INT32])
def test_refuses_other_dtypes(dt: DType) -> None:
    g = Graph()
    x = g.add_input("x", TensorType(dt, (4, 8)))
    w = g.add_initializer("w", torch.ones(8, 6, dtype=dt.torch))
    g.outputs.append(g.add("MatMul", [x, w], name="mm")[0])
    assert not registry.get("triton.gemm").applicable(_node(g), CUDA)


def test_takes_bfloat16_and_a_gemm_with_a_broadcast_c() -> None:
    t = registry.get("triton.gemm")
    assert t.applicable(bias_gelu_residual(DType.BFLOAT16, "none", ALL).node, CUDA)
    m = Maker()
    y = m.g.add("Gemm", [m.input("x", (4, 8), F16), m.weight(8, 6, F16), m.input("c", (4, 1), F16)],
                {"beta": 0.5}, name="fc")[0]
    node = m.finish(y, ()).node
    s = spec(node)
    assert t.applicable(node, CUDA) and s is not None and s.c_at == 2 and s.beta == 0.5


# --- the generated source -----------------------------------------------------------------------------------


def test_the_epilogue_is_rendered_by_the_pointwise_rules() -> None:
    from kiln.kernels.pointwise.codegen import build_program, epilogue_graph

    node = bias_gelu_residual(F16, "tanh", ALL).node
    s = spec(node)
    assert s is not None and s.program is not None
    found = epilogue_graph(node.attrs["body"])
    assert found is not None
    pointwise = build_program(found[0])
    # the same formulas line for line; only the accumulator's name differs (an operand there, a register tile here)
    assert [line.replace("a0", "acc").replace("a1", "a0").replace("a2", "a1") for line in pointwise.lines] == \
        list(s.program.lines)
    src = triton_gemm.render(s, tf32=False)
    assert "km.gelu_tanh(" in src and "input_precision" not in src  # float16: tensor cores, no precision choice
    assert "tl.store(out_ptr + rm * stride_om + rn * stride_on, v2.to(tl.float16), mask=mask)" in src


def test_scalar_constants_are_baked_into_the_tile() -> None:
    s = spec(local_constants(F32, ()).node)
    assert s is not None and s.program is not None
    src = triton_gemm.render(s, tf32=False)
    assert "tl.full([BLOCK_M, BLOCK_N], 0.125, tl.float32)" in src
    assert len(s.program.operands) == 1 and s.program.operands[0].data is not None  # the vector [N]


@pytest.mark.parametrize("tf32", [False, True])
def test_float32_products_follow_torchs_tf32_setting(tf32: bool) -> None:
    s = spec(bias_gelu_residual(F32, "none", ALL).node)
    assert s is not None
    flags = torch.backends.cuda.matmul
    before = flags.allow_tf32  # why: a property of torch's, which monkeypatch cannot restore
    try:
        flags.allow_tf32 = tf32
        src = triton_gemm.source(s)
    finally:
        flags.allow_tf32 = before
    assert ('input_precision="tf32"' if tf32 else 'input_precision="ieee"') in src


def test_float_tma_tiles_read_the_weight_k_major_and_refuse_rows_tma_cannot_read() -> None:
    from kiln.utils.errors import UnsupportedError

    case = bias_gelu_residual(F16, "none", (), k=96)
    s = spec(case.node)
    assert s is not None
    text = triton_gemm.source(s, tma=True)
    assert "x_desc.load" in text and "w_desc.load" in text and "tl.dot(x, w.T, acc)" in text and "x_ptrs" not in text
    kernel = registry.get("triton.gemm").build(case.node, {"tile": "tma-128x256x64-w8s4"}, torch.device("cpu"))
    w = kernel.weight(case.node.inputs[s.w_at].data)  # type: ignore[attr-defined,union-attr]
    assert tuple(w.shape) == (96, 96) and w.t().is_contiguous()  # [K, N] view of an [N, K] weight
    ragged = bias_gelu_residual(F16, "none", (), k=100).node  # rows of 200 bytes: not 16-byte multiples
    with pytest.raises(UnsupportedError, match="16 bytes"):
        registry.get("triton.gemm").build(ragged, {"tile": "tma-128x256x64-w8s4"}, CUDA)
