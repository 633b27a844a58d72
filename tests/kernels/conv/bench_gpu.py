"""Times `triton.conv` (every tile) against `cuda.conv` (cuDNN + generated pointwise epilogue, or cuDNN's fused
conv + bias + ReLU where it applies, every config) on the ResNet-50 shapes of `test_gpu.py`, channels-last, on the
same GPU in one process (CUDA graphs of 20 calls, median of 30 replays, inputs rotated over 3 sets). Not a test;
run from the repository root:

    PYTHONPATH=src:. python tests/kernels/conv/bench_gpu.py [float16|bfloat16|float32] [BATCH ...]
"""

from __future__ import annotations

import sys

import torch

from kiln.ir import DType
from kiln.kernels import registry
from tests.kernels.conv.cases import CUDA, Case, constants_to, inputs
from tests.kernels.conv.test_gpu import RESNET50
from tests.kernels.pointwise.bench_gpu import _gpu_us


def _sets(case: Case, n: int = 3) -> list[list[object]]:
    constants_to(case.node, "cuda")  # as the engine holds them: the kernels' prepared weights stay valid
    base = inputs(case.node, case.feeds, "cuda")
    return [[x if v is None or v.data is not None else x.clone().normal_() for x, v in zip(base, case.node.inputs)]
            for _ in range(n)]


def _rows(case: Case) -> list[tuple[str, str]]:
    sets = _sets(case)
    rows = []
    for tactic in ("cuda.conv", "triton.conv"):
        t = registry.get(tactic)
        for cfg in t.configs():
            label = f"{tactic} {cfg}"
            try:
                kernel = t.build(case.node, cfg, CUDA)
                us = _gpu_us(lambda i, k=kernel, xs=sets: k(list(xs[i % len(xs)])))
            except Exception as e:  # a config that refuses this epilogue, or a tile the GPU cannot hold
                rows.append((label, f"failed: {type(e).__name__}"))
                continue
            rows.append((label, f"{us:9.1f} us"))
    return rows


def main(dtype: str, batches: list[int]) -> None:
    dt = DType.from_torch(getattr(torch, dtype))
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  dtype {dtype}  "
          f"cudnn.allow_tf32 {torch.backends.cudnn.allow_tf32}")
    for batch in batches:
        for name, make in RESNET50.items():
            print(f"\n{name}  batch {batch}")
            for label, value in _rows(make(dt, batch)):
                print(f"  {label:60s} {value}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "float16", [int(b) for b in sys.argv[2:]] or [128, 1])
