"""kiln as an `onnx.backend` Backend, so the ONNX backend test suite can run against it."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import torch
from onnx.backend.base import Backend, BackendRep

from kiln.frontend.onnx import import_model
from kiln.ir.interpreter import Interpreter


class KilnRep(BackendRep):
    def __init__(self, interp: Interpreter) -> None:
        self.interp = interp

    def run(self, inputs: Any, **kwargs: Any) -> tuple[Any, ...]:
        feeds = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
        graph_inputs = self.interp.graph.inputs
        if len(feeds) > len(graph_inputs):
            feeds = feeds[: len(graph_inputs)]
        named = {v.name: np.asarray(x) if not isinstance(x, (list, type(None))) else x
                 for v, x in zip(graph_inputs, feeds)}
        # Inputs the test does not feed are optional graph inputs: pass "empty".
        for v in graph_inputs[len(feeds):]:
            named[v.name] = None
        # Unseeded random ops draw from torch's global generator: seeded here, a case's outcome does not depend on
        # what ran before it in the process (the Bernoulli cases, compared with numpy's draws, matched by chance).
        torch.manual_seed(0)
        out = self.interp.run(named)
        return tuple(out.values())


class KilnBackend(Backend):
    @classmethod
    def is_compatible(cls, model: onnx.ModelProto, device: str = "CPU", **kwargs: Any) -> bool:
        return True

    @classmethod
    def prepare(cls, model: onnx.ModelProto, device: str = "CPU", **kwargs: Any) -> KilnRep:
        return KilnRep(Interpreter(import_model(model)))

    @classmethod
    def supports_device(cls, device: str) -> bool:
        return device == "CPU"
