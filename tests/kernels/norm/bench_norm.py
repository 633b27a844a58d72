"""Times the Triton norm tactics against PyTorch eager on the GPU at real shapes (every config of the space), and
checks each against the op table's reference. Run on a CUDA machine:

    PYTHONPATH=src python -m tests.kernels.norm.bench_norm [--quick]

Times are CUDA-event medians of GPU time (launch cost hidden) after warm-up, with inputs rotated over several
copies so that no run finds its input in L2; GB/s counts one read of the inputs and one write of the outputs."""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from kiln.ir.ops import get_op
from kiln.ir.ops.base import RefCtx
from kiln.kernels import registry
from kiln.tune.tuner import _close
from tests.kernels.norm.interp_cases import C, node_of

CUDA = torch.device("cuda")


@dataclass
class Workload:
    name: str
    tactic: str
    op: str
    inputs: Callable[[], list[Any]]
    attrs: dict[str, Any]
    eager: Callable[[list[Any]], Any]


def _t(*shape: int, dtype: torch.dtype, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(shape, device=CUDA).add_(shift).to(dtype)


def workloads() -> list[Workload]:
    h, b = torch.float16, torch.bfloat16
    return [
        Workload("layernorm BERT [16384,768] fp16", "triton.layernorm", "LayerNormalization",
                 lambda: [_t(16384, 768, dtype=h), C(_t(768, dtype=h)), C(_t(768, dtype=h))], {},
                 lambda xs: F.layer_norm(xs[0], (768,), xs[1], xs[2])),
        Workload("layernorm [16384,768] fp32", "triton.layernorm", "LayerNormalization",
                 lambda: [_t(16384, 768, dtype=torch.float32), C(_t(768, dtype=torch.float32)),
                          C(_t(768, dtype=torch.float32))], {},
                 lambda xs: F.layer_norm(xs[0], (768,), xs[1], xs[2])),
        Workload("layernorm [4096,8192] fp16", "triton.layernorm", "LayerNormalization",
                 lambda: [_t(4096, 8192, dtype=h), C(_t(8192, dtype=h)), C(_t(8192, dtype=h))], {},
                 lambda xs: F.layer_norm(xs[0], (8192,), xs[1], xs[2])),
        Workload("rmsnorm [8192,4096] bf16", "triton.rmsnorm", "RMSNormalization",
                 lambda: [_t(8192, 4096, dtype=b), C(_t(4096, dtype=b))], {"epsilon": 1e-6},
                 lambda xs: F.rms_norm(xs[0], (4096,), xs[1], 1e-6)),
        Workload("softmax BERT [128,12,128,128] fp16", "triton.softmax", "Softmax",
                 lambda: [_t(128, 12, 128, 128, dtype=h)], {}, lambda xs: torch.softmax(xs[0], -1)),
        Workload("softmax [4096,4096] fp32", "triton.softmax", "Softmax",
                 lambda: [_t(4096, 4096, dtype=torch.float32)], {}, lambda xs: torch.softmax(xs[0], -1)),
        Workload("logsoftmax vocab [1024,50257] fp16", "triton.softmax", "LogSoftmax",
                 lambda: [_t(1024, 50257, dtype=h)], {}, lambda xs: torch.log_softmax(xs[0], -1)),
        Workload("softmax vocab [1024,50257] fp32", "triton.softmax", "Softmax",
                 lambda: [_t(1024, 50257, dtype=torch.float32)], {}, lambda xs: torch.softmax(xs[0], -1)),
        Workload("groupnorm SD [2,320,64,64] g32 fp16", "triton.groupnorm", "GroupNormalization",
                 lambda: [_t(2, 320, 64, 64, dtype=h), C(_t(320, dtype=h)), C(_t(320, dtype=h))],
                 {"num_groups": 32}, lambda xs: F.group_norm(xs[0], 32, xs[1], xs[2])),
        Workload("groupnorm [8,128,32,32] g32 fp16", "triton.groupnorm", "GroupNormalization",
                 lambda: [_t(8, 128, 32, 32, dtype=h), C(_t(128, dtype=h)), C(_t(128, dtype=h))],
                 {"num_groups": 32}, lambda xs: F.group_norm(xs[0], 32, xs[1], xs[2])),
        Workload("groupnorm VAE [1,512,256,256] g32 fp16", "triton.groupnorm", "GroupNormalization",
                 lambda: [_t(1, 512, 256, 256, dtype=h), C(_t(512, dtype=h)), C(_t(512, dtype=h))],
                 {"num_groups": 32}, lambda xs: F.group_norm(xs[0], 32, xs[1], xs[2])),
        Workload("instancenorm [8,64,128,128] fp32", "triton.groupnorm", "InstanceNormalization",
                 lambda: [_t(8, 64, 128, 128, dtype=torch.float32), C(_t(64, dtype=torch.float32)),
                          C(_t(64, dtype=torch.float32))], {},
                 lambda xs: F.group_norm(xs[0], 64, xs[1], xs[2])),
    ]


def time_ms(fn: Callable[[list[Any]], Any], sets: list[list[Any]], reps: int = 50) -> float:
    """Median GPU time of one call. Each call is queued behind a GPU sleep, so the host's launch cost is hidden
    (as it is under CUDA graphs) and the events time the kernels alone."""
    for s in sets:
        fn(s)
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for i, (start, end) in enumerate(events):
        torch.cuda._sleep(1_000_000)
        start.record()
        fn(sets[i % len(sets)])
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def close(got: torch.Tensor, want: torch.Tensor) -> tuple[bool, float]:
    """Whether the tuner would accept `got` against the reference, and the share of exact matches."""
    return _close(got, want), float(((got == want) | (got.isnan() & want.isnan())).float().mean())


def bench(w: Workload, quick: bool) -> None:
    base = w.inputs()
    node, args = node_of(w.op, base, 1, w.attrs)
    tactic = registry.get(w.tactic)
    assert tactic.applicable(node, CUDA)
    copies = max(2, int(4e9 // sum(a.numel() * a.element_size() for a in args if a is not None)))
    sets = [args] + [[a.clone() if i == 0 else a for i, a in enumerate(args)] for _ in range(min(copies, 4) - 1)]
    moved = sum(a.numel() * a.element_size() for a in args if a is not None) + args[0].numel() * args[0].element_size()
    want = get_op(w.op).ref(RefCtx(node), list(args))[0]
    eager = time_ms(w.eager, sets)
    rows = []
    for cfg in tactic.configs()[:1] if quick else tactic.configs():
        kernel = tactic.build(node, cfg, CUDA)
        ok, exact = close(kernel(list(args))[0], want)
        rows.append((time_ms(kernel, sets), cfg, ok, exact))
    best = min(rows, key=lambda r: r[0])
    first = rows[0]
    def rate(ms: float) -> str:
        return f"{ms * 1e3:8.1f} us {moved / ms / 1e6:5.0f} GB/s"

    print(f"{w.name:40s} eager {rate(eager)} | default {rate(first[0])} | best {rate(best[0])} {best[1]} | "
          f"ref ok {all(r[2] for r in rows)} exact {min(r[3] for r in rows):.4f}", flush=True)


def main() -> None:
    quick = "--quick" in sys.argv
    only = [a for a in sys.argv[1:] if not a.startswith("--")]
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    for w in workloads():
        if not only or any(o in w.name for o in only):
            bench(w, quick)


if __name__ == "__main__":
    main()
