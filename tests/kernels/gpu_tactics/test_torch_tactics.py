"""The GPU tactics that call cuBLAS / cuDNN / SDPA through torch, against the op table's reference.

These tactics are device-agnostic torch code apart from their library choice, so on a CPU-only machine they are
built for "cuda" and run on CPU tensors (SDPA on its math backend); the cuDNN-only fused path and the real GPU
shapes are in the GPU tier (`tests/gpu`)."""

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
from kiln.ir.ops import OPS
from kiln.ir.ops.base import RefCtx
from kiln.kernels import registry
from kiln.passes.epilogue_fusion import epilogue_fusion

CUDA = torch.device("cuda")
F32 = DType.FLOAT32
ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(autouse=True)
def _reference_tails(monkeypatch: pytest.MonkeyPatch) -> None:
    """In this process the epilogue tails run through the op references: a generated Triton kernel needs a GPU
    or the interpreter, which must be switched on before triton is imported (see the subprocess test below)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        monkeypatch.setattr("kiln.kernels.epilogue._generated", lambda a, start: None)


def _w(g: Graph, name: str, *shape: int, seed: int = 0) -> Value:
    return g.add_initializer(name, torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.3)


def _inputs(node: Node, feeds: dict[str, torch.Tensor]) -> list[Any]:
    return [None if v is None else (v.data if v.data is not None else feeds[v.name]) for v in node.inputs]


def _check(node: Node, feeds: dict[str, torch.Tensor], tactic: str, configs: list[dict[str, Any]]) -> None:
    t = registry.get(tactic)
    assert t.applicable(node, CUDA)
    assert not t.applicable(node, torch.device("cpu"))
    args = _inputs(node, feeds)
    want = OPS[node.op].ref(RefCtx(node), args)[0]
    for cfg in configs:
        got = t.build(node, cfg, CUDA)(list(args))[0]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m, c=cfg: f"{c}: {m}")


def _fused(g: Graph) -> Node:
    epilogue_fusion(g)
    fused = [n for n in g.nodes if n.op == "Fused"]
    assert len(fused) == 1
    return fused[0]


def _linear_graph(act: str) -> tuple[Graph, dict[str, torch.Tensor]]:
    g = Graph()
    x = g.add_input("x", TensorType(F32, (2, 5, 8)))
    res = g.add_input("res", TensorType(F32, (2, 5, 6)))
    y = g.add("MatMul", [x, _w(g, "w", 8, 6)], name="mm")[0]
    y = g.add("Add", [y, _w(g, "b", 6, seed=1)], name="bias")[0]
    y = g.add(act, [y], {"approximate": "tanh"} if act == "Gelu" else {}, name="act")[0]
    y = g.add("Add", [y, res], name="residual")[0]
    g.outputs.append(y)
    feeds = {"x": torch.randn(2, 5, 8), "res": torch.randn(2, 5, 6)}
    return g, feeds


@pytest.mark.parametrize("act", ["Relu", "Gelu", "Sigmoid"])
def test_linear_with_bias_activation_and_residual(act: str) -> None:
    g, feeds = _linear_graph(act)
    node = _fused(g)
    assert [m.op for m in node.attrs["body"].nodes] == ["MatMul", "Add", act, "Add"]
    configs = registry.get("cuda.linear").configs()
    assert len(configs) == 4
    _check(node, feeds, "cuda.linear", configs)


def test_gemm_trans_b_alpha_and_row_bias() -> None:
    g = Graph()
    x = g.add_input("x", TensorType(F32, (3, 8)))
    y = g.add("Gemm", [x, _w(g, "w", 6, 8), _w(g, "c", 6, seed=2)], {"transB": 1, "alpha": 0.5}, name="fc")[0]
    g.outputs.append(y)
    _check(g.nodes[0], {"x": torch.randn(3, 8)}, "cuda.linear", registry.get("cuda.linear").configs())


def test_linear_refuses_a_full_c_and_an_activation_weight() -> None:
    g = Graph()
    x = g.add_input("x", TensorType(F32, (3, 8)))
    b = g.add_input("b", TensorType(F32, (8, 6)))
    full = g.add("Gemm", [x, _w(g, "w", 8, 6), _w(g, "c", 3, 6)], name="full_c")[0]
    act = g.add("MatMul", [x, b], name="act_weight")[0]
    g.outputs.extend([full, act])
    t = registry.get("cuda.linear")
    assert not t.applicable(g.nodes[0], CUDA) and not t.applicable(g.nodes[1], CUDA)


def test_conv_with_bias_residual_and_relu() -> None:
    g = Graph()
    x = g.add_input("x", TensorType(F32, (2, 4, 7, 7)))
    res = g.add_input("res", TensorType(F32, (2, 6, 4, 4)))
    c = g.add("Conv", [x, _w(g, "w", 6, 4, 3, 3), _w(g, "b", 6, seed=3)],
              {"pads": (1, 1, 1, 1), "strides": (2, 2)}, name="conv")[0]
    y = g.add("Relu", [g.add("Add", [c, res], name="add")[0]], name="relu")[0]
    g.outputs.append(y)
    node = _fused(g)
    feeds = {"x": torch.randn(2, 4, 7, 7), "res": torch.randn(2, 6, 4, 4)}
    both = [{"fuse": "pointwise", "format": "given"}, {"fuse": "pointwise", "format": "nchw"}]
    _check(node, feeds, "cuda.conv", both)
    cl = {k: v.contiguous(memory_format=torch.channels_last) for k, v in feeds.items()}
    _check(node, cl, "cuda.conv", both)  # channels-last activations, weight converted once
    for cfg in both:  # either way, a channels-last input gives a channels-last output
        y = registry.get("cuda.conv").build(node, cfg, CUDA)(_inputs(node, cl))[0]
        assert y.is_contiguous(memory_format=torch.channels_last)


def test_conv_asymmetric_padding_is_left_to_the_reference() -> None:
    g = Graph()
    x = g.add_input("x", TensorType(F32, (1, 4, 7, 7)))
    g.outputs.append(g.add("Conv", [x, _w(g, "w", 6, 4, 3, 3)], {"pads": (0, 0, 1, 1)}, name="conv")[0])
    assert not registry.get("cuda.conv").applicable(g.nodes[0], CUDA)


def test_cudnn_fusion_config_refuses_other_epilogues() -> None:
    g = Graph()
    x = g.add_input("x", TensorType(F32, (1, 4, 7, 7)))
    c = g.add("Conv", [x, _w(g, "w", 6, 4, 3, 3)], {"pads": (1, 1, 1, 1)}, name="conv")[0]
    g.outputs.append(g.add("Sigmoid", [c], name="sig")[0])
    node = _fused(g)
    with pytest.raises(ValueError, match="cuDNN's fused conv"):
        registry.get("cuda.conv").build(node, {"fuse": "cudnn"}, CUDA)


def _attention(packed: bool, kv_heads: int, mask: bool, causal: bool) -> tuple[Node, dict[str, torch.Tensor]]:
    g = Graph()
    b, s, h, d = 2, 5, 4, 8
    if packed:
        q = g.add_input("q", TensorType(F32, (b, s, h * d)))
        k = g.add_input("k", TensorType(F32, (b, s, kv_heads * d)))
        v = g.add_input("v", TensorType(F32, (b, s, kv_heads * d)))
        feeds = {"q": torch.randn(b, s, h * d), "k": torch.randn(b, s, kv_heads * d),
                 "v": torch.randn(b, s, kv_heads * d)}
        attrs: dict[str, Any] = {"q_num_heads": h, "kv_num_heads": kv_heads}
    else:
        q = g.add_input("q", TensorType(F32, (b, h, s, d)))
        k = g.add_input("k", TensorType(F32, (b, kv_heads, s, d)))
        v = g.add_input("v", TensorType(F32, (b, kv_heads, s, d)))
        feeds = {"q": torch.randn(b, h, s, d), "k": torch.randn(b, kv_heads, s, d),
                 "v": torch.randn(b, kv_heads, s, d)}
        attrs = {}
    ins: list[Value | None] = [q, k, v]
    if mask:
        ins.append(g.add_input("m", TensorType(F32, (b, 1, 1, s))))
        feeds["m"] = torch.where(torch.rand(b, 1, 1, s) < 0.3, -65504.0, 0.0)
    attrs.update({"is_causal": int(causal), "scale": 0.3})
    y = g.add("Attention", ins, attrs, name="attn", outputs=1)[0]
    g.outputs.append(y)
    return g.nodes[0], feeds


@pytest.mark.parametrize("packed,kv_heads,mask,causal", [
    (True, 4, True, False), (False, 4, False, True), (False, 2, False, False), (True, 1, True, False),
])
def test_sdpa_matches_the_reference(packed: bool, kv_heads: int, mask: bool, causal: bool) -> None:
    node, feeds = _attention(packed, kv_heads, mask, causal)
    _check(node, feeds, "cuda.sdpa", [{"backend": "math"}])


@pytest.mark.parametrize("packed", [False, True])
def test_sdpa_takes_boolean_masks_with_rows_that_see_nothing(packed: bool) -> None:
    """GroupQueryAttention's mask (onnxruntime's LLM exports): boolean [B, 1, S, T]; a row with no key to see
    gives zeros, as the reference says (on the CPU torch's math backend does too; the GPU backends are not
    promised to, hence the kernel's own zeroing)."""
    g = Graph()
    b, h, kvh, s, t, d = 2, 4, 2, 3, 5, 8
    shapes = ((b, s, h * d), (b, t, kvh * d)) if packed else ((b, h, s, d), (b, kvh, t, d))
    q, k, v = (g.add_input(n, TensorType(F32, shape)) for n, shape in zip("qkv", (shapes[0], shapes[1], shapes[1])))
    m = g.add_input("m", TensorType(DType.BOOL, (b, 1, s, t)))
    attrs = {"q_num_heads": h, "kv_num_heads": kvh} if packed else {}
    g.outputs.append(g.add("Attention", [q, k, v, m], attrs, name="attn", outputs=1)[0])
    gen = torch.Generator().manual_seed(3)
    mask = torch.rand((b, 1, s, t), generator=gen) < 0.6
    mask[1, 0, 2] = False  # sequence 1's last query sees nothing
    feeds = {"q": torch.randn(shapes[0], generator=gen), "k": torch.randn(shapes[1], generator=gen),
             "v": torch.randn(shapes[1], generator=gen), "m": mask}
    _check(g.nodes[0], feeds, "cuda.sdpa", [{"backend": "math"}])
    got = registry.get("cuda.sdpa").build(g.nodes[0], {"backend": "math"}, CUDA)(list(feeds.values()))[0]
    row = got[1, 2] if packed else got[1, :, 2]
    assert not row.any() and got.isfinite().all()


@pytest.mark.parametrize("mask", [False, True])
def test_sdpa_tries_a_backend_that_takes_the_mask_first(mask: bool) -> None:
    """Below the default optimization level the tuner times a tactic's first config only: flash (no masks) first
    for an unmasked attention, last for a masked one - in both orders every backend is in the space."""
    from kiln.tune.tuner import _configs

    node, _ = _attention(False, 4, mask, False)
    tactic = registry.get("cuda.sdpa")
    order = [c["backend"] for c in tactic.node_configs(node)]
    assert sorted(order) == sorted(c["backend"] for c in tactic.configs())
    assert (order[0] == "flash") is not mask and (order[-1] == "flash") is mask
    assert _configs(tactic, node, 1) == [{"backend": order[0]}] and len(_configs(tactic, node, 3)) == len(order)


def test_sdpa_leaves_caches_to_the_reference() -> None:
    g = Graph()
    q = g.add_input("q", TensorType(F32, (1, 2, 3, 4)))
    past = g.add_input("past", TensorType(F32, (1, 2, 2, 4)))
    g.outputs.append(g.add("Attention", [q, q, q, None, past, past], name="attn", outputs=1)[0])
    assert not registry.get("cuda.sdpa").applicable(g.nodes[0], CUDA)


def test_epilogue_tails_as_generated_kernels_under_the_triton_interpreter() -> None:
    """The same checks with the tails as generated pointwise kernels (in place on the GEMM/conv output)."""
    code = (
        "import kiln.kernels.epilogue as e\n"
        "from tests.kernels.gpu_tactics import test_torch_tactics as t\n"
        "for act in ('Relu', 'Gelu', 'Sigmoid'):\n"
        "    g, feeds = t._linear_graph(act)\n"
        "    node = t._fused(g)\n"
        "    a = e.Anchored.of(node, frozenset({'MatMul'}))\n"
        "    assert e._generated(a, 1) is not None, act\n"
        "    t._check(node, feeds, 'cuda.linear', t.registry.get('cuda.linear').configs())\n"
        "t.test_conv_with_bias_residual_and_relu()\n"
        "print('ok')\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout + done.stderr


def _one(op: str, inputs: list[Any], attrs: dict[str, Any] | None = None) -> tuple[Node, dict[str, torch.Tensor]]:
    """A one-node graph: tensors become graph inputs, ("const", t) initializers."""
    g = Graph()
    vals: list[Value | None] = []
    feeds: dict[str, torch.Tensor] = {}
    for k, x in enumerate(inputs):
        if isinstance(x, tuple):
            vals.append(g.add_initializer(f"c{k}", x[1]))
        else:
            from kiln.ir.dtype import DType as D

            vals.append(g.add_input(f"x{k}", TensorType(D.from_torch(x.dtype), tuple(x.shape))))
            feeds[f"x{k}"] = x
    g.outputs.extend(g.add(op, vals, attrs or {}, name=op.lower(), outputs=1))
    return g.nodes[0], feeds


@pytest.mark.parametrize("op,inputs", [
    ("Reshape", [torch.randn(2, 3, 4), ("c", torch.tensor([0, -1]))]),
    ("Unsqueeze", [torch.randn(2, 3), ("c", torch.tensor([0, 3]))]),
    ("Slice", [torch.randn(5, 6), ("c", torch.tensor([1])), ("c", torch.tensor([-1])), ("c", torch.tensor([1]))]),
    ("Expand", [torch.randn(3, 1), ("c", torch.tensor([2, 3, 4]))]),
    ("ReduceMean", [torch.randn(2, 3, 4), ("c", torch.tensor([1]))]),
])
def test_host_shapes_reads_its_constant_inputs_once_on_the_host(op: str, inputs: list[Any]) -> None:
    node, feeds = _one(op, inputs)
    t = registry.get("cuda.host_shapes")
    assert t.applicable(node, CUDA)
    kernel = t.build(node, {}, CUDA)
    for v in node.inputs[1:]:  # the kernel kept host copies: the graph's constants are not read again
        assert v is not None and v.data is not None
        v.data = None
    args = [feeds.get(f"x{k}") if v is None or v.name.startswith("x") else None for k, v in enumerate(node.inputs)]
    got = kernel(args)[0]
    want = OPS[op].ref(RefCtx(node), [feeds["x0"], *(torch.as_tensor(x[1]) for x in inputs[1:])])[0]
    torch.testing.assert_close(got, want)


def test_host_shapes_needs_constant_shape_inputs() -> None:
    node, _ = _one("Reshape", [torch.randn(2, 6), torch.tensor([3, 4])])
    assert not registry.get("cuda.host_shapes").applicable(node, CUDA)


def test_gather_wraps_negative_indices_and_flags_out_of_range_ones() -> None:
    """An index out of range is recorded on the device (a DeferredCheck) and clamped, not a device-side assertion
    that would break the CUDA context; the flag reads once, then clears."""
    table = torch.randn(10, 4)
    node, feeds = _one("Gather", [table, torch.tensor([[1, -1], [0, 9]])])
    _check(node, feeds, "cuda.gather", [{}])
    kernel = registry.get("cuda.gather").build(node, {}, CUDA)
    (check,) = kernel.checks  # type: ignore[attr-defined]
    kernel([table, torch.tensor([[1, -1]])])
    assert check.raised() is None
    got = kernel([table, torch.tensor([[1, 10], [-11, 2]])])[0]
    assert torch.equal(got, table[torch.tensor([[1, 9], [0, 2]])])  # clamped lookups: valid memory only
    message = check.raised()
    assert message is not None and "node 'gather' (Gather): an index is out of range" in message
    assert check.raised() is None
    node, feeds = _one("Gather", [torch.randn(3, 5), ("c", torch.tensor([4, -5]))], {"axis": 1})
    _check(node, feeds, "cuda.gather", [{}])


@pytest.mark.parametrize("index,axis", [
    (torch.tensor(0), 1),  # a class token: x[:, 0]
    (torch.tensor(-1), 1),  # the last position
    (torch.tensor([2, 3, 4]), 1),
    (torch.tensor([[1, 2], [3, 4]]), 2),
    (torch.tensor([-3, -2]), 2),
])
def test_consecutive_constant_indices_select_a_view(index: torch.Tensor, axis: int) -> None:
    """Constant indices that are consecutive after wrapping (one index included) make the result a view of the
    data: no kernel, and nothing copied."""
    x = torch.randn(2, 6, 5)
    node, feeds = _one("Gather", [x, ("c", index)], {"axis": axis})
    _check(node, feeds, "cuda.gather", [{}])
    got = registry.get("cuda.gather").build(node, {}, CUDA)([x, node.inputs[1].data])[0]  # type: ignore[union-attr]
    assert got.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()


def test_other_constant_indices_are_copied_and_checked() -> None:
    x = torch.randn(2, 6, 5)
    for index in (torch.tensor([3, 1]), torch.tensor([4, -1]), torch.tensor([0, 0])):
        node, feeds = _one("Gather", [x, ("c", index)], {"axis": 2})
        _check(node, feeds, "cuda.gather", [{}])
        got = registry.get("cuda.gather").build(node, {}, CUDA)([x, node.inputs[1].data])[0]  # type: ignore[union-attr]
        assert got.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
    node, _ = _one("Gather", [x, ("c", torch.tensor([4, 5]))], {"axis": 2})  # consecutive, past the axis' end
    with pytest.raises(IndexError, match="an index is out of range for a dim of size 5"):
        registry.get("cuda.gather").build(node, {}, CUDA)([x, node.inputs[1].data])  # type: ignore[union-attr]


def test_a_run_raises_what_its_kernels_flagged_naming_the_node() -> None:
    """The runtime reads the kernels' deferred checks when a run's results reach the host: a token id past the
    vocabulary gives an InputError naming the Gather, and the context keeps working for valid ids."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    import kiln
    from kiln.runtime.plan import Choice
    from kiln.utils.errors import InputError

    emb = numpy_helper.from_array(np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32), "emb")
    g = helper.make_graph([helper.make_node("Gather", ["emb", "ids"], ["y"], name="lookup")], "g",
                          [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 4])], [emb])
    engine = kiln.build(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]),
                        kiln.BuilderConfig(opt_level=0))
    at = next(i for i, n in enumerate(engine.plan.graph.nodes) if n.op == "Gather")
    engine.plan.choices[0][at] = Choice("cuda.gather", {})  # the GPU tactic, on CPU tensors
    ctx = engine.create_context()
    good = np.array([[1, 2, 3], [4, 5, -1]])
    np.testing.assert_array_equal(ctx.run({"ids": good})["y"], numpy_helper.to_array(emb)[good])
    with pytest.raises(InputError, match="node 'lookup' \\(Gather\\): an index is out of range"):
        ctx.run({"ids": np.array([[1, 2, 3], [4, 10, 0]])})
    np.testing.assert_array_equal(ctx.run({"ids": good})["y"], numpy_helper.to_array(emb)[good])


@pytest.mark.parametrize("op,attrs", [
    ("MaxPool", {"kernel_shape": (3, 3), "strides": (2, 2), "pads": (1, 1, 1, 1)}),
    ("AveragePool", {"kernel_shape": (2, 2), "strides": (2, 2)}),
    ("MaxPool", {"kernel_shape": (2, 2), "pads": (0, 0, 1, 1)}),  # asymmetric: padded first
    ("GlobalAveragePool", {}),
])
def test_pool_keeps_the_memory_format(op: str, attrs: dict[str, Any]) -> None:
    x = torch.randn(2, 8, 9, 9).contiguous(memory_format=torch.channels_last)
    node, feeds = _one(op, [x], attrs)
    _check(node, feeds, "cuda.pool", [{}])
    y = registry.get("cuda.pool").build(node, {}, CUDA)([x])[0]
    assert y.is_contiguous(memory_format=torch.channels_last)


def test_opt_levels_choose_which_gpu_tactics_are_timed() -> None:
    """Default builds (level 3) time triton.gemm beside cuBLAS (its fused epilogues won on the H100) with cuBLAS
    ranked first; triton.conv stays opt-in (level 4, build time); level 0 takes the first candidate untimed."""
    from kiln.tune.tuner import TuneSettings, candidates

    g, _ = _linear_graph("Relu")
    node = _fused(g)
    names = {t.name for t in registry.candidates(node, CUDA)}
    assert {"cuda.linear", "triton.gemm", "reference"} <= names
    default = [t.name for t in candidates(node, TuneSettings(CUDA, opt_level=3))]
    assert "triton.gemm" in default and default[0] == "cuda.linear"
    assert registry.get("triton.conv").min_opt_level == 4
    assert registry.get("triton.flash_attention").min_opt_level == 3
