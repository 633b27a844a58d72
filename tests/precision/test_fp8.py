"""FP8 builds (`precision="fp8"`): float8 E4M3 Q/DQ with per-tensor scales on every Gemm/MatMul input, folded into
"quantized" nodes that `cuda.fp8_gemm` runs as torch's `_scaled_mm` (CPU here; cuBLASLt on sm_89+ GPUs in the GPU
test), QuantizeLinear to float8 on `triton.fp8_quantize`; refused on GPUs without FP8."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

import kiln
from kiln.build.config import ConfigError
from kiln.ir import DType
from kiln.ir.ops import OPS
from kiln.ir.ops.base import RefCtx, run_nodes
from kiln.kernels import registry
from kiln.precision.quantize import FP8_MAX, fold_quantized, fuse_requantize, quantize_graph
from tests.precision.scales import minmax_scales
from tests.precision.test_int8_gemm import _mlp

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
FP8 = DType.FLOAT8_E4M3FN


def _calib(n: int = 4) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [{"x": rng.standard_normal((32, 64)).astype(np.float32)} for _ in range(n)]


def _quantized_fp8() -> Any:
    g = _mlp()
    x = torch.from_numpy(_calib(1)[0]["x"])
    report = quantize_graph(g, minmax_scales(g, x), fp8=True)
    assert len(report.layers) == 3 and report.to_json()["fp8_layers"] == 3
    return g, x


def test_fp8_placement_uses_one_scale_per_operand_and_float8_values() -> None:
    g, _ = _quantized_fp8()
    dqs = [n for n in g.nodes if n.op == "DequantizeLinear"]
    weights = [n for n in dqs if n.inputs[0] is not None and n.inputs[0].data is not None]
    assert len(weights) == 3
    for n in weights:
        q, s = n.inputs[0], n.inputs[1]
        assert q is not None and s is not None and isinstance(q.data, torch.Tensor)
        assert q.data.dtype == torch.float8_e4m3fn and s.data.numel() == 1  # type: ignore[union-attr]
        assert float(q.data.float().abs().max()) == FP8_MAX  # the largest weight maps onto E4M3's largest value
    quants = [n for n in g.nodes if n.op == "QuantizeLinear"]
    assert quants and all(n.outputs[0].dtype is FP8 for n in quants)


def test_folded_fp8_layers_run_on_scaled_mm_like_their_reference() -> None:
    g, x = _quantized_fp8()
    assert len(fold_quantized(g)) == 3
    t = registry.get("cuda.fp8_gemm")
    values: dict[Any, Any] = {g.inputs[0]: x}
    checked = 0
    for n in g.nodes:
        args = [None if v is None else (v.data if v.data is not None else values[v]) for v in n.inputs]
        want = OPS[n.op].ref(RefCtx(n), list(args))
        if n.op == "Fused" and n.attrs["kind"] == "quantized":
            assert t.applicable(n, CPU) and not registry.get("cuda.int8_gemm").applicable(n, CPU)
            got = t.build(n, {}, CPU)(list(args))[0]
            torch.testing.assert_close(got, want[0], rtol=1e-4, atol=1e-4)  # the same float8 products, float32 sums
            checked += 1
        values.update(zip(n.outputs, want))
    assert checked == 3


def _requantized_fp8() -> tuple[Any, torch.Tensor, list[str]]:
    g, x = _quantized_fp8()
    fold_quantized(g)
    return g, x, fuse_requantize(g)


def test_fp8_layers_write_float8_for_the_next_one_with_the_same_results() -> None:
    """The QuantizeLinear to float8 after fc1 and fc2 (each the only reader of the layer's output) becomes the last
    step of that layer: its epilogue writes float8 (the generated kernel saturates and stores E4M3), no separate
    quantize pass, and the reference gives the same values bit for bit."""
    from kiln.kernels.epilogue import Anchored, steps_view
    from kiln.kernels.pointwise.codegen import build_program, epilogue_graph

    g0, x = _quantized_fp8()
    fold_quantized(g0)
    want = run_nodes(g0.nodes, {g0.inputs[0]: x})[g0.outputs[0]]
    g, _, fused = _requantized_fp8()
    assert len(fused) == 2 and not [n for n in g.nodes if n.op == "QuantizeLinear" and n.inputs[0] is not g.inputs[0]]
    got = run_nodes(g.nodes, {g.inputs[0]: x})[g.outputs[0]]
    assert torch.equal(got, want)
    layer = next(n for n in g.nodes if n.name in fused)
    assert layer.outputs[0].dtype is FP8
    body = layer.attrs["body"]
    a = Anchored(layer, body.nodes[2], [], body.nodes[3:], body)
    found = epilogue_graph(steps_view(a))  # type: ignore[arg-type]
    assert found is not None
    program = build_program(found[0])
    assert "448.0" in program.lines[-1] and found[0].outputs[0].dtype is FP8


def test_an_fp8_build_reports_its_layers_and_stays_close_to_fp32(tmp_path: Any) -> None:
    # opt_level 0: the tactics' order decides, not CPU timings (on a CPU the reference may time faster)
    e = kiln.build(_mlp(), kiln.BuilderConfig(device="cpu", precision="fp8", calibration=_calib(), opt_level=0))
    lowered = e.plan.stats["precision"]
    assert lowered["precision"] == "fp8" and lowered["fp8_layers"] == 3
    assert lowered["int8_outputs"] == 2  # fc1 and fc2 write float8 for the next layer (the name predates FP8)
    assert [c.tactic for c in e.plan.choices[0]].count("cuda.fp8_gemm") == 3
    x = np.random.default_rng(5).standard_normal((32, 64)).astype(np.float32)
    y = e.create_context().run({"x": x})["y"]
    y32 = kiln.build(_mlp(), kiln.BuilderConfig(device="cpu")).create_context().run({"x": x})["y"]
    cos = float((y * y32).sum() / np.linalg.norm(y) / np.linalg.norm(y32))
    assert cos >= 0.995, cos  # 3 layers of 3-bit mantissas, per-tensor scales
    e.save(tmp_path / "fp8.kiln")  # the float8 constants of the requantizing epilogues travel in the file
    assert np.array_equal(kiln.load(tmp_path / "fp8.kiln").create_context().run({"x": x})["y"], y)


def test_fp8_needs_calibration_and_an_fp8_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="fp8 build needs calibration data"):
        kiln.BuilderConfig(device="cpu", precision="fp8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda dev=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda dev=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ConfigError, match=r"A100-SXM4-80GB \(sm_80\) has no FP8 tensor cores") as e:
        kiln.BuilderConfig(device="cuda", precision="fp8", calibration=_calib())
    assert "--int8" in (e.value.hint or "")


def test_the_tuner_accepts_float8_results_one_code_apart() -> None:
    from kiln.tune.tuner import _one_step

    want = (torch.randn(64, 64, generator=torch.Generator().manual_seed(0)) * 10).to(torch.float8_e4m3fn)
    bits = want.view(torch.uint8).clone()
    bits[0, :8] = torch.where((bits[0, :8] & 127) < 126, bits[0, :8] + 1, bits[0, :8])  # next code, same sign
    near = bits.view(torch.float8_e4m3fn)
    assert _one_step(near, want)
    far = want.view(torch.uint8).clone()
    far[0, 0] = far[0, 0] ^ 128  # the sign flipped
    assert not (far[0, 0] & 127 <= 1) and not _one_step(far.view(torch.float8_e4m3fn), want)


def test_the_tuner_accepts_float8_codes_near_zero_within_the_accumulation_error() -> None:
    """Float8 codes crowd around zero: a value that cancels to near zero in an FP8 tensor-core GEMM (about 14
    significant bits in its sums) lands codes apart while off by 1e-5 of the range (measured on an H100: 0.03125
    where the exact result rounds to 0.0215, the largest value 384). Accepted; the same codes-apart error on a
    large value, or an error of 1 % of the range near zero, is not."""
    from kiln.tune.tuner import FLOAT8_FLOOR, _codes, _one_step

    want = (torch.randn(64, 64, generator=torch.Generator().manual_seed(0)) * 100).to(torch.float8_e4m3fn)
    top = float(want.float().abs().max())
    zero_ish = want.flatten().float().clone()
    zero_ish[0] = 0.0215 * top / 384
    ref = zero_ish.to(torch.float8_e4m3fn).reshape(64, 64)
    got = ref.float().flatten().clone()
    got[0] = 0.03125 * top / 384
    got8 = got.to(torch.float8_e4m3fn).reshape(64, 64)
    assert int((_codes(got8) - _codes(ref)).abs().max()) >= 4 and _one_step(got8, ref)
    far = ref.float().flatten().clone()
    i = int(far.abs().argmax())
    far[i] = far[i] * 0.7  # a few codes off on a large value
    assert not _one_step(far.to(torch.float8_e4m3fn).reshape(64, 64), ref)
    off = ref.float().flatten().clone()
    off[0] = 0.01 * top  # near zero, but 1 % of the range away
    assert 4 * FLOAT8_FLOOR < 0.01 and not _one_step(off.to(torch.float8_e4m3fn).reshape(64, 64), ref)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.int8], ids=str)
def test_the_tuner_accepts_8bit_results_as_close_to_float32_as_the_reference(dtype: torch.dtype) -> None:
    """An FP16 build's reference rounds to float16 before quantizing; a kernel rounding elsewhere flips other codes.
    Judged against the layer computed in float32: as close as the reference (one step, at most twice as often plus
    1 %) passes; a wrong kernel (6 % off, or two steps) does not."""
    from kiln.tune.tuner import _codes, _codes_as_accurate, _one_step

    gen = torch.Generator().manual_seed(1)
    wide = (torch.randn(100, 100, generator=gen) * 20).to(dtype)
    if dtype == torch.int8:
        wide = (torch.randn(100, 100, generator=gen) * 30).round().clamp(-120, 120).to(dtype)

    def moved(t: torch.Tensor, share: float, step: int = 1, seed: int = 2) -> torch.Tensor:
        pick = torch.rand(t.shape, generator=torch.Generator().manual_seed(seed)) < share
        if t.dtype == torch.int8:
            return torch.where(pick, t.int() + step, t.int()).to(t.dtype)
        bits = t.view(torch.uint8).int()
        nudged = torch.where((bits & 127) < 120, bits + step, bits)  # the next larger magnitude, same sign
        return torch.where(pick, nudged, bits).to(torch.uint8).view(torch.float8_e4m3fn)

    ref = moved(wide, 0.015, seed=3)
    good = moved(wide, 0.02, seed=4)
    assert not _one_step(good, ref) and _codes_as_accurate(good, ref, wide)
    assert not _codes_as_accurate(moved(wide, 0.06, seed=5), ref, wide)
    assert not _codes_as_accurate(moved(wide, 0.01, step=2, seed=6), ref, wide)
    assert int((_codes(good) - _codes(wide)).abs().max()) == 1
    if dtype == torch.float8_e4m3fn:  # an FP8 tensor-core GEMM's own sums flip 1-2 % of the codes (H100, K=768)
        fp8_sums = moved(wide, 0.016, seed=7)
        assert _codes_as_accurate(fp8_sums, moved(wide, 0.0018, seed=8), wide)
        assert not _codes_as_accurate(moved(wide, 0.03, seed=9), moved(wide, 0.0018, seed=8), wide)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs an FP8 GPU (sm_89+)")
def test_fp8_on_the_gpu() -> None:
    """cuBLASLt's FP8 GEMM and the float8 quantize kernel against the references, then a whole FP16+FP8 build."""
    g, x = _quantized_fp8()
    fold_quantized(g)
    values: dict[Any, Any] = {g.inputs[0]: x}
    gemms = quants = 0
    for n in g.nodes:
        args = [None if v is None else (v.data if v.data is not None else values[v]) for v in n.inputs]
        want = OPS[n.op].ref(RefCtx(n), list(args))
        cuda_args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
        if n.op == "Fused" and n.attrs["kind"] == "quantized":
            got = registry.get("cuda.fp8_gemm").build(n, {}, CUDA)(cuda_args)[0]
            torch.testing.assert_close(got.cpu(), want[0], rtol=1e-3, atol=1e-3)
            gemms += 1
        if n.op == "QuantizeLinear":
            t = registry.get("triton.fp8_quantize")
            assert t.applicable(n, CUDA)
            got = t.build(n, {}, CUDA)(cuda_args)[0]
            assert torch.equal(got.cpu().view(torch.uint8), want[0].view(torch.uint8))  # RNE + saturation, exactly
            quants += 1
        values.update(zip(n.outputs, want))
    assert gemms == 3 and quants >= 1
    from kiln.tune.tuner import _one_step

    g, x, fused = _requantized_fp8()  # fc1 and fc2 write float8 from their generated epilogue
    values = {g.inputs[0]: x}
    written = 0
    for n in g.nodes:
        args = [None if v is None else (v.data if v.data is not None else values[v]) for v in n.inputs]
        want = OPS[n.op].ref(RefCtx(n), list(args))
        if n.name in fused:
            cuda_args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
            got = registry.get("cuda.fp8_gemm").build(n, {}, CUDA)(cuda_args)[0].cpu()
            assert got.dtype == torch.float8_e4m3fn and _one_step(got, want[0])  # a float16 GEMM rounding apart
            written += 1
        values.update(zip(n.outputs, want))
    assert written == 2
    e = kiln.build(_mlp(), kiln.BuilderConfig(device="cuda", precision="fp8", calibration=_calib()))
    tactics = [c.tactic for c in e.plan.choices[0]]
    assert sum(t in ("cuda.fp8_gemm", "triton.fp8_gemm") for t in tactics) == 3, tactics
    y = e.create_context().run({"x": _calib(1)[0]["x"]})["y"]
    assert np.isfinite(y).all()


def test_the_accuracy_gate_keeps_fp8_layers_float_until_the_target_holds() -> None:
    held = [{"x": np.random.default_rng(9).standard_normal((32, 64)).astype(np.float32)}]
    e = kiln.build(_mlp(), kiln.BuilderConfig(device="cpu", precision="fp8", calibration=_calib(),
                                              accuracy_check=held, accuracy_target="cosine>=0.99995"))
    q = e.plan.stats["precision"]
    acc = q["accuracy"]
    assert acc["met"] is True and acc["metrics"]["cosine"] >= 0.99995
    assert acc["kept_float"] and q["fp8_layers"] == 3 - len(acc["kept_float"])


def test_fp8_convs_get_per_channel_float8_weights_and_fold_into_one_layer() -> None:
    """--fp8 quantizes convs too: the activation per tensor, the weight per output channel (amax_c / 448, what
    the conv template scales per channel); grouped convs stay float. Each conv is then one "quantized" layer."""
    from kiln.ir import Graph, TensorType

    gen = torch.Generator().manual_seed(0)
    g = Graph()
    x = g.add_input("x", TensorType(DType.FLOAT32, (2, 8, 6, 6)))
    conv = {"strides": (1, 1), "pads": (1, 1, 1, 1), "dilations": (1, 1)}
    w = torch.randn(16, 8, 3, 3, generator=gen) * torch.linspace(0.1, 2.0, 16).reshape(16, 1, 1, 1)
    (h,) = g.add("Conv", [x, g.add_initializer("w1", w)], conv, name="c1")
    (h,) = g.add("Relu", [h], name="r1")
    dw = g.add_initializer("w2", torch.randn(16, 1, 3, 3, generator=gen))
    (y,) = g.add("Conv", [h, dw], {**conv, "group": 16}, name="depthwise")
    g.outputs.append(y)
    xv = torch.randn(2, 8, 6, 6, generator=gen)
    report = quantize_graph(g, minmax_scales(g, xv), fp8=True)
    assert report.layers == ["c1"] and "grouped" in report.float_layers["depthwise"]
    dq = next(n for n in g.nodes if n.op == "DequantizeLinear" and n.inputs[0] is not None
              and isinstance(n.inputs[0].data, torch.Tensor))
    q, s = dq.inputs[0].data, dq.inputs[1].data  # type: ignore[union-attr]
    assert q.dtype == torch.float8_e4m3fn and s.shape == (16,) and dq.attrs["axis"] == 0
    assert torch.allclose(q.float().abs().amax(dim=(1, 2, 3)), torch.full((16,), FP8_MAX))  # each channel's top
    assert fold_quantized(g) == ["c1"]
    layer = next(n for n in g.nodes if n.name == "c1")
    assert layer.op == "Fused" and layer.attrs["kind"] == "quantized" and layer.inputs[0].dtype is FP8  # type: ignore[union-attr]
