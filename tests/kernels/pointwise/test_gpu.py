"""The generated pointwise kernels on a real GPU: every interpreter case compiled for CUDA, bigger shapes against
the op table's reference on the device, every tactic configuration, a domain past 2**31 elements, CUDA graph
capture. Run with `pytest -m gpu tests/kernels/pointwise` on a machine with an NVIDIA GPU."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from kiln.ir import DType, Graph
from kiln.kernels.pointwise import PointwiseKernel, epilogue_graph
from kiln.kernels.registry import TACTICS
from tests.kernels.pointwise.cases import CASES, compare, epilogue_body, graph, reference, run_case

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]

D = DType
F32, F16, BF16 = D.FLOAT32, D.FLOAT16, D.BFLOAT16
CUDA = torch.device("cuda")


def _rand(*shape: int, dtype: DType = F16, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(shape, device=CUDA) * scale).to(dtype.torch)


def _check(g: Graph, xs: list[torch.Tensor], **kw: Any) -> None:
    want = reference(g, [x.clone() for x in xs])
    got = PointwiseKernel(g, **kw)(xs)
    for i, (a, b) in enumerate(zip(got, want)):
        problem = compare(a.cpu(), b.cpu())
        assert problem is None, f"output {i}: {problem}"


@pytest.mark.parametrize("name", list(CASES))
def test_case_on_cuda(name: str) -> None:
    problem = run_case(name, "cuda")
    assert problem is None, problem


def _bias_gelu(dt: DType, m: int, n: int) -> tuple[Graph, list[torch.Tensor]]:
    g, (x, b) = graph((dt, (m, n)), (dt, (n,)))
    g.outputs = list(g.add("Gelu", [g.add("Add", [x, b])[0]], {"approximate": "tanh"}))
    return g, [_rand(m, n, dtype=dt), _rand(n, dtype=dt)]


def _nchw(dt: DType) -> tuple[Graph, list[torch.Tensor]]:
    n, c, h, w = 16, 64, 56, 56
    g, (x, s, b, r) = graph((dt, (n, c, h, w)), (dt, (1, c, 1, 1)), (dt, (1, c, 1, 1)), (dt, (n, c, h, w)))
    (y,) = g.add("Add", [g.add("Mul", [x, s])[0], b])
    g.outputs = [g.add("Relu", [g.add("Add", [y, r])[0]])[0]]
    return g, [_rand(n, c, h, w, dtype=dt), _rand(1, c, 1, 1, dtype=dt), _rand(1, c, 1, 1, dtype=dt),
               _rand(n, c, h, w, dtype=dt)]


def _transposed(dt: DType) -> tuple[Graph, list[torch.Tensor]]:
    g, (x, y) = graph((dt, (2048, 3000)), (dt, (2048, 3000)))
    g.outputs = [g.add("Mul", [g.add("Sigmoid", [x])[0], y])[0], g.add("Tanh", [x])[0]]
    return g, [_rand(3000, 2048, dtype=dt).t(), _rand(2048, 3000, dtype=dt)]


BIG: dict[str, Callable[[DType], tuple[Graph, list[torch.Tensor]]]] = {
    "bias-gelu": lambda dt: _bias_gelu(dt, 4096, 4096),
    "bias-gelu-odd": lambda dt: _bias_gelu(dt, 1000, 1027),
    "nchw-affine-residual-relu": _nchw,
    "transposed-two-outputs": _transposed,
}


@pytest.mark.parametrize("dt", [F32, F16, BF16], ids=str)
@pytest.mark.parametrize("name", list(BIG))
def test_big_shapes(name: str, dt: DType) -> None:
    g, xs = BIG[name](dt)
    _check(g, xs)


def test_every_tactic_config() -> None:
    from kiln.ir import Node

    g, xs = _bias_gelu(F16, 512, 1000)
    outer = Graph("outer")
    ins = [outer.add_input(f"i{k}", v.type) for k, v in enumerate(g.inputs)]
    outer.add("Fused", ins, {"body": g, "kind": "pointwise"})
    node: Node = outer.nodes[-1]
    t = TACTICS["triton.pointwise"]
    assert t.applicable(node, CUDA)
    want = reference(g, xs)[0].cpu()
    for cfg in t.configs():
        got = t.build(node, cfg, CUDA)(list(xs))[0]
        assert compare(got.cpu(), want) is None, cfg


def test_epilogue_in_place_on_a_gemm_output() -> None:
    body = epilogue_body(F16, 256, 512, 768)
    found = epilogue_graph(body)
    assert found is not None
    g, idx = found
    xs = [_rand(256, 512, dtype=F16, scale=0.1), _rand(512, 768, dtype=F16, scale=0.1), _rand(768, dtype=F16),
          _rand(256, 768, dtype=F16)]
    want = reference(body, xs)[0].cpu()
    acc = xs[0] @ xs[1]
    out = PointwiseKernel(g)([acc, *(xs[i] for i in idx)], out=[acc])
    assert out[0] is acc
    assert compare(acc.cpu(), want) is None


@pytest.mark.big_gpu_memory
def test_domain_past_int32() -> None:
    n = 2**31 + 4099
    if torch.cuda.get_device_properties(0).total_memory < 3 * 2 * n:
        pytest.skip("needs 13 GB of GPU memory")
    g, (x, s) = graph((F16, (n,)), (F16, ()))
    g.outputs = list(g.add("Mul", [g.add("Add", [x, s])[0], s]))
    x_t = torch.empty(n, dtype=torch.float16, device=CUDA).uniform_(-1, 1)
    s_t = torch.tensor(0.5, dtype=torch.float16, device=CUDA)
    kernel = PointwiseKernel(g)
    (y,) = kernel([x_t, s_t])
    assert all(layout.wide for layout in kernel._fns)
    for sl in (slice(0, 4096), slice(2**31 - 2048, 2**31 + 2048), slice(n - 4096, n)):
        want = ((x_t[sl].float() + 0.5) * 0.5).half()
        assert compare(y[sl].cpu(), want.cpu()) is None, sl
    del x_t, y
    torch.cuda.empty_cache()


def test_cuda_graph_replay() -> None:
    g, xs = _bias_gelu(F16, 64, 1024)
    kernel = PointwiseKernel(g)
    out = [torch.empty(64, 1024, dtype=torch.float16, device=CUDA)]
    kernel(xs, out=out)  # compiles outside the capture
    graph_ = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph_):
        kernel(xs, out=out)
    xs[0].copy_(_rand(64, 1024))
    graph_.replay()
    torch.cuda.synchronize()
    assert compare(out[0].cpu(), reference(g, xs)[0].cpu()) is None


@pytest.mark.parametrize("name", ["float16-every-value", "bfloat16-every-value", "float32-relative-error",
                                  "special-values"])
def test_narrow_gelu_on_cuda(name: str) -> None:
    """`km.gelu_narrow` with the GPU's exp2 (an approximation) against float64: the interpreter test's bounds."""
    from tests.kernels.pointwise import gelu_cases
    from tests.kernels.pointwise.test_gelu_narrow import check_exhaustive, check_float32, check_specials

    r = gelu_cases.run_case(name, "cuda")
    print(name, r)
    if name.endswith("every-value"):
        check_exhaustive(r, name.split("-")[0])
    elif name == "float32-relative-error":
        check_float32(r)
    else:
        check_specials(r)
