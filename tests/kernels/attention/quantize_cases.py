"""`triton.flash_attention_quantize` cases: an Attention whose output a per-tensor QuantizeLinear reads, fused by
`fuse_output_quantize` into one "quantizing" node, against that node's reference - judged as the tuner judges a
candidate (a float16 reference rounds its scores and softmax, so the kernel's codes are measured against the layer
computed from float32-widened inputs too). Shared by the interpreter test (CPU; int8/uint8: the interpreter's
float8 conversion is wrong) and the GPU tier (float8 too)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from kiln.ir import DType, Graph, TensorType
from kiln.ir.graph import Node
from tests.kernels.quantizing import quantized_output, run


def attention_quantize(b: int, s: int, h: int, d: int, dt: torch.dtype, out: DType, *, keep_y: bool = True,
                       mask: bool = False, zero: int = 0, seed: int = 4) -> tuple[Node, list[Any]]:
    """The fused node of Attention(Q, K, V[, key-padding mask]) on packed [b, s, h*d] inputs -> QuantizeLinear
    (the output also a graph output when `keep_y`) and its inputs."""
    gen = torch.Generator().manual_seed(seed)
    g = Graph()
    names = ("q", "k", "v")
    ins = [g.add_input(n, TensorType(DType.from_torch(dt), (b, s, h * d))) for n in names]
    data = [torch.randn(b, s, h * d, generator=gen).to(dt) for _ in names]
    if mask:
        ins.append(g.add_input("mask", TensorType(DType.from_torch(dt), (b, 1, 1, s))))
        m = torch.zeros(b, 1, 1, s)
        m[0, ..., s - s // 3:] = -65504.0  # the last third of the first sequence is padding
        data.append(m.to(dt))
    (y,) = g.add("Attention", ins, {"q_num_heads": h, "kv_num_heads": h}, name="att", outputs=1)
    node = quantized_output(g, y, dt, out, 1.5, zero=zero, keep_y=keep_y)  # |y| mostly below ~1.5
    feeds = dict(zip(ins, data))
    return node, [feeds.get(v, v.data) for v in node.inputs]  # type: ignore[union-attr]


CASES: dict[str, Callable[[], tuple[Node, list[Any]]]] = {
    "f32-int8-keep-y": lambda: attention_quantize(2, 40, 2, 32, torch.float32, DType.INT8),
    "f16-int8-mask-only-q": lambda: attention_quantize(2, 33, 2, 64, torch.float16, DType.INT8, mask=True,
                                                       keep_y=False),
    "f32-uint8-zero128-mask": lambda: attention_quantize(1, 20, 3, 16, torch.float32, DType.UINT8, mask=True,
                                                         zero=128),
}
FP8_CASES: dict[str, Callable[[], tuple[Node, list[Any]]]] = {
    "bert-f16-fp8-mask-keep-y": lambda: attention_quantize(8, 128, 12, 64, torch.float16, DType.FLOAT8_E4M3FN,
                                                           mask=True),
    "f16-fp8-only-q": lambda: attention_quantize(2, 77, 4, 64, torch.float16, DType.FLOAT8_E4M3FN, keep_y=False),
}


def run_case(name: str, device: str = "cpu") -> dict[str, str | None]:
    from kiln.kernels.attention.triton_flash import CONFIGS

    node, args = {**CASES, **FP8_CASES}[name]()
    configs = [{**c, "quantize": q} for c in (CONFIGS[0], CONFIGS[-1]) for q in ("fused", "separate")]
    return run("triton.flash_attention_quantize", node, args, configs, device)


def run_sdpa_case(name: str) -> dict[str, str | None]:
    """`cuda.sdpa_quantize` on the GPU, every backend that takes the case's dtype (float32: the memory-efficient
    one alone), judged as the tuner judges it; a backend torch refuses for the case (FlashAttention takes no mask)
    raises, as it does in the tuner, which drops it: recorded as "refused"."""
    node, args = {**CASES, **FP8_CASES}[name]()
    half = args[0].dtype != torch.float32
    out: dict[str, str | None] = {}
    for b in ("flash", "efficient", "cudnn") if half else ("efficient",):
        try:
            out.update(run("cuda.sdpa_quantize", node, args, [{"backend": b}], "cuda"))
        except RuntimeError as e:
            if "No available kernel" not in str(e):
                raise
            out[f"backend={b}"] = "refused"
    return out
