"""Every op reference is device-agnostic: the ONNX backend suite (and a few graphs it does not cover) through the
reference executor on an emulated CUDA device (`tests/gpu/fake_device.py`), on the CPU.

The emulator fails where CUDA fails on a device mix (CPU helper tensors, numpy conversions of device tensors,
integer matmuls) and reproduces two CUDA numeric habits (division by a CPU scalar as a multiplication by its
reciprocal, TF32 convolutions), so these bugs are caught without a GPU. Other differences between CUDA and CPU
kernels are the GPU tier's business (`tests/gpu/test_conformance_cuda.py`).
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import onnx.backend.test
import pytest
import torch
from onnx import TensorProto, helper

from kiln.frontend.onnx import import_model
from kiln.ir import DType, Graph, TensorType
from kiln.ir.interpreter import Interpreter
from tests.conformance.backend import KilnBackend, KilnRep
from tests.conformance.expected_failures import EXPECTED_FAILURES
from tests.gpu.fake_device import FakeCuda

os.environ["ONNX_HOME"] = tempfile.mkdtemp(prefix="kiln-onnx-home-fake-")

# Cases that fail under the emulator only (in addition to the CPU list), with the reason.
FAKE_DEVICE_EXPECTED_FAILURES: dict[str, str] = {}


class FakeCudaRep(KilnRep):
    def run(self, inputs: Any, **kwargs: Any) -> tuple[Any, ...]:
        with FakeCuda():
            return super().run(inputs, **kwargs)


class FakeCudaBackend(KilnBackend):
    @classmethod
    def prepare(cls, model: onnx.ModelProto, device: str = "CPU", **kwargs: Any) -> KilnRep:
        return FakeCudaRep(Interpreter(import_model(model), device="cuda"))


np.random.seed(0)  # the node cases draw their inputs from numpy's global generator (see test_onnx_backend.py)
backend_test = onnx.backend.test.BackendTest(FakeCudaBackend, __name__)
for pattern in {**EXPECTED_FAILURES, **FAKE_DEVICE_EXPECTED_FAILURES}:
    backend_test.xfail(f"^{pattern}_cpu$")
_cases = backend_test.test_cases
for _case in _cases.values():
    for _name in [n for n in vars(_case) if n.endswith("_cuda")]:
        delattr(_case, _name)
del _case
globals().update(_cases)


# --- graphs the suite does not cover: the emulated device gives the CPU's result, bit for bit ---------------

F, I32, I64, U64 = TensorProto.FLOAT, TensorProto.INT32, TensorProto.INT64, TensorProto.UINT64


def _vi(name: str, elem: int, shape: list[Any] | None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def _model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto], outputs: list[str],
           opset: int = 21, inits: list[onnx.TensorProto] | None = None) -> Graph:
    g = helper.make_graph(nodes, "g", inputs, [_vi(o, 0, None) for o in outputs], initializer=inits or [])
    return import_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)]))


def _one(op: str, ins: list[tuple[str, int, np.ndarray]], n_out: int = 1, opset: int = 21,
         **attrs: Any) -> tuple[Graph, dict[str, Any]]:
    outs = [f"y{i}" for i in range(n_out)]
    node = helper.make_node(op, [n for n, _, _ in ins], outs, **attrs)
    g = _model([node], [_vi(n, e, list(a.shape)) for n, e, a in ins], outs, opset)
    return g, {n: a for n, _, a in ins}


def _loop() -> tuple[Graph, dict[str, Any]]:
    """A Loop whose body concatenates its iteration count (a 0-d input it makes 1-d) to a carried vector."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["c"], ["c_out"]),
         helper.make_node("Cast", ["i"], ["f"], to=F),
         helper.make_node("Unsqueeze", ["f", "axes"], ["u"]),
         helper.make_node("Concat", ["acc", "u"], ["acc_out"], axis=0),
         helper.make_node("Identity", ["u"], ["scan"])],
        "body", [_vi("i", I64, []), _vi("c", TensorProto.BOOL, []), _vi("acc", F, None)],
        [_vi("c_out", TensorProto.BOOL, []), _vi("acc_out", F, None), _vi("scan", F, None)],
        initializer=[helper.make_tensor("axes", I64, [1], [0])])
    node = helper.make_node("Loop", ["M", "", "acc0"], ["acc", "scans"], body=body)
    g = _model([node], [_vi("M", I64, []), _vi("acc0", F, [1])], ["acc", "scans"])
    return g, {"M": np.array(3), "acc0": np.array([-1.0], np.float32)}


def _bitcast(x: np.ndarray, src: DType, to: DType) -> tuple[Graph, dict[str, Any]]:
    g = Graph()
    v = g.add_input("x", TensorType(src, x.shape))
    g.outputs += g.add("BitCast", [v], {"to": to})
    return g, {"x": x}


def _extra_cases() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    f32 = rng.standard_normal((2, 3, 6, 6)).astype(np.float32)
    big = np.array([0, 7, 2**63, 2**64 - 1, 12345678901234567890, 5], np.uint64)
    div = np.array([3, 2**63 + 1, 7, 2**32, 10, 2**64 - 1], np.uint64)
    ints = rng.integers(-100, 100, (3, 4)).astype(np.int32)
    wide = rng.integers(-(2**40), 2**40, (2, 3)).astype(np.int64)
    odd = np.array([0.1, -3.3, 500.0, -1e9, np.inf, np.nan, 1e-9, -0.0], np.float32)
    probs = np.array([[0.1, 0.9, 0.5], [0.0, 1.0, 0.25]], np.float32)
    rois = np.array([[0, 0, 0, 3, 3], [1, 1, 1, 5, 4]], np.float32)
    return {
        "MaxRoiPool": lambda: _one("MaxRoiPool", [("x", F, f32), ("rois", F, rois)], pooled_shape=[2, 2],
                                   spatial_scale=1.0),
        "Shrink_int": lambda: _one("Shrink", [("x", I32, ints)], bias=1.5, lambd=20.0),
        "Div_uint64": lambda: _one("Div", [("a", U64, big), ("b", U64, div)]),
        "Mod_uint64": lambda: _one("Mod", [("a", U64, big), ("b", U64, div)]),
        "MatMul_int32": lambda: _one("MatMul", [("a", I32, ints), ("b", I32, ints.T.copy())]),
        "MatMul_int64_wraps": lambda: _one("MatMul", [("a", I64, wide), ("b", I64, wide.T.copy() * 2**20)]),
        "Gemm_int32": lambda: _one("Gemm", [("a", I32, ints), ("b", I32, ints), ("c", I32, ints[:, :1].copy())],
                                   transB=1, alpha=2.0),
        "Einsum_int64": lambda: _one("Einsum", [("a", I64, wide), ("b", I64, wide)], equation="ij,kj->ik"),
        "Cast_float8_no_saturate": lambda: _one("Cast", [("x", F, odd)], to=TensorProto.FLOAT8E4M3FN,
                                                saturate=0),
        "Cast_float4": lambda: _one("Cast", [("x", F, odd)], opset=23, to=TensorProto.FLOAT4E2M1),
        "QuantizeLinear_float8": lambda: (_model(
            [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y0"])], [_vi("x", F, [8])], ["y0"],
            inits=[helper.make_tensor("s", F, [], [0.5]), helper.make_tensor("z", TensorProto.FLOAT8E5M2, [], [0])]),
            {"x": odd}),
        "BitCast_e8m0": lambda: _bitcast(np.array([0, 1, 127, 254, 255], np.uint8), DType.UINT8, DType.FLOAT8_E8M0),
        "BitCast_float4": lambda: _bitcast(np.array([0, 0.5, 6, -0.0, -1.5], ml_dtypes.float4_e2m1fn),
                                           DType.FLOAT4_E2M1, DType.UINT4),
        "BitCast_to_float4": lambda: _bitcast(np.arange(16, dtype=np.uint8).astype(ml_dtypes.uint4), DType.UINT4,
                                              DType.FLOAT4_E2M1),
        "RandomUniformLike_seeded": lambda: _one("RandomUniformLike", [("x", F, f32)], seed=3.0),
        "RandomNormal_seeded": lambda: (_model([helper.make_node("RandomNormal", [], ["y0"], shape=[4], seed=2.0)],
                                               [], ["y0"]), {}),
        "Bernoulli_seeded": lambda: _one("Bernoulli", [("p", F, probs)], seed=5.0),
        "Multinomial_seeded": lambda: _one("Multinomial", [("x", F, probs)], sample_size=6, seed=1.0),
        "Dropout_seeded": lambda: _one("Dropout", [("x", F, f32), ("r", F, np.array(0.3, np.float32)),
                                                   ("t", TensorProto.BOOL, np.array(True))], n_out=2, seed=7),
        "Loop_counter": _loop,
        "Gather_strings": lambda: _one("Gather", [("s", TensorProto.STRING, np.array(["a", "bb", "c"], object)),
                                                  ("i", I64, np.array([2, 0, 2]))]),
    }


EXTRA = _extra_cases()


@pytest.mark.parametrize("case", sorted(EXTRA))
def test_the_emulated_device_gives_the_cpu_result(case: str) -> None:
    g, feeds = EXTRA[case]()
    want = Interpreter(g).run(feeds)
    with FakeCuda():
        got = Interpreter(g, device="cuda").run(feeds)
    for name in want:
        w, o = np.asarray(want[name]), np.asarray(got[name])
        assert w.dtype == o.dtype and w.shape == o.shape, name
        if w.dtype == object:
            assert w.tolist() == o.tolist(), name
        else:  # bit for bit (NaN payloads and signed zeros included)
            np.testing.assert_array_equal(w.view(np.uint8), o.view(np.uint8), err_msg=name)


# --- the emulator itself --------------------------------------------------------------------------------------


def test_the_emulator_refuses_what_cuda_refuses() -> None:
    with FakeCuda():
        x = torch.ones(3).cuda()
        assert x.device == torch.device("cuda", 0) and x.is_cuda
        assert torch.zeros(3, device=x.device).is_cuda and torch.ones(2).to(x.device).is_cuda
        assert not x.cpu().is_cuda and (x + torch.tensor(2.0)).is_cuda  # a 0-d CPU tensor mixes
        assert x[torch.tensor([0, 2])].is_cuda  # CPU indices may index a device tensor
        for bad in (lambda: x + torch.ones(3), lambda: torch.cat([x, torch.ones(1)]), lambda: x.numpy(),
                    lambda: np.asarray(x), lambda: torch.ones(3)[x.long()],
                    lambda: x.long() @ x.long()):
            with pytest.raises((RuntimeError, TypeError)):
                bad()


def test_the_emulator_divides_by_cpu_scalars_as_cuda_does() -> None:
    x = torch.tensor([-2.5], dtype=torch.float32)
    scale = torch.tensor(5 / 255, dtype=torch.float32)
    with FakeCuda():
        by_reciprocal = (x.cuda() / scale).cpu()
        exact = (x.cuda() / scale.cuda()).cpu()
    assert exact == x / scale and by_reciprocal == x * (1 / scale)
    assert by_reciprocal != exact  # -127.5 vs -127.49999: the two round differently to integers


def test_the_emulator_rounds_convolutions_to_tf32() -> None:
    x, w = torch.full((1, 1, 1), 1 + 2.0**-20), torch.ones(1, 1, 1)
    prev = torch.backends.cudnn.allow_tf32
    try:
        with FakeCuda():
            torch.backends.cudnn.allow_tf32 = True
            assert float(torch.nn.functional.conv1d(x.cuda(), w.cuda()).cpu()) == 1.0
            torch.backends.cudnn.allow_tf32 = False
            assert float(torch.nn.functional.conv1d(x.cuda(), w.cuda()).cpu()) == 1 + 2.0**-20
    finally:
        torch.backends.cudnn.allow_tf32 = prev
