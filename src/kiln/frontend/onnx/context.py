"""What an ONNX op handler sees: the ONNX node, its resolved inputs, and ways to emit kiln nodes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import torch

from kiln.ir.convert import from_numpy
from kiln.ir.dtype import DType
from kiln.ir.graph import Constant, Graph, Value, ValueType
from kiln.ir.ops.base import const_value
from kiln.utils.errors import UnsupportedError

if TYPE_CHECKING:
    from kiln.frontend.onnx.importer import Importer, Scope


class NodeCtx:
    """One ONNX node being imported. Handlers read `inputs` and `attrs` and return the kiln values for
    the node's outputs (in order), usually from `emit`."""

    def __init__(
        self,
        importer: Importer,
        node: onnx.NodeProto,
        graph: Graph,
        scope: Scope,
        inputs: list[Value | None],
        attrs: dict[str, Any],
        opset: int,
        since: int,
    ) -> None:
        self.importer = importer
        self.proto = node
        self.graph = graph
        self.scope = scope
        self.inputs = inputs
        self.attrs = attrs
        self.op_type = node.op_type
        self.domain = node.domain or ""
        self.opset = opset
        self.since = since
        self.name = node.name or graph.fresh_name(node.op_type)
        self.output_names = list(node.output)

    # --- reading ------------------------------------------------------------------------------------

    def attr(self, name: str, default: Any = None) -> Any:
        return self.attrs.get(name, default)

    def input(self, i: int) -> Value | None:
        return self.inputs[i] if i < len(self.inputs) else None

    def const_input(self, i: int) -> Any:
        """The constant value of input i (torch tensor / numpy strings), or None."""
        return const_value(self.input(i))

    @property
    def n_outputs(self) -> int:
        """How many outputs the node uses (trailing omitted ones dropped)."""
        names = self.output_names
        while names and not names[-1]:
            names = names[:-1]
        return len(names)

    # --- building -----------------------------------------------------------------------------------

    def emit(
        self,
        op: str,
        inputs: Sequence[Value | None],
        attrs: dict[str, Any] | None = None,
        *,
        outputs: int | None = None,
    ) -> list[Value]:
        """Add a kiln node. With `outputs=None` this is the node's final op: its outputs take the ONNX output
        names. Give `outputs=k` for intermediate nodes (their values get derived names)."""
        if outputs is None:
            n = max(self.n_outputs, 1)
            names = [self.output_names[i] if i < len(self.output_names) and self.output_names[i]
                     else f"{self.name}_unused{i}" for i in range(n)]
            return self.graph.add(op, inputs, attrs, name=self.name, outputs=names)
        return self.graph.add(op, inputs, attrs, name=self.graph.fresh_name(f"{self.name}/{op}"),
                              outputs=[f"{self.name}/{op}_{i}" for i in range(outputs)])

    def const(self, data: Any, dtype: DType | None = None, hint: str = "const") -> Value:
        """A new initializer. `data` may be a torch tensor, a numpy array, a list or a Python number."""
        t: Constant
        if isinstance(data, torch.Tensor):
            t = data
            if dtype is not None and not dtype.is_narrow and data.dtype != dtype.torch:
                t = data.to(dtype.torch)
        else:
            arr = np.asarray(data)
            if dtype is None and arr.dtype == np.float64 and not isinstance(data, np.ndarray):
                dtype = DType.FLOAT32  # a Python float means the model's float, not double
            t, dtype = from_numpy(arr, dtype)
        return self.graph.add_initializer(f"{self.name}/{hint}", t, dtype)

    def subgraph(self, attr: str, input_types: Sequence[ValueType | None] | None = None) -> Graph:
        """Import the GraphProto attribute `attr` as a subgraph of the current graph. `input_types` overrides the
        declared types of its inputs (None entries keep the declared type)."""
        gp = self.attrs.get(attr)
        if not isinstance(gp, onnx.GraphProto):
            raise self.fail(f"attribute '{attr}' must be a graph")
        return self.importer.import_subgraph(gp, self.graph, self.scope, input_types, f"{self.name}/{attr}")

    def fail(self, reason: str, hint: str | None = None) -> UnsupportedError:
        return UnsupportedError(reason, op=self.op_type, node=self.name, opset=self.opset, domain=self.domain,
                                hint=hint)

    def default(self) -> list[Value]:
        """Map the node onto the kiln op of the same name, attributes converted by that op's schema."""
        from kiln.frontend.onnx.handlers import default_handler

        return default_handler(self)


Handler = Callable[[NodeCtx], Sequence[Value | None]]
