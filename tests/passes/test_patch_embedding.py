"""patch_embedding: a ViT's patch conv + flatten + transpose -> patch rows and one GEMM (GPU builds)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kiln.ir import DType, Graph, TensorType
from kiln.ir.graph import Value
from kiln.passes.dead_nodes import dead_nodes
from kiln.passes.manager import PassContext
from kiln.passes.patch_embedding import patch_embedding, rewrite
from tests.passes.same_function import randn, run_checked

F32 = DType.FLOAT32


def _stem(g: Graph, batch: int | str = 2, c: int = 3, size: int = 8, k: int = 4, o: int = 6, bias: bool = True,
          perm: tuple[int, ...] = (0, 2, 1), stride: int | None = None, pads: tuple[int, ...] = (0, 0, 0, 0)) -> Value:
    """x [batch, c, size, size] -> Conv(k x k, stride k) -> Reshape [batch, o, cells] -> Transpose(perm)."""
    x = g.add_input("x", TensorType(F32, (batch, c, size, size)))
    gen = torch.Generator().manual_seed(0)
    inputs = [x, g.add_initializer("w", torch.randn(o, c, k, k, generator=gen))]
    if bias:
        inputs.append(g.add_initializer("b", torch.randn(o, generator=gen)))
    s = stride or k
    y = g.add("Conv", inputs, {"kernel_shape": [k, k], "strides": [s, s], "pads": list(pads)}, name="conv")[0]
    cells = ((size + pads[0] + pads[2] - k) // s + 1) ** 2
    shape = torch.tensor([-1 if isinstance(batch, str) else batch, o, cells])
    y = g.add("Reshape", [y, g.add_initializer("shape", shape)], name="flatten")[0]
    return g.add("Transpose", [y], {"perm": list(perm)}, name="swap")[0]


def _feeds(batch: int = 2, size: int = 8) -> list[dict[str, np.ndarray]]:
    return [{"x": randn(batch, 3, size, size, seed=s)} for s in (0, 1)]


@pytest.mark.parametrize("bias", [True, False])
def test_the_stem_becomes_patch_rows_and_one_gemm(bias: bool) -> None:
    g = Graph()
    g.outputs.append(_stem(g, bias=bias))
    results = run_checked(g, [rewrite, dead_nodes], _feeds())
    assert results[0].counts == {"patch_embeddings": 1}
    ops = [n.op for n in g.nodes]
    assert ops == ["Reshape", "Transpose", "Reshape", "MatMul", *(["Add"] if bias else [])], ops
    assert g.outputs[0].shape == (2, 4, 6) and g.outputs[0].name == "swap_out0"


def test_a_symbolic_batch() -> None:
    g = Graph()
    g.outputs.append(_stem(g, batch="n"))
    results = run_checked(g, [rewrite, dead_nodes], _feeds(batch=3))
    assert results[0].counts == {"patch_embeddings": 1}


@pytest.mark.parametrize("kw", [dict(perm=(1, 0, 2)), dict(stride=2), dict(pads=(1, 1, 1, 1)), dict(size=10)],
                         ids=["other-perm", "overlapping", "padded", "remainder"])
def test_left_alone_unless_windows_tile_the_image_into_rows(kw: dict) -> None:
    g = Graph()
    g.outputs.append(_stem(g, **kw))
    size = kw.get("size", 8)
    results = run_checked(g, [rewrite], _feeds(size=size))
    assert results[0].counts == {"patch_embeddings": 0} and g.nodes[0].op == "Conv"


def test_left_alone_when_the_conv_output_is_read_elsewhere() -> None:
    g = Graph()
    g.outputs.append(_stem(g))
    conv = g.nodes[0]
    g.outputs.append(conv.outputs[0])
    assert rewrite(g).counts == {"patch_embeddings": 0}


def test_gpu_builds_only() -> None:
    g = Graph()
    g.outputs.append(_stem(g))
    assert patch_embedding(PassContext(device="cpu"))(g).counts == {}
    assert g.nodes[0].op == "Conv"
    assert patch_embedding(PassContext(device="cuda"))(g).counts == {"patch_embeddings": 1}
