"""Times `triton.gemm`, `triton.gemm_next` and, where it applies, `triton.gemm_splitk` (every tile) against
`cuda.linear` (cuBLAS + generated pointwise epilogue, every config) on the model shapes of `test_gpu.py`, on the
same GPU in one process (CUDA graphs of 20 calls, median of 30 replays, inputs rotated over 3 sets). Not a test;
run from the repository root:

    PYTHONPATH=src:. python tests/kernels/gemm/bench_gpu.py [float16|bfloat16|float32] [SHAPE ...]
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch

from kiln.ir import DType
from kiln.kernels import registry
from tests.kernels.gemm.cases import CUDA, Case, constants_to, inputs
from tests.kernels.gemm.test_gpu import SHAPES
from tests.kernels.pointwise.bench_gpu import _gpu_us


def _sets(case: Case, n: int = 3) -> list[list[object]]:
    constants_to(case.node, "cuda")  # as the engine holds them: the kernels' prepared weights stay valid
    base = inputs(case.node, case.feeds, "cuda")
    return [[x if v is None or v.data is not None else x.clone().normal_() for x, v in zip(base, case.node.inputs)]
            for _ in range(n)]


def main(dtype: str, names: Sequence[str] = ()) -> None:
    dt = DType.from_torch(getattr(torch, dtype))
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  dtype {dtype}")
    for name, make in SHAPES.items():
        if names and name not in names:
            continue
        case = make(dt)
        sets = _sets(case)
        rows = []
        for tactic in ("cuda.linear", "triton.gemm", "triton.gemm_next", "triton.gemm_splitk"):
            t = registry.get(tactic)
            if not t.applicable(case.node, CUDA):
                continue
            for cfg in t.configs():
                kernel = t.build(case.node, cfg, CUDA)
                try:
                    us = _gpu_us(lambda i, k=kernel, xs=sets: k(list(xs[i % len(xs)])))
                except Exception as e:  # a tile the GPU cannot hold: reported, not timed
                    rows.append((f"{tactic} {cfg}", f"failed: {type(e).__name__}"))
                    continue
                rows.append((f"{tactic} {cfg}", f"{us:9.1f} us"))
        print(f"\n{name}")
        for label, value in rows:
            print(f"  {label:60s} {value}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "float16", sys.argv[2:])
