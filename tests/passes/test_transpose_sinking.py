"""Transpose sinking: Transposes move through elementwise ops until they meet and cancel or merge; paths that
branch, broadcast larger or end elsewhere are left alone."""

from __future__ import annotations

import torch

from kiln.ir import DType, Graph, TensorType
from kiln.passes.dead_nodes import dead_nodes
from kiln.passes.transpose_sinking import sink_transposes
from tests.passes.cleanup_util import ops, preserves, rand

F32 = DType.FLOAT32
NCHW = (0, 3, 1, 2)
NHWC = (0, 2, 3, 1)


def _nhwc_sandwich(second: tuple[int, ...] = NCHW) -> Graph:
    """x (NCHW) -> to NHWC -> Relu -> Add bias[C] -> Mul by a [H,W,1] constant -> Where(mask) -> Cast -> back."""
    g = Graph()
    x = g.add_input("x", TensorType(F32, ("n", 3, 4, 5)))
    (t,) = g.add("Transpose", [x], {"perm": NHWC})
    (r,) = g.add("Relu", [t])
    (a,) = g.add("Add", [r, g.add_initializer("bias", torch.tensor([1.0, 2.0, 3.0]))])
    (m,) = g.add("Mul", [a, g.add_initializer("scale", torch.arange(20.0).reshape(4, 5, 1))])
    (w,) = g.add("Where", [g.add_initializer("mask", torch.tensor([True, False, True])), m,
                           g.add_initializer("zero", torch.tensor(0.0))])
    (c,) = g.add("Cast", [w], {"to": DType.FLOAT64})
    (y,) = g.add("Transpose", [c], {"perm": second}, outputs=["y"])
    g.outputs = [y]
    return g


FEEDS = [{"x": rand(2, 3, 4, 5)}, {"x": rand(1, 3, 4, 5, seed=1)}]


def test_a_transpose_pair_around_elementwise_ops_cancels() -> None:
    g, result = preserves(_nhwc_sandwich, [sink_transposes, dead_nodes], FEEDS)
    assert result.counts == {"transposes_cancelled": 1}
    assert ops(g) == ["Relu", "Add", "Mul", "Where", "Cast"]
    assert g.nodes[1].inputs[1].shape == (1, 3, 1, 1)  # the bias, permuted back to NCHW
    assert g.nodes[2].inputs[1].shape == (1, 1, 4, 5)
    assert g.nodes[-1].outputs[0].name == "y"


def test_a_transpose_pair_that_does_not_cancel_merges() -> None:
    g, result = preserves(lambda: _nhwc_sandwich((0, 3, 2, 1)), [sink_transposes, dead_nodes], FEEDS)
    assert result.counts == {"transposes_merged": 1}
    assert ops(g) == ["Relu", "Add", "Mul", "Where", "Cast", "Transpose"]
    assert g.nodes[-1].attrs["perm"] == (0, 1, 3, 2)


def test_two_transposed_operands_move_together() -> None:
    def build() -> Graph:
        g = Graph()
        x = g.add_input("x", TensorType(F32, (2, 3, 4)))
        z = g.add_input("z", TensorType(F32, (2, 3, 4)))
        (tx,) = g.add("Transpose", [x], {"perm": (2, 0, 1)})
        (tz,) = g.add("Transpose", [z], {"perm": (2, 0, 1)})
        (s,) = g.add("Sub", [tz, tx])
        (y,) = g.add("Transpose", [s], {"perm": (1, 2, 0)}, outputs=["y"])
        g.outputs = [y]
        return g

    g, _ = preserves(build, [sink_transposes, dead_nodes], {"x": rand(2, 3, 4), "z": rand(2, 3, 4, seed=2)})
    assert ops(g) == ["Sub"] and g.nodes[0].inputs == list(reversed(g.inputs))


def test_blocked_paths_are_left_alone() -> None:
    def build(case: str) -> Graph:
        g = Graph()
        x = g.add_input("x", TensorType(F32, (2, 3)))
        (t,) = g.add("Transpose", [x], {"perm": (1, 0)})
        (r,) = g.add("Relu", [t])
        if case == "branch":  # the Relu's output has a second reader
            extra = g.add("Neg", [r], outputs=["extra"])[0]
        elif case == "broadcast":  # the Add grows the tensor: moving the Transpose would move more data
            (r,) = g.add("Add", [r, g.add_initializer("k", torch.zeros(4, 1, 1))])
        elif case == "softmax":  # not elementwise
            (r,) = g.add("Softmax", [r], {"axis": -1})
        (y,) = g.add("Transpose", [r], {"perm": (1, 0) if case != "broadcast" else (0, 2, 1)}, outputs=["y"])
        g.outputs = [y, extra] if case == "branch" else [y]
        return g

    for case in ("branch", "broadcast", "softmax"):
        g, result = preserves(lambda case=case: build(case), sink_transposes, {"x": rand(2, 3)})
        assert not result.changed and ops(g).count("Transpose") == 2, case
