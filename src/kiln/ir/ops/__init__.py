"""The op table: one entry per op (attributes, shape/dtype inference, torch reference implementation).

Entries live in one module per op family; importing this package registers them all.
"""

from __future__ import annotations

from kiln.ir.ops.base import (
    OPS,
    REQUIRED,
    Attr,
    AttrKind,
    InferCtx,
    OpDef,
    RefCtx,
    broadcast_shapes,
    const_value,
    register,
)
from kiln.utils.errors import UnsupportedError

# Registration order does not matter; each module adds its ops to OPS.
from kiln.ir.ops import (  # noqa: F401  isort: skip
    elementwise,
    cast,
    tensor,
    reduce,
    norm,
    linalg,
    loss,
    conv,
    pool,
    image,
    control,
    sequence,
    string,
    quant,
    random,
    signal,
    rnn,
    attention,
    fused,
)


def get_op(name: str) -> OpDef:
    op = OPS.get(name)
    if op is None:
        raise UnsupportedError("kiln's op table has no such op", op=name)
    return op


__all__ = [
    "OPS",
    "REQUIRED",
    "Attr",
    "AttrKind",
    "InferCtx",
    "OpDef",
    "RefCtx",
    "broadcast_shapes",
    "const_value",
    "get_op",
    "register",
]
