"""`cuda.scatter_elements`: ScatterElements with the index range checked on the device (torch ops: run here on CPU
tensors), against the op table's reference."""

from __future__ import annotations

import pytest
import torch

from kiln.ir import DType, Graph, TensorType
from kiln.ir.ops import OPS
from kiln.ir.ops.base import RefCtx
from kiln.kernels import registry

CUDA = torch.device("cuda")


def _node(axis: int, reduction: str, shape: tuple[int, ...], idx_shape: tuple[int, ...]):  # type: ignore[no-untyped-def]
    g = Graph()
    x = g.add_input("x", TensorType(DType.FLOAT32, shape))
    i = g.add_input("i", TensorType(DType.INT64, idx_shape))
    u = g.add_input("u", TensorType(DType.FLOAT32, idx_shape))
    g.outputs.append(g.add("ScatterElements", [x, i, u], {"axis": axis, "reduction": reduction}, name="put")[0])
    return g.nodes[0]


@pytest.mark.parametrize("reduction", ["none", "add", "mul", "max", "min"])
@pytest.mark.parametrize("axis", [1, -1])
def test_matches_the_reference(reduction: str, axis: int) -> None:
    gen = torch.Generator().manual_seed(0)
    shape, idx_shape = (2, 5, 4), (2, 3, 4)
    n = shape[axis]
    # distinct indices along every scattered line ("none" leaves duplicates' order undefined), some negative
    if axis == 1:  # lines [b, :, c] of 3 of the 5 positions
        idx = torch.stack([torch.randperm(n, generator=gen)[:3] for _ in range(8)]).reshape(2, 4, 3).transpose(1, 2)
    else:  # lines [b, r, :] of all 4 positions
        idx = torch.stack([torch.randperm(n, generator=gen) for _ in range(6)]).reshape(2, 3, 4)
    idx = idx - n * (torch.rand(2, 3, 4, generator=gen) < 0.3)
    xs = [torch.randn(shape, generator=gen), idx.to(torch.int64), torch.randn(idx_shape, generator=gen)]
    node = _node(axis, reduction, shape, idx_shape)
    kernel = registry.get("cuda.scatter_elements").build(node, {}, CUDA)
    (got,) = kernel(xs)
    (want,) = OPS["ScatterElements"].ref(RefCtx(node), xs)
    torch.testing.assert_close(got, want)
    assert kernel.checks[0].raised() is None  # type: ignore[attr-defined]


def test_an_out_of_range_index_raises_after_the_run_naming_the_node() -> None:
    node = _node(2, "none", (1, 2, 4), (1, 2, 1))
    kernel = registry.get("cuda.scatter_elements").build(node, {}, CUDA)
    kernel([torch.zeros(1, 2, 4), torch.tensor([[[1], [4]]]), torch.ones(1, 2, 1)])
    message = kernel.checks[0].raised()  # type: ignore[attr-defined]
    assert message is not None and "node 'put'" in message and "out of range" in message


def test_applicable_on_cuda_before_the_reference() -> None:
    node = _node(1, "none", (2, 5, 4), (2, 3, 4))
    t = registry.get("cuda.scatter_elements")
    assert t.applicable(node, CUDA) and not t.applicable(node, torch.device("cpu"))
    names = [c.name for c in registry.candidates(node, CUDA)]
    assert names.index("cuda.scatter_elements") < names.index("reference")


def _gather_node(axis: int, shape: tuple[int, ...], idx_shape: tuple[int, ...]):  # type: ignore[no-untyped-def]
    g = Graph()
    x = g.add_input("x", TensorType(DType.FLOAT32, shape))
    i = g.add_input("i", TensorType(DType.INT32, idx_shape))
    g.outputs.append(g.add("GatherElements", [x, i], {"axis": axis}, name="take")[0])
    return g.nodes[0]


@pytest.mark.parametrize("axis", [0, 2, -2])
def test_gather_elements_matches_the_reference(axis: int) -> None:
    """`cuda.gather_elements` (a sliding-window cache's shift): indices smaller than the data on other axes, some
    negative, int32."""
    gen = torch.Generator().manual_seed(1)
    shape, idx_shape = (3, 5, 4), (2, 4, 3)
    n = shape[axis]
    idx = torch.randint(-n, n, idx_shape, generator=gen).to(torch.int32)
    xs = [torch.randn(shape, generator=gen), idx]
    node = _gather_node(axis, shape, idx_shape)
    t = registry.get("cuda.gather_elements")
    assert t.applicable(node, CUDA) and not t.applicable(node, torch.device("cpu"))
    kernel = t.build(node, {}, CUDA)
    (got,) = kernel(xs)
    (want,) = OPS["GatherElements"].ref(RefCtx(node), xs)
    torch.testing.assert_close(got, want)
    assert kernel.checks[0].raised() is None  # type: ignore[attr-defined]
    kernel([xs[0], torch.full(idx_shape, n, dtype=torch.int32)])
    message = kernel.checks[0].raised()  # type: ignore[attr-defined]
    assert message is not None and "node 'take'" in message and "out of range" in message
