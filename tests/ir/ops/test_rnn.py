"""RNN, GRU and LSTM: inference, the ONNX handlers, and the reference against torch.nn and onnxruntime."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from kiln.frontend.onnx import import_model
from kiln.ir import DType, Graph, TensorType
from kiln.ir.interpreter import Interpreter
from kiln.utils.errors import ShapeError, UnsupportedError

F32 = DType.FLOAT32
RNG = np.random.default_rng(0)
GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}


def _randn(*shape: int, scale: float = 1.0) -> np.ndarray:
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def _onnx_model(op: str, feeds: dict[str, np.ndarray], inputs: list[str], outputs: list[str], opset: int = 22,
                **attrs: Any) -> onnx.ModelProto:
    node = helper.make_node(op, inputs, outputs, **attrs)
    ins = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(feeds[k].dtype), feeds[k].shape)
           for k in inputs if k]
    outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs if o]
    graph = helper.make_graph([node], "g", ins, outs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _kiln(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return list(Interpreter(import_model(model)).run(feeds).values())


def _ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _feeds(op: str, seq: int, batch: int, inp: int, hidden: int, dirs: int, *, layout: int = 0,
           lens: list[int] | None = None) -> tuple[dict[str, np.ndarray], list[str]]:
    g = GATES[op]
    x_shape = (batch, seq, inp) if layout else (seq, batch, inp)
    s_shape = (batch, dirs, hidden) if layout else (dirs, batch, hidden)
    feeds = {"X": _randn(*x_shape, scale=2.0), "W": _randn(dirs, g * hidden, inp),
             "R": _randn(dirs, g * hidden, hidden), "B": _randn(dirs, 2 * g * hidden), "h0": _randn(*s_shape)}
    names = ["X", "W", "R", "B", "", "h0"]
    if lens is not None:
        feeds["lens"] = np.array(lens, np.int32)
        names[4] = "lens"
    if op == "LSTM":
        feeds["c0"], feeds["P"] = _randn(*s_shape), _randn(dirs, 3 * hidden)
        names += ["c0", "P"]
    return feeds, names


def _outputs(op: str) -> list[str]:
    return ["Y", "Y_h", "Y_c"] if op == "LSTM" else ["Y", "Y_h"]


# --- against onnxruntime ------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["RNN", "GRU", "LSTM"])
@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
def test_matches_onnxruntime_with_sequence_lens(op: str, direction: str) -> None:
    dirs = 2 if direction == "bidirectional" else 1
    feeds, names = _feeds(op, 5, 3, 4, 3, dirs, lens=[5, 2, 3])
    model = _onnx_model(op, feeds, names, _outputs(op), opset=14, hidden_size=3, direction=direction)
    for got, want in zip(_kiln(model, feeds), _ort(model, feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", ["RNN", "GRU", "LSTM"])
def test_layout_1_clip_and_activation_params_match_onnxruntime(op: str) -> None:
    """onnxruntime has no layout=1: compare against it on time-major copies of the inputs."""
    feeds, names = _feeds(op, 4, 2, 3, 5, 2, layout=1)
    acts = {"RNN": ["LeakyRelu", "HardSigmoid"], "GRU": ["HardSigmoid", "Tanh", "Sigmoid", "LeakyRelu"],
            "LSTM": ["HardSigmoid", "Tanh", "Elu", "Sigmoid", "LeakyRelu", "Tanh"]}[op]
    alphas = [0.3, 0.15, 0.9][: 3 if op == "LSTM" else 2]  # consumed in order by the activations taking one
    attrs = dict(direction="bidirectional", clip=0.7, hidden_size=5, activations=acts,
                 activation_alpha=alphas, activation_beta=[0.4])
    got = _kiln(_onnx_model(op, feeds, names, _outputs(op), opset=14, layout=1, **attrs), feeds)
    time_major = {k: v.swapaxes(0, 1) if k in ("X", "h0", "c0") else v for k, v in feeds.items()}
    want = _ort(_onnx_model(op, time_major, names, _outputs(op), opset=14, **attrs), time_major)
    np.testing.assert_allclose(got[0], want[0].transpose(2, 0, 1, 3), rtol=1e-5, atol=1e-5)
    for g, w in zip(got[1:], want[1:]):
        np.testing.assert_allclose(g, w.swapaxes(0, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("linear_before_reset", [0, 1])
def test_gru_linear_before_reset_matches_onnxruntime(linear_before_reset: int) -> None:
    feeds, names = _feeds("GRU", 6, 2, 3, 4, 1)
    model = _onnx_model("GRU", feeds, names, ["Y", "Y_h"], opset=14, hidden_size=4,
                        linear_before_reset=linear_before_reset)
    for got, want in zip(_kiln(model, feeds), _ort(model, feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_lstm_input_forget_couples_gates() -> None:
    """input_forget=1 uses 1 - i as the forget gate: equal to a plain LSTM step whose forget gate we force."""
    feeds, names = _feeds("LSTM", 1, 2, 3, 4, 1)
    feeds["P"][:] = 0
    model = _onnx_model("LSTM", feeds, names, ["Y", "Y_h", "Y_c"], input_forget=1)
    _, _, c = _kiln(model, feeds)
    x, w, r, b, h0, c0 = (feeds[k] for k in ("X", "W", "R", "B", "h0", "c0"))
    gates = x[0] @ w[0].T + h0[0] @ r[0].T + b[0, :16] + b[0, 16:]
    i = 1 / (1 + np.exp(-gates[:, :4]))
    want = (1 - i) * c0[0] + i * np.tanh(gates[:, 12:])
    np.testing.assert_allclose(c[0], want, rtol=1e-5, atol=1e-6)


def test_zero_length_sequence_has_zero_state() -> None:
    feeds, names = _feeds("GRU", 3, 2, 2, 3, 1, lens=[0, 3])
    model = _onnx_model("GRU", feeds, names, ["Y", "Y_h"], opset=14, hidden_size=3)
    (y, h), (_, h_ort) = _kiln(model, feeds), _ort(model, feeds)
    assert not y[:, :, 0].any() and not h[:, 0].any()
    np.testing.assert_allclose(h, h_ort, rtol=1e-5, atol=1e-6)


# --- against torch.nn.LSTM / GRU ----------------------------------------------------------------------


def _torch_gates(w: torch.Tensor, order: list[int], hidden: int) -> np.ndarray:
    return torch.cat([w[k * hidden:(k + 1) * hidden] for k in order]).detach().numpy()


def test_lstm_matches_torch_bidirectional() -> None:
    torch.manual_seed(0)
    seq, batch, inp, hidden = 7, 3, 5, 6
    lstm = torch.nn.LSTM(inp, hidden, bidirectional=True)
    x, h0, c0 = torch.randn(seq, batch, inp), torch.randn(2, batch, hidden), torch.randn(2, batch, hidden)
    want_y, (want_h, want_c) = lstm(x, (h0, c0))
    order = [0, 3, 1, 2]  # torch i, f, g, o -> ONNX i, o, f, c
    sfx = ["", "_reverse"]
    W = np.stack([_torch_gates(getattr(lstm, f"weight_ih_l0{s}"), order, hidden) for s in sfx])
    R = np.stack([_torch_gates(getattr(lstm, f"weight_hh_l0{s}"), order, hidden) for s in sfx])
    B = np.stack([np.concatenate([_torch_gates(getattr(lstm, f"bias_{kind}_l0{s}"), order, hidden)
                                  for kind in ("ih", "hh")]) for s in sfx])
    feeds = {"X": x.numpy(), "W": W, "R": R, "B": B, "h0": h0.numpy(), "c0": c0.numpy()}
    model = _onnx_model("LSTM", feeds, ["X", "W", "R", "B", "", "h0", "c0"], ["Y", "Y_h", "Y_c"],
                        hidden_size=hidden, direction="bidirectional")
    y, h, c = _kiln(model, feeds)
    want_y = want_y.detach().reshape(seq, batch, 2, hidden).transpose(1, 2)
    np.testing.assert_allclose(y, want_y.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h, want_h.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(c, want_c.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_gru_matches_torch_batch_first() -> None:
    torch.manual_seed(1)
    gru = torch.nn.GRU(4, 5, batch_first=True)
    x = torch.randn(2, 6, 4)
    want_y, want_h = gru(x)
    order = [1, 0, 2]  # torch r, z, n -> ONNX z, r, h
    W = _torch_gates(gru.weight_ih_l0, order, 5)[None]
    R = _torch_gates(gru.weight_hh_l0, order, 5)[None]
    B = np.concatenate([_torch_gates(gru.bias_ih_l0, order, 5), _torch_gates(gru.bias_hh_l0, order, 5)])[None]
    feeds = {"X": x.numpy(), "W": W, "R": R, "B": B}
    model = _onnx_model("GRU", feeds, ["X", "W", "R", "B"], ["Y", "Y_h"], layout=1, linear_before_reset=1)
    y, h = _kiln(model, feeds)
    np.testing.assert_allclose(y[:, :, 0], want_y.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h[:, 0], want_h.detach().numpy()[0], rtol=1e-5, atol=1e-6)


# --- handlers -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("op", "opset"), [("LSTM", 1), ("GRU", 1), ("GRU", 3), ("RNN", 1), ("LSTM", 7)])
def test_old_versions_import(op: str, opset: int) -> None:
    feeds, names = _feeds(op, 3, 2, 2, 3, 1)
    attrs: dict[str, Any] = {"hidden_size": 3}
    if opset < 7:
        attrs["output_sequence"] = 1
    model = _onnx_model(op, feeds, names, _outputs(op), opset=opset, **attrs)
    new = _onnx_model(op, feeds, names, _outputs(op), opset=22, hidden_size=3)
    for got, want in zip(_kiln(model, feeds), _kiln(new, feeds)):
        np.testing.assert_array_equal(got, want)


def test_only_cell_state_output() -> None:
    feeds, names = _feeds("LSTM", 3, 2, 2, 3, 1)
    model = _onnx_model("LSTM", feeds, names, ["", "", "Y_c"])
    (c,) = _kiln(model, feeds)
    full = _kiln(_onnx_model("LSTM", feeds, names, ["Y", "Y_h", "Y_c"]), feeds)
    np.testing.assert_array_equal(c, full[2])


def test_unknown_activation_is_unsupported() -> None:
    feeds, names = _feeds("RNN", 2, 1, 2, 2, 1)
    model = _onnx_model("RNN", feeds, names, ["Y"], activations=["Swish"])
    with pytest.raises(UnsupportedError, match="unknown activation 'Swish'"):
        import_model(model)


def test_wrong_activation_count_is_unsupported() -> None:
    feeds, names = _feeds("GRU", 2, 1, 2, 2, 2)
    model = _onnx_model("GRU", feeds, names, ["Y"], direction="bidirectional",
                        activations=["Sigmoid", "Tanh"])
    with pytest.raises(UnsupportedError, match="needs 4 names"):
        import_model(model)


# --- inference ----------------------------------------------------------------------------------------


def _graph(op: str, x_shape: tuple | None, dirs: int, hidden: int, inp: int = 4,
           **attrs: Any) -> list[TensorType]:
    g = Graph()
    x = g.add_input("x", TensorType(F32, x_shape))
    w = g.add_input("w", TensorType(F32, (dirs, GATES[op] * hidden, inp)))
    r = g.add_input("r", TensorType(F32, (dirs, GATES[op] * hidden, hidden)))
    outs = g.add(op, [x, w, r], attrs)
    return [v.type for v in outs]


def test_infer_symbolic_layouts() -> None:
    y, h, c = _graph("LSTM", ("T", "N", 4), 2, 8, direction="bidirectional")
    assert y.shape == ("T", 2, "N", 8) and h.shape == c.shape == (2, "N", 8)
    y, h = _graph("GRU", ("N", "T", 4), 1, 8, layout=1)
    assert y.shape == ("N", "T", 1, 8) and h.shape == ("N", 1, 8)


def test_infer_unknown_rank_gives_fresh_dims() -> None:
    y, h = _graph("RNN", None, 1, 8)
    assert y.rank == 4 and y.shape is not None and y.shape[1:] != ()
    assert y.shape[1] == 1 and y.shape[3] == 8 and isinstance(y.shape[0], str)
    assert h.shape is not None and h.shape[1] == y.shape[2]


def test_infer_rejects_inconsistent_weights() -> None:
    with pytest.raises(ShapeError, match="directions"):
        _graph("RNN", ("T", "N", 4), 1, 8, direction="bidirectional")
    with pytest.raises(ShapeError, match="hidden_size=5"):
        _graph("GRU", ("T", "N", 4), 1, 8, hidden_size=5)
    with pytest.raises(UnsupportedError, match="direction"):
        _graph("GRU", ("T", "N", 4), 1, 8, direction="sideways")


def test_half_precision_keeps_dtype() -> None:
    feeds, names = _feeds("LSTM", 3, 2, 2, 3, 1)
    half = {k: v.astype(np.float16) for k, v in feeds.items()}
    model = _onnx_model("LSTM", half, names, ["Y", "Y_h", "Y_c"])
    for o in model.graph.output:
        o.type.tensor_type.elem_type = TensorProto.FLOAT16
    got = _kiln(model, half)
    want = _kiln(_onnx_model("LSTM", feeds, names, ["Y", "Y_h", "Y_c"]), feeds)
    for a, b in zip(got, want):
        assert a.dtype == np.float16
        np.testing.assert_allclose(a.astype(np.float32), b, rtol=2e-2, atol=2e-2)
