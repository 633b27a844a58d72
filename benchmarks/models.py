"""The benchmarked models, built with seeded random weights (nothing downloads), and their ONNX export.

Every model is wrapped so that it takes its inputs positionally, in `ModelSpec.inputs` order, and returns a tuple in
`ModelSpec.outputs` order: PyTorch modes, the ONNX export and the correctness checks all see the same signature.

Random weights are made to look trained: parameters that initialize to a constant (zero biases, unit LayerNorm
scales, ViT's zero classifier head) are redrawn close to that constant, so that no optimizer can drop them as no-ops,
and BatchNorm statistics are recalibrated on random images, so that activations neither vanish (MobileNetV3's
logits are ~1e-10 otherwise, zero in fp16) nor grow through the residual stack.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

SEED = 0
OPSET = 17
BERT_SEQ = 128
TINY_BERT_SEQ = 16
CALIBRATION_BATCHES = 2
CALIBRATION_BATCH = 8
REDRAW_STD = 0.02


@dataclass(frozen=True)
class InputSpec:
    """One model input. kind: "float" (N(0, 1)), "ids" (integers in [0, high)) or "ones" (an all-ones int64 mask)."""

    name: str
    shape: tuple[int, ...]  # without the batch dimension
    kind: str = "float"
    high: int = 0


@dataclass(frozen=True)
class ModelSpec:
    """How to build one benchmarked model. `build` gives the fp32 wrapper on the CPU; `export_variant` gives the
    module the ONNX exporter traces (same weights; BERT swaps SDPA for its eager attention, which exports cleanly)."""

    name: str
    build: Callable[[], nn.Module]
    inputs: tuple[InputSpec, ...]
    outputs: tuple[str, ...]
    dynamic: dict[str, dict[int, str]] = field(default_factory=dict)
    export_variant: Callable[[nn.Module], nn.Module] = lambda m: m
    hidden: bool = False  # test-only models, left out of the default list


class TupleOut(nn.Module):
    """A single-output model that returns a one-element tuple, like the multi-output wrappers."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.model(x),)


class BertOutputs(nn.Module):
    """BertModel with positional (input_ids, attention_mask) in and (last_hidden_state, pooler_output) out."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask)
        return out.last_hidden_state, out.pooler_output


class TinyCNN(nn.Module):
    """Two convolutions and a classifier: the smoke test's vision model."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


# --- weights ---------------------------------------------------------------------------------------------------


def redraw_constants(model: nn.Module) -> None:
    """Redraw every floating parameter that is one constant (0 or 1 initializers) as N(constant, REDRAW_STD)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.numel() > 0 and bool((p == p.flatten()[0]).all()):
                p.normal_(float(p.flatten()[0]), REDRAW_STD)


def calibrate_batchnorm(model: nn.Module, image_shape: tuple[int, ...]) -> None:
    """Set BatchNorm running statistics from random images, as if the model had been trained on such data."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
        m.train()
    with torch.no_grad():
        for _ in range(CALIBRATION_BATCHES):
            model(torch.randn(CALIBRATION_BATCH, *image_shape))
    model.eval()


def _seeded(make: Callable[[], nn.Module], image_shape: tuple[int, ...] | None = None) -> nn.Module:
    torch.manual_seed(SEED)
    model = make().eval()
    redraw_constants(model)
    if image_shape is not None:
        calibrate_batchnorm(model, image_shape)
    return model.eval()


# --- the models ------------------------------------------------------------------------------------------------

IMAGE = (3, 224, 224)
VISION_DYNAMIC = {"x": {0: "batch"}, "logits": {0: "batch"}}


def _torchvision(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return TupleOut(_seeded(lambda: getattr(torchvision.models, name)(weights=None), IMAGE)).eval()

    return build


def _bert_config(tiny: bool, attn: str):  # -> transformers.BertConfig
    from transformers import BertConfig

    if tiny:
        return BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64, max_position_embeddings=64, attn_implementation=attn)
    return BertConfig(attn_implementation=attn)  # bert-base: 12 layers, hidden 768, 12 heads, vocab 30522


def _bert(tiny: bool) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from transformers import BertModel

        return BertOutputs(_seeded(lambda: BertModel(_bert_config(tiny, "sdpa")))).eval()

    return build


def _bert_for_export(tiny: bool) -> Callable[[nn.Module], nn.Module]:
    """The same weights with transformers' eager attention: plain MatMul/Softmax in ONNX, what TensorRT users export
    (the SDPA path exports the same math with extra NaN guards)."""

    def variant(model: nn.Module) -> nn.Module:
        from transformers import BertModel

        bert = BertModel(_bert_config(tiny, "eager"))
        bert.load_state_dict(model.bert.state_dict())  # type: ignore[union-attr]
        return BertOutputs(bert).eval()

    return variant


def _bert_spec(name: str, tiny: bool) -> ModelSpec:
    seq = TINY_BERT_SEQ if tiny else BERT_SEQ
    vocab = 1000 if tiny else 30522
    dyn = {n: {0: "batch", 1: "seq"} for n in ("input_ids", "attention_mask", "last_hidden_state")}
    dyn["pooler_output"] = {0: "batch"}
    return ModelSpec(name, _bert(tiny), (InputSpec("input_ids", (seq,), "ids", vocab),
                                         InputSpec("attention_mask", (seq,), "ones")),
                     ("last_hidden_state", "pooler_output"), dyn, _bert_for_export(tiny), hidden=tiny)


SPECS: dict[str, ModelSpec] = {
    "resnet50": ModelSpec("resnet50", _torchvision("resnet50"), (InputSpec("x", IMAGE),), ("logits",),
                          VISION_DYNAMIC),
    "mobilenet_v3_large": ModelSpec("mobilenet_v3_large", _torchvision("mobilenet_v3_large"),
                                    (InputSpec("x", IMAGE),), ("logits",), VISION_DYNAMIC),
    "vit_b_16": ModelSpec("vit_b_16", _torchvision("vit_b_16"), (InputSpec("x", IMAGE),), ("logits",),
                          VISION_DYNAMIC),
    "bert_base": _bert_spec("bert_base", tiny=False),
    # beyond the four, by name only: the layouts ConvNeXt's NHWC round trips and EfficientNet's
    # squeeze-excitation blocks and odd channel counts need
    "convnext_tiny": ModelSpec("convnext_tiny", _torchvision("convnext_tiny"), (InputSpec("x", IMAGE),), ("logits",),
                               VISION_DYNAMIC, hidden=True),
    "efficientnet_b0": ModelSpec("efficientnet_b0", _torchvision("efficientnet_b0"), (InputSpec("x", IMAGE),),
                                 ("logits",), VISION_DYNAMIC, hidden=True),
    "tiny_cnn": ModelSpec("tiny_cnn", lambda: TupleOut(_seeded(TinyCNN, (3, 32, 32))).eval(),
                          (InputSpec("x", (3, 32, 32)),), ("logits",), VISION_DYNAMIC, hidden=True),
    "tiny_bert": _bert_spec("tiny_bert", tiny=True),
}
DEFAULT_MODELS = tuple(name for name, s in SPECS.items() if not s.hidden)


# --- inputs ----------------------------------------------------------------------------------------------------


def make_inputs(spec: ModelSpec, batch: int, index: int) -> list[torch.Tensor]:
    """Input set number `index` (seeded by it) on the CPU: float32 for float inputs, int64 otherwise."""
    gen = torch.Generator().manual_seed(1000 + index)
    out = []
    for inp in spec.inputs:
        shape = (batch, *inp.shape)
        if inp.kind == "float":
            out.append(torch.randn(shape, generator=gen))
        elif inp.kind == "ids":
            out.append(torch.randint(0, inp.high, shape, generator=gen, dtype=torch.int64))
        else:
            out.append(torch.ones(shape, dtype=torch.int64))
    return out


# --- ONNX ------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _mha_fastpath_off() -> Iterator[None]:
    """nn.MultiheadAttention's fused inference kernel has no ONNX export; the exporter must see the plain ops."""
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)


def export_onnx(spec: ModelSpec, model: nn.Module, path: Path, *, exporter: str = "torchscript",
                as_built: bool = False) -> Path:
    """Export the fp32 model to ONNX with a dynamic batch: by the TorchScript exporter (opset OPSET) or, `exporter`
    "dynamo", by torch.export (its own opset; weights kept inside the file); `as_built`: the model itself rather
    than its export variant (`ModelSpec.export_variant`). Returns `path`."""
    module = (model if as_built else spec.export_variant(model)).eval()
    args = tuple(make_inputs(spec, 2, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    names = {"input_names": [i.name for i in spec.inputs], "output_names": list(spec.outputs),
             "dynamic_axes": spec.dynamic}
    with _mha_fastpath_off(), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' deprecation and tracer warnings
        if exporter == "dynamo":
            torch.onnx.export(module, args, str(path), dynamo=True, external_data=False, **names)
        elif exporter == "torchscript":
            torch.onnx.export(module, args, str(path), opset_version=OPSET, dynamo=False, **names)
        else:
            raise ValueError(f"unknown exporter '{exporter}'")
    model.eval()  # the exporter restores the training flag it found; make sure nothing was left in train mode
    return path


ONNX_DTYPES = {1: torch.float32, 10: torch.float16, 16: torch.bfloat16, 7: torch.int64, 6: torch.int32,
               9: torch.bool}


def onnx_input_dtypes(path: Path) -> dict[str, torch.dtype]:
    """The element type of each graph input of an ONNX file."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {i.name: ONNX_DTYPES[i.type.tensor_type.elem_type] for i in proto.graph.input}
