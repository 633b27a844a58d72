"""Spatial means as pooling: a ReduceMean over the spatial axes of an image tensor becomes GlobalAveragePool.

Rewrite cases:
- ReduceMean(x [N, C, H, W], axes [2, 3], keepdims=1)         -> GlobalAveragePool(x)
- the same with keepdims=0                                    -> Flatten(GlobalAveragePool(x), axis=1)

torch.export spells adaptive_avg_pool2d(x, 1) and x.mean((2, 3)) so (a squeeze-excitation block's mean, ResNet's
last pooling); as a pooling op it runs on the pooling kernels and stays channels-last between convolutions
(`kiln.passes.layout`), where a ReduceMean made a GPU engine convert the activation to row-major and back around it.
After the norms are recognized: their patterns read ReduceMean.
"""

from __future__ import annotations

from kiln.ir.graph import Graph, Node
from kiln.passes.manager import PassResult
from kiln.passes.matching import add_node, reduce_axes, swap_in
from kiln.passes.pattern import apply_rules, rule
from kiln.passes.rewrite import Uses


def _pool_mean(graph: Graph, node: Node, uses: Uses) -> str | None:
    x = node.inputs[0]
    if x is None or x.rank != 4 or not x.dtype.is_float or reduce_axes(node, 4) != [2, 3]:
        return None
    (y,) = add_node(graph, node, "GlobalAveragePool", [x], {}, name=f"{node.name}/pool")
    what = "global_pool"
    if not node.attrs.get("keepdims", 1):
        (y,) = add_node(graph, node, "Flatten", [y], {"axis": 1}, name=f"{node.name}/flat")
        what = "global_pool_flat"
    return swap_in(graph, node, y, what)


RULES = [rule("ReduceMean", _pool_mean)]


def pool_means(graph: Graph) -> PassResult:
    """ReduceMean over the spatial axes of a 4-D tensor as GlobalAveragePool (counts: global_pool,
    global_pool_flat)."""
    return apply_rules(graph, RULES)
