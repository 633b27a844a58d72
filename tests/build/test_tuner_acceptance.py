"""The tuner's acceptance test for candidates: within tolerance of the reference, or - for half-precision results -
at least about as accurate as the reference itself against the reference computed in float32 (also a float32
result that a half-precision step casts to)."""

from __future__ import annotations

import pytest
import torch

from kiln.ir import DType, Graph, TensorType
from kiln.ir.ops import get_op
from kiln.ir.ops.base import RefCtx
from kiln.tune.tuner import _as_accurate, _close, _Widened


def _decode_attention(dt: torch.dtype) -> tuple[object, list[torch.Tensor]]:
    """One query against a thousand keys, the case where a reference that rounds every step drifts most."""
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(s, generator=gen).to(dt) for s in ((2, 8, 1, 64), (2, 8, 1000, 64), (2, 8, 1000, 64))]
    g = Graph()
    vals = [g.add_input(f"in{i}", TensorType(DType.from_torch(dt), tuple(x.shape))) for i, x in enumerate(xs)]
    g.outputs.extend(g.add("Attention", list(vals), {}, name="attn", outputs=1))
    return g.nodes[0], xs


def test_a_more_accurate_half_result_is_accepted_where_the_tolerance_alone_rejects_it() -> None:
    node, xs = _decode_attention(torch.bfloat16)
    want = get_op("Attention").ref(RefCtx(node), list(xs))[0]
    widened = _Widened()
    wide = widened.get(node, xs, 0)
    assert wide.dtype == torch.float32 and widened.get(node, xs, 9) is None
    best = wide.to(torch.bfloat16)  # the float32 result rounded once: the best a bfloat16 kernel can give
    exact = torch.nn.functional.scaled_dot_product_attention(*[x.double() for x in xs])
    assert (best.double() - exact).abs().max() < (want.double() - exact).abs().max()
    assert not _close(best, want)  # the reference's own rounding puts it beyond the tolerance
    assert _as_accurate(best, want, wide)


def test_a_less_accurate_or_non_finite_result_stays_rejected() -> None:
    node, xs = _decode_attention(torch.bfloat16)
    want = get_op("Attention").ref(RefCtx(node), list(xs))[0]
    wide = _Widened().get(node, xs, 0)
    gen = torch.Generator().manual_seed(1)
    worse = (wide + 0.05 * torch.randn(wide.shape, generator=gen)).to(torch.bfloat16)
    assert not _as_accurate(worse, want, wide)
    holed = wide.to(torch.bfloat16)
    holed[0, 0, 0, 0] = float("nan")
    assert not _as_accurate(holed, want, wide)
    # float32 all through: the reference is its own second opinion, so nothing beyond the tolerance passes
    f32 = (wide + 2e-3 * torch.randn(wide.shape, generator=gen)).float()
    assert not _close(f32, wide) and not _as_accurate(f32, wide, wide)


def test_a_half_precision_step_cast_to_float32_is_judged_against_its_float32_second_opinion() -> None:
    """A bfloat16 Gemm whose float32 Cast joined it (a classifier head before the model's float32 output): the
    reference rounds the sum to bfloat16 before casting, up to 2**-9 relative off, beyond float32's tolerance. A
    kernel that casts its float32 sum directly is nearer the exact result and must not be rejected (on the GPU
    every GEMM tactic was, and the head ran on the reference); one farther off than the reference still is."""
    gen = torch.Generator().manual_seed(2)
    x, w = torch.randn(4, 32, generator=gen).bfloat16(), torch.randn(32, 10, generator=gen).bfloat16()
    want = (x @ w).float()  # the reference: the sum rounded to bfloat16, then cast
    wide = x.float() @ w.float()  # the second opinion: the body in float32
    assert not _close(wide, want) and _as_accurate(wide, want, wide)
    worse = want + 4 * (want - wide)
    assert not _as_accurate(worse, want, wide)


def test_a_quantizing_layer_may_round_a_value_one_step_the_other_way() -> None:
    """A requantizing layer's int8 result: one step off in a few places is a float sum rounding differently at a
    .5 boundary (accepted, for quantizing nodes only); two steps, or many values off, is a wrong kernel."""
    from kiln.tune.tuner import _one_step, _quantizes

    want = torch.randint(-128, 127, (64, 64), generator=torch.Generator().manual_seed(0)).to(torch.int8)
    near = want.clone()
    near[0, :8] += 1  # 8 of 4096 values one step up
    assert not _close(near, want) and _one_step(near, want)
    far = want.clone()
    far[0, 0] += 2
    assert not _one_step(far, want)
    many = want.clone()
    many[:2] += 1  # 128 of 4096 (3 %)
    assert not _one_step(many, want)
    assert not _one_step(near.float(), want.float())  # floats have their own tolerance

    g = Graph()
    x = g.add_input("x", TensorType(DType.FLOAT32, (4,)))
    s = g.add_initializer("s", torch.tensor(0.1))
    (q,) = g.add("QuantizeLinear", [x, s], name="q")
    (r,) = g.add("Relu", [x], name="relu")
    g.outputs.extend([q, r])
    assert _quantizes(g.nodes[0]) and not _quantizes(g.nodes[1])


def test_a_rejected_candidate_is_reported_with_how_far_off_it_is() -> None:
    """The build report's rejection line says which output missed and by how much (codes for 8-bit results, the
    largest difference for floats), so a user can tell a near miss from a broken kernel."""
    from kiln.tune.tuner import _mismatch

    g = Graph()
    x = g.add_input("x", TensorType(DType.FLOAT32, (64, 64)))
    s = g.add_initializer("s", torch.tensor(0.1))
    (q,) = g.add("QuantizeLinear", [x, s], name="q")
    g.outputs.append(q)
    node = g.nodes[0]
    want = torch.randint(-100, 100, (64, 64), generator=torch.Generator().manual_seed(0)).to(torch.int8)
    assert _mismatch(node, [want.clone()], [want], lambda k: None) is None
    far = want.clone()
    far[0, :41] += 3  # 41 of 4096 values (1.00 %), three codes off
    assert _mismatch(node, [far], [want], lambda k: None) == "output 0: 1.00 % of the codes differ, by up to 3"
    assert _mismatch(node, [], [want], lambda k: None) == "0 outputs, the node has 1"
    f = torch.linspace(-2, 4, 64)
    off = f.clone()
    off[3] += 0.5
    assert _mismatch(node, [off], [f], lambda k: None) == "output 0: max |diff| 0.5 (largest |value| 4)"


def test_the_second_opinion_of_a_quantized_layer_computes_its_body_in_float32() -> None:
    """An int8 conv in a float16 build: the reference dequantizes to float16 (every weight rounded to 11 bits) and
    convolves in float16, the int8 kernel sums exactly in int32. With a small output scale the reference's own error
    moves codes; the second opinion runs the body in float32 (not the reference again, as it did while the body's
    float16 types were kept), so the exact result is accepted and a wrong one still is not."""
    from kiln.tune.tuner import _codes_as_accurate, _one_step
    from tests.kernels.conv import int8_cases as q8

    node, args = q8.quantized((2, 64, 12, 12), 256, 1, half=True, requant=True, act=False)
    body = node.attrs["body"]
    at = body.inputs.index(body.nodes[-1].inputs[1])
    args[at] = torch.tensor(0.004, dtype=torch.float16)  # large quotients, as an entropy-calibrated scale gives
    want = get_op("Fused").ref(RefCtx(node), list(args))[0]
    wide = _Widened().get(node, list(args), 0)
    assert wide.dtype == torch.int8 and not torch.equal(wide, want)
    xq, sx, wq, sw, b = args[0], args[1], args[3], args[4], args[6]
    acc = torch.einsum("bchw,nc->bnhw", xq.double(), wq[:, :, 0, 0].double())
    y = acc * (sx.double() * sw.double()).view(1, -1, 1, 1) + b.double().view(1, -1, 1, 1)
    exact = (y / float(args[at])).round().clamp(-128, 127).to(torch.int8)  # what an exact int8 kernel writes
    assert not _one_step(exact, want)  # more than 1 % of the codes differ from the float16 reference
    assert _codes_as_accurate(exact, want, wide)
    off = (y * 1.01 / float(args[at])).round().clamp(-128, 127).to(torch.int8)  # a 1 % scale error
    assert not _codes_as_accurate(off, want, wide)


def test_a_layer_whose_every_kernel_is_rejected_runs_on_the_reference_and_the_build_says_so(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Never silently slow: when every kernel candidate of a layer is rejected, the reference runs it and the build
    report warns, naming the layer and the first rejection."""
    import kiln
    from kiln.kernels import registry
    from kiln.kernels.base import Kernel, Tactic

    class Broken(Tactic):
        name = "test.broken"
        ops = frozenset({"Relu"})
        priority = 1

        def build(self, node: object, config: object, device: object, run_subgraph: object = None) -> Kernel:
            return lambda xs: [xs[0] + 1.0]  # type: ignore[return-value]

    items = {"reference": registry.get("reference"), "test.broken": Broken()}  # (get loads the tactic modules)
    monkeypatch.setattr(registry.TACTICS, "_items", items)
    g = Graph()
    x = g.add_input("x", TensorType(DType.FLOAT32, (4, 8)))
    g.outputs.extend(g.add("Relu", [x], name="act", outputs=["y"]))
    engine = kiln.build(g, kiln.BuilderConfig(device="cpu", opt_level=3))
    assert [c.tactic for c in engine.plan.choices[0]] == ["reference"]
    warnings = engine.plan.stats["tuning"]["warnings"]
    assert any(w.startswith("act (Relu) runs on the reference: all 1 kernel candidates were rejected (first: "
                            "test.broken (outputs differ") for w in warnings), warnings
