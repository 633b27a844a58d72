"""What the tuner times for a candidate: one run as the runtime makes it, output conversions included."""

from __future__ import annotations

from typing import Any

import torch

from kiln.tune.tuner import _call


def test_a_candidate_is_timed_with_the_conversion_the_runtime_adds() -> None:
    """An output the plan keeps channels-last, written row-major by the kernel, is converted inside the timed
    call (the runtime converts it after the kernel); an output the kernel already wrote so is left as it is."""
    x = torch.randn(2, 3, 4, 5)

    def rowmajor(xs: list[Any]) -> list[Any]:
        return [xs[0] * 2, xs[0] + 1]

    got = _call(rowmajor, [x], [True, False])()
    assert got[0].is_contiguous(memory_format=torch.channels_last) and not got[0].is_contiguous()
    assert got[1].is_contiguous()
    torch.testing.assert_close(got[0], x * 2)
    cl = x.contiguous(memory_format=torch.channels_last)

    def already(xs: list[Any]) -> list[Any]:
        return [cl]

    assert _call(already, [x], [True])()[0] is cl
    assert _call(rowmajor, [x], [False, False])()[0].is_contiguous()
