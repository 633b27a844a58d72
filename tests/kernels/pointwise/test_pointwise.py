"""The pointwise code generator: every case of `cases.py` run under the Triton CPU interpreter against the op
table's reference (in two subprocesses), plus the parts that need no kernel run: layout planning, the generated
source's shape, what `supports()` refuses, `epilogue_graph`, and the tactic's applicability."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from kiln.ir import DType, Graph, Node, TensorType
from kiln.kernels.pointwise import TritonPointwise, check, epilogue_graph, supports
from kiln.kernels.pointwise import layout as lay
from kiln.kernels.pointwise.codegen import build_program, render
from kiln.kernels.registry import TACTICS
from kiln.utils.errors import UnsupportedError
from tests.kernels.interpreted import case_result, run_cases
from tests.kernels.pointwise.cases import CASES, epilogue_body, graph

ROOT = Path(__file__).resolve().parents[3]
SHARDS = 2
D = DType
F32, F16 = D.FLOAT32, D.FLOAT16


# --- every case, interpreted ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    """Runs all cases in SHARDS interpreter workers at once; returns {name: record} and their logs."""
    return run_cases("tests.kernels.pointwise.cases", tmp_path_factory.mktemp("pointwise"), SHARDS)


@pytest.mark.parametrize("name", list(CASES))
def test_interpreted_case(name: str, interpreted: tuple[dict[str, Any], str]) -> None:
    result = case_result(interpreted, name)
    assert result is None, result


def test_the_cases_cover_the_brief() -> None:
    names = set(CASES)
    for must in ("bcast-bias-MN+N-float16", "bcast-nchw-channel-float16", "bcast-scalar-float32",
                 "bcast-col-float32", "bcast-size1-float32", "bcast-size7-float32", "bcast-size1031-float32",
                 "bcast-3x5x7x11-float32", "strided-transposed-float32", "inplace-alias-input-float16",
                 "epilogue-matmul-bias-gelu-residual-float16", "dag-diamond-passthrough-float32", "wide-int64-index"):
        assert must in names
    assert len(names) > 300


# --- layouts ---------------------------------------------------------------------------------------------------


def _contig(*shape: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return shape, tuple(lay.contiguous(shape))


def test_layout_bias_is_flat_plus_modulo() -> None:
    launch = lay.plan((32, 64), [_contig(32, 64), _contig(64), _contig(32, 64)], 1024)
    flat, bias, out = launch.layout.accesses
    assert flat.kind == out.kind == "flat"
    assert bias == lay.Access("strided", (lay.Term(1, 1, True),))
    assert launch.args == (64,) and launch.layout.even and not launch.layout.wide


def test_layout_collapses_nchw_channel_to_three_dims() -> None:
    launch = lay.plan((2, 3, 5, 7), [_contig(2, 3, 5, 7), _contig(1, 3, 1, 1), _contig(2, 3, 5, 7)], 256)
    assert launch.layout.rank == 3
    assert launch.layout.accesses[1] == lay.Access("strided", (lay.Term(1, 1, True),))
    assert lay.arg_keys(launch.layout) == [("inner", 1, 0), ("span", 1, 1)]
    assert launch.args == (35, 3) and not launch.layout.even


def test_layout_contiguous_and_scalar_collapse_to_one_dim() -> None:
    launch = lay.plan((4, 5, 6), [_contig(4, 5, 6), ((), ()), _contig(4, 5, 6)], 128)
    assert launch.layout.rank == 1
    assert [a.kind for a in launch.layout.accesses] == ["flat", "scalar", "flat"]
    assert launch.args == ()


def test_layout_transposed_input_has_two_terms() -> None:
    launch = lay.plan((24, 40), [((24, 40), (1, 24)), _contig(24, 40)], 1024)
    assert launch.layout.accesses[0] == lay.Access("strided", (lay.Term(0, 0, True), lay.Term(1, 1, False)))
    assert launch.args == (40, 40, 24)  # inner0 (index // 40), span1_1 (index % 40), stride 24


def test_layout_modes_avoid_per_element_division() -> None:
    bias = lay.plan((64, 4096), [_contig(64, 4096), _contig(4096), _contig(64, 4096)], 1024).layout
    assert bias.accesses[1].terms == (lay.Term(1, 1, True, "fixed"),)
    nchw = lay.plan((8, 64, 56, 56), [_contig(8, 64, 56, 56), _contig(1, 64, 1, 1), _contig(8, 64, 56, 56)],
                    1024).layout
    assert nchw.accesses[1].terms == (lay.Term(1, 1, True, "step"),)
    small = lay.plan((8, 64, 4, 4), [_contig(8, 64, 4, 4), _contig(1, 64, 1, 1)], 1024).layout
    assert small.accesses[1].terms == (lay.Term(1, 1, True, "div"),)
    g, (x, b) = graph((F16, (64, 4096)), (F16, (4096,)))
    g.outputs = list(g.add("Add", [x, b]))
    src = render(build_program(g), bias)
    assert "r1_1 = tl.multiple_of(start % span1_1, BLOCK) + lane" in src and "offs %" not in src
    g, (x, s) = graph((F16, (8, 64, 56, 56)), (F16, (1, 64, 1, 1)))
    g.outputs = list(g.add("Mul", [x, s]))
    src = render(build_program(g), nchw)
    assert "//" not in src.replace("start // inner1", "")  # one scalar division per program


def test_layout_goes_int64_for_huge_domains_and_reach() -> None:
    assert lay.plan((2**31 + 5,), [_contig(2**31 + 5), _contig(2**31 + 5)], 1024).layout.wide
    far = lay.plan((4, 8), [((4, 8), (2**30, 1)), _contig(4, 8)], 1024)
    assert far.layout.wide
    assert not lay.plan((4, 8), [_contig(4, 8), _contig(4, 8)], 1024).layout.wide


def test_source_of_bias_add_is_vectorizable() -> None:
    g, (x, b) = graph((F16, (32, 64)), (F16, (64,)))
    g.outputs = list(g.add("Add", [x, b]))
    prog = build_program(g)
    layout = lay.plan((32, 64), [_contig(32, 64), _contig(64), _contig(32, 64)], 1024).layout
    src = render(prog, layout)
    assert "tl.load(p0 + offs)" in src and "tl.store(o0 + offs, " in src and "mask" not in src  # even: no mask
    assert "r1_1 = offs % span1_1" in src and "tl.load(p1 + r1_1)" in src
    assert ".to(tl.float32)" in src and "v0.to(tl.float16)" in src
    wide = lay.plan((2**31 + 5,), [_contig(2**31 + 5)] * 3, 1024).layout
    assert "tl.program_id(0).to(tl.int64)" in render(prog, wide)
    compile(src, "<generated>", "exec")


def test_scalar_constants_are_baked_and_vectors_passed() -> None:
    g, (x,) = graph((F32, (5, 12)))
    s = g.add_initializer("s", torch.tensor(0.25))
    v = g.add_initializer("v", torch.arange(12.0))
    g.outputs = list(g.add("Add", [g.add("Mul", [x, s])[0], v]))
    prog = build_program(g)
    assert [op.input for op in prog.operands] == [0, None]
    assert prog.operands[1].data is v.data
    assert any("tl.full([BLOCK], 0.25, tl.float32)" in line for line in prog.lines)


# --- what is refused --------------------------------------------------------------------------------------------


def _one(op: str, dts: list[DType], shapes: list[tuple[int, ...]] | None = None, **attrs: Any) -> Graph:
    g, vals = graph(*[(dt, s) for dt, s in zip(dts, shapes or [(4, 5)] * len(dts))])
    g.outputs = list(g.add(op, vals, attrs))
    return g


REFUSED = {
    "BitShift": lambda: _one("BitShift", [D.INT32, D.INT32], direction="LEFT"),
    "integer Div": lambda: _one("Div", [D.INT32, D.INT32]),
    "float32 Mod": lambda: _one("Mod", [F32, F32], fmod=1),
    "integer Pow": lambda: _one("Pow", [D.INT32, D.INT32]),
    "integer Erf": lambda: _one("Erf", [D.INT32]),
    "float64 Exp": lambda: _one("Exp", [D.FLOAT64]),
    "uint16 Add": lambda: _one("Add", [D.UINT16, D.UINT16]),
    "Softmax": lambda: _one("Softmax", [F32]),
    "float8 Cast": lambda: _one("Cast", [F32], to=D.FLOAT8_E4M3FN),
    "outputs of two shapes": lambda: _two_shapes(),
    "unknown rank": lambda: _unknown_rank(),
}


def _two_shapes() -> Graph:
    g, (x, b) = graph((F32, (4, 5)), (F32, (5,)))
    g.outputs = [g.add("Add", [x, b])[0], g.add("Relu", [b])[0]]
    return g


def _unknown_rank() -> Graph:
    g = Graph("case")
    x = g.add_input("x", TensorType(F32, None))
    g.outputs = list(g.add("Relu", [x]))
    return g


@pytest.mark.parametrize("what", list(REFUSED))
def test_supports_refuses(what: str) -> None:
    g = REFUSED[what]()
    assert not supports(g)
    assert check(g)
    with pytest.raises(UnsupportedError):
        build_program(g)


def test_supports_takes_a_mixed_graph() -> None:
    g, (x, b) = graph((F16, (4, 5)), (F16, (5,)))
    (y,) = g.add("Gelu", [g.add("Add", [x, b])[0]], {"approximate": "tanh"})
    g.outputs = [y, g.add("Cast", [g.add("IsNaN", [y])[0]], {"to": D.INT64})[0]]
    assert check(g) is None


# --- epilogues ---------------------------------------------------------------------------------------------------


def test_epilogue_graph_maps_the_steps_operands() -> None:
    body = epilogue_body(F16)
    found = epilogue_graph(body)
    assert found is not None
    g, idx = found
    assert idx == [2, 3]
    assert [n.op for n in g.nodes] == ["Add", "Gelu", "Add"]
    assert g.nodes[0].inputs[0] is g.inputs[0] and g.inputs[0].type == body.nodes[0].outputs[0].type
    assert [v.type for v in g.inputs[1:]] == [body.inputs[i].type for i in idx]
    assert [v.type for v in g.outputs] == [v.type for v in body.outputs]
    assert all(v.producer is None for v in body.inputs) and len(body.nodes) == 4  # the body is left alone


def test_epilogue_graph_refuses_unsupported_steps() -> None:
    body, (a, w, c) = graph((F32, (4, 6)), (F32, (6, 5)), (F32, (5,)))
    (acc,) = body.add("MatMul", [a, w])
    body.outputs = list(body.add("Mod", [acc, c], {"fmod": 1}))
    assert epilogue_graph(body) is None


# --- the tactic ---------------------------------------------------------------------------------------------------


def _fused(kind: str, body: Graph) -> Node:
    outer = Graph("outer")
    ins = [outer.add_input(f"i{k}", v.type) for k, v in enumerate(body.inputs)]
    outer.add("Fused", ins, {"body": body, "kind": kind}, outputs=len(body.outputs))
    return outer.nodes[-1]


def _pointwise_body() -> Graph:
    g, (x, b) = graph((F16, (8, 16)), (F16, (16,)))
    g.outputs = list(g.add("Sigmoid", [g.add("Add", [x, b])[0]]))
    return g


def test_tactic_applies_to_supported_pointwise_groups_on_cuda_only() -> None:
    t = TACTICS["triton.pointwise"]
    assert isinstance(t, TritonPointwise) and t.priority < 1000 and t.space
    node = _fused("pointwise", _pointwise_body())
    assert t.applicable(node, torch.device("cuda"))
    assert not t.applicable(node, torch.device("cpu"))
    assert not t.applicable(_fused("region", _pointwise_body()), torch.device("cuda"))
    assert not t.applicable(_fused("epilogue", epilogue_body(F16)), torch.device("cuda"))
    assert not t.applicable(_fused("pointwise", REFUSED["BitShift"]()), torch.device("cuda"))
    assert t.configs()[0] == {"BLOCK": 1024, "num_warps": 4}


def test_package_imports_without_triton() -> None:
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch\n"
            "import kiln.kernels.pointwise as p\n"
            "from tests.kernels.pointwise.test_pointwise import _fused, _pointwise_body\n"
            "assert not p.triton_available()\n"
            "assert not p.TritonPointwise().applicable(_fused('pointwise', _pointwise_body()), torch.device('cuda'))\n"
            "print('ok')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_layout_walks_a_channels_last_domain_in_memory_order() -> None:
    n, c, h, w = 8, 64, 56, 56
    nhwc = (h * w * c, 1, w * c, c)
    launch = lay.plan((n, c, h, w), [((n, c, h, w), nhwc), _contig(1, c, 1, 1), ((n, c, h, w), nhwc)], 1024)
    x, scale, out = launch.layout.accesses
    assert x.kind == out.kind == "flat"  # coalesced, no index arithmetic (it was a stride-C gather)
    assert launch.layout.rank == 2 and scale == lay.Access("strided", (lay.Term(1, 1, True, "div"),))
    assert launch.args == (c,)  # the channel is index % C


def test_new_outputs_follow_a_channels_last_input() -> None:
    from kiln.kernels.pointwise.codegen import _output_order, _strides

    x = torch.empty(2, 8, 5, 6).contiguous(memory_format=torch.channels_last)
    order = _output_order([x], (2, 8, 5, 6))
    assert _strides((2, 8, 5, 6), order) == x.stride()
    assert _output_order([torch.empty(2, 8, 5, 6)], (2, 8, 5, 6)) == [0, 1, 2, 3]
    assert _output_order([x[:, :, :, ::2]], (2, 8, 5, 3)) == [0, 1, 2, 3]  # not dense: row-major


def test_tactic_takes_a_lone_elementwise_node() -> None:
    from kiln.kernels.pointwise import body_of

    t = TACTICS["triton.pointwise"]
    g, (x, s) = graph((F16, (8, 64, 56, 56)), (F16, (1, 64, 1, 1)))
    g.outputs = list(g.add("Mul", [x, s], name="se_scale"))
    node = g.nodes[0]
    assert t.applicable(node, torch.device("cuda")) and not t.applicable(node, torch.device("cpu"))
    body = body_of(node)
    assert body is not None and [n.op for n in body.nodes] == ["Mul"] and len(body.inputs) == 2
    assert body.outputs[0].type == node.outputs[0].type
    g2, (y,) = graph((F32, (4, 5)))
    clip = g2.add("Clip", [y, None, None], name="clip")[0]
    grow = g2.add("Expand", [y, g2.add_initializer("shape", torch.tensor([3, 4, 5]))], name="grow")[0]
    g2.outputs = [clip, grow]
    for n in g2.nodes:
        assert not t.applicable(n, torch.device("cuda")), n.op  # an omitted input; a shape-dependent Expand


def test_tactic_takes_the_input_cast_of_a_named_batch() -> None:
    """A graph input keeps its named batch where the profile fixed every computed value's (the engine's input Cast
    [batch, 3, 224, 224] -> [128, 3, 224, 224]): generated; an output still named under a known input is not."""
    t = TACTICS["triton.pointwise"]
    g, (x,) = graph((F32, ("batch", 3, 8, 8)))
    (y,) = g.add("Cast", [x], {"to": F16}, name="x_to_float16")
    y.type = TensorType(F16, (4, 3, 8, 8))
    g.outputs = [y]
    assert t.applicable(g.nodes[0], torch.device("cuda")), check(g)
    g2, (a, b) = graph((F32, (4, 3)), (F32, (1, 3)))  # the other way round: static values, a named output
    g2.outputs = list(g2.add("Add", [a, b]))
    g2.outputs[0].type = TensorType(F32, ("n", 3))
    assert check(g2) is None
    g3, (c, e) = graph((F32, ("m", 3)), (F32, (4, 3)))
    g3.outputs = list(g3.add("Add", [c, e]))
    g3.outputs[0].type = TensorType(F32, ("n", 3))
    assert "does not broadcast" in str(check(g3))  # two different names: not known to match


def test_quantize_divides_by_the_corrected_reciprocal_where_it_is_finite() -> None:
    """A constant scale: km.quotient with its float32 reciprocal baked in; a scale whose reciprocal overflows
    (subnormal) or a computed one: IEEE division per value (`tl.div_rn`); never Triton's approximate `/`."""
    def source(scale: torch.Tensor | None) -> str:
        g, ins = graph((F32, (64,)), *([] if scale is not None else [(F32, ())]))
        s = g.add_initializer("s", scale) if scale is not None else ins[1]
        zero = g.add_initializer("z", torch.tensor(0, dtype=torch.int8))
        g.outputs = list(g.add("QuantizeLinear", [ins[0], s, zero]))
        reads = [_contig(64), *([] if scale is not None else [_contig()])]
        return render(build_program(g), lay.plan((64,), [*reads, _contig(64)], 1024).layout)

    normal, tiny, computed = source(torch.tensor(0.37)), source(torch.tensor(1e-39)), source(None)
    assert "km.quotient(" in normal and "tl.div_rn" not in normal
    assert "tl.div_rn(" in tiny and "km.quotient" not in tiny
    assert "tl.div_rn(" in computed and "km.quotient" not in computed
    assert not any(" / " in src.split("def kiln_pointwise")[1] for src in (normal, tiny, computed))


def test_the_plan_tells_a_pointwise_kernel_which_outputs_are_channels_last() -> None:
    """`base.plan_layouts`, as the runtime and the tuner call it after a build: a generated kernel learns the
    outputs the layout pass keeps channels-last (it then writes them so, no conversion after it); a kernel
    without the attribute (a plain function) is left alone."""
    from kiln.kernels.base import plan_layouts

    g, (x,) = graph((F32, (2, 3, 8, 8)))
    g.outputs = list(g.add("Cast", [x], {"to": F16}, name="to_half"))
    node = g.nodes[0]
    kernel = TACTICS["triton.pointwise"].build(node, {"BLOCK": 1024, "num_warps": 4}, torch.device("cuda"))
    assert kernel.channels_last_outputs == ()
    plan_layouts(kernel, node, {node.outputs[0].name: "channels_last"})
    assert kernel.channels_last_outputs == (True,)
    plan_layouts(kernel, node, {})
    assert kernel.channels_last_outputs == (False,)

    def plain(xs: list[Any]) -> list[Any]:
        return xs

    plan_layouts(plain, node, {node.outputs[0].name: "channels_last"})
    assert not hasattr(plain, "channels_last_outputs")
