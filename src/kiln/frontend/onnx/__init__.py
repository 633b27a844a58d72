"""The ONNX importer: `import_model(path | bytes | ModelProto) -> Graph`, and the capability report."""

from kiln.frontend.onnx.importer import MAX_OPSET, Importer, Problem, import_model, load_model

__all__ = ["MAX_OPSET", "Importer", "Problem", "import_model", "load_model"]
