"""kiln.ort on the GPU: CUDAExecutionProvider picks the CUDA device; results match the CPU engine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from onnx import TensorProto as T
from onnx import helper as h

import kiln.ort as kort

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _model() -> bytes:
    rng = np.random.default_rng(0)
    w = h.make_tensor("w", T.FLOAT, [16, 8], rng.standard_normal(128).astype(np.float32).tolist())
    nodes = [h.make_node("MatMul", ["x", "w"], ["m"]), h.make_node("Relu", ["m"], ["r"]),
             h.make_node("Softmax", ["r"], ["y"], axis=-1)]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, ["batch", "seq", 16])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["batch", "seq", 8])], initializer=[w])
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8).SerializeToString()


def test_cuda_provider_runs_on_the_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path))
    gpu = kort.InferenceSession(_model(), providers=[("CUDAExecutionProvider", {"device_id": 0}),
                                                     "CPUExecutionProvider"])
    cpu = kort.InferenceSession(_model(), providers=["CPUExecutionProvider"])
    assert gpu.device == "cuda:0" and cpu.device == "cpu"
    assert gpu.get_providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert gpu.get_provider_options()["CUDAExecutionProvider"]["device_id"] == "0"
    assert kort.get_available_providers()[0] == "CUDAExecutionProvider" and kort.get_device() == "GPU"
    rng = np.random.default_rng(1)
    for batch, seq in [(2, 5), (1, 9), (4, 40)]:
        x = rng.standard_normal((batch, seq, 16)).astype(np.float32)
        (got,) = gpu.run(None, {"x": x})
        (want,) = cpu.run(None, {"x": x})
        assert isinstance(got, np.ndarray) and got.shape == (batch, seq, 8)
        np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-3)  # TF32 matmuls on the GPU
    assert gpu.kiln_stats.builds == 2 and gpu._entries[0].engine.device.type == "cuda"
    again = kort.InferenceSession(_model(), providers=["CUDAExecutionProvider"])
    again.run(None, {"x": np.ones((2, 5, 16), np.float32)})
    assert (again.kiln_stats.builds, again.kiln_stats.disk_loads) == (0, 1)
    gpu.set_providers(["CPUExecutionProvider"])
    assert gpu.device == "cpu" and gpu.kiln_stats.builds == 2
    gpu.run(None, {"x": np.ones((2, 5, 16), np.float32)})
    assert gpu._entries[0].engine.device.type == "cpu"
