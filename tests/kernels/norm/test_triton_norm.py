"""The Triton norm tactics: which nodes they take (no kernel runs), that they load without triton, and their
results against the op table's reference under Triton's CPU interpreter (in worker processes, see interp_cases)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from kiln.ir import DType
from kiln.kernels import registry
from kiln.kernels.norm import common
from tests.kernels.interpreted import run_workers
from tests.kernels.norm.interp_cases import C, all_cases, node_of

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
GROUPS = ("softmax", "layernorm", "groupnorm")
CUDA, CPU = torch.device("cuda"), torch.device("cpu")


def r(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype)


def takes(tactic: str, op: str, inputs: list[Any], n_out: int = 1, **attrs: Any) -> bool:
    node, _ = node_of(op, inputs, n_out, attrs)
    return registry.get(tactic).applicable(node, CUDA)


# --- applicability ---------------------------------------------------------------------------------------------


def test_cuda_only_and_below_the_reference() -> None:
    node, _ = node_of("Softmax", [r(4, 8)], 1, {})
    t = registry.get("triton.softmax")
    assert t.applicable(node, CUDA) and not t.applicable(node, CPU)
    assert t in registry.candidates(node, CUDA) and t not in registry.candidates(node, CPU)
    for name in ("triton.softmax", "triton.layernorm", "triton.rmsnorm", "triton.groupnorm"):
        tactic = registry.get(name)
        assert tactic.devices == frozenset({"cuda"}) and tactic.priority < 1000
        assert len(tactic.configs()) > 1 and all(set(c) == {"tile", "per_thread", "max_row"} for c in tactic.configs())


def test_softmax_takes_the_last_axis_of_float_tensors() -> None:
    for op in ("Softmax", "LogSoftmax"):
        assert takes("triton.softmax", op, [r(2, 3, 5)], axis=-1)
        assert takes("triton.softmax", op, [r(2, 3, 5)], axis=2)
        assert takes("triton.softmax", op, [r(5)], axis=0)
        assert takes("triton.softmax", op, [r(2, 5, dtype=torch.float16)])
        assert takes("triton.softmax", op, [r(2, 5, dtype=torch.bfloat16)])
        assert not takes("triton.softmax", op, [r(2, 3, 5)], axis=1)
        assert not takes("triton.softmax", op, [r(2, 3, 5)], axis=-2)
        assert not takes("triton.softmax", op, [r(2, 3, 5)], axis=0)
        assert not takes("triton.softmax", op, [r(2, 5, dtype=torch.float64)])


def test_layernorm_rules() -> None:
    f16 = torch.float16
    assert takes("triton.layernorm", "LayerNormalization", [r(4, 6), C(r(6)), C(r(6))])
    assert takes("triton.layernorm", "LayerNormalization", [r(4, 6), C(r(6)), None])
    assert takes("triton.layernorm", "LayerNormalization", [r(4, 6), r(6), r(6)], n_out=3)
    assert takes("triton.layernorm", "LayerNormalization", [r(2, 4, 6), C(r(4, 6)), C(r(1, 4, 6))], axis=1)
    assert takes("triton.layernorm", "LayerNormalization", [r(2, 4, 6), C(r(2, 4, 6))], axis=0)
    assert takes("triton.layernorm", "LayerNormalization", [r(2, 4, 6), C(r(4, 6))], axis=-2)
    assert takes("triton.layernorm", "LayerNormalization", [r(4, 6, dtype=f16), C(r(6, dtype=f16))])
    assert takes("triton.layernorm", "LayerNormalization", [r(4, 6, dtype=f16), C(r(6))])
    # broadcast Scale / B (not the normalized shape), unsupported stash types and dtypes
    assert not takes("triton.layernorm", "LayerNormalization", [r(4, 6), C(r(1))])
    assert not takes("triton.layernorm", "LayerNormalization", [r(2, 4, 6), C(r(6))], axis=1)
    assert not takes("triton.layernorm", "LayerNormalization", [r(4, 6), C(r(6)), C(r(1))])
    assert not takes("triton.layernorm", "LayerNormalization", [r(4, 6), C(r(6))], stash_type=DType.FLOAT64)
    assert not takes("triton.layernorm", "LayerNormalization", [r(4, 6, dtype=f16), C(r(6, dtype=f16))],
                     stash_type=DType.FLOAT16)
    assert not takes("triton.layernorm", "LayerNormalization", [r(4, 6, dtype=torch.float64), C(r(6))])
    assert not takes("triton.layernorm", "RMSNormalization", [r(4, 6), C(r(6))])


def test_layernorm_needs_a_static_normalized_shape() -> None:
    from kiln.ir import Graph, TensorType

    def with_x_shape(dims: tuple[Any, ...]) -> bool:
        g = Graph()
        x = g.add_input("x", TensorType(DType.FLOAT32, dims))
        g.add("LayerNormalization", [x, g.add_initializer("w", r(6))], {})
        return registry.get("triton.layernorm").applicable(g.nodes[-1], CUDA)

    assert with_x_shape(("batch", 6))
    assert not with_x_shape(("batch", "hidden"))


def test_rmsnorm_rules() -> None:
    assert takes("triton.rmsnorm", "RMSNormalization", [r(4, 6), C(r(6))])
    assert takes("triton.rmsnorm", "RMSNormalization", [r(4, 6), C(r(6, dtype=torch.float16))])
    assert takes("triton.rmsnorm", "RMSNormalization", [r(3, 4, 6), C(r(4, 6))], axis=1)
    assert not takes("triton.rmsnorm", "RMSNormalization", [r(3, 4, 6), C(r(6))], axis=1)
    assert not takes("triton.rmsnorm", "RMSNormalization", [r(4, 6), C(r(6))], stash_type=DType.FLOAT64)
    assert not takes("triton.rmsnorm", "RMSNormalization", [r(4, 6), C(r(6, dtype=torch.float64))])


def test_groupnorm_rules() -> None:
    assert takes("triton.groupnorm", "GroupNormalization", [r(2, 4, 5, 5), C(r(4)), C(r(4))], num_groups=2)
    assert takes("triton.groupnorm", "GroupNormalization", [r(2, 4), C(r(4)), C(r(4))], num_groups=4)
    assert takes("triton.groupnorm", "InstanceNormalization", [r(2, 4, 5), C(r(4)), C(r(4))])
    assert takes("triton.groupnorm", "InstanceNormalization",
                 [r(2, 4, 5, dtype=torch.float16), C(r(4, dtype=torch.float16)), C(r(4, dtype=torch.float16))])
    assert not takes("triton.groupnorm", "GroupNormalization", [r(2, 4, 5), C(r(4)), C(r(4))], num_groups=2,
                     stash_type=DType.FLOAT64)
    assert not takes("triton.groupnorm", "InstanceNormalization",
                     [r(2, 4, 5, dtype=torch.float64), C(r(4, dtype=torch.float64)), C(r(4, dtype=torch.float64))])


def test_nothing_applies_without_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common, "triton_available", lambda: False)
    node, _ = node_of("Softmax", [r(4, 8)], 1, {})
    assert not registry.get("triton.softmax").applicable(node, CUDA)


def test_loads_without_triton() -> None:
    """With triton impossible to import, the tactics still register (and apply to nothing); with triton present,
    registering and checking them imports no triton (it is loaded when a kernel is built)."""
    code = (
        "import sys, torch\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'triton' or name.startswith('triton.'):\n"
        "            raise ModuleNotFoundError(name)\n"
        "if sys.argv[1] == 'block':\n"
        "    sys.meta_path.insert(0, Block())\n"
        "from kiln.ir import DType, Graph, TensorType\n"
        "from kiln.kernels import registry\n"
        "g = Graph()\n"
        "x = g.add_input('x', TensorType(DType.FLOAT32, (4, 8)))\n"
        "g.add('Softmax', [x], {})\n"
        "names = [t.name for t in registry.candidates(g.nodes[-1], torch.device('cuda'))]\n"
        "assert registry.get('triton.softmax') is not None\n"
        "print(int('triton.softmax' in names), int('triton' in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    blocked = subprocess.run([sys.executable, "-c", code, "block"], env=env, capture_output=True, text=True,
                             timeout=120)
    assert blocked.returncode == 0, blocked.stderr
    assert blocked.stdout.split() == ["0", "0"]
    if common.triton_available():
        present = subprocess.run([sys.executable, "-c", code, "allow"], env=env, capture_output=True, text=True,
                                 timeout=120)
        assert present.returncode == 0, present.stderr
        assert present.stdout.split() == ["1", "0"]


# --- against the reference, under the interpreter ----------------------------------------------------------------


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every case's result, from one worker process per group (run side by side)."""
    pytest.importorskip("triton")
    workers = {g: [str(HERE / "interp_cases.py"), g] for g in GROUPS}
    results, ended = run_workers(workers, tmp_path_factory.mktemp("interp"), key="id")
    for g, e in ended.items():
        results[f"<{g}>"] = {"returncode": e["returncode"], "stderr": e["log"]}
    return results


CASES = all_cases()


def test_case_ids_are_unique() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_reference(interpreted: dict[str, Any], case: Any) -> None:
    worker = interpreted[f"<{case.group}>"]
    rec = interpreted.get(case.id)
    if rec is None or rec["status"] == "started":
        where = "in this case" if rec else "before this case"
        pytest.fail(f"the {case.group} worker died {where} (exit {worker['returncode']}):\n{worker['stderr']}")
    assert rec["status"] == "passed", rec.get("message")
