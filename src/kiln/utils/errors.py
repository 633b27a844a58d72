"""The KilnError tree: every user-facing failure names the thing that failed and says what to do."""

from __future__ import annotations


class KilnError(Exception):
    """Base of all errors kiln reports to users. The message is complete on its own (one or two lines)."""

    hint: str | None = None

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        if hint is not None:
            self.hint = hint
        super().__init__(self.__str__())

    def __str__(self) -> str:
        return f"{self.message}\n  hint: {self.hint}" if self.hint else self.message


class ModelLoadError(KilnError):
    """The model file could not be read: missing, truncated, not ONNX, missing external data."""


class UnsupportedError(KilnError):
    """The model uses something kiln does not support (an op, an op version, an attribute value, a type)."""

    def __init__(
        self,
        reason: str,
        *,
        op: str | None = None,
        node: str | None = None,
        opset: int | None = None,
        domain: str = "",
        hint: str | None = None,
    ) -> None:
        self.reason = reason
        self.op = op
        self.node = node
        self.opset = opset
        self.domain = domain
        where = []
        if op is not None:
            where.append(f"op {domain + '::' if domain else ''}{op}")
        if opset is not None:
            where.append(f"opset {opset}")
        if node is not None:
            where.append(f"node '{node}'")
        prefix = f"{', '.join(where)}: " if where else ""
        super().__init__(f"{prefix}{reason}", hint=hint)


class GraphError(KilnError):
    """The graph is malformed: a dangling value, a cycle, a type that does not match its op."""


class ShapeError(KilnError):
    """Shapes or dtypes are inconsistent in the graph (found by inference)."""


class InputError(KilnError):
    """Run-time inputs do not match the model: unknown or missing name, wrong dtype, wrong shape."""


class ExecutionError(KilnError):
    """An op failed while running; names the node and op."""


class EngineFileError(KilnError):
    """An engine file could not be loaded: not a kiln file, corrupt, too new, built for another device."""
