from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from kiln.frontend.onnx import MAX_OPSET, import_model
from kiln.ir.interpreter import Interpreter
from kiln.utils.errors import GraphError, KilnError, ModelLoadError, UnsupportedError


def _model(nodes: list, opset: int = 17, inits: list | None = None, functions: list | None = None,
           extra_opsets: list | None = None) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits or [])
    ops = [helper.make_opsetid("", opset), *(extra_opsets or [])]
    return helper.make_model(g, opset_imports=ops, functions=functions or [])


def _add_relu() -> onnx.ModelProto:
    w = onnx.numpy_helper.from_array(np.arange(4, dtype=np.float32) - 1.5, "w")
    return _model([helper.make_node("Add", ["x", "w"], ["t"], name="add0"),
                   helper.make_node("Relu", ["t"], ["y"], name="relu0")], inits=[w])


def _run(model: onnx.ModelProto | str, x: np.ndarray) -> np.ndarray:
    return Interpreter(import_model(model)).run({"x": x})["y"]


X = np.linspace(-2, 2, 8, dtype=np.float32).reshape(2, 4)


def test_imports_and_runs() -> None:
    np.testing.assert_allclose(_run(_add_relu(), X), np.maximum(X + np.arange(4) - 1.5, 0))


def test_from_path_and_bytes(tmp_path: Path) -> None:
    p = tmp_path / "m.onnx"
    onnx.save(_add_relu(), p)
    np.testing.assert_allclose(_run(str(p), X), _run(_add_relu(), X))
    g = import_model(p.read_bytes())
    assert [v.name for v in g.outputs] == ["y"]


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        import_model(tmp_path / "nope.onnx")
    with pytest.raises(ModelLoadError, match="is a directory"):
        import_model(tmp_path)


def test_garbage_and_empty_files(tmp_path: Path) -> None:
    p = tmp_path / "garbage.onnx"
    p.write_bytes(b"\x93NUMPY this is not an onnx model \xff\xfe\x00" * 10)
    with pytest.raises(ModelLoadError, match=r"not a valid ONNX model|no graph"):
        import_model(p)
    p.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="empty"):
        import_model(p)
    p.write_text("hello, I am a text file\n")
    with pytest.raises(ModelLoadError):
        import_model(p)


def test_truncated_file_is_a_clear_error(tmp_path: Path) -> None:
    data = _add_relu().SerializeToString()
    for cut in range(8, len(data) - 1, 7):
        p = tmp_path / "t.onnx"
        p.write_bytes(data[:cut])
        with pytest.raises(KilnError) as e:
            import_model(p)
        assert isinstance(e.value, (ModelLoadError, GraphError, UnsupportedError)), cut
        assert "truncated" in str(e.value) or "not" in str(e.value), (cut, str(e.value))


def _save_external(tmp_path: Path) -> Path:
    m = _add_relu()
    p = tmp_path / "ext.onnx"
    onnx.save_model(m, p, save_as_external_data=True, all_tensors_to_one_file=True, location="weights.bin",
                    size_threshold=0)
    assert (tmp_path / "weights.bin").exists()
    return p


def test_external_data(tmp_path: Path) -> None:
    p = _save_external(tmp_path)
    np.testing.assert_allclose(_run(str(p), X), _run(_add_relu(), X))


def test_missing_external_data_names_file_and_tensor(tmp_path: Path) -> None:
    p = _save_external(tmp_path)
    os.remove(tmp_path / "weights.bin")
    with pytest.raises(ModelLoadError, match=r"tensor 'w'.*'weights.bin' not found"):
        import_model(p)


def test_short_external_data(tmp_path: Path) -> None:
    p = _save_external(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"\x00\x01")
    with pytest.raises(ModelLoadError, match="too short"):
        import_model(p)


def test_external_data_outside_the_model_folder_is_refused(tmp_path: Path) -> None:
    m = _add_relu()
    t = m.graph.initializer[0]
    t.ClearField("raw_data")
    t.ClearField("float_data")
    t.data_location = TensorProto.EXTERNAL
    t.external_data.add(key="location", value="../../etc/passwd")
    p = tmp_path / "evil.onnx"
    onnx.save(m, p)
    with pytest.raises(ModelLoadError, match="outside the model folder"):
        import_model(p)


def test_unknown_op_names_node_op_and_opset() -> None:
    m = _model([helper.make_node("FrobnicateX", ["x"], ["y"], name="frob1")], opset=13)
    with pytest.raises(UnsupportedError) as e:
        import_model(m)
    msg = str(e.value)
    assert "FrobnicateX" in msg and "frob1" in msg and "opset 13" in msg


def test_custom_domain_is_named() -> None:
    m = _model([helper.make_node("FusedThing", ["x"], ["y"], name="f", domain="com.acme")],
               extra_opsets=[helper.make_opsetid("com.acme", 1)])
    with pytest.raises(UnsupportedError, match=r"com\.acme"):
        import_model(m)


def test_newer_opset_is_refused_with_advice() -> None:
    m = _model([helper.make_node("Relu", ["x"], ["y"])], opset=MAX_OPSET + 5)
    with pytest.raises(UnsupportedError) as e:
        import_model(m)
    assert f"opset {MAX_OPSET + 5}" in str(e.value) and "re-export" in str(e.value)


def test_unknown_attribute_is_refused() -> None:
    m = _model([helper.make_node("Relu", ["x"], ["y"], name="r", slope=0.1)])
    with pytest.raises(UnsupportedError, match="attribute 'slope'"):
        import_model(m)


def test_local_function_is_inlined_with_attribute_refs() -> None:
    # AddThenRelu(x, b) = Relu(x + b); its 'bias' attribute feeds a Constant through ref_attr_name.
    const = helper.make_node("Constant", [], ["b"])
    attr = helper.make_attribute_ref("value_float", onnx.AttributeProto.FLOAT)
    attr.ref_attr_name = "bias"
    const.attribute.append(attr)
    fn = helper.make_function(
        "acme", "AddThenRelu", ["x"], ["y"],
        [const, helper.make_node("Add", ["x", "b"], ["t"]), helper.make_node("Relu", ["t"], ["y"])],
        opset_imports=[helper.make_opsetid("", 17)], attributes=["bias"],
    )
    m = _model([helper.make_node("AddThenRelu", ["x"], ["y"], domain="acme", name="call", bias=0.5)],
               functions=[fn], extra_opsets=[helper.make_opsetid("acme", 1)])
    np.testing.assert_allclose(_run(m, X), np.maximum(X + 0.5, 0))
    g = import_model(m)
    assert g.op_counts() == {"Add": 1, "Constant": 1, "Relu": 1}
    assert [n.name for n in g.nodes] == ["call/Constant", "call/Add", "call/Relu"]


def test_graph_output_aliasing_an_input_keeps_its_name() -> None:
    g = helper.make_graph([], "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    out = Interpreter(import_model(m)).run({"x": np.ones(2, np.float32)})
    assert list(out) == ["x"]


def test_nodes_out_of_order_are_sorted() -> None:
    m = _add_relu()
    nodes = list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(reversed(nodes))
    np.testing.assert_allclose(_run(m, X), _run(_add_relu(), X))


def test_outer_names_survive_a_subgraph_that_reuses_them() -> None:
    # The If branch computes a value named 's' before the main graph's output 's' exists.
    then_g = helper.make_graph([helper.make_node("Relu", ["x"], ["s"])], "then", [],
                               [helper.make_tensor_value_info("s", TensorProto.FLOAT, None)])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["s2"])], "else", [],
                               [helper.make_tensor_value_info("s2", TensorProto.FLOAT, None)])
    g = helper.make_graph(
        [helper.make_node("ReduceSum", ["x"], ["tot"], keepdims=0),
         helper.make_node("Greater", ["tot", "zero"], ["c"]),
         helper.make_node("If", ["c"], ["r"], then_branch=then_g, else_branch=else_g),
         helper.make_node("Identity", ["r"], ["s"])],
        "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("s", TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(np.array(0, np.float32), "zero")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    out = Interpreter(import_model(m)).run({"x": np.array([1, -2, 3], np.float32)})
    assert list(out) == ["s"]
    np.testing.assert_array_equal(out["s"], [1, 0, 3])


class _Without:
    """The op table minus some ops, to exercise the importer's fallback to ONNX function bodies."""

    def __init__(self, table: object, hidden: set[str]) -> None:
        self.table, self.hidden = table, hidden

    def __contains__(self, name: object) -> bool:
        return name not in self.hidden and name in self.table  # type: ignore[operator]


def test_ops_kiln_lacks_expand_to_their_onnx_function(monkeypatch: pytest.MonkeyPatch) -> None:
    import kiln.frontend.onnx.importer as imp

    monkeypatch.setattr(imp, "OPS", _Without(imp.OPS, {"Softsign", "LayerNormalization"}))
    real_find = imp.find_handler
    monkeypatch.setattr(imp, "find_handler", lambda d, op, s: None if op in {"Softsign", "LayerNormalization"}
                        else real_find(d, op, s))
    # Softsign has a plain function body; LayerNormalization a context-dependent one.
    scale = onnx.numpy_helper.from_array(np.linspace(0.5, 1.5, 4, dtype=np.float32), "scale")
    bias = onnx.numpy_helper.from_array(np.full(4, 0.1, np.float32), "bias")
    m = _model([helper.make_node("Softsign", ["x"], ["s"], name="ss"),
                helper.make_node("LayerNormalization", ["s", "scale", "bias"], ["y"], name="ln", epsilon=1e-5)],
               inits=[scale, bias])
    g = import_model(m)
    assert "Softsign" not in g.op_counts() and "LayerNormalization" not in g.op_counts()
    assert {"Abs", "Div", "ReduceMean", "Sqrt"} <= set(g.op_counts())
    s = X / (1 + np.abs(X))
    mu, var = s.mean(-1, keepdims=True), s.var(-1, keepdims=True)
    want = (s - mu) / np.sqrt(var + 1e-5) * np.linspace(0.5, 1.5, 4) + 0.1
    np.testing.assert_allclose(Interpreter(g).run({"x": X})["y"], want, rtol=1e-5, atol=1e-6)
