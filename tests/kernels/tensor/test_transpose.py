"""`cuda.transpose`: views where the permuted memory is already what the reader gets, copies otherwise; the values
always the reference's (torch tensors on the CPU: the kernel is torch's permute)."""

from __future__ import annotations

import torch

from kiln.ir import DType, Graph, TensorType
from kiln.kernels import registry
from kiln.kernels.base import plan_layouts

CUDA = torch.device("cuda")


def _node(perm: tuple[int, ...] | None, shape: tuple[int, ...] = (2, 3, 4, 5)):  # type: ignore[no-untyped-def]
    g = Graph()
    x = g.add_input("x", TensorType(DType.FLOAT32, shape))
    g.outputs.append(g.add("Transpose", [x], {} if perm is None else {"perm": perm}, name="t")[0])
    return g.nodes[0]


def _run(perm: tuple[int, ...] | None, x: torch.Tensor, planned_cl: bool = False) -> torch.Tensor:
    node = _node(perm, tuple(x.shape))
    kernel = registry.get("cuda.transpose").build(node, {}, CUDA)
    plan_layouts(kernel, node, {node.outputs[0].name: "channels_last"} if planned_cl else {})
    (y,) = kernel([x])
    want = x.permute(perm if perm is not None else tuple(reversed(range(x.dim()))))
    torch.testing.assert_close(y, want, rtol=0, atol=0)
    return y


def test_to_nhwc_of_a_channels_last_tensor_is_a_view() -> None:
    x = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    y = _run((0, 2, 3, 1), x)
    assert y.data_ptr() == x.data_ptr() and y.is_contiguous()


def test_back_to_nchw_is_a_view_only_where_the_plan_keeps_it_channels_last() -> None:
    nhwc = torch.randn(2, 4, 5, 3)
    y = _run((0, 3, 1, 2), nhwc, planned_cl=True)
    assert y.data_ptr() == nhwc.data_ptr() and y.is_contiguous(memory_format=torch.channels_last)
    y = _run((0, 3, 1, 2), nhwc)  # a row-major reader: a row-major copy, as the reference makes
    assert y.data_ptr() != nhwc.data_ptr() and y.is_contiguous()


def test_other_permutations_copy_row_major() -> None:
    for perm, shape in (((1, 0, 2), (3, 4, 5)), (None, (2, 3, 4)), ((0, 2, 1, 3), (2, 3, 4, 5))):
        x = torch.randn(shape)
        y = _run(perm, x, planned_cl=True)
        assert y.is_contiguous() and (y.data_ptr() != x.data_ptr() or y.numel() <= 1)
    x = torch.randn(2, 1, 4, 1)
    y = _run((0, 3, 2, 1), x)  # only size-1 dims move: already row-major, a view
    assert y.data_ptr() == x.data_ptr()


def test_applicable_on_cuda_before_the_reference() -> None:
    node = _node((0, 2, 3, 1))
    t = registry.get("cuda.transpose")
    assert t.applicable(node, CUDA) and not t.applicable(node, torch.device("cpu"))
    names = [c.name for c in registry.candidates(node, CUDA)]
    assert names.index("cuda.transpose") < names.index("reference")
