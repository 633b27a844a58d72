"""The folding and fusion passes on real ResNets: the function is unchanged, no BatchNormalization is left, every
Conv carries its Relu and residual Add, and ResNet-50 takes at most 60 steps.

Weights must be constants for BatchNormalization folding; the constant-folding pass is not part of this test,
so the few constant nodes these exports have (Identity of an initializer, ConstantOfShape) are folded here.
"""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pytest
import torch

from kiln.frontend.onnx import import_model
from kiln.ir.graph import Graph
from kiln.ir.ops import OPS
from kiln.ir.ops.base import RefCtx, const_value
from kiln.passes.dead_nodes import dead_nodes
from kiln.passes.epilogue_fusion import epilogue_fusion
from kiln.passes.fold_affine import fold_affine
from kiln.passes.pointwise_fusion import pointwise_fusion
from kiln.passes.rewrite import redirect
from tests.e2e import models as M
from tests.passes.same_function import run_checked

pytestmark = pytest.mark.slow

PASSES = [fold_affine, epilogue_fusion, pointwise_fusion, dead_nodes]


def resnet_with_batchnorm(name: str) -> str:
    """A torchvision ResNet exported with its BatchNormalization nodes kept (the default export folds them)
    and random statistics, so that folding has something to get wrong."""

    def export(path: str) -> None:
        import torchvision

        torch.manual_seed(0)
        model = getattr(torchvision.models, name)(weights=None).eval()
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.5, 0.5)
        with torch.no_grad():
            torch.onnx.export(model, (torch.zeros(1, 3, 224, 224),), path, input_names=["image"],
                              output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                              opset_version=17, dynamo=False, training=torch.onnx.TrainingMode.PRESERVE,
                              do_constant_folding=False)

    return M.cached(f"{name}_bn", export)


def fold_constant_nodes(g: Graph) -> None:
    """Identity/Constant/ConstantOfShape of constants -> initializers."""
    for n in list(g.nodes):
        if n.op not in ("Identity", "Constant", "ConstantOfShape") or any(
                v is not None and const_value(v) is None for v in n.inputs):
            continue
        (value,) = OPS[n.op].ref(RefCtx(n), [const_value(v) for v in n.inputs])
        c = g.add_initializer(f"{n.outputs[0].name}.value", value)
        g.remove_nodes([n])
        redirect(g, n.outputs[0], c)


def light_model(name: str) -> bytes:
    """A model of the onnx wheel's light set with its ConstantOfShape fills replaced by seeded random weights
    (a check on constant fills would prove little): [C] vectors (BatchNormalization's) in [0.5, 1.5), others
    normal with variance 1/fan_in."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light",
                                   f"{name}.onnx"))
    graph = model.graph
    known = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    known.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node if n.op_type == "Constant"})
    rng = np.random.default_rng(0)
    keep = []
    for n in graph.node:
        if n.op_type != "ConstantOfShape" or n.input[0] not in known:
            keep.append(n)
            continue
        shape = [int(d) for d in known[n.input[0]]]
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 0
        w = rng.standard_normal(shape) / np.sqrt(fan_in) if fan_in else rng.random(shape) + 0.5
        graph.initializer.append(numpy_helper.from_array(w.astype(np.float32), n.output[0]))
    del graph.node[:]
    graph.node.extend(keep)
    return model.SerializeToString()


def _check_structure(g: Graph, residual_op: str, n_residual: int) -> Counter[str]:
    assert "BatchNormalization" not in g.op_counts()
    top = Counter(n.op for n in g.nodes)
    assert top["Relu"] == 0 and top[residual_op] == 0, top  # each carried by a Conv
    bodies = Counter("+".join(m.op for m in n.attrs["body"].nodes) for n in g.nodes if n.op == "Fused")
    assert bodies[f"Conv+{residual_op}+Relu"] == n_residual
    assert set(bodies) == {"Conv+Relu", f"Conv+{residual_op}+Relu"}
    return bodies


@pytest.mark.parametrize(("name", "blocks", "max_steps"), [("resnet18", 8, 30), ("resnet50", 16, 60)])
def test_torchvision_resnet_with_batchnorm(name: str, blocks: int, max_steps: int) -> None:
    g = import_model(resnet_with_batchnorm(name))
    fold_constant_nodes(g)
    assert g.op_counts()["BatchNormalization"] > 0
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    results = run_checked(g, PASSES, [{"image": x}], rel=1e-4)
    assert results[0].counts["batchnorm_folded"] == g.op_counts()["Conv"]
    _check_structure(g, "Add", blocks)
    assert len(g.nodes) <= max_steps


def test_torchvision_resnet50_default_export_steps() -> None:
    """The default export (BatchNormalization already folded by torch): 57 steps = 49 Conv epilogues, the 4
    downsample Convs, MaxPool, GlobalAveragePool, Flatten, Gemm."""
    g = import_model(M.torchvision_model("resnet50"))
    fold_constant_nodes(g)
    x = np.random.default_rng(1).standard_normal((1, 3, 224, 224)).astype(np.float32)
    run_checked(g, PASSES, [{"image": x}], rel=0)
    _check_structure(g, "Add", 16)
    assert len(g.nodes) == 57


def test_light_resnet50_from_the_onnx_wheel() -> None:
    g = import_model(light_model("light_resnet50"))
    fold_constant_nodes(g)
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    results = run_checked(g, PASSES, [{g.inputs[0].name: x}], rel=1e-4)
    assert results[0].counts["batchnorm_folded"] == 53
    _check_structure(g, "Sum", 16)
    assert len(g.nodes) == 58  # + AveragePool, MaxPool, Reshape, Gemm, Softmax
