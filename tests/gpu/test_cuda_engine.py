"""The GPU tier (`make gpu-test`): engines built for and run on a CUDA device."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import kiln

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _cnn() -> onnx.ModelProto:
    rng = np.random.default_rng(0)

    def init(name: str, *shape: int) -> onnx.TensorProto:
        return onnx.numpy_helper.from_array((rng.standard_normal(shape) * 0.1).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2], name="pool1"),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], transB=1, name="fc"),
    ]
    g = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 32, 32])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10])],
                          [init("w1", 16, 3, 3, 3), init("b1", 16), init("w2", 32, 16, 3, 3), init("b2", 32),
                           init("w3", 10, 32), init("b3", 10)])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_cuda_engine_matches_the_cpu_reference(tmp_path) -> None:
    cfg = kiln.BuilderConfig(device="cuda", profiles=[{"x": ((1, 3, 32, 32), (4, 3, 32, 32), (8, 3, 32, 32))}],
                             tf32=False, timing_cache=str(tmp_path / "t.cache"))
    engine = kiln.build(_cnn(), cfg)
    assert engine.device_info.kind == "cuda" and engine.device_info.arch.startswith("sm_")
    engine.save(tmp_path / "m.kiln")
    ctx = kiln.load(tmp_path / "m.kiln", device="cuda").create_context()
    x = np.random.default_rng(1).standard_normal((5, 3, 32, 32)).astype(np.float32)
    ours = ctx.run({"x": x})["y"]
    ref = kiln.run_reference(_cnn(), {"x": x})["y"]
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)
    # torch CUDA tensors in -> CUDA tensors out, no host round trip for the caller
    out = ctx.run({"x": torch.from_numpy(x).cuda()})["y"]
    assert out.is_cuda
    np.testing.assert_allclose(out.cpu().numpy(), ref, rtol=1e-4, atol=1e-5)


def test_cpu_engine_refuses_to_load_on_the_gpu(tmp_path) -> None:
    kiln.build(_cnn(), kiln.BuilderConfig(profiles=[{"x": (1, 3, 32, 32)}])).save(tmp_path / "cpu.kiln")
    with pytest.raises(kiln.EngineFileError, match="retune=True"):
        kiln.load(tmp_path / "cpu.kiln", device="cuda")
    engine = kiln.load(tmp_path / "cpu.kiln", device="cuda", retune=True)
    assert engine.device_info.kind == "cuda"


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_engines_compute_in_half_with_gpu_tactics(tmp_path, precision: str) -> None:
    cfg = kiln.BuilderConfig(device="cuda", precision=precision, profiles=[{"x": (4, 3, 32, 32)}])
    engine = kiln.build(_cnn(), cfg)
    half = {"fp16": "float16", "bf16": "bfloat16"}[precision]
    assert any(n.outputs[0].type.dtype.value == half for n in engine.graph.nodes)
    tactics = {c.tactic for c in engine.plan.choices[0]}
    assert tactics & {"cuda.conv", "triton.conv"} and tactics & {"cuda.linear", "triton.gemm"}, tactics
    assert engine.graph.layouts, "the convolutions should run channels-last"
    engine.save(tmp_path / "h.kiln")
    x = np.random.default_rng(4).standard_normal((4, 3, 32, 32)).astype(np.float32)
    ref = kiln.run_reference(_cnn(), {"x": x})["y"]
    for ctx in (kiln.load(tmp_path / "h.kiln", device="cuda").create_context(),
                engine.create_context(cuda_graphs=False)):
        out = ctx.run({"x": x})["y"]
        assert out.dtype == np.float32  # the interface keeps the model's types
        np.testing.assert_allclose(out, ref, rtol=0.05, atol=0.05 * np.abs(ref).max())


def test_cuda_graph_replay_matches_step_by_step_and_follows_new_inputs() -> None:
    cfg = kiln.BuilderConfig(device="cuda", profiles=[{"x": ((1, 3, 32, 32), (4, 3, 32, 32), (8, 3, 32, 32))}],
                             tf32=False)
    engine = kiln.build(_cnn(), cfg)
    graphed, eager = engine.create_context(), engine.create_context(cuda_graphs=False)
    rng = np.random.default_rng(5)
    # a shape's first run is step by step, its second captures a graph, later ones replay it with the new data
    for n, graphs in ((4, 0), (4, 1), (2, 1), (4, 1), (2, 2), (2, 2), (1, 2)):
        x = torch.from_numpy(rng.standard_normal((n, 3, 32, 32)).astype(np.float32)).cuda()
        a, b = graphed.run({"x": x})["y"], eager.run({"x": x})["y"]
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert graphed.graphs is not None and len(graphed.graphs.graphs) == graphs, (n, graphs)
    assert not graphed.graphs.eager_keys
    first = engine.create_context(capture_after=1)
    first.run({"x": x})
    assert first.graphs is not None and len(first.graphs.graphs) == 1


def test_an_engine_that_cannot_be_captured_says_so_and_runs_eagerly() -> None:
    """GatherND by data-dependent indices checks them on the host (a sync CUDA graphs refuse): the context warns
    once, naming the node, and runs step by step with the right values."""
    import logging

    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("GatherND", ["r", "i"], ["y"], name="pick")]
    g = helper.make_graph(nodes, "gnd", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 3]),
                                         helper.make_tensor_value_info("i", TensorProto.INT64, [2, 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    ctx = kiln.build(model, kiln.BuilderConfig(device="cuda")).create_context()
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("kiln").addHandler(handler)
    try:
        x = np.random.default_rng(3).standard_normal((4, 3)).astype(np.float32)
        for i in ([[3, 1], [0, 2]], [[1, 1], [2, 0]]):
            y = ctx.run({"x": x, "i": np.array(i, dtype=np.int64)})["y"]
            np.testing.assert_array_equal(y, np.maximum(x, 0)[tuple(np.array(i).T)])
    finally:
        logging.getLogger("kiln").removeHandler(handler)
    assert ctx.graphs is not None and ctx.graphs.eager_keys
    assert len(seen) == 1 and "no CUDA graph" in seen[0] and "pick" in seen[0], seen


def test_convnext_block_runs_channels_last_with_view_transposes() -> None:
    """A ConvNeXt block (depthwise 7x7 -> NHWC -> LayerNorm -> Linear -> GELU -> Linear -> NCHW -> + residual):
    one channels-last region, the transposes `cuda.transpose` views; values as the CPU reference."""
    rng = np.random.default_rng(5)

    def init(name: str, *shape: int, scale: float = 0.2) -> onnx.TensorProto:
        return onnx.numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "dw", "dwb"], ["d"], pads=[3, 3, 3, 3], group=16, name="dwconv"),
        helper.make_node("Transpose", ["d"], ["t"], perm=[0, 2, 3, 1], name="to_nhwc"),
        helper.make_node("LayerNormalization", ["t", "g", "b"], ["n"], axis=-1, name="norm"),
        helper.make_node("MatMul", ["n", "w1"], ["h"], name="fc1"),
        helper.make_node("Gelu", ["h"], ["a"], name="gelu"),
        helper.make_node("MatMul", ["a", "w2"], ["o"], name="fc2"),
        helper.make_node("Transpose", ["o"], ["u"], perm=[0, 3, 1, 2], name="to_nchw"),
        helper.make_node("Add", ["u", "x"], ["r"], name="residual"),
        helper.make_node("Conv", ["r", "pw"], ["y"], name="next"),
    ]
    g = helper.make_graph(nodes, "cnx", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 16, 14, 14])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 8, 14, 14])],
                          [init("dw", 16, 1, 7, 7), init("dwb", 16), init("g", 16, scale=1.0), init("b", 16),
                           init("w1", 16, 64), init("w2", 64, 16), init("pw", 8, 16, 1, 1)])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)])
    engine = kiln.build(model, kiln.BuilderConfig(device="cuda", tf32=False, opt_level=1))  # the plan, not speed
    plan = engine.plan
    tactics = {n.name: c.tactic for n, c in zip(plan.graph.nodes, plan.choices[0])}
    assert [t for name, t in tactics.items() if "to_n" in name] == ["cuda.transpose"] * 2, tactics
    convs = [n for n in plan.graph.nodes
             if n.op == "Conv" or (n.op == "Fused" and n.attrs["body"].nodes[0].op == "Conv")]
    assert len(convs) == 2 and all(n.outputs[0].name in plan.graph.layouts for n in convs)  # one channels-last region
    x = rng.standard_normal((8, 16, 14, 14)).astype(np.float32)
    ref = kiln.run_reference(model, {"x": x})["y"]
    out = engine.create_context().run({"x": x})["y"]
    np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())


def test_no_tf32_engine_runs_without_tf32(tmp_path) -> None:
    cfg = kiln.BuilderConfig(device="cuda", profiles=[{"x": (4, 3, 32, 32)}], tf32=False)
    ctx = kiln.build(_cnn(), cfg).create_context()
    torch.backends.cudnn.allow_tf32 = True  # the process default must not leak into a tf32=False engine
    x = np.random.default_rng(2).standard_normal((4, 3, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(ctx.run({"x": x})["y"], kiln.run_reference(_cnn(), {"x": x})["y"],
                               rtol=1e-5, atol=1e-6)


def test_tuning_runs_on_the_gpu_and_computed_weights_move_there(tmp_path) -> None:
    # Weights made by ConstantOfShape / Constant nodes (as in the ONNX suite's "light" models) are created on the
    # CPU by their reference; the engine and the tuner's sample run must still work on the GPU.
    g = helper.make_graph(
        [helper.make_node("Constant", [], ["shape"], value=onnx.numpy_helper.from_array(np.array([8, 3, 3, 3]))),
         helper.make_node("ConstantOfShape", ["shape"], ["w"],
                          value=onnx.numpy_helper.from_array(np.array([0.02], np.float32))),
         helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
        "computed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8, 16, 16])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    engine = kiln.build(m, kiln.BuilderConfig(device="cuda", tf32=False))
    assert not engine.plan.stats["tuning"]["warnings"], engine.plan.stats["tuning"]["warnings"]
    x = np.random.default_rng(3).standard_normal((2, 3, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(engine.create_context().run({"x": x})["y"], kiln.run_reference(m, {"x": x})["y"],
                               rtol=1e-5, atol=1e-6)
    cnn = kiln.build(_cnn(), kiln.BuilderConfig(device="cuda", profiles=[{"x": (2, 3, 32, 32)}]))
    assert not cnn.plan.stats["tuning"]["warnings"], cnn.plan.stats["tuning"]["warnings"]


def test_host_inputs_go_through_a_reused_pinned_buffer() -> None:
    engine = kiln.build(_cnn(), kiln.BuilderConfig(device="cuda", profiles=[{"x": (2, 3, 32, 32)}], tf32=False))
    ctx = engine.create_context()
    rng = np.random.default_rng(6)
    first = None
    for _ in range(2):  # the second run refills the same buffer: no stale data
        x = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
        np.testing.assert_allclose(ctx.run({"x": x})["y"], kiln.run_reference(_cnn(), {"x": x})["y"],
                                   rtol=1e-5, atol=1e-6)
        buf = ctx._pinned["x"]
        assert buf.is_pinned() and (first is None or buf is first)
        first = buf


def test_runs_queued_on_a_given_stream() -> None:
    engine = kiln.build(_cnn(), kiln.BuilderConfig(device="cuda", profiles=[{"x": (2, 3, 32, 32)}], tf32=False))
    ctx = engine.create_context()
    x = torch.from_numpy(np.random.default_rng(7).standard_normal((2, 3, 32, 32)).astype(np.float32)).cuda()
    want = ctx.run({"x": x})["y"]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    for _ in range(3):  # first call captures, the others replay: all on the side stream
        got = ctx.run({"x": x}, stream=side)["y"]
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(got, want)


def _overflowing_model() -> onnx.ModelProto:
    """A layer whose values reach ~1e5 (beyond FP16's 65504), normalized right after."""
    rng = np.random.default_rng(8)

    def init(name: str, a: np.ndarray) -> onnx.TensorProto:
        return onnx.numpy_helper.from_array(a.astype(np.float32), name)

    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("MatMul", ["h", "w2"], ["big"], name="boost"),
             helper.make_node("LayerNormalization", ["big", "s"], ["n"], name="norm"),
             helper.make_node("MatMul", ["n", "w3"], ["y"], name="fc3")]
    g = helper.make_graph(nodes, "overflow", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 4])],
                          [init("w1", rng.standard_normal((16, 32)) * 0.3),
                           init("w2", rng.standard_normal((32, 32)) * 4000), init("s", np.ones(32)),
                           init("w3", rng.standard_normal((32, 4)) * 0.3)])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_fp16_keeps_the_overflowing_layers_in_fp32_says_so_and_matches() -> None:
    m = _overflowing_model()
    engine = kiln.build(m, kiln.BuilderConfig(device="cuda", precision="fp16", tf32=False))
    kept = engine.plan.stats["precision"]["kept_fp32"]
    assert set(kept) == {"boost", "norm"}, kept
    x = np.random.default_rng(9).standard_normal((8, 16)).astype(np.float32)
    out = engine.create_context().run({"x": x})["y"]
    ref = kiln.run_reference(m, {"x": x})["y"]
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, ref, rtol=0.02, atol=0.02 * np.abs(ref).max())


def test_profile_times_each_step_alone_and_the_sum_matches_the_whole_run(tmp_path) -> None:
    import argparse

    from kiln.cli.inspect import profile

    cfg = kiln.BuilderConfig(device="cuda", precision="fp16", profiles=[{"x": (64, 3, 32, 32)}])
    engine = kiln.build(_cnn(), cfg)
    args = argparse.Namespace(runs=5, input=[], seed=0, int_range=None)
    p = profile(engine, args)
    steps = p["steps_ms_median"]
    assert len(steps) == len(engine.plan.graph.nodes) and all(t > 0 for t in steps)
    assert p["uncaptured"] == []  # every GPU tactic here runs inside a CUDA graph
    # each step alone (L2 flushed) vs the whole graph replay: the same work, so the same order of magnitude
    assert 0.3 < p["total_ms_median"] / p["whole_ms_median"] < 3, p


@pytest.mark.parametrize("tactic", ["triton.gather", "cuda.gather"])
def test_a_token_id_past_the_vocabulary_is_an_input_error_and_the_context_survives(tactic: str) -> None:
    """On a GPU an out-of-range Gather index is flagged on the device and raised when the results reach the host
    (InputError naming the node), through the CUDA graph too; the CUDA context stays usable (a device-side
    assertion would break it for good). Both GPU gather tactics (triton.gather ranks first, so an untimed build
    takes it; cuda.gather is set in the plan)."""
    from onnx import numpy_helper

    from kiln.runtime.plan import Choice
    from kiln.utils.errors import InputError

    emb = numpy_helper.from_array(np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32), "emb")
    g = helper.make_graph([helper.make_node("Gather", ["emb", "ids"], ["y"], name="lookup")], "g",
                          [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 4])], [emb])
    engine = kiln.build(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]),
                        kiln.BuilderConfig(device="cuda", opt_level=0))
    (at,) = [i for i, n in enumerate(engine.plan.graph.nodes) if n.op == "Gather"]
    assert engine.plan.choices[0][at].tactic == "triton.gather"
    engine.plan.choices[0][at] = Choice(tactic)
    ctx = engine.create_context()
    good, table = np.array([[1, 2, 3], [4, 5, -1]]), numpy_helper.to_array(emb)
    for _ in range(3):  # eager first run, then the captured graph
        np.testing.assert_allclose(ctx.run({"ids": good})["y"], table[good])
    with pytest.raises(InputError, match="node 'lookup' \\(Gather\\): an index is out of range"):
        ctx.run({"ids": np.array([[1, 2, 3], [4, 10, 0]])})
    np.testing.assert_allclose(ctx.run({"ids": good})["y"], table[good])
    ids = torch.tensor([[1, 2, 3], [4, 5, 99]], device="cuda")
    ctx.run({"ids": ids})  # device tensors in and out: nothing waits for the device here
    with pytest.raises(InputError, match="lookup"):
        ctx.check()


def _vit_stem() -> onnx.ModelProto:
    """A ViT's patch embedding: Conv 4x4 / stride 4 (3 -> 32 channels) on [n, 3, 16, 16], flattened to [n, 32, 16]
    and transposed to one row per patch, then a class token prepended and a position embedding added."""
    rng = np.random.default_rng(3)

    def init(name: str, *shape: int) -> onnx.TensorProto:
        return onnx.numpy_helper.from_array((rng.standard_normal(shape) * 0.2).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[4, 4], strides=[4, 4], name="patches"),
        helper.make_node("Reshape", ["c", "flat"], ["f"], name="flatten"),
        helper.make_node("Transpose", ["f"], ["t"], perm=[0, 2, 1], name="rows"),
        helper.make_node("Shape", ["x"], ["xs"], name="shape"),
        helper.make_node("Slice", ["xs", "zero", "one"], ["n"], name="batch"),
        helper.make_node("Concat", ["n", "cls_dims"], ["cls_shape"], axis=0, name="cls_shape"),
        helper.make_node("Expand", ["cls", "cls_shape"], ["cls_n"], name="cls_n"),
        helper.make_node("Concat", ["cls_n", "t"], ["tokens"], axis=1, name="tokens"),
        helper.make_node("Add", ["tokens", "pos"], ["y"], name="pos"),
    ]
    ints = onnx.numpy_helper.from_array
    g = helper.make_graph(nodes, "stem", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 16, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 17, 32])],
                          [init("w", 32, 3, 4, 4), init("b", 32), init("cls", 1, 1, 32), init("pos", 1, 17, 32),
                           ints(np.array([0, 32, 16], dtype=np.int64), "flat"),
                           ints(np.array([0], dtype=np.int64), "zero"), ints(np.array([1], dtype=np.int64), "one"),
                           ints(np.array([1, 32], dtype=np.int64), "cls_dims")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_a_patch_embedding_runs_as_patch_rows_and_a_gemm(precision: str) -> None:
    """The patch conv + flatten + transpose of a ViT stem become patch rows and one GEMM on the GPU (no Conv left
    in the plan); results match the reference, for every batch of the profile."""
    cfg = kiln.BuilderConfig(device="cuda", precision=precision, tf32=False,
                             profiles=[{"x": ((1, 3, 16, 16), (2, 3, 16, 16), (4, 3, 16, 16))}])
    engine = kiln.build(_vit_stem(), cfg)
    assert engine.plan.stats["passes"] and not [n for n in engine.graph.nodes if n.op == "Conv"]
    ctx = engine.create_context()
    for n in (2, 1, 4, 2):
        x = np.random.default_rng(n).standard_normal((n, 3, 16, 16)).astype(np.float32)
        ref = kiln.run_reference(_vit_stem(), {"x": x})["y"]
        tol = 1e-4 if precision == "fp32" else 2e-2
        np.testing.assert_allclose(ctx.run({"x": x})["y"], ref, rtol=tol, atol=tol * np.abs(ref).max())


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("form", ["prompt", "decode-uneven", "decode-rotary-packed"])
def test_group_query_attention_runs_in_a_cuda_graph(precision: str, form: str) -> None:
    """onnxruntime's GroupQueryAttention (the attention of onnxruntime-genai's LLM exports) on the GPU: the cache
    writes are device-side scatters, so the whole step is captured; two steps of new data replay the graph, each
    equal to the CPU reference (output and both presents)."""
    from tests.frontend.test_contrib_ops import _gqa

    case = {"prompt": dict(past=0, seqlens=[5, 3], s=6),
            "decode-uneven": dict(past=7, seqlens=[7, 2], s=1),
            "decode-rotary-packed": dict(past=6, seqlens=[6, 4], s=1, rotary=True, packed=True)}[form]
    engine = None
    tol = 1e-5 if precision == "fp32" else 1e-2
    for seed in (0, 1):
        model, feeds = _gqa(8, 2, 64, seed=seed, **case)
        if engine is None:
            engine = kiln.build(model, kiln.BuilderConfig(device="cuda", precision=precision, tf32=False))
            ctx = engine.create_context()
        ref = kiln.run_reference(model, feeds)
        out = ctx.run(feeds)
        for name in ("out", "present_key", "present_value"):
            want = np.asarray(ref[name])
            np.testing.assert_allclose(out[name], want, rtol=0, atol=tol * max(1.0, float(np.abs(want).max())),
                                       err_msg=f"{form} {name} seed {seed}")
    assert ctx.graphs is not None and ctx.graphs.graphs and not ctx.graphs.eager_keys


def test_sdpa_backends_give_zeros_for_a_boolean_mask_row_that_sees_nothing() -> None:
    """cuda.sdpa on each torch backend that takes the mask: the reference's zeros for a query with no key."""
    from kiln.ir import DType, Graph, TensorType
    from kiln.ir.ops import OPS
    from kiln.ir.ops.base import RefCtx
    from kiln.kernels import registry

    g = Graph()
    q = g.add_input("q", TensorType(DType.FLOAT16, (2, 8, 4, 64)))
    k = g.add_input("k", TensorType(DType.FLOAT16, (2, 2, 9, 64)))
    m = g.add_input("m", TensorType(DType.BOOL, (2, 1, 4, 9)))
    g.outputs.append(g.add("Attention", [q, k, k, m], name="attn", outputs=1)[0])
    node = g.nodes[0]
    gen = torch.Generator(device="cuda").manual_seed(0)
    mask = torch.rand((2, 1, 4, 9), generator=gen, device="cuda") < 0.5
    mask[1, 0, 3] = False
    args = [torch.randn((2, 8, 4, 64), generator=gen, device="cuda", dtype=torch.float16),
            torch.randn((2, 2, 9, 64), generator=gen, device="cuda", dtype=torch.float16)]
    args = [args[0], args[1], args[1], mask]
    want = OPS["Attention"].ref(RefCtx(node), args)[0]
    tactic = registry.get("cuda.sdpa")
    ran = []
    for cfg in tactic.configs():
        try:
            got = tactic.build(node, cfg, torch.device("cuda"))(list(args))[0]
        except RuntimeError:  # a backend that does not take this mask (flash): the tuner drops it the same way
            continue
        ran.append(cfg["backend"])
        torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3, msg=lambda s, c=cfg: f"{c}: {s}")
    assert "math" in ran and len(ran) >= 2, ran
