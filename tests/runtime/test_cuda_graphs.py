"""`kiln.runtime.cuda_graphs` parts that run anywhere: the input/output copies around a replay. (Capture and
replay themselves are GPU tests: tests/gpu/test_cuda_engine.py.)"""

from __future__ import annotations

import torch

from kiln.runtime.cuda_graphs import copy_all


def test_copy_all_copies_every_pair_in_one_foreach_where_it_can() -> None:
    src = [torch.arange(5, dtype=torch.int64), torch.arange(3, dtype=torch.int64) * 7, torch.ones(2, 2)]
    dst = [torch.zeros(5, dtype=torch.int64), torch.zeros(3, dtype=torch.int64), torch.zeros(2, 2)]
    copy_all(dst, src)  # mixed dtypes: one copy each
    assert all(torch.equal(d, s) for d, s in zip(dst, src))
    src2 = [torch.randn(4), torch.randn(3, 2).t()]  # one of them strided
    dst2 = [torch.zeros(4), torch.zeros(2, 3)]
    copy_all(dst2, src2)
    assert all(torch.equal(d, s) for d, s in zip(dst2, src2))


def test_copy_all_leaves_a_buffer_copied_onto_itself_alone() -> None:
    own = torch.arange(6.0)
    other, target = torch.full((6,), 2.0), torch.zeros(6)
    copy_all([own, target], [own, other])
    assert torch.equal(own, torch.arange(6.0)) and torch.equal(target, other)
    view = own[::2]  # same start, other strides: a real copy
    dst = torch.zeros(3)
    copy_all([dst], [view])
    assert torch.equal(dst, torch.tensor([0.0, 2.0, 4.0]))
