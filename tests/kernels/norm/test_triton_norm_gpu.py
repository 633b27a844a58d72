"""The Triton norm tactics on a real GPU at model shapes, against the op table's reference (run with
`make gpu-test`; skipped without CUDA). Every config of the space is compiled and checked at one shape."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kiln.ir.ops import get_op
from kiln.ir.ops.base import RefCtx
from kiln.kernels import registry
from tests.kernels.norm.bench_norm import close, time_ms, workloads
from tests.kernels.norm.interp_cases import C, node_of

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
CUDA = torch.device("cuda")
WORKLOADS = {w.name: w for w in workloads()}


def _check(tactic: str, op: str, inputs: list[Any], attrs: dict[str, Any], configs: list[dict[str, Any]],
           exact_min: float = 0.98) -> None:
    node, args = node_of(op, inputs, 1, attrs)
    t = registry.get(tactic)
    assert t.applicable(node, CUDA) and t in registry.candidates(node, CUDA)
    want = get_op(op).ref(RefCtx(node), list(args))[0]
    for cfg in configs:
        got = t.build(node, cfg, CUDA)(list(args))[0]
        assert got.dtype == want.dtype and got.shape == want.shape
        ok, exact = close(got, want)
        assert ok, f"{tactic} differs from the reference beyond the tuner's tolerance under {cfg}"
        if want.dtype != torch.float32:
            # the kernels round where the reference rounds: half results agree almost everywhere
            assert exact >= exact_min, f"only {exact:.4f} of {tactic}'s results match the reference exactly ({cfg})"


@pytest.mark.parametrize("name", [
    "layernorm BERT [16384,768] fp16", "layernorm [16384,768] fp32", "rmsnorm [8192,4096] bf16",
    "softmax BERT [128,12,128,128] fp16", "logsoftmax vocab [1024,50257] fp16", "softmax vocab [1024,50257] fp32",
    "groupnorm SD [2,320,64,64] g32 fp16", "groupnorm VAE [1,512,256,256] g32 fp16",
    "instancenorm [8,64,128,128] fp32",
])
def test_model_shapes(name: str) -> None:
    w = WORKLOADS[name]
    t = registry.get(w.tactic)
    _check(w.tactic, w.op, w.inputs(), w.attrs, t.configs()[:1])


def _rand(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(shape, device=CUDA).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_every_config_compiles_and_matches(dtype: torch.dtype) -> None:
    x = _rand(37, 20000, dtype=dtype)
    x[3, ::7] = float("-inf")
    x[4, :] = float("-inf")
    x[5, 11] = float("nan")
    x[7, 2999] = float("inf")
    for op in ("Softmax", "LogSoftmax"):
        for n in (20000, 3000, 100):
            # a row's total is rounded to the type as the reference rounds it, but summed in another order (and,
            # streamed, unrounded between chunks) with the GPU's exp(): now and then a whole row's total rounds the
            # other way, one unit in the last place (within the tuner's tolerance); one row of 37 is 2.7 %
            _check("triton.softmax", op, [x[:, :n].contiguous()], {}, registry.get("triton.softmax").configs(), 0.9)
    for n in (20000, 1000):
        ln = [_rand(37, n, dtype=dtype), C(_rand(n, dtype=dtype)), C(_rand(n, dtype=dtype))]
        _check("triton.layernorm", "LayerNormalization", ln, {}, registry.get("triton.layernorm").configs())
        _check("triton.rmsnorm", "RMSNormalization", ln[:2], {}, registry.get("triton.rmsnorm").configs())
    for spatial in (4096, 33):
        gn = [_rand(2, 64, spatial, dtype=dtype), C(_rand(64, dtype=dtype)), C(_rand(64, dtype=dtype))]
        _check("triton.groupnorm", "GroupNormalization", gn, {"num_groups": 8},
               registry.get("triton.groupnorm").configs())
        _check("triton.groupnorm", "InstanceNormalization", gn, {}, registry.get("triton.groupnorm").configs())


@pytest.mark.parametrize("name", ["layernorm BERT [16384,768] fp16", "softmax BERT [128,12,128,128] fp16",
                                  "rmsnorm [8192,4096] bf16", "groupnorm SD [2,320,64,64] g32 fp16"])
@pytest.mark.timed
def test_as_fast_as_eager(name: str) -> None:
    """The default config is no slower than PyTorch's own fused kernel (with a 25% margin for noise)."""
    w = WORKLOADS[name]
    node, args = node_of(w.op, w.inputs(), 1, w.attrs)
    t = registry.get(w.tactic)
    kernel = t.build(node, t.configs()[0], CUDA)
    sets = [args, [args[0].clone(), *args[1:]], [args[0].clone(), *args[1:]]]
    ours, eager = time_ms(kernel, sets), time_ms(w.eager, sets)
    assert ours <= 1.25 * eager, f"{name}: {ours * 1e3:.1f} us against eager {eager * 1e3:.1f} us"


@pytest.mark.big_gpu_memory
@pytest.mark.parametrize("op", ["Softmax", "LayerNormalization", "GroupNormalization"])
def test_offsets_past_2_to_the_31(op: str) -> None:
    """More than 2**31 elements (4.3 GB of float16): the last rows are right (checked on a slice, since rows and
    instances are independent)."""
    h = torch.float16
    if op == "GroupNormalization":
        x = _rand(2, 64, (1 << 24) + 1, dtype=h)
        inputs: list[Any] = [x, C(_rand(64, dtype=h)), C(_rand(64, dtype=h))]
        attrs: dict[str, Any] = {"num_groups": 4}
    else:
        x = _rand((1 << 21) + 3, 1024, dtype=h)
        inputs = [x] if op == "Softmax" else [x, C(_rand(1024, dtype=h)), C(_rand(1024, dtype=h))]
        attrs = {}
    assert x.numel() > 2**31
    tactic = "triton.softmax" if op == "Softmax" else "triton.layernorm" if op == "LayerNormalization" \
        else "triton.groupnorm"
    node, args = node_of(op, inputs, 1, attrs)
    t = registry.get(tactic)
    got = t.build(node, t.configs()[0], CUDA)(list(args))[0][-1:]
    tail = [args[0][-1:], *args[1:]]
    want = get_op(op).ref(RefCtx(node), tail)[0]
    assert close(got, want)[0]


@pytest.mark.parametrize("name", ["ln-f16-int8-keep-y", "ln-f16-uint8-zero128-looped", "rms-f32-int8-keep-y",
                                  "ln-f16-fp8-keep-y", "ln-f32-fp8-only-q-looped"])
def test_norm_quantize_on_cuda(name: str) -> None:
    """`triton.norm_quantize` (fused and separate) against the "quantizing" node's reference; float8 only here (the
    interpreter's float8 conversion is wrong)."""
    from tests.kernels.norm import quantize_cases

    if "fp8" in name and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 needs sm_89+")
    problems = quantize_cases.run_case(name, "cuda")
    assert len(problems) == 4 and all(p is None for p in problems.values()), problems
