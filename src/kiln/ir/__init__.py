"""kiln's IR: dtypes, values, nodes, graphs, the op table, the verifier, the printer and the reference executor."""

from kiln.ir.dtype import DType
from kiln.ir.graph import Graph, Node, OptionalType, SequenceType, TensorType, Value, ValueType

__all__ = ["DType", "Graph", "Node", "OptionalType", "SequenceType", "TensorType", "Value", "ValueType"]
