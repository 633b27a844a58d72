"""Programmatic dependent launch (`kiln.kernels.pdl`): when it is on (per engine, else KILN_PDL, and only where
supported), where the wait goes in a generated module, how kernels are launched, and that an engine keeps its
setting. The GPU effect is measured by the benchmarks (`--modes kiln,kiln-nopdl`)."""

from __future__ import annotations

import ast
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import kiln
from kiln.ir import DType
from kiln.kernels import pdl
from kiln.kernels.gemm.triton_gemm import render, spec
from tests.kernels.gemm import cases as f


@pytest.fixture
def supported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pdl, "supported", lambda: True)


def _first_statements(source: str) -> dict[str, list[str]]:
    tree = ast.parse(source)
    return {n.name: [ast.unparse(s) for s in n.body[:3]] for n in tree.body if isinstance(n, ast.FunctionDef)}


def test_on_per_mode_else_by_the_environment_and_only_where_supported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KILN_PDL", raising=False)
    monkeypatch.setattr(pdl, "supported", lambda: True)
    assert pdl.active()  # on by default
    monkeypatch.setenv("KILN_PDL", "0")
    assert not pdl.active()
    monkeypatch.setenv("KILN_PDL", "1")
    assert pdl.active()
    with pdl.mode(False):
        assert not pdl.active() and pdl.launch_options() == {"PDL": False}
        with pdl.mode(None):
            assert pdl.active()  # None: the environment decides
    monkeypatch.setenv("KILN_PDL", "0")
    with pdl.mode(True):
        assert pdl.active() and pdl.launch_options() == {"PDL": True, "launch_pdl": True}
    monkeypatch.setattr(pdl, "supported", lambda: False)
    with pdl.mode(True):
        assert not pdl.active()  # the interpreter, a CPU-only machine, a GPU older than sm_90
        source = render(spec(f.bare(DType.FLOAT16, (70,), 300, 96, ()).node), False)  # type: ignore[arg-type]
        assert pdl.with_wait(source) == source and pdl.launch_options() == {"PDL": False}


def test_not_supported_under_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    pdl.supported.cache_clear()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    try:
        assert pdl.supported() is False
    finally:
        pdl.supported.cache_clear()


def test_every_kernel_of_a_module_waits_first(supported: None) -> None:
    s = spec(f.bias_gelu_residual(DType.FLOAT16, "none", (), lead=(1, 128), k=3072, n=768).node)
    assert s is not None
    with pdl.mode(True):
        for source in (render(s, False), render(s, False, split=True), render(s, False, tma=True, persistent=True)):
            waited = pdl.with_wait(source)
            firsts = _first_statements(waited)
            assert firsts and all(body[:2] == ["gdc_wait()", "gdc_launch_dependents()"] for body in firsts.values())
            assert len(firsts) == source.count("@triton.jit")
            # the import follows the module docstring; the rest of the text is unchanged
            assert ast.get_docstring(ast.parse(waited)) == ast.get_docstring(ast.parse(source))
            kept = [line for line in waited.splitlines(True) if line.strip() not in (*pdl._WAIT, pdl._IMPORT.strip())]
            assert "".join(kept) == source


def test_helpers_are_left_alone(supported: None) -> None:
    source = '"""doc"""\nfrom __future__ import annotations\nimport triton\n\n\n@triton.jit\ndef helper(x):\n' \
             '    return x\n\n\n@triton.jit\ndef kiln_k(x_ptr):\n    """doc"""\n    helper(1)\n'
    with pdl.mode(True):
        waited = pdl.with_wait(source)
    firsts = _first_statements(waited)
    assert firsts["helper"] == ["return x"]
    assert firsts["kiln_k"][:2] == ["gdc_wait()", "gdc_launch_dependents()"]
    lines = waited.splitlines()
    assert lines[1] == "from __future__ import annotations" and lines[2] == pdl._IMPORT.strip()


def test_a_launcher_adds_the_dependent_launch(supported: None) -> None:
    seen: list[tuple[Any, tuple[Any, ...], dict[str, Any]]] = []

    class Fn:
        name = "kiln_k"

        def __getitem__(self, grid: Any) -> Any:
            return lambda *a, **kw: seen.append((grid, a, kw))

    with pdl.mode(True):
        fn = pdl.launcher(Fn())
    fn[(3,)](1, 2, BLOCK=4)
    assert seen == [((3,), (1, 2), {"BLOCK": 4, "launch_pdl": True})] and fn.name == "kiln_k"
    with pdl.mode(False):
        plain = Fn()
        assert pdl.launcher(plain) is plain


def _model() -> onnx.ModelProto:
    w = onnx.numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("setting", [True, False, None])
def test_an_engine_keeps_its_setting(setting: bool | None, tmp_path: Any) -> None:
    engine = kiln.build(_model(), kiln.BuilderConfig(pdl=setting, opt_level=0))
    assert engine.pdl is setting and engine.metadata["config"]["pdl"] is setting
    engine.save(tmp_path / "e.kiln")
    assert kiln.load(tmp_path / "e.kiln").pdl is setting
