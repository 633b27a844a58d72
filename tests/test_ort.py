"""kiln.ort against onnxruntime on small hand-built models: reports, results, lazy builds, the disk cache, errors."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h

import kiln.ort as kort
from kiln.utils.errors import InputError, KilnError, ModelLoadError, UnsupportedError

OPSET = [h.make_opsetid("", 17)]


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _model(nodes: list, inputs: list, outputs: list, inits: tuple = (), **props: Any) -> bytes:
    graph = h.make_graph(nodes, "g", inputs, outputs, initializer=list(inits), doc_string=props.pop("gdoc", ""))
    metadata = props.pop("metadata", {})
    m = h.make_model(graph, opset_imports=OPSET, ir_version=8, **props)
    h.set_model_props(m, metadata)
    return m.SerializeToString()


def dynamic_model() -> bytes:
    """x[batch,?,4] + w -> z (declared without a shape); sum(y[batch,3]) -> s[batch]; shape(x) -> shp."""
    w = h.make_tensor("w", T.FLOAT, [4], [1.0, -2.0, 3.0, 0.5])
    nodes = [h.make_node("Add", ["x", "w"], ["z"]), h.make_node("ReduceSum", ["y", "axes"], ["s"], keepdims=0),
             h.make_node("Shape", ["x"], ["shp"])]
    axes = h.make_tensor("axes", T.INT64, [1], [1])
    return _model(nodes,
                  [h.make_tensor_value_info("x", T.FLOAT, ["batch", None, 4]),
                   h.make_tensor_value_info("y", T.FLOAT, ["batch", 3])],
                  [h.make_tensor_value_info("z", T.FLOAT, None), h.make_tensor_value_info("s", T.FLOAT, ["batch"]),
                   h.make_tensor_value_info("shp", T.INT64, None)],
                  (w, axes), producer_name="kiln-tests", doc_string="a dynamic model", domain="test.kiln",
                  model_version=7, gdoc="the graph")


def static_model() -> bytes:
    w = h.make_tensor("w", T.FLOAT, [4, 3], np.arange(12, dtype=np.float32).tolist())
    return _model([h.make_node("MatMul", ["x", "w"], ["y"])], [h.make_tensor_value_info("x", T.FLOAT, [2, 4])],
                  [h.make_tensor_value_info("y", T.FLOAT, [2, 3])], (w,))


def zoo_model() -> bytes:
    """One Identity per element type, a sequence and an optional output, an overridable initializer."""
    types = {"f16": T.FLOAT16, "f64": T.DOUBLE, "i8": T.INT8, "u8": T.UINT8, "i32": T.INT32, "i64": T.INT64,
             "b": T.BOOL, "s": T.STRING, "bf16": T.BFLOAT16}
    ins = [h.make_tensor_value_info(n, t, [2, "k"]) for n, t in types.items()]
    outs = [h.make_tensor_value_info(f"{n}_out", t, None) for n, t in types.items()]
    nodes = [h.make_node("Identity", [n], [f"{n}_out"]) for n in types]
    nodes += [h.make_node("SequenceConstruct", ["f64", "f64"], ["seq"]), h.make_node("Optional", ["f16"], ["opt"]),
              h.make_node("Add", ["i64", "bias"], ["i64_plus"])]
    outs += [h.make_tensor_sequence_value_info("seq", T.DOUBLE, None),
             h.make_value_info("opt", h.make_optional_type_proto(h.make_tensor_type_proto(T.FLOAT16, [2, "k"]))),
             h.make_tensor_value_info("i64_plus", T.INT64, [2, "k"])]
    ins.append(h.make_tensor_value_info("bias", T.INT64, [1]))
    bias = h.make_tensor("bias", T.INT64, [1], [5])
    return _model(nodes, ins, outs, (bias,), metadata={"author": "kiln", "license": "MIT"})


def _kiln(model: Any, *args: Any, **kwargs: Any) -> kort.InferenceSession:
    """A kiln session on the CPU unless providers are given (the GPU tier has its own tests)."""
    if len(args) < 2:
        kwargs.setdefault("providers", ["CPUExecutionProvider"])
    return kort.InferenceSession(model, *args, **kwargs)


def _ort(model: bytes) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def _args(args: list) -> list[tuple]:
    return [(a.name, a.shape, a.type) for a in args]


def _dyn_feeds(batch: int, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((batch, n, 4)).astype(np.float32),
            "y": rng.standard_normal((batch, 3)).astype(np.float32)}


# --- reports --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [dynamic_model, static_model, zoo_model])
def test_reports_match_onnxruntime(make: Any) -> None:
    model = make()
    ours, theirs = _kiln(model, providers=["CPUExecutionProvider"]), _ort(model)
    assert _args(ours.get_inputs()) == _args(theirs.get_inputs())
    assert _args(ours.get_outputs()) == _args(theirs.get_outputs())
    assert _args(ours.get_overridable_initializers()) == _args(theirs.get_overridable_initializers())
    a, b = ours.get_modelmeta(), theirs.get_modelmeta()
    for f in ("producer_name", "graph_name", "domain", "description", "graph_description", "version",
              "custom_metadata_map"):
        assert getattr(a, f) == getattr(b, f), f
    assert ours.get_providers() == theirs.get_providers()
    assert ours.get_provider_options() == theirs.get_provider_options()


def test_reports_spot_checks() -> None:
    sess = _kiln(dynamic_model())
    x, y = sess.get_inputs()
    assert (x.name, x.shape, x.type) == ("x", ["batch", None, 4], "tensor(float)")
    assert str(y) == "NodeArg(name='y', type='tensor(float)', shape=['batch', 3])"
    assert [o.shape for o in sess.get_outputs()] == [["batch", None, 4], ["batch"], [3]]
    meta = sess.get_modelmeta()
    assert (meta.producer_name, meta.version, meta.description) == ("kiln-tests", 7, "a dynamic model")
    assert _kiln(static_model()).get_modelmeta().version == kort.NO_VERSION


def test_model_from_path_and_modelproto(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(dynamic_model())
    feeds = _dyn_feeds(2, 3)
    want = _ort(dynamic_model()).run(None, feeds)
    for src in (str(path), path, onnx.load(str(path))):
        got = _kiln(src).run(None, feeds)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)


# --- running ------------------------------------------------------------------------------------------------


def test_run_matches_onnxruntime_over_shapes() -> None:
    model = dynamic_model()
    ours, theirs = _kiln(model), _ort(model)
    for i, (batch, n) in enumerate([(1, 3), (2, 5), (3, 1), (1, 17), (4, 0)]):
        feeds = _dyn_feeds(batch, n, seed=i)
        got, want = ours.run(None, feeds), theirs.run(None, feeds)
        assert len(got) == 3
        for g, w in zip(got, want):
            assert isinstance(g, np.ndarray) and g.dtype == w.dtype and g.shape == w.shape
            np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)


def test_output_names_select_and_order() -> None:
    sess = _kiln(dynamic_model())
    feeds = _dyn_feeds(2, 3)
    shp, z = sess.run(["shp", "z"], feeds)
    assert shp.tolist() == [2, 3, 4] and z.shape == (2, 3, 4)
    assert len(sess.run([], feeds)) == 3
    ro = kort.RunOptions()
    assert len(sess.run(None, feeds, ro)) == 3


def test_static_model_builds_when_the_session_is_created() -> None:
    sess = _kiln(static_model())
    assert sess.kiln_stats.builds == 1
    x = np.ones((2, 4), np.float32)
    (y,) = sess.run(None, {"x": x})
    np.testing.assert_allclose(y, _ort(static_model()).run(None, {"x": x})[0])
    assert sess.kiln_stats.builds == 1


def test_sequence_and_optional_outputs() -> None:
    model = zoo_model()
    rng = np.random.default_rng(0)
    feeds = {"f16": rng.standard_normal((2, 3)).astype(np.float16), "f64": rng.standard_normal((2, 3)),
             "i8": np.ones((2, 3), np.int8), "u8": np.ones((2, 3), np.uint8), "i32": np.ones((2, 3), np.int32),
             "i64": np.arange(6, dtype=np.int64).reshape(2, 3), "b": np.ones((2, 3), bool),
             "s": np.array([["a", "b", "c"], ["d", "e", "f"]], dtype=object),
             "bf16": rng.standard_normal((2, 3)).astype(ml_dtypes.bfloat16)}
    names = ["f64_out", "s_out", "bf16_out", "seq", "opt", "i64_plus"]
    # onnxruntime takes no ml_dtypes arrays (bfloat16): the expected values come from numpy
    f64, s, bf16, seq, opt, plus = _kiln(model).run(names, feeds)
    np.testing.assert_array_equal(f64, feeds["f64"])
    assert s.tolist() == feeds["s"].tolist()
    assert bf16.dtype == ml_dtypes.bfloat16 and np.array_equal(bf16, feeds["bf16"])
    assert isinstance(seq, list) and len(seq) == 2
    np.testing.assert_array_equal(seq[1], feeds["f64"])
    np.testing.assert_array_equal(opt, feeds["f16"])
    np.testing.assert_array_equal(plus, feeds["i64"] + 5)


def test_threads_share_the_engines() -> None:
    model = dynamic_model()
    sess, ref = _kiln(model), _ort(model)
    feeds = [_dyn_feeds(2, 3, seed=i) for i in range(8)]
    sess.run(None, feeds[0])
    want = [ref.run(["z"], f)[0] for f in feeds]
    errors: list[str] = []

    def work(k: int) -> None:
        for _ in range(20):
            got = sess.run(["z"], feeds[k])[0]
            if not np.array_equal(got, want[k]):
                errors.append(f"thread {k}")

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and sess.kiln_stats.builds == 1


# --- lazy builds and the profile policy -----------------------------------------------------------------------


def test_bucket_max() -> None:
    assert [kort.bucket_max(d) for d in (0, 1, 2, 3, 4, 5, 576)] == [2, 2, 4, 8, 8, 16, 2048]


def test_rebuilds_only_when_shapes_leave_the_profile() -> None:
    sess = _kiln(dynamic_model())
    builds = []
    for batch, n in [(1, 3), (1, 5), (2, 8), (1, 1), (1, 9), (1, 3), (3, 2), (2, 20), (4, 30), (5, 30)]:
        sess.run(["z"], _dyn_feeds(batch, n))
        builds.append(sess.kiln_stats.builds)
    # (1,3): batch<=2, n<=8. (1,9): n<=32. (3,2): batch<=8, n<=32 (the envelope keeps n's range). (5,30): batch
    # 5 and n 30 are inside batch<=8 n<=32.
    assert builds == [1, 1, 1, 1, 2, 2, 3, 3, 3, 3]
    p = sess.kiln_stats.profiles
    assert p[0].shapes["x"].max == (2, 8, 4) and p[0].shapes["x"].min == (1, 1, 4)
    assert p[1].shapes["x"].max == (2, 32, 4) and p[1].shapes["y"].max == (2, 3)
    assert p[2].shapes["x"].max == (8, 32, 4) and p[2].shapes["x"].opt == (3, 2, 4)


def test_a_failed_bucketed_build_falls_back_to_exact_profiles() -> None:
    # Relu -> Softmax -> Neg: the optimizer keeps the two intermediates (a Softmax separates the elementwise ops).
    nodes = [h.make_node("Relu", ["x"], ["r"]), h.make_node("Softmax", ["r"], ["s"], axis=-1),
             h.make_node("Neg", ["s"], ["y"])]
    model = _model(nodes, [h.make_tensor_value_info("x", T.FLOAT, [1, "n"])],
                   [h.make_tensor_value_info("y", T.FLOAT, [1, "n"])])
    # 'r' and 's' are alive together: 2 x 512 bytes at n=100, 2 x 1024 at the bucket's max (256): a 1100-byte
    # limit only fits the exact profile.
    sess = _kiln(model, kiln_options={"memory_limit_bytes": 1100})
    x = np.linspace(-1, 1, 100, dtype=np.float32)[None]
    r = np.maximum(x, 0)
    want = -np.exp(r - r.max()) / np.exp(r - r.max()).sum()
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], want, rtol=1e-6, atol=1e-7)
    assert sess.kiln_stats.builds == 1 and sess.kiln_stats.profiles[0].shapes["x"].max == (1, 100)
    sess.run(None, {"x": x[:, :50]})
    assert sess.kiln_stats.profiles[1].shapes["x"].max == (1, 50)


# --- the disk cache ------------------------------------------------------------------------------------------


def test_a_second_session_loads_engines_from_disk(_cache_dir: Path) -> None:
    model = dynamic_model()
    first = _kiln(model)
    want = first.run(None, _dyn_feeds(2, 3))
    first.run(None, _dyn_feeds(2, 11))
    assert first.kiln_stats.builds == 2
    assert len(list((_cache_dir / "ort").rglob("*.kiln"))) == 2
    second = _kiln(model)
    got = second.run(None, _dyn_feeds(2, 3))
    second.run(None, _dyn_feeds(2, 11))
    assert (second.kiln_stats.builds, second.kiln_stats.disk_loads) == (0, 2)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_the_cache_is_keyed_by_model_and_can_be_turned_off(_cache_dir: Path) -> None:
    _kiln(dynamic_model()).run(None, _dyn_feeds(1, 3))
    other = _model([h.make_node("Neg", ["x"], ["z"])], [h.make_tensor_value_info("x", T.FLOAT, ["b", None, 4])],
                   [h.make_tensor_value_info("z", T.FLOAT, ["b", None, 4])])
    sess = _kiln(other)
    sess.run(None, {"x": np.ones((1, 3, 4), np.float32)})
    assert (sess.kiln_stats.builds, sess.kiln_stats.disk_loads) == (1, 0)
    before = sorted((_cache_dir / "ort").rglob("*"))
    off = _kiln(dynamic_model(), kiln_cache=False)
    off.run(None, _dyn_feeds(1, 3))
    assert (off.kiln_stats.builds, off.kiln_stats.disk_loads) == (1, 0)
    assert sorted((_cache_dir / "ort").rglob("*")) == before


def test_a_corrupt_cache_entry_is_rebuilt(_cache_dir: Path) -> None:
    model = dynamic_model()
    _kiln(model).run(None, _dyn_feeds(1, 3))
    (entry,) = (_cache_dir / "ort").rglob("*.kiln")
    data = bytearray(entry.read_bytes())
    data[len(data) // 2] ^= 0xFF
    entry.write_bytes(bytes(data))
    sess = _kiln(model)
    with pytest.warns(RuntimeWarning, match="rebuilding the cached engine"):
        got = sess.run(["z"], _dyn_feeds(1, 3))[0]
    np.testing.assert_allclose(got, _ort(model).run(["z"], _dyn_feeds(1, 3))[0])
    assert (sess.kiln_stats.builds, sess.kiln_stats.rejected_cache_entries) == (1, 1)
    again = _kiln(model)
    again.run(None, _dyn_feeds(1, 3))
    assert (again.kiln_stats.builds, again.kiln_stats.disk_loads) == (0, 1)


def test_an_unreadable_timing_cache_is_left_out(_cache_dir: Path) -> None:
    (_cache_dir / "ort").mkdir(parents=True)
    (_cache_dir / "ort" / "timing-cache.json").write_text("{not json")
    sess = _kiln(dynamic_model())
    with pytest.warns(RuntimeWarning, match="without the timing cache"):
        sess.run(None, _dyn_feeds(1, 3))
    sess.run(None, _dyn_feeds(1, 30))
    assert sess.kiln_stats.builds == 2


# --- errors ----------------------------------------------------------------------------------------------------


def _bad_feeds() -> list[tuple[dict[str, Any], str]]:
    x, y = _dyn_feeds(2, 3).values()
    return [
        ({"x": x, "y": y, "q": y}, "unknown input 'q'"),
        ({"x": x}, "missing input 'y'"),
        ({"x": x.astype(np.float64), "y": y}, "input 'x' expects float32, got numpy float64"),
        ({"x": x[0], "y": y}, "input 'x' expects rank 3"),
        ({"x": np.ones((2, 3, 5), np.float32), "y": y}, "(dim 2)"),
        ({"x": x, "y": y[:1]}, "'batch' = 2 elsewhere, got 1"),
        ({"x": x, "y": y, "w": np.ones(4, np.float32)}, "unknown input 'w'"),
    ]


@pytest.mark.parametrize("warm", [False, True], ids=["before-any-build", "with-an-engine"])
def test_wrong_feeds_are_input_errors(warm: bool) -> None:
    sess = _kiln(dynamic_model())
    if warm:
        sess.run(None, _dyn_feeds(2, 3))
    for feeds, message in _bad_feeds():
        with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
            sess.run(None, feeds)
    with pytest.raises(InputError, match="unknown output 'nope'"):
        sess.run(["nope"], _dyn_feeds(2, 3))
    with pytest.raises(InputError, match="input_feed must be a dict"):
        sess.run(None, list(_dyn_feeds(2, 3).values()))  # type: ignore[arg-type]
    assert sess.kiln_stats.builds == int(warm)


def test_feeding_an_initializer_is_an_input_error() -> None:
    sess = _kiln(zoo_model())
    assert [a.name for a in sess.get_overridable_initializers()] == ["bias"]
    with pytest.raises(InputError, match="'bias' is an initializer"):
        sess.run(None, {"bias": np.ones(1, np.int64)})


def test_session_errors() -> None:
    with pytest.raises(kort.SessionError, match="cannot load a model from a int") as e:
        kort.InferenceSession(3)  # type: ignore[arg-type]
    assert isinstance(e.value, ValueError) and isinstance(e.value, KilnError)
    with pytest.raises(ModelLoadError, match="not found"):
        _kiln("/nonexistent/model.onnx")
    odd = _model([h.make_node("Frobnicate", ["x"], ["y"], domain="com.example")],
                 [h.make_tensor_value_info("x", T.FLOAT, ["n"])], [h.make_tensor_value_info("y", T.FLOAT, ["n"])])
    with pytest.raises(UnsupportedError, match="Frobnicate"):  # at creation, as onnxruntime fails at creation
        _kiln(odd)
    with pytest.raises(kort.SessionError, match="same length"):
        _kiln(static_model(), providers=["CPUExecutionProvider"], provider_options=[{}, {}])
    with pytest.raises(kort.SessionError, match=r"kiln_options: unknown or session-managed field.*device"):
        _kiln(static_model(), kiln_options={"device": "cuda"})
    with pytest.raises(KilnError, match="opt_level"):
        _kiln(static_model(), kiln_options={"opt_level": 9})


# --- providers and options ---------------------------------------------------------------------------------


def test_providers_fall_back_with_a_warning_like_onnxruntime() -> None:
    with pytest.warns(UserWarning, match="'FooExecutionProvider' is not in available provider names"):
        sess = _kiln(static_model(), providers=["FooExecutionProvider", "CPUExecutionProvider"])
    assert sess.get_providers() == ["CPUExecutionProvider"] and sess.device == "cpu"
    if kort.get_available_providers() != ["CPUExecutionProvider"]:
        pytest.skip("this machine has a GPU")
    with pytest.warns(UserWarning, match="CUDAExecutionProvider"):
        sess = _kiln(static_model(), providers=[("CUDAExecutionProvider", {"device_id": 0}),
                                                                "CPUExecutionProvider"])
    assert sess.device == "cpu" and sess.get_providers() == _ort(static_model()).get_providers()
    assert kort.get_device() == "CPU" and kort.InferenceSession(static_model()).device == "cpu"


def test_provider_choice() -> None:
    pairs = [("CPUExecutionProvider", {"arena_extend_strategy": "kSameAsRequested"})]
    assert kort.choose_device(pairs) == ("cpu", ["CPUExecutionProvider"], {"CPUExecutionProvider": {}})
    sess, ref = _kiln(static_model(), providers=pairs), ort.InferenceSession(static_model(), providers=pairs)
    assert sess.get_provider_options() == ref.get_provider_options()
    assert kort.choose_device([])[1][-1] == "CPUExecutionProvider"


def test_session_options_are_kept_and_set_providers_works() -> None:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = _kiln(static_model(), sess_options=so, providers=["CPUExecutionProvider"])
    assert sess.get_session_options() is so
    own = kort.SessionOptions()
    own.graph_optimization_level = kort.GraphOptimizationLevel.ORT_DISABLE_ALL
    own.add_session_config_entry("session.x", "1")
    sess = _kiln(static_model(), own)
    assert sess.get_session_options().get_session_config_entry("session.x") == "1"
    sess.set_providers(["CPUExecutionProvider"])
    assert sess.get_providers() == ["CPUExecutionProvider"] and len(sess.kiln_stats.profiles) == 1


def test_unknown_keyword_arguments_warn() -> None:
    with pytest.warns(UserWarning, match="ignores argument"):
        _kiln(static_model(), kiln_optionz={})
    _kiln(static_model(), disabled_optimizers=["x"])  # onnxruntime's own: accepted silently


def test_no_engine_files_leak_outside_the_cache(tmp_path: Path) -> None:
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        _kiln(static_model())
        assert not list(tmp_path.glob("*.kiln"))
    finally:
        os.chdir(cwd)
