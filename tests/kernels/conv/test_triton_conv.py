"""`triton.conv`: every case of `cases.py` run under the Triton CPU interpreter against the op table's reference (in
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
from kiln.kernels.conv import triton_conv
from kiln.kernels.conv.triton_conv import TILES, spec
from tests.kernels.conv.cases import ALL, CASES, CUDA, F16, F32, Maker, conv_add_relu, conv_hardswish, relu
from tests.kernels.interpreted import case_result, run_cases

ROOT = Path(__file__).resolve().parents[3]

# --- every case, interpreted ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    """{case name: its JSON record} from one interpreter worker, and its log."""
    return run_cases("tests.kernels.conv.cases", tmp_path_factory.mktemp("conv"))


@pytest.mark.parametrize("name", list(CASES))
def test_interpreted_case(name: str, interpreted: tuple[dict[str, Any], str]) -> None:
    problems = case_result(interpreted, name)
    assert problems and all(p is None for p in problems.values()), problems


def test_the_cases_cover_the_space_and_both_layouts() -> None:
    assert set(ALL) == set(TILES)
    cases = [make() for make in CASES.values()]  # cheap: no kernel runs
    assert {t for c in cases for t in c.tiles} == set(TILES)
    layouts = {triton_conv.channels_last(c.feeds["x"]) for c in cases}
    assert layouts == {True, False}
    assert {c.feeds["x"].dtype for c in cases} == {torch.float32, torch.float16}


# --- the space ------------------------------------------------------------------------------------------------


def test_the_space_is_at_most_four_tiles() -> None:
    t = registry.get("triton.conv")
    configs = t.configs()
    assert 1 < len(configs) <= 4
    assert [c["tile"] for c in configs] == list(TILES)
    for name, tile in TILES.items():
        for block in (tile.block_m, tile.block_n, tile.block_k):
            assert block >= 16 and block & (block - 1) == 0, name  # tl.dot needs power-of-two dims >= 16
        assert tile.num_warps in (1, 2, 4, 8) and 1 <= tile.num_stages <= 5 and tile.group_m >= 1


# --- applicability ----------------------------------------------------------------------------------------------


def _conv_node(x: tuple[int, ...], w: tuple[int, ...], attrs: dict[str, Any], dt: DType = F32) -> Node:
    g = Graph()
    xi = g.add_input("x", TensorType(dt, x))
    wi = g.add_initializer("w", torch.ones(w, dtype=dt.torch))
    g.outputs.append(g.add("Conv", [xi, wi], attrs, name="conv")[0])
    return g.nodes[0]


def test_applicable_on_cuda_only_and_after_cudnn() -> None:
    node = conv_add_relu(F16, (1, 8, 7, 7), 5, (3, 3), ALL, cl=True, pad=(1, 1)).node
    t = registry.get("triton.conv")
    assert t.applicable(node, CUDA)
    assert not t.applicable(node, torch.device("cpu"))
    names = [c.name for c in registry.candidates(node, CUDA)]
    assert names.index("cuda.conv") < names.index("triton.conv")  # cuDNN stays first at optimization level 0


def test_takes_bfloat16() -> None:
    assert registry.get("triton.conv").applicable(conv_hardswish(DType.BFLOAT16, (1, 3, 7, 7), 5, (1, 1), ()).node,
                                                  CUDA)


def test_not_applicable_without_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    node = conv_add_relu(F32, (1, 4, 7, 7), 5, (3, 3), ()).node
    monkeypatch.setattr(templates, "triton_available", lambda: False)  # the template tactics ask there
    assert not registry.get("triton.conv").applicable(node, CUDA)


def test_the_module_imports_without_triton() -> None:
    code = ("import sys\nsys.modules['triton'] = None\n"
            "from kiln.kernels import registry\n"
            "from tests.kernels.conv.cases import CASES, CUDA\n"
            "node = CASES['3x3-pad1-relu-f32-nchw']().node\n"
            "assert registry.get('cuda.conv').applicable(node, CUDA)\n"
            "assert not registry.get('triton.conv').applicable(node, CUDA)\n"
            "print('ok')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout + done.stderr


@pytest.mark.parametrize(("x", "w", "attrs"), [
    ((1, 8, 7, 7), (8, 2, 3, 3), {"group": 4, "pads": (1, 1, 1, 1)}),  # grouped
    ((1, 8, 7, 7), (8, 1, 3, 3), {"group": 8, "pads": (1, 1, 1, 1)}),  # depthwise
    ((1, 4, 7, 7), (6, 4, 3, 3), {"pads": (0, 0, 1, 1)}),  # asymmetric padding
    ((1, 4, 7, 7), (6, 4, 3, 3), {"auto_pad": "SAME_UPPER"}),
    ((1, 4, 9), (6, 4, 3), {}),  # 1-D
    ((1, 4, 5, 5, 5), (6, 4, 3, 3, 3), {}),  # 3-D
], ids=["grouped", "depthwise", "asymmetric-pads", "auto-pad-same", "conv1d", "conv3d"])
def test_refuses_what_cudnn_keeps(x: tuple[int, ...], w: tuple[int, ...], attrs: dict[str, Any]) -> None:
    assert not registry.get("triton.conv").applicable(_conv_node(x, w, attrs), CUDA)


def test_takes_auto_pad_valid_and_a_bare_conv() -> None:
    node = _conv_node((1, 4, 7, 7), (6, 4, 3, 3), {"auto_pad": "VALID", "strides": (2, 2)})
    s = spec(node)
    assert s is not None and s.pad == (0, 0) and s.stride == (2, 2) and s.program is None and s.b_at is None


def test_refuses_a_weight_that_is_not_a_constant() -> None:
    g = Graph()
    x = g.add_input("x", TensorType(F32, (1, 4, 7, 7)))
    w = g.add_input("w", TensorType(F32, (6, 4, 3, 3)))
    g.outputs.append(g.add("Conv", [x, w], name="conv")[0])
    assert not registry.get("triton.conv").applicable(g.nodes[0], CUDA)


@pytest.mark.parametrize("dt", [DType.FLOAT64])
def test_refuses_other_dtypes(dt: DType) -> None:
    assert not registry.get("triton.conv").applicable(_conv_node((1, 4, 7, 7), (6, 4, 3, 3), {}, dt), CUDA)


def test_refuses_an_epilogue_with_an_extra_output() -> None:
    m = Maker()
    y = m.conv(F32, (1, 4, 7, 7), 5, (3, 3))
    m.g.outputs.append(y)  # the pre-activation value is read outside: a second output of the fused node
    node = m.finish(relu(m, y), ()).node
    assert node.op == "Fused" and len(node.outputs) == 2
    assert not registry.get("triton.conv").applicable(node, CUDA)


# --- the generated source -----------------------------------------------------------------------------------


def test_the_epilogue_is_rendered_by_the_pointwise_rules() -> None:
    from kiln.kernels.pointwise.codegen import build_program, epilogue_graph

    node = conv_hardswish(F16, (1, 3, 7, 7), 5, (3, 3), ()).node
    s = spec(node)
    assert s is not None and s.program is not None and s.b_at is not None
    found = epilogue_graph(node.attrs["body"])
    assert found is not None
    # the same formulas line for line; only the accumulator's name differs (an operand there, a register tile here)
    assert [line.replace("a0", "acc") for line in build_program(found[0]).lines] == list(s.program.lines)
    src = triton_conv.render(s, tf32=True)
    assert "/ 6.0 + 0.5" in src and "input_precision" not in src  # float16: tensor cores, no precision choice
    assert "acc = acc + tl.load(b_ptr + (offs_n % N) * stride_b).to(tl.float32)[None, :]" in src
    assert f"tl.store(out_ptr + out_rows + rn * stride_oc, {s.program.result.text}.to(tl.float16), mask=mask)" in src


def test_a_residual_is_read_with_its_own_strides() -> None:
    s = spec(conv_add_relu(F32, (1, 4, 7, 7), 5, (3, 3), ()).node)
    assert s is not None and s.program is not None and len(s.program.operands) == 1
    src = triton_conv.render(s, tf32=False)
    assert "a0 = tl.load(p0 + (ob * s0_b + oh * s0_h + ow * s0_w)[:, None] + rn * s0_c, mask=mask" in src


@pytest.mark.parametrize("tf32", [False, True])
def test_float32_products_follow_cudnns_tf32_setting(tf32: bool) -> None:
    s = spec(conv_add_relu(F32, (1, 4, 7, 7), 5, (3, 3), ()).node)
    assert s is not None
    flags = torch.backends.cudnn
    before = flags.allow_tf32  # why: a property of torch's, which monkeypatch cannot restore
    try:
        flags.allow_tf32 = tf32
        src = triton_conv.source(s)
    finally:
        flags.allow_tf32 = before
    assert ('input_precision="tf32"' if tf32 else 'input_precision="ieee"') in src
