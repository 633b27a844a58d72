"""pack_attention: sequence-first attention (nn.MultiheadAttention's export) becomes the [B, S, E] form."""

from __future__ import annotations

import pytest
import torch

from kiln.ir import DType, Graph, TensorType
from kiln.ir.graph import Value
from kiln.passes.pack_attention import pack_attention
from tests.passes.pattern_util import ops, rand, rewrite_preserves

B, S, H, D = 2, 5, 3, 4
E = H * D
F32 = DType.FLOAT32


def _c(g: Graph, data: torch.Tensor) -> Value:
    return g.add_initializer(g.fresh_name("c"), data)


def _i(*v: int) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.int64)


def mha(*, head_perm: tuple[int, ...] = (1, 0, 2), shuffle_back: bool = True, batch: int = B) -> Graph:
    """torch MHA, sequence-first, as exported: packed in-projection, Gather per q/k/v, heads via
    [S, B*H, D] -> Transpose -> [B, H, S, D]; out-projection on [S*B, E] rows, back to [B, S, E]. At batch 1 the
    sequence-first transposes are Reshapes, as no-op removal leaves them."""
    g = Graph()
    x = g.add_input("x", TensorType(F32, (batch, S, E)))
    gen = torch.Generator().manual_seed(0)

    def seq_first(v: Value, name: str | None = None) -> Value:
        if batch == 1:
            d0, d1, d2 = v.type.shape  # type: ignore[union-attr]
            return g.add("Reshape", [v, _c(g, _i(d1, d0, d2))], outputs=[name] if name else 1)[0]
        return g.add("Transpose", [v], {"perm": (1, 0, 2)}, outputs=[name] if name else 1)[0]

    xt = seq_first(x)
    (y,) = g.add("MatMul", [xt, _c(g, torch.randn(E, 3 * E, generator=gen))])
    (r,) = g.add("Reshape", [y, _c(g, _i(1, S, batch, 3, E))])
    (t,) = g.add("Transpose", [r], {"perm": (3, 1, 2, 0, 4)})
    (sq,) = g.add("Squeeze", [t, _c(g, _i(3))])
    qkv = []
    for k in range(3):
        (p,) = g.add("Gather", [sq, _c(g, torch.tensor(k))], {"axis": 0})
        (p,) = g.add("Reshape", [p, _c(g, _i(S, batch * H, D))])
        (p,) = g.add("Transpose", [p], {"perm": head_perm})
        (p,) = g.add("Reshape", [p, _c(g, _i(batch, H, S, D))])
        qkv.append(p)
    (o,) = g.add("Attention", qkv, {"scale": 0.5}, outputs=1)
    (o,) = g.add("Transpose", [o], {"perm": (2, 0, 1, 3)})
    (o,) = g.add("Reshape", [o, _c(g, _i(S * batch, E))])
    (o,) = g.add("Gemm", [o, _c(g, torch.randn(E, E, generator=gen)), _c(g, torch.randn(E, generator=gen))],
                 {"transB": 1})
    (o,) = g.add("Reshape", [o, _c(g, _i(S, batch, E))])
    if shuffle_back:
        o = seq_first(o, "y")
    g.outputs = [o]
    return g


def test_sequence_first_attention_becomes_packed_with_no_data_movement_left() -> None:
    g, res = rewrite_preserves(mha, pack_attention, {"x": rand(B, S, E, seed=1)})
    assert res.counts == {"attention_packed": 1, "rows_kept_in_order": 1}
    assert sorted(ops(g)) == sorted(["MatMul", "Split", "Attention", "MatMul", "Add"])
    att = next(n for n in g.nodes if n.op == "Attention")
    assert att.attrs["q_num_heads"] == H and att.attrs["kv_num_heads"] == H and att.attrs["scale"] == 0.5


def test_batch_one_where_the_sequence_first_transposes_are_reshapes() -> None:
    """At batch 1 the [B, S, E] <-> [S, B, E] transposes are Reshapes (ViT at batch 1 kept 8 copies per layer)."""
    def build() -> Graph:
        return mha(batch=1)

    g, res = rewrite_preserves(build, pack_attention, {"x": rand(1, S, E, seed=4)})
    assert res.counts == {"attention_packed": 1, "rows_kept_in_order": 1}
    assert sorted(ops(g)) == sorted(["MatMul", "Split", "Attention", "MatMul", "Add"])


def test_a_chain_that_is_not_a_head_split_is_left_alone() -> None:
    """Reading [S, B*H, D] straight as [B, H, S, D] (no transpose) mixes sequence and batch: not a head split,
    so the attention keeps its 4-D inputs (the function is preserved either way)."""
    def build() -> Graph:
        return mha(head_perm=(0, 1, 2))

    g, res = rewrite_preserves(build, pack_attention, {"x": rand(B, S, E, seed=2)})
    assert "attention_packed" not in res.counts and "Gather" in ops(g)


def test_rows_left_shuffled_keep_their_gemm() -> None:
    """Without the final transpose the output stays sequence-first: the GEMM's rows are not put back in order."""
    def build() -> Graph:
        return mha(shuffle_back=False)

    g, res = rewrite_preserves(build, pack_attention, {"x": rand(B, S, E, seed=3)})
    assert res.counts.get("attention_packed") == 1 and "rows_kept_in_order" not in res.counts
    assert "Gemm" in ops(g)


@pytest.mark.parametrize("batch", [2, 1])
def test_torch_transformer_encoder_export_gets_eight_steps_per_layer(batch: int) -> None:
    """nn.TransformerEncoder (batch_first) as torch.onnx exports it: packed attention, 8 plan steps per layer
    (at batch 1 too, where the export's sequence-first transposes become Reshapes)."""
    import io

    import numpy as np
    import onnx

    import kiln

    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0)
    model = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    for p in model.parameters():  # exports drop zero biases; random ones keep every bias add in the graph
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(batch, 7, 32)
    f = io.BytesIO()
    torch.onnx.export(model, (x,), f, opset_version=17, dynamo=False, input_names=["x"], output_names=["y"])
    proto = onnx.load_from_string(f.getvalue())
    engine = kiln.build(proto, kiln.BuilderConfig(opt_level=0))
    steps = [n.op if n.op != "Fused" else "+".join(m.op for m in n.attrs["body"].nodes) for n in engine.graph.nodes]
    assert steps.count("Attention") == 2 and "Transpose" not in steps and "Gather" not in steps, steps
    assert len(steps) == 16, steps
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(engine.create_context().run({"x": x.numpy()})["y"], want, rtol=1e-4, atol=1e-5)
