"""String ops and TfIdfVectorizer: inference, attribute validation, and results against onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from kiln.frontend.onnx import import_model
from kiln.ir import DType, Graph, TensorType
from kiln.ir.interpreter import Interpreter
from kiln.utils.errors import ExecutionError, ShapeError, UnsupportedError

S = DType.STRING


def _one_node(node: onnx.NodeProto, inputs: list, outputs: list, opset: int = 20) -> onnx.ModelProto:
    return helper.make_model(helper.make_graph([node], "m", inputs, outputs),
                             opset_imports=[helper.make_opsetid("", opset)])


def _strs(*xs: str) -> np.ndarray:
    return np.array(list(xs), dtype=object)


def test_string_concat_broadcasts_and_infers() -> None:
    g = Graph()
    a, b = g.add_input("a", TensorType(S, ("N", 1))), g.add_input("b", TensorType(S, (3,)))
    (c,) = g.add("StringConcat", [a, b], outputs=["c"])
    assert c.shape == ("N", 3)
    g.outputs = [c]
    out = Interpreter(g).run({"a": _strs("x", "y").reshape(2, 1), "b": _strs("1", "2", "é")})
    assert out["c"].tolist() == [["x1", "x2", "xé"], ["y1", "y2", "yé"]]
    f = g.add_input("f", TensorType(DType.FLOAT32, (3,)))
    with pytest.raises(ShapeError, match="must be a string tensor"):
        g.add("StringConcat", [a, f], outputs=1)


def test_string_split_shapes_and_unknown_rank() -> None:
    g = Graph()
    x = g.add_input("x", TensorType(S, None))
    y, z = g.add("StringSplit", [x], outputs=2)
    assert y.shape is None and z.type == TensorType(DType.INT64, None)
    g2 = Graph()
    x2 = g2.add_input("x", TensorType(S, (2, "K")))
    y2, z2 = g2.add("StringSplit", [x2], {"delimiter": ",", "maxsplit": 1}, outputs=["y", "z"])
    assert y2.shape is not None and y2.shape[:2] == (2, "K") and z2.shape == (2, "K")
    g2.outputs = [y2, z2]
    out = Interpreter(g2).run({"x": _strs("a,b,c", "", "d", ",e").reshape(2, 2)})
    assert out["y"].tolist() == [[["a", "b,c"], ["", ""]], [["d", ""], ["", "e"]]]
    assert out["z"].tolist() == [[2, 1], [1, 2]]
    with pytest.raises(ShapeError, match="maxsplit must be non-negative"):
        g2.add("StringSplit", [x2], {"maxsplit": -2}, outputs=2)


def test_regex_full_match_and_bad_patterns() -> None:
    g = Graph()
    x = g.add_input("x", TensorType(S, (3,)))
    g.outputs = g.add("RegexFullMatch", [x], {"pattern": r"[a-z]+\d?"}, outputs=["y"])
    out = Interpreter(g).run({"x": _strs("abc", "abc12", "q7")})
    assert out["y"].tolist() == [True, False, True]
    with pytest.raises(ExecutionError, match="invalid pattern"):
        g.add("RegexFullMatch", [x], {"pattern": "(unclosed"}, outputs=1)
    with pytest.raises(UnsupportedError, match="'pattern' is required"):
        g.add("RegexFullMatch", [x], outputs=1)


def test_string_normalizer_shapes() -> None:
    g = Graph()
    x = g.add_input("x", TensorType(S, (1, 4)))
    (y,) = g.add("StringNormalizer", [x], {"stopwords": ("A",), "case_change_action": "LOWER"}, outputs=["y"])
    assert y.shape is not None and y.shape[0] == 1 and isinstance(y.shape[1], str)
    (same,) = g.add("StringNormalizer", [x], {"case_change_action": "UPPER"}, outputs=["same"])
    assert same.shape == (1, 4)
    g.outputs = [y, same]
    out = Interpreter(g).run({"x": _strs("a", "B", "A", "Straße").reshape(1, 4)})
    assert out["y"].tolist() == [["b", "straße"]]
    assert out["same"].tolist() == [["A", "B", "A", "STRASSE"]]
    bad = g.add_input("bad", TensorType(S, (2, 2)))
    with pytest.raises(ShapeError, match=r"must be \[C\] or \[1, C\]"):
        g.add("StringNormalizer", [bad], outputs=1)


def test_string_normalizer_refuses_locales_with_special_case_rules() -> None:
    node = helper.make_node("StringNormalizer", ["x"], ["y"], case_change_action="UPPER", locale="tr_TR")
    m = _one_node(node, [helper.make_tensor_value_info("x", TensorProto.STRING, [2])],
                  [helper.make_tensor_value_info("y", TensorProto.STRING, None)], opset=10)
    with pytest.raises(UnsupportedError, match="locale 'tr_TR'"):
        import_model(m)
    m.graph.node[0].attribute[1].s = b"en_US"
    assert import_model(m).op_counts() == {"StringNormalizer": 1}


@pytest.mark.parametrize(("mode", "skip", "lo", "hi", "weights"), [
    ("TF", 0, 1, 1, None), ("TF", 2, 1, 2, None), ("IDF", 1, 2, 2, [0.5, 2.0, 3.0, 4.0]),
    ("TFIDF", 3, 1, 2, [1.0, 0.5, 2.0, 1.5, 3.0, 0.25, 1.0]),
])
def test_tfidf_matches_onnxruntime(mode: str, skip: int, lo: int, hi: int, weights: list | None) -> None:
    # 4 unigrams then 3 bigrams; the output columns are a permutation of the pool's n-grams.
    attrs = dict(mode=mode, min_gram_length=lo, max_gram_length=hi, max_skip_count=skip, ngram_counts=[0, 4],
                 ngram_indexes=[6, 1, 2, 0, 4, 5, 3], pool_int64s=[2, 3, 5, 4, 5, 6, 7, 8, 6, 7])
    if weights is not None:
        attrs["weights"] = weights + [1.0] * (7 - len(weights))
    node = helper.make_node("TfIdfVectorizer", ["x"], ["y"], **attrs)
    m = _one_node(node, [helper.make_tensor_value_info("x", TensorProto.INT32, [3, 8])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], opset=9)
    x = np.random.default_rng(0).integers(2, 9, size=(3, 8)).astype(np.int32)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    want = sess.run(None, {"x": x})[0]
    got = Interpreter(import_model(m)).run({"x": x})["y"]
    assert got.shape == (3, 7)
    np.testing.assert_allclose(got, want)


def test_tfidf_strings_and_validation() -> None:
    g = Graph()
    x = g.add_input("x", TensorType(S, (5,)))
    attrs = {"mode": "TF", "min_gram_length": 1, "max_gram_length": 2, "max_skip_count": 0,
             "ngram_counts": (0, 2), "ngram_indexes": (3, 0, 1), "pool_strings": ("a", "b", "a", "b")}
    g.outputs = g.add("TfIdfVectorizer", [x], attrs, outputs=["y"])
    assert g.outputs[0].shape == (4,)
    out = Interpreter(g).run({"x": _strs("a", "b", "a", "b", "c")})
    assert out["y"].tolist() == [2, 2, 0, 2]  # 'a' -> 3, 'b' -> 0, 'a b' -> 1
    with pytest.raises(ShapeError, match="exactly one of pool_int64s and pool_strings"):
        g.add("TfIdfVectorizer", [x], {**attrs, "pool_int64s": (1, 2)}, outputs=1)
    with pytest.raises(ShapeError, match="do not make whole 2-grams"):
        g.add("TfIdfVectorizer", [x], {**attrs, "pool_strings": ("a", "b", "a")}, outputs=1)
    with pytest.raises(ShapeError, match="ngram_indexes has 2 entries"):
        g.add("TfIdfVectorizer", [x], {**attrs, "ngram_indexes": (0, 1)}, outputs=1)
    i = g.add_input("i", TensorType(DType.INT64, (5,)))
    with pytest.raises(ShapeError, match="a string pool cannot count int64 input"):
        g.add("TfIdfVectorizer", [i], attrs, outputs=1)
