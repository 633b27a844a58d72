"""kiln: an open inference compiler and runtime. ONNX in, a tuned engine out.

    import kiln
    config = kiln.BuilderConfig(device="cpu", profiles=[{"x": ((1, 3, 224, 224), (8, 3, 224, 224), (32, 3, 224, 224))}])
    engine = kiln.build("model.onnx", config)       # import, optimize, tune on this device
    engine.save("model.kiln")
    engine = kiln.load("model.kiln", device="cpu")  # checks the file and the device (retune=True to re-tune)
    ctx = engine.create_context()
    outputs = ctx.run({"x": x})                     # numpy in -> numpy out; torch in -> torch out

    graph = kiln.import_onnx("model.onnx")          # kiln's IR; raises a KilnError naming any problem
    report = kiln.check("model.onnx")               # every unsupported / suspicious node, in one pass
    outputs = kiln.run_reference(graph, {"x": x})   # the CPU reference executor

    import kiln.ort as onnxruntime                  # onnxruntime's API on kiln: engines built for the shapes fed
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from kiln.utils.version import __version__

if TYPE_CHECKING:
    import onnx
    import torch

    from kiln.frontend.onnx.capability import Report
    from kiln.ir.graph import Graph
    from kiln.runtime.engine import Engine


def load(path: str | os.PathLike[str], device: str | torch.device = "cpu", *, retune: bool = False,
         timing_cache: str | None = None) -> Engine:
    """Load an engine file. A file built for another device fails with a clear error, unless retune=True,
    which re-tunes the stored optimized graph for this device."""
    from kiln.runtime import engine_file
    from kiln.runtime.engine import check_device, engine_from_blob
    from kiln.utils.errors import EngineFileError

    p = os.fspath(path)
    blob = engine_file.read(p)
    if retune:
        import torch

        try:
            check_device(blob.header, torch.device(device), p)
        except (EngineFileError, KeyError):
            from kiln.build.builder import retune as _retune

            return _retune(blob, device, p, timing_cache)
    return engine_from_blob(blob, device, p)


def import_onnx(model: str | os.PathLike[str] | bytes | onnx.ModelProto) -> Graph:
    """Import an ONNX model (path, bytes or ModelProto) into kiln's IR."""
    from kiln.frontend.onnx import import_model

    return import_model(model)


def check(model: str | os.PathLike[str] | bytes | onnx.ModelProto) -> Report:
    """The capability report of `kiln check`: `report.supported`, `report.problems`."""
    from kiln.frontend.onnx.capability import check_model

    return check_model(model)


def run_reference(model: Graph | str | os.PathLike[str] | bytes | onnx.ModelProto, feeds: Any) -> Any:
    """Run a model once on CPU through the op table's reference implementations."""
    from kiln.ir.graph import Graph
    from kiln.ir.interpreter import Interpreter

    graph = model if isinstance(model, Graph) else import_onnx(model)
    return Interpreter(graph).run(feeds)


def __getattr__(name: str) -> Any:
    if name in {"KilnError", "ModelLoadError", "UnsupportedError", "InputError", "GraphError", "ShapeError",
                "ExecutionError", "EngineFileError"}:
        from kiln.utils import errors

        return getattr(errors, name)
    if name in {"DType", "Graph"}:
        from kiln import ir

        return getattr(ir, name)
    if name == "build":  # the package is callable: kiln.build(model, config) -> Engine
        import kiln.build

        return kiln.build
    if name == "BuilderConfig":
        from kiln.build.config import BuilderConfig

        return BuilderConfig
    if name == "ort":  # kiln.ort: onnxruntime's API on kiln engines
        import kiln.ort

        return kiln.ort
    if name in {"Profile", "ShapeRange"}:
        from kiln.runtime import plan

        return getattr(plan, name)
    raise AttributeError(f"module 'kiln' has no attribute '{name}'")


__all__ = ["__version__", "build", "check", "import_onnx", "load", "run_reference"]
