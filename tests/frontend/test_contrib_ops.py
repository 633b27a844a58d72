"""onnxruntime's contrib ops (com.microsoft) imported as kiln ops: every case is a one-node model run by onnxruntime
(the reference: these ops are its own) and by kiln's reference interpreter on the same random inputs."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import kiln
from kiln.runtime.engine import Engine
from kiln.utils.errors import UnsupportedError

B, S, H, HEADS = 2, 5, 8, 2
MS = "com.microsoft"
F32, I32, I64 = TensorProto.FLOAT, TensorProto.INT32, TensorProto.INT64


def _rand(*shape: int, seed: int = 0, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def _model(op: str, inputs: dict[str, np.ndarray | None], outputs: list[str], domain: str = MS,
           inits: dict[str, np.ndarray] | None = None, **attrs) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A one-node model: `inputs` in order (None: omitted, "" in the node), those in `inits` as initializers."""
    inits = inits or {}
    names = [("" if a is None else k) for k, a in inputs.items()]
    node = helper.make_node(op, names, outputs, domain=domain, **attrs)
    elem = {np.dtype(np.float32): F32, np.dtype(np.int32): I32, np.dtype(np.int64): I64,
            np.dtype(np.uint8): TensorProto.UINT8, np.dtype(np.int8): TensorProto.INT8}
    ins = [helper.make_tensor_value_info(k, elem[a.dtype], list(a.shape))
           for k, a in inputs.items() if a is not None and k not in inits]
    outs = [helper.make_tensor_value_info(o, I32 if o == "mask_index" else F32, None) for o in outputs if o]
    g = helper.make_graph([node], "contrib", ins, outs,
                          [onnx.numpy_helper.from_array(a, k) for k, a in inits.items()])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)])
    feeds = {k: a for k, a in inputs.items() if a is not None and k not in inits}
    return model, feeds


def _same(model: onnx.ModelProto, feeds: dict[str, np.ndarray], atol: float = 2e-6) -> None:
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    got = kiln.run_reference(model, feeds)
    names = [o.name for o in model.graph.output]
    for name, w in zip(names, want):
        g = np.asarray(got[name])
        assert g.shape == w.shape and g.dtype == w.dtype, (name, g.shape, w.shape, g.dtype, w.dtype)
        scale = max(float(np.abs(w).max()), 1.0) if w.size else 1.0
        np.testing.assert_allclose(g, w, rtol=0, atol=atol * scale, err_msg=name)


@pytest.mark.parametrize("form", ["plain", "beta+bias", "all outputs"])
def test_skip_layer_normalization(form: str) -> None:
    ins = {"input": _rand(B, S, H), "skip": _rand(B, S, H, seed=1), "gamma": _rand(H, seed=2),
           "beta": _rand(H, seed=3) if form != "plain" else None, "bias": _rand(H, seed=4) if form != "plain" else None}
    outs = ["y", "mean", "inv_std", "sum"] if form == "all outputs" else ["y", "", "", "sum"]
    _same(*_model("SkipLayerNormalization", ins, outs, epsilon=1e-5))


@pytest.mark.parametrize("bias", [False, True])
def test_skip_simplified_layer_normalization(bias: bool) -> None:
    ins = {"input": _rand(B, S, H), "skip": _rand(B, S, H, seed=1), "gamma": _rand(H, seed=2),
           "bias": _rand(H, seed=4) if bias else None}
    _same(*_model("SkipSimplifiedLayerNormalization", ins, ["y", "", "", "sum"], epsilon=1e-6))


def test_simplified_layer_normalization_in_the_onnx_domain() -> None:
    model, feeds = _model("SimplifiedLayerNormalization", {"x": _rand(B, S, H), "scale": _rand(H, seed=2)},
                          ["y", "inv_std"], domain="", epsilon=1e-6)
    _same(model, feeds)


@pytest.mark.parametrize(("op", "inputs"), [
    ("Gelu", ["X"]), ("BiasGelu", ["A", "B"]), ("FastGelu", ["X"]), ("FastGelu", ["X", "bias"]),
    ("QuickGelu", ["X"]),
])
def test_activations(op: str, inputs: list[str]) -> None:
    shapes = {"X": (B, S, H), "A": (B, S, H), "B": (H,), "bias": (H,)}
    ins = {k: _rand(*shapes[k], seed=i, scale=2.0) for i, k in enumerate(inputs)}
    _same(*_model(op, ins, ["y"]))


def test_bias_add() -> None:
    """onnxruntime has BiasAdd on CUDA only: numpy is the reference here."""
    x, bias, skip = _rand(B, S, H), _rand(H, seed=1), _rand(B, S, H, seed=2)
    model, feeds = _model("BiasAdd", {"X": x, "bias": bias, "skip": skip}, ["y"])
    np.testing.assert_allclose(np.asarray(kiln.run_reference(model, feeds)["y"]), x + bias + skip, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("ta", "tb", "alpha"), [(0, 0, 1.0), (1, 0, 0.5), (0, 1, 2.0), (1, 1, 1.0)])
def test_fused_matmul(ta: int, tb: int, alpha: float) -> None:
    a = _rand(3, H, S) if ta else _rand(3, S, H)
    b = _rand(4, H, seed=1) if tb else _rand(H, 4, seed=1)
    _same(*_model("FusedMatMul", {"A": a, "B": b}, ["y"], transA=ta, transB=tb, alpha=alpha))


@pytest.mark.parametrize("form", ["segments+mask", "no mask", "position ids"])
def test_embed_layer_normalization(form: str) -> None:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 30, (B, S)).astype(np.int32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 2, 1, 1, 1]], np.int32)  # onnxruntime counts the 1s: the 2 does not count
    ins = {"ids": ids, "seg": rng.integers(0, 2, (B, S)).astype(np.int32) if form != "no mask" else None,
           "word": _rand(30, H), "pos": _rand(S + 3, H, seed=1), "segemb": _rand(2, H, seed=2) if form != "no mask"
           else None, "gamma": _rand(H, seed=3), "beta": _rand(H, seed=4),
           "mask": mask if form != "no mask" else None,
           "position_ids": np.array([[2, 3, 4, 5, 6]] * B, np.int32) if form == "position ids" else None}
    inits = {k: ins[k] for k in ("word", "pos", "segemb", "gamma", "beta") if ins[k] is not None}
    _same(*_model("EmbedLayerNormalization", ins, ["y", "mask_index", "sum"], inits=inits, epsilon=1e-5))


def _attention_inputs(mask: str) -> dict[str, np.ndarray | None]:
    m: np.ndarray | None = None
    if mask == "end":
        m = np.array([3, 5], np.int32)
    elif mask == "raw":
        m = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.int32)
    elif mask == "3d":
        m = np.tril(np.ones((S, S), np.int32))[None].repeat(B, 0)
    return {"input": _rand(B, S, H), "weights": _rand(H, 3 * H, seed=1, scale=0.5), "bias": _rand(3 * H, seed=2),
            "mask_index": m}


@pytest.mark.parametrize("mask", ["none", "end", "raw", "3d"])
@pytest.mark.parametrize("causal", [0, 1])
def test_attention(mask: str, causal: int) -> None:
    ins = _attention_inputs(mask)
    _same(*_model("Attention", ins, ["y"], inits={"weights": ins["weights"], "bias": ins["bias"]}, num_heads=HEADS,
                  unidirectional=causal))


def test_attention_with_its_own_scale_sizes_and_bias() -> None:
    ins = {"input": _rand(B, S, H), "weights": _rand(H, 2 * H + 4, seed=1, scale=0.5),
           "bias": _rand(2 * H + 4, seed=2), "mask_index": np.array([[1, 1, 0, 1, 1], [1, 1, 1, 1, 0]], np.int32),
           "past": None, "attention_bias": _rand(1, HEADS, S, S, seed=3)}
    _same(*_model("Attention", ins, ["y"], num_heads=HEADS, qkv_hidden_sizes=[H, H, 4], scale=0.3,
                  mask_filter_value=-500.0))


@pytest.mark.parametrize("mask", ["none", "raw"])
def test_multi_head_attention(mask: str) -> None:
    ins = {"query": _rand(B, S, H), "key": _rand(B, S + 2, H, seed=1), "value": _rand(B, S + 2, H, seed=2),
           "bias": _rand(3 * H, seed=3),
           "key_padding_mask": np.array([[1] * (S + 2), [1] * S + [0, 0]], np.int32) if mask == "raw" else None}
    _same(*_model("MultiHeadAttention", ins, ["y"], num_heads=HEADS))


PAST = 3


@pytest.mark.parametrize("mask", ["none", "raw", "end"])
@pytest.mark.parametrize("causal", [0, 1])
def test_attention_with_its_key_value_cache(mask: str, causal: int) -> None:
    """GPT-2 as onnxruntime's optimizer writes it: past [2, B, N, P, H] in, present [2, B, N, P + S, H] out,
    the queries at positions P.. (unidirectional), masks over all P + S keys."""
    ins = _attention_inputs("none")
    ins["mask_index"] = {"none": None, "raw": np.array([[1] * (PAST + S), [0] + [1] * (PAST + S - 3) + [0, 0]],
                                                        np.int32),
                         "end": np.array([PAST + S - 1, PAST + 2], np.int32)}[mask]
    ins["past"] = _rand(2, B, HEADS, PAST, H // HEADS, seed=7)
    _same(*_model("Attention", ins, ["y", "present"], inits={"weights": ins["weights"], "bias": ins["bias"]},
                  num_heads=HEADS, unidirectional=causal))


def test_attention_present_without_a_past() -> None:
    """A first step: present holds the new keys and values alone."""
    ins = _attention_inputs("raw")
    _same(*_model("Attention", ins, ["y", "present"], inits={"weights": ins["weights"], "bias": ins["bias"]},
                  num_heads=HEADS, unidirectional=1))


@pytest.mark.parametrize("form", ["decode", "prompt-causal", "padding-mask", "attention-bias", "first-step"])
def test_multi_head_attention_with_its_key_value_cache(form: str) -> None:
    """past_key / past_value [B, N, P, H] -> present_key / present_value [B, N, P + L, H]."""
    s = 1 if form == "decode" else S
    d = H // HEADS
    ins: dict[str, np.ndarray | None] = {
        "query": _rand(B, s, H), "key": _rand(B, s, H, seed=1), "value": _rand(B, s, H, seed=2),
        "bias": _rand(3 * H, seed=3), "key_padding_mask": None, "attention_bias": None,
        "past_key": None if form == "first-step" else _rand(B, HEADS, PAST, d, seed=4),
        "past_value": None if form == "first-step" else _rand(B, HEADS, PAST, d, seed=5)}
    total = s + (0 if form == "first-step" else PAST)
    if form == "padding-mask":
        ins["key_padding_mask"] = np.array([[1] * total, [0, 0] + [1] * (total - 2)], np.int32)
    if form == "attention-bias":
        ins["attention_bias"] = _rand(1, HEADS, s, total, seed=6)
    causal = int(form in ("prompt-causal", "first-step"))
    _same(*_model("MultiHeadAttention", ins, ["y", "present_key", "present_value"], num_heads=HEADS,
                  unidirectional=causal))


def test_shared_buffer_caches_are_refused_by_name() -> None:
    ins = _attention_inputs("none")
    ins["past"] = _rand(2, B, HEADS, 3, H // HEADS)
    ins["attention_bias"] = None
    ins["past_sequence_length"] = np.array(3, np.int32)
    model, _ = _model("Attention", ins, ["y", "present"], num_heads=HEADS)
    with pytest.raises(UnsupportedError, match=r"input 6 \(past_sequence_length\): key/value caches"):
        kiln.run_reference(model, {})


@pytest.mark.slow
def test_the_ort_transformer_optimizer_output_runs_as_onnxruntime_runs_it(tmp_path) -> None:
    """The small BERT of the e2e tests optimized by onnxruntime's own tool (EmbedLayerNormalization, Attention,
    SkipLayerNormalization, BiasGelu): kiln builds it, its attentions are kiln's Attention, and the outputs match
    onnxruntime's."""
    from onnxruntime.transformers.optimizer import optimize_model

    from tests.e2e import models as M

    out = str(tmp_path / "bert-ort.onnx")
    optimize_model(M.bert_small(), model_type="bert", num_heads=4, hidden_size=64).save_model_to_file(out)
    contrib = {n.op_type for n in onnx.load(out).graph.node if n.domain == MS}
    assert {"EmbedLayerNormalization", "Attention", "SkipLayerNormalization"} <= contrib, contrib
    engine = _bert_as_onnxruntime(out)
    assert sum(n.op == "Attention" for n in engine.plan.graph.nodes) == 2


def _bert_as_onnxruntime(path: str) -> Engine:
    """The e2e BERT file at `path` on a padded batch of 2: kiln's CPU engine against onnxruntime; the engine."""
    rng = np.random.default_rng(0)
    mask = np.ones((2, 16), np.int64)
    mask[0, 11:] = 0
    feeds = {"input_ids": rng.integers(0, 1000, (2, 16)), "attention_mask": mask,
             "token_type_ids": np.zeros((2, 16), np.int64)}
    want = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, feeds)
    engine = kiln.build(path, kiln.BuilderConfig(device="cpu", profiles=[{k: (2, 16) for k in feeds}]))
    got = engine.create_context().run(feeds)
    for name, w in zip(("last_hidden_state", "pooler_output"), want):
        np.testing.assert_allclose(np.asarray(got[name]), w, rtol=0, atol=2e-5 * float(np.abs(w).max()))
    return engine


@pytest.mark.slow
def test_a_dynamically_quantized_ort_optimized_bert_runs_as_onnxruntime_runs_it(tmp_path) -> None:
    """onnxruntime's BERT recipe - its optimizer, then quantize_dynamic - writes QEmbedLayerNormalization and
    QAttention (int8 QKV projections) beside DynamicQuantizeLinear + MatMulInteger: kiln's engine gives its
    outputs."""
    from onnxruntime.quantization import quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    from tests.e2e import models as M

    fused, out = str(tmp_path / "bert-ort.onnx"), str(tmp_path / "bert-ort-int8.onnx")
    optimize_model(M.bert_small(), model_type="bert", num_heads=4, hidden_size=64).save_model_to_file(fused)
    quantize_dynamic(fused, out, extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    contrib = {n.op_type for n in onnx.load(out).graph.node if n.domain == MS}
    assert {"QEmbedLayerNormalization", "QAttention"} <= contrib, contrib
    _bert_as_onnxruntime(out)


@pytest.mark.parametrize("form", ["uint8-mask-end", "weight-zero-point-causal", "uint8-cache"])
def test_quantized_attention(form: str) -> None:
    """QAttention against onnxruntime: uint8 input (onnxruntime's CPU kernel takes no int8 input) with zero
    points, a mask, unidirectional, the cache (past -> present)."""
    rng = np.random.default_rng(5)
    ins: dict[str, np.ndarray | None] = {
        "input": rng.integers(0, 256, (B, S, H)).astype(np.uint8),
        "weight": rng.integers(-128, 128, (H, 3 * H)).astype(np.int8), "bias": _rand(3 * H, seed=2),
        "input_scale": np.array(0.02, np.float32), "weight_scale": np.array(0.01, np.float32),
        "mask_index": np.array([3, 5], np.int32) if form == "uint8-mask-end" else None,
        "input_zero_point": np.array(128, np.uint8),
        "weight_zero_point": np.array(2 if form.startswith("weight") else 0, np.int8),
        "past": _rand(2, B, HEADS, 3, H // HEADS, seed=7) if form == "uint8-cache" else None}
    inits = {k: v for k, v in ins.items() if k in ("weight", "bias", "input_scale", "weight_scale",
                                                   "input_zero_point", "weight_zero_point") and v is not None}
    outs = ["y", "present"] if form == "uint8-cache" else ["y"]
    _same(*_model("QAttention", ins, outs, inits=inits, num_heads=HEADS, unidirectional=int(form != "uint8-mask-end")),
          atol=1e-5)


@pytest.mark.parametrize("form", ["3d-ids", "3d-offset", "4d-ids", "3d-interleaved-partial", "4d-partial-offset",
                                  "3d-heads-from-cache"])
def test_rotary_embedding(form: str) -> None:
    """com.microsoft RotaryEmbedding (input, position_ids, cos_cache, sin_cache): ids per token, or one start
    position; 3-D [B, S, H*D] or 4-D [B, H, S, D]; halves or interleaved; the whole head or its first dims."""
    heads, d, max_pos = 2, 8, 12
    rot = 4 if "partial" in form else d
    angles = np.arange(max_pos)[:, None] / 10000 ** (np.arange(rot // 2) / (rot // 2))
    x = _rand(B, S, heads * d) if form.startswith("3d") else _rand(B, heads, S, d)
    if "offset" in form:
        pos = np.array([3], np.int64)
    else:
        pos = np.random.default_rng(1).integers(0, max_pos, (B, S)).astype(np.int64)
    ins = {"input": x, "position_ids": pos, "cos_cache": np.cos(angles).astype(np.float32),
           "sin_cache": np.sin(angles).astype(np.float32)}
    attrs: dict = {}
    if form != "3d-heads-from-cache":
        attrs["num_heads"] = heads
    if "partial" in form:
        attrs["rotary_embedding_dim"] = rot
    if "interleaved" in form:
        attrs["interleaved"] = 1
    _same(*_model("RotaryEmbedding", ins, ["y"], **attrs))


def test_rotary_embedding_packed_batching_is_refused_by_name() -> None:
    ins = {"input": _rand(B, S, 16), "position_ids": np.zeros((B, S), np.int64),
           "cos_cache": _rand(8, 4), "sin_cache": _rand(8, 4, seed=1)}
    model, feeds = _model("RotaryEmbedding", ins, ["y"], num_heads=2, is_packed_batching=1)
    with pytest.raises(UnsupportedError, match="packed batching"):
        kiln.run_reference(model, feeds)


def _quantized_mlp(bits: int, block: int, symmetric: bool, k: int = 80) -> onnx.ModelProto:
    """x [2, 5, k] @ W1 [k, 48] + b1 -> Relu -> @ W2 [48, 24], both MatMuls made MatMulNBits by onnxruntime's own
    weight-only quantizer (k = 80: a last block of 16 padded values at block 32)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["hb"]),
             helper.make_node("Relu", ["hb"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["y"])]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", F32, [2, 5, k])],
                          [helper.make_tensor_value_info("y", F32, [2, 5, 24])],
                          [onnx.numpy_helper.from_array(_rand(k, 48, seed=1, scale=0.2), "w1"),
                           onnx.numpy_helper.from_array(_rand(48, seed=2), "b1"),
                           onnx.numpy_helper.from_array(_rand(48, 24, seed=3, scale=0.2), "w2")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    config = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=symmetric, bits=bits)
    quantizer = MatMulNBitsQuantizer(model, algo_config=config)
    quantizer.process()
    out = quantizer.model.model
    assert sum(node.op_type == "MatMulNBits" for node in out.graph.node) == 2
    return out


@pytest.mark.parametrize("bits,block,symmetric", [(4, 32, False), (4, 32, True), (4, 16, False), (8, 32, False)])
def test_matmul_nbits_from_onnxruntimes_quantizer(bits: int, block: int, symmetric: bool) -> None:
    model = _quantized_mlp(bits, block, symmetric)
    _same(model, {"x": _rand(2, 5, 80, seed=4)}, atol=1e-5)


def test_matmul_nbits_with_a_bias_input() -> None:
    model = _quantized_mlp(4, 32, False)
    node = next(n for n in model.graph.node if n.op_type == "MatMulNBits")
    cols = next(a.i for a in node.attribute if a.name == "N")
    model.graph.initializer.append(onnx.numpy_helper.from_array(_rand(cols, seed=9), "nbits_bias"))
    while len(node.input) < 5:
        node.input.append("")
    node.input.append("nbits_bias")
    _same(model, {"x": _rand(2, 5, 80, seed=4)}, atol=1e-5)


@pytest.mark.parametrize("form", ["prompt", "decode-silu", "no-bias-dilation-2", "no-state"])
def test_causal_conv_with_state(form: str) -> None:
    """LFM2's short convolution against onnxruntime: output and the carried state."""
    s = 1 if form.startswith("decode") else 5
    dilation = 2 if "dilation" in form else 1
    ins = {"input": _rand(2, 4, s), "weight": _rand(4, 1, 3, seed=1),
           "bias": None if "no-bias" in form else _rand(4, seed=2),
           "past_state": None if form == "no-state" else _rand(2, 4, 2 * dilation, seed=3)}
    attrs = {"ndim": 1, "activation": "silu" if "silu" in form else "none"}
    if dilation > 1:
        attrs["dilation"] = dilation
    inits = {k: v for k, v in ins.items() if k in ("weight", "bias") and v is not None}
    model, feeds = _model("CausalConvWithState", ins, ["y", "present_state"], inits=inits, **attrs)
    if form == "no-state":  # onnxruntime wants the state: compare with an explicit zero one
        want_model, want_feeds = _model("CausalConvWithState", {**ins, "past_state": np.zeros((2, 4, 2), np.float32)},
                                        ["y", "present_state"], inits=inits, **attrs)
        want = ort.InferenceSession(want_model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, want_feeds)
        got = kiln.run_reference(model, feeds)
        for name, w in zip(("y", "present_state"), want):
            np.testing.assert_allclose(np.asarray(got[name]), w, rtol=0, atol=1e-6)
        return
    _same(model, feeds, atol=1e-6)


def _moe(act: str, *, rows: tuple[int, ...] = (5,), bias: bool = True, scale: float = 1.0, ties: bool = False,
         **attrs: Any) -> tuple[onnx.ModelProto, dict]:
    """A MoE node of 4 experts (hidden 8, inner 6), top 2, over tokens [*rows, 8]."""
    e, h, i = 4, 8, 6
    f = 2 * i if act == "swiglu" else i
    router = _rand(int(np.prod(rows)), e, seed=2)
    if ties:
        router[:, :] = 0.0
        router[:, [1, 3]] = 1.0
    ins = {"input": _rand(*rows, h, seed=1, scale=scale), "router_probs": router,
           "fc1_experts_weights": _rand(e, f, h, seed=3, scale=0.5),
           "fc1_experts_bias": _rand(e, f, seed=4, scale=0.5) if bias else None,
           "fc2_experts_weights": _rand(e, h, i, seed=5, scale=0.5),
           "fc2_experts_bias": _rand(e, h, seed=6, scale=0.5) if bias else None}
    inits = {k: v for k, v in ins.items() if k.startswith("fc") and v is not None}
    if act == "swiglu":
        attrs.setdefault("swiglu_fusion", 1)
    return _model("MoE", ins, ["y"], inits=inits, k=2, activation_type=act, **attrs)


@pytest.mark.parametrize("form", ["relu", "gelu-unnormalized", "silu", "identity-no-bias", "swiglu-gpt-oss",
                                  "swiglu-defaults", "tokens-3d", "router-ties"])
def test_mixture_of_experts(form: str) -> None:
    """com.microsoft MoE (gpt-oss as onnxruntime-genai exports it) against onnxruntime: top-k routing (softmax over
    the k, or over all experts), the activations (gelu is the tanh form there), SwiGLU with gpt-oss's limit,
    alpha and beta (interleaved gate/linear), [B, S, H] tokens, tied router logits (the lower expert first)."""
    model, feeds = {
        "relu": lambda: _moe("relu", normalize_routing_weights=1),
        "gelu-unnormalized": lambda: _moe("gelu", normalize_routing_weights=0),
        "silu": lambda: _moe("silu", normalize_routing_weights=1),
        "identity-no-bias": lambda: _moe("identity", bias=False, normalize_routing_weights=1),
        "swiglu-gpt-oss": lambda: _moe("swiglu", scale=6.0, normalize_routing_weights=1, activation_alpha=1.702,
                                       activation_beta=1.0, swiglu_limit=7.0),
        "swiglu-defaults": lambda: _moe("swiglu", scale=6.0, normalize_routing_weights=1),
        "tokens-3d": lambda: _moe("silu", rows=(2, 3), normalize_routing_weights=1),
        "router-ties": lambda: _moe("relu", ties=True, normalize_routing_weights=1),
    }[form]()
    _same(model, feeds, atol=1e-5)


def _qmoe(bits: int, block: int, act: str) -> tuple[onnx.ModelProto, dict]:
    """A QMoE node of 4 experts (hidden 32, inner 16), top 2: random 4/8-bit weights packed as onnxruntime packs
    them (two 4-bit values a byte, low nibble first), scales per row or per block."""
    rng = np.random.default_rng(bits + block)
    e, h, i = 4, 32, 16
    f = 2 * i if act == "swiglu" else i

    def packed(rows: int, cols: int) -> np.ndarray:
        q = rng.integers(0, 2 ** bits, (e, rows, cols))
        return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8) if bits == 4 else q.astype(np.uint8)

    def scales(rows: int, cols: int) -> np.ndarray:
        shape = (e, rows) if not block else (e, rows, cols // block)
        return (rng.random(shape) * 0.05 + 0.01).astype(np.float32)

    ins = {"input": _rand(5, h, seed=1), "router_probs": _rand(5, e, seed=2), "fc1_experts_weights": packed(f, h),
           "fc1_scales": scales(f, h), "fc1_experts_bias": _rand(e, f, seed=3, scale=0.1),
           "fc2_experts_weights": packed(h, i), "fc2_scales": scales(h, i),
           "fc2_experts_bias": _rand(e, h, seed=4, scale=0.1)}
    attrs: dict[str, Any] = {"k": 2, "activation_type": act, "normalize_routing_weights": 1,
                             "expert_weight_bits": bits}
    if block:
        attrs["block_size"] = block
    if act == "swiglu":
        attrs.update(swiglu_fusion=1, activation_alpha=1.702, activation_beta=1.0, swiglu_limit=7.0)
    return _model("QMoE", ins, ["y"], inits={k: v for k, v in ins.items() if k.startswith("fc")}, **attrs)


@pytest.mark.parametrize("bits,block,act", [(4, 0, "swiglu"), (4, 16, "swiglu"), (8, 0, "swiglu"), (4, 0, "relu")],
                         ids=["int4-rows-swiglu", "int4-blocks-swiglu", "int8-rows-swiglu", "int4-rows-relu"])
def test_quantized_mixture_of_experts(bits: int, block: int, act: str) -> None:
    """QMoE (onnxruntime-genai's INT4 gpt-oss) against onnxruntime: weights dequantized at import."""
    model, feeds = _qmoe(bits, block, act)
    _same(model, feeds, atol=1e-5)


@pytest.mark.parametrize("attr,value,match", [("use_sparse_mixer", 1, "sparse mixer"),
                                              ("swiglu_fusion", 2, "swiglu_fusion"), ("expert_mode", 1, "expert_mode")])
def test_mixture_of_experts_refusals_name_what(attr: str, value: int, match: str) -> None:
    model, feeds = _moe("swiglu", normalize_routing_weights=1)
    node = model.graph.node[0]
    kept = [a for a in node.attribute if a.name != attr]
    del node.attribute[:]
    node.attribute.extend([*kept, helper.make_attribute(attr, value)])
    with pytest.raises(UnsupportedError, match=match):
        kiln.run_reference(model, feeds)


def _gqa(hq: int, hkv: int, d: int, *, past: int | None, seqlens: list[int], s: int, packed: bool = False,
         rotary: bool = False, interleaved: bool = False, seed: int = 0,
         rotary_width: int | None = None) -> tuple[onnx.ModelProto, dict]:
    """A GroupQueryAttention node and feeds: past of `past` positions (None: no past inputs), S = `s` new tokens."""
    rng = np.random.default_rng(seed)
    b = len(seqlens)
    f = {"query": rng.standard_normal((b, s, (hq + 2 * hkv) * d if packed else hq * d)).astype(np.float32)}
    if not packed:
        f["key"] = rng.standard_normal((b, s, hkv * d)).astype(np.float32)
        f["value"] = rng.standard_normal((b, s, hkv * d)).astype(np.float32)
    if past is not None:
        f["past_key"] = rng.standard_normal((b, hkv, past, d)).astype(np.float32)
        f["past_value"] = rng.standard_normal((b, hkv, past, d)).astype(np.float32)
    f["seqlens_k"] = np.array(seqlens, np.int32)
    f["total_sequence_length"] = np.array((past or 0) + s, np.int32)
    if rotary:
        w = rotary_width or d // 2  # the cache's columns: half the rotated dims (fewer than d / 2: partial)
        angles = np.arange(32)[:, None] / 10000 ** (np.arange(w) / w)
        f["cos_cache"], f["sin_cache"] = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    order = ["query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length", "cos_cache",
             "sin_cache"]
    ins = {k: f.get(k) for k in order[:9 if rotary else 7]}
    return _model("GroupQueryAttention", ins, ["out", "present_key", "present_value"], num_heads=hq, kv_num_heads=hkv,
                  do_rotary=int(rotary), rotary_interleaved=int(interleaved))


@pytest.mark.parametrize("form", ["prompt", "prompt-right-padded", "prompt-no-past-inputs", "decode",
                                  "decode-uneven-lengths", "chunk-after-past", "packed-qkv", "multi-query",
                                  "rotary-prompt", "rotary-decode-interleaved", "rotary-partial-prompt",
                                  "rotary-partial-decode-interleaved"])
def test_group_query_attention(form: str) -> None:
    """onnxruntime's GroupQueryAttention with its growing cache (total_sequence_length = past + new), against
    onnxruntime: output and both presents."""
    hq, hkv, d = ((4, 1, 8) if form == "multi-query" else (4, 2, 32) if "partial" in form
                  else (4, 2, 16) if form.startswith("rotary") else (4, 2, 8))
    case = {
        "prompt": dict(past=0, seqlens=[4, 4], s=5), "prompt-right-padded": dict(past=0, seqlens=[4, 2], s=5),
        "prompt-no-past-inputs": dict(past=None, seqlens=[5, 5], s=6),
        "decode": dict(past=3, seqlens=[3, 3], s=1), "decode-uneven-lengths": dict(past=4, seqlens=[4, 1], s=1),
        "chunk-after-past": dict(past=3, seqlens=[6], s=4), "packed-qkv": dict(past=2, seqlens=[2, 2], s=1,
                                                                                  packed=True),
        "multi-query": dict(past=0, seqlens=[3, 3], s=4), "rotary-prompt": dict(past=0, seqlens=[4, 3], s=5,
                                                                                rotary=True),
        "rotary-decode-interleaved": dict(past=5, seqlens=[5, 2], s=1, rotary=True, interleaved=True),
        "rotary-partial-prompt": dict(past=0, seqlens=[4, 3], s=5, rotary=True, rotary_width=8),
        "rotary-partial-decode-interleaved": dict(past=5, seqlens=[5, 2], s=1, rotary=True, interleaved=True,
                                                  rotary_width=8),
    }[form]
    _same(*_gqa(hq, hkv, d, **case), atol=1e-5)


@pytest.mark.parametrize("case", [dict(past=0, seqlens=[6, 4], s=7), dict(past=6, seqlens=[6, 3], s=1)])
def test_group_query_attention_sliding_window(case: dict) -> None:
    """local_window_size (Mistral's, Phi-3's sliding window): the query's own position and the W - 1 before it."""
    model, feeds = _gqa(4, 2, 8, **case)
    model.graph.node[0].attribute.append(helper.make_attribute("local_window_size", 3))
    _same(model, feeds, atol=1e-5)


def _extra_input(model: onnx.ModelProto, feeds: dict, at: int, name: str, value: np.ndarray) -> None:
    """Gives the one node input `at` (feeding `value` as a graph input)."""
    node = model.graph.node[0]
    while len(node.input) < at:
        node.input.append("")
    node.input.append(name)
    elem = {np.dtype(np.float32): F32, np.dtype(np.int64): I64, np.dtype(np.int32): I32}[value.dtype]
    model.graph.input.append(helper.make_tensor_value_info(name, elem, list(value.shape)))
    feeds[name] = value


@pytest.mark.parametrize("case", [dict(past=0, seqlens=[5, 3], s=6), dict(past=4, seqlens=[4, 2], s=1),
                                  dict(past=None, seqlens=[4, 4], s=5)], ids=["prompt", "decode", "no-past-inputs"])
@pytest.mark.parametrize("form", ["softcap", "smooth-softmax", "head-sink", "head-sink-smooth", "bias-full",
                                  "bias-one", "bias-per-batch", "softcap-bias-sink", "position-ids"])
def test_group_query_attention_extras(form: str, case: dict) -> None:
    """Gemma-2's softcap, gpt-oss's head sinks (smooth softmax: a zero logit in each row's denominator; head_sink
    gives that logit per head), an additive attention_bias in its broadcast shapes, and position_ids for the
    rotary angles (the cache slots still follow seqlens_k), against onnxruntime."""
    hq, hkv, d = 4, 2, 16
    model, feeds = _gqa(hq, hkv, d, rotary=form == "position-ids", seed=3, **case)
    node = model.graph.node[0]
    b, s, t = len(case["seqlens"]), case["s"], (case["past"] or 0) + case["s"]
    if "softcap" in form:
        node.attribute.append(helper.make_attribute("softcap", 1.5))
    if "smooth" in form:
        node.attribute.append(helper.make_attribute("smooth_softmax", 1))
    bias = {"bias-full": (b, hq, s, t), "bias-one": (1, 1, s, t), "bias-per-batch": (b, 1, s, t),
            "softcap-bias-sink": (1, hq, s, t)}.get(form)
    if bias is not None:
        _extra_input(model, feeds, 10, "attention_bias", _rand(*bias, seed=5))
    if "sink" in form:
        _extra_input(model, feeds, 11, "head_sink", np.array([0.5, -1.0, 2.0, 0.0], np.float32))
    if form == "position-ids":
        shift = np.array([3, 7])[:b, None]  # not the cache positions: the rotary follows these
        start = np.zeros(b, np.int64) if not case["past"] else np.array(case["seqlens"]) + 1 - s
        _extra_input(model, feeds, 9, "position_ids", (start[:, None] + shift + np.arange(s)).astype(np.int64))
    _same(model, feeds, atol=1e-5)


def _window_cache(**case: Any) -> tuple[onnx.ModelProto, dict]:
    model, feeds = _gqa(4, 2, 16, seed=2, **case)
    model.graph.node[0].attribute.extend([helper.make_attribute("local_window_size", 4),
                                          helper.make_attribute("sliding_window_cache", 1),
                                          helper.make_attribute("softcap", 2.0)])
    feeds["total_sequence_length"] = np.array(max(case["seqlens"]) + 1, np.int32)
    return model, feeds


@pytest.mark.parametrize("case", [dict(past=4, seqlens=[2, 1], s=1), dict(past=4, seqlens=[5, 4], s=1),
                                  dict(past=4, seqlens=[9, 6], s=1), dict(past=4, seqlens=[4, 4], s=5),
                                  dict(past=4, seqlens=[3, 8], s=1, rotary=True)],
                         ids=["filling", "full", "long-history", "prompt-past-capacity", "rotary"])
def test_group_query_attention_sliding_window_cache(case: dict) -> None:
    """Gemma-2's sliding layers as onnxruntime-genai exports them: a key/value cache of fixed capacity (past's
    length, the window) holding each sequence's last tokens, present shifted to keep the last C; with softcap.
    While a cache is not full, onnxruntime leaves its present's unused slots uninitialized (seen: stale rows):
    those are compared as kiln defines them, zeros."""
    model, feeds = _window_cache(**case)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    got = kiln.run_reference(model, feeds)
    np.testing.assert_allclose(np.asarray(got["out"]), want[0], rtol=0, atol=1e-5 * float(np.abs(want[0]).max()))
    filled = [min(n + 1, 4) for n in case["seqlens"]]  # tokens held: the history and the new ones, at most C = 4
    for name, w in zip(("present_key", "present_value"), want[1:]):
        g = np.asarray(got[name])
        assert g.shape == w.shape, (g.shape, w.shape)
        for b, f in enumerate(filled):
            np.testing.assert_allclose(g[b, :, :f], w[b, :, :f], rtol=0, atol=1e-5, err_msg=f"{name} {b}")
            assert not g[b, :, f:].any()


def test_group_query_attention_sliding_window_cache_larger_than_the_window() -> None:
    """Capacity 6 over a window of 4: onnxruntime 1.32 returns uninitialized presents there (seen: 9e33, NaN), so
    kiln's own rule - the cache keeps each sequence's last C tokens - is checked against the same step on a cache
    of capacity 4 holding the last 4 of those tokens: the same output, present the last 4 of its 6."""
    model6, feeds6 = _window_cache(past=6, seqlens=[3, 8], s=1, rotary=True)
    model4, feeds4 = _window_cache(past=4, seqlens=[3, 8], s=1, rotary=True)
    for name in ("query", "key", "value"):
        feeds4[name] = feeds6[name]
    for name in ("past_key", "past_value"):  # sequence 0: 3 tokens in slots 0-2; sequence 1: positions 2..7
        feeds4[name] = np.concatenate([feeds6[name][:1, :, :4], feeds6[name][1:, :, 2:]])
    got6, got4 = kiln.run_reference(model6, feeds6), kiln.run_reference(model4, feeds4)
    np.testing.assert_allclose(np.asarray(got6["out"]), np.asarray(got4["out"]), rtol=0, atol=1e-6)
    for name in ("present_key", "present_value"):
        p6, p4 = np.asarray(got6[name]), np.asarray(got4[name])
        np.testing.assert_array_equal(p6[0, :, :4], p4[0])  # 4 tokens: slots 0-3, zeros after
        assert not p6[0, :, 4:].any()
        np.testing.assert_array_equal(p6[1, :, 2:], p4[1])


def test_group_query_attention_output_qk_is_refused_by_name() -> None:
    model, feeds = _gqa(4, 2, 8, past=0, seqlens=[3, 3], s=4)
    model.graph.node[0].output.append("qk")
    model.graph.output.append(helper.make_tensor_value_info("qk", F32, None))
    with pytest.raises(UnsupportedError, match="output_qk"):
        kiln.run_reference(model, feeds)


def test_group_query_attention_refuses_an_attribute_it_does_not_know() -> None:
    """A new attribute may change what the node computes (sliding_window_cache was one): refused by name."""
    model, feeds = _gqa(4, 2, 8, past=0, seqlens=[3, 3], s=4)
    model.graph.node[0].attribute.append(helper.make_attribute("future_mode", 1))
    with pytest.raises(UnsupportedError, match="future_mode"):
        kiln.run_reference(model, feeds)


def test_group_query_attention_static_cache_same_output_longer_present() -> None:
    """onnxruntime's static ("shared buffer") cache - total_sequence_length <= past length: the same output; its
    present keeps the past's length, kiln's has one position more per new token (zeros): what the docstring says."""
    model, feeds = _gqa(4, 2, 8, past=8, seqlens=[3, 1], s=1)
    feeds["total_sequence_length"] = np.array(4, np.int32)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    got = kiln.run_reference(model, feeds)
    np.testing.assert_allclose(np.asarray(got["out"]), want[0], rtol=0, atol=1e-5)
    pk = np.asarray(got["present_key"])
    assert want[1].shape == (2, 2, 8, 8) and pk.shape == (2, 2, 9, 8)
    np.testing.assert_array_equal(pk[:, :, :8], want[1])
    assert not pk[:, :, 8:].any()
