"""pool_means: a spatial ReduceMean -> GlobalAveragePool (Flatten after it without kept dims)."""

from __future__ import annotations

import pytest
import torch

from kiln.ir import DType, Graph, TensorType
from kiln.ir.graph import Value
from kiln.passes.pool_means import pool_means
from tests.passes.pattern_util import ops, rand, rewrite_preserves


def _c(g: Graph, value, dtype: torch.dtype = torch.float32) -> Value:
    return g.add_initializer(g.fresh_name("c"), torch.tensor(value, dtype=dtype))


IMAGE = {"x": rand(2, 3, 4, 5)}


def _image_mean(axes: list[int], keepdims: int) -> Graph:
    g = Graph()
    x = g.add_input("x", TensorType(DType.FLOAT32, ("batch", 3, 4, 5)))
    (y,) = g.add("ReduceMean", [x, _c(g, axes, torch.int64)], {"keepdims": keepdims}, outputs=["y"])
    g.outputs = [y]
    return g


@pytest.mark.parametrize("axes", [[2, 3], [-1, -2]])
def test_spatial_mean_is_global_average_pool(axes: list[int]) -> None:
    g, res = rewrite_preserves(lambda: _image_mean(axes, 1), pool_means, IMAGE)
    assert ops(g) == ["GlobalAveragePool"] and res.counts == {"global_pool": 1}


def test_spatial_mean_without_kept_dims_is_pool_and_flatten() -> None:
    g, res = rewrite_preserves(lambda: _image_mean([2, 3], 0), pool_means, IMAGE)
    assert ops(g) == ["GlobalAveragePool", "Flatten"] and res.counts == {"global_pool_flat": 1}
    assert g.outputs[0].shape == ("batch", 3)


@pytest.mark.parametrize("axes", [[1, 2, 3], [3], [1]])
def test_other_means_stay(axes: list[int]) -> None:
    _g, res = rewrite_preserves(lambda: _image_mean(axes, 1), pool_means, IMAGE)
    assert not res.changed
