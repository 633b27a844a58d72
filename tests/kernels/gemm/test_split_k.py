"""The split-K GEMM tiles (`triton.gemm_splitk`) under the Triton CPU interpreter (every case of `split_cases.py`
in one subprocess, where every launch splits), and what needs no kernel run: the two kernels' sources, which
nodes the tactic takes, how a launch shares the K steps."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kiln.ir import DType, TensorType
from kiln.kernels import registry
from kiln.kernels.gemm.triton_gemm import SPLIT_TILES, GemmKernel, render, spec
from tests.kernels.gemm import cases as f
from tests.kernels.gemm.split_cases import CASES, LAST
from tests.kernels.interpreted import case_result, run_cases

F16 = DType.FLOAT16


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    return run_cases("tests.kernels.gemm.split_cases", tmp_path_factory.mktemp("split"))


@pytest.mark.parametrize("name", list(CASES))
def test_interpreted_case(name: str, interpreted: tuple[dict[str, Any], str]) -> None:
    problems = case_result(interpreted, name)
    tiles = LAST if name == "last-sums-twice" else tuple(SPLIT_TILES)
    assert problems and set(problems) == set(tiles) and all(p is None for p in problems.values()), problems


def test_the_split_source_sums_partials_before_the_one_epilogue() -> None:
    s = spec(f.bias_gelu_residual(F16, "none", (), lead=(1, 128), k=3072, n=768).node)
    assert s is not None
    plain, split = render(s, False), render(s, False, split=True)
    reduce, part = split.split("\n@triton.jit\ndef kiln_gemm_part(")
    assert "tl.dot" not in reduce and "for part in range(0, SPLIT)" in reduce
    assert "tl.dot" in part and "for k in range(first, tl.minimum(first + KSTEPS" in part
    # the epilogue (bias, erf GELU, residual) and the store are the plain kernel's, once, in the reducing kernel
    tail = plain[plain.index("    rm = offs_m[:, None]"):]
    assert reduce.rstrip("\n").endswith(tail.rstrip("\n")) and "erf" not in part and part.count("tl.store(") == 1
    for bad in (dict(tma=True), dict(persistent=True), dict(subtile=2)):
        with pytest.raises(ValueError, match="split-K"):
            render(s, False, split=True, **bad)


def test_the_one_kernel_form_sums_in_its_last_program() -> None:
    s = spec(f.bias_gelu_residual(F16, "none", (), lead=(1, 128), k=3072, n=768).node)
    assert s is not None
    plain, one = render(s, False), render(s, False, split=True, last_sums=True)
    assert one.count("@triton.jit") == 1 and "kiln_gemm_part" not in one
    head, last = one.split("    if arrived == SPLIT - 1:\n")
    assert "tl.dot" in head and "erf" not in head and head.count("tl.store(") == 1  # the share's partial
    # the plain kernel's epilogue and store, indented under the last program's branch
    tail = plain[plain.index("    rm = offs_m[:, None]"):]
    assert "".join(f"    {line}" if line.strip() else line for line in tail.splitlines(True)) in last
    with pytest.raises(ValueError, match="split-K"):
        render(s, False, last_sums=True)


@pytest.mark.parametrize("lead,k,n,takes", [
    ((1, 128), 3072, 768, True),     # BERT-base bs1 FFN-down: 2 x 12 tiles of 64 x 64
    ((1, 197), 768, 3072, True),     # ViT-B/16 bs1 FFN-up: 4 x 48
    ((128, 128), 3072, 768, False),  # batch 128: 256 x 12 tiles fill the GPU
    ((1, 128), 128, 768, False),     # K of two steps: nothing to share
])
def test_the_tactic_takes_few_rows_and_a_long_k(lead: tuple[int, ...], k: int, n: int, takes: bool) -> None:
    node = f.bias_gelu_residual(F16, "none", (), lead=lead, k=k, n=n).node
    assert registry.get("triton.gemm_splitk").applicable(node, torch.device("cuda")) is takes
    assert registry.get("triton.gemm").applicable(node, torch.device("cuda"))


def test_a_symbolic_row_count_is_refused() -> None:
    case = f.bias_gelu_residual(F16, "none", (), lead=(1, 128), k=768, n=768)
    x = case.node.inputs[0]
    assert x is not None and x.type is not None
    x.type = TensorType(x.type.dtype, ("batch", 128, 768))
    assert not registry.get("triton.gemm_splitk").applicable(case.node, torch.device("cuda"))


@pytest.mark.parametrize("tile,k,shares", [
    ("64x64x64-w4s4-k4", 300, 3),   # 5 steps: 2 + 2 + 1
    ("64x64x64-w4s4-k8", 300, 5),   # 1 step each
    ("64x64x64-w4s4-k2", 3072, 2),  # 48 steps: 24 + 24
    ("16x64x256-w4s3-k4", 300, 2),  # 2 steps of 256
])
def test_a_launch_makes_no_program_without_a_k_step(tile: str, k: int, shares: int,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    case = f.bias_gelu_residual(F16, "none", (), lead=(1, 70), k=k, n=96)
    kernel = GemmKernel(case.node, spec(case.node), SPLIT_TILES[tile], torch.device("cuda"))  # type: ignore[arg-type]
    seen: list[tuple[Any, ...]] = []

    class Launch:
        def __getitem__(self, grid: tuple[int, ...]) -> Any:
            return lambda *args, **kw: seen.append((grid, args))

    monkeypatch.setattr(kernel, "_part_fn", Launch())
    monkeypatch.setattr(kernel, "fn", Launch())
    kernel(f.inputs(case.node, case.feeds))
    (grid, part), (_, reduce) = seen
    assert grid[1] == shares and part[2].shape[0] == shares and reduce[0] is part[2]
    m, n, k_, ksteps = [a for a in part if isinstance(a, int)][:4]
    steps = -(-k // SPLIT_TILES[tile].block_k)
    assert (m, n, k_) == (70, 96, k) and (shares - 1) * ksteps < steps <= shares * ksteps
    assert [a for a in reduce if isinstance(a, int)][:4] == [70, 96, k, shares]
