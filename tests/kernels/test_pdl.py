"""Programmatic dependent launch (`kiln.kernels.pdl`): when it is on, where the wait goes in a generated module and
how a kernel is launched; when it is off. The GPU effect is measured by the benchmarks (KILN_PDL=1)."""

from __future__ import annotations

import ast
from typing import Any

import pytest

from kiln.ir import DType
from kiln.kernels import pdl
from kiln.kernels.gemm.triton_gemm import render, spec
from tests.kernels.gemm import cases as f


@pytest.fixture
def on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pdl, "enabled", lambda: True)


def _first_statements(source: str) -> dict[str, list[str]]:
    tree = ast.parse(source)
    return {n.name: [ast.unparse(s) for s in n.body[:3]] for n in tree.body if isinstance(n, ast.FunctionDef)}


def test_off_unless_asked_for_on_a_hopper_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    for env in ({}, {"KILN_PDL": "0"}, {"KILN_PDL": "1", "TRITON_INTERPRET": "1"}):
        pdl.enabled.cache_clear()
        monkeypatch.delenv("KILN_PDL", raising=False)
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        assert pdl.enabled() is False
    pdl.enabled.cache_clear()
    monkeypatch.setenv("KILN_PDL", "1")
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pdl.enabled() is False  # no GPU
    pdl.enabled.cache_clear()
    source = render(spec(f.bare(DType.FLOAT16, (70,), 300, 96, ()).node), False)  # type: ignore[arg-type]
    assert pdl.with_wait(source) == source and pdl.launch_options() == {}
    pdl.enabled.cache_clear()


def test_every_kernel_of_a_module_waits_first(on: None) -> None:
    s = spec(f.bias_gelu_residual(DType.FLOAT16, "none", (), lead=(1, 128), k=3072, n=768).node)
    assert s is not None
    for source in (render(s, False), render(s, False, split=True), render(s, False, tma=True, persistent=True)):
        waited = pdl.with_wait(source)
        firsts = _first_statements(waited)
        assert firsts and all(body[:2] == ["gdc_wait()", "gdc_launch_dependents()"] for body in firsts.values())
        assert len(firsts) == source.count("@triton.jit")
        # the import follows the module docstring; the rest of the text is unchanged
        assert ast.get_docstring(ast.parse(waited)) == ast.get_docstring(ast.parse(source))
        kept = [line for line in waited.splitlines(True) if line.strip() not in (*pdl._WAIT, pdl._IMPORT.strip())]
        assert "".join(kept) == source


def test_helpers_are_left_alone(on: None) -> None:
    source = '"""doc"""\nfrom __future__ import annotations\nimport triton\n\n\n@triton.jit\ndef helper(x):\n' \
             '    return x\n\n\n@triton.jit\ndef kiln_k(x_ptr):\n    """doc"""\n    helper(1)\n'
    waited = pdl.with_wait(source)
    firsts = _first_statements(waited)
    assert firsts["helper"] == ["return x"]
    assert firsts["kiln_k"][:2] == ["gdc_wait()", "gdc_launch_dependents()"]
    lines = waited.splitlines()
    assert lines[1] == "from __future__ import annotations" and lines[2] == pdl._IMPORT.strip()


def test_a_launcher_adds_the_dependent_launch(on: None) -> None:
    seen: list[tuple[Any, tuple[Any, ...], dict[str, Any]]] = []

    class Fn:
        name = "kiln_k"

        def __getitem__(self, grid: Any) -> Any:
            return lambda *a, **kw: seen.append((grid, a, kw))

    fn = pdl.launcher(Fn())
    fn[(3,)](1, 2, BLOCK=4)
    assert seen == [((3,), (1, 2), {"BLOCK": 4, "launch_pdl": True})] and fn.name == "kiln_k"
    assert pdl.launch_options() == {"launch_pdl": True}
