"""kiln: an open inference compiler and runtime. ONNX in, a tuned engine out.

    import kiln
    graph = kiln.import_onnx("model.onnx")          # kiln's IR; raises a KilnError naming any problem
    report = kiln.check("model.onnx")               # every unsupported / suspicious node, in one pass
    outputs = kiln.run_reference(graph, {"x": x})   # CPU reference executor: numpy in -> numpy out, torch -> torch
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    import onnx

    from kiln.frontend.onnx.capability import Report
    from kiln.ir.graph import Graph


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
    raise AttributeError(f"module 'kiln' has no attribute '{name}'")


__all__ = ["__version__", "check", "import_onnx", "run_reference"]
