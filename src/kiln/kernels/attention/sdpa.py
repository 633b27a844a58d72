"""`cuda.sdpa`: the Attention op through torch's scaled_dot_product_attention, one backend per config
(FlashAttention-2, memory-efficient, cuDNN, math): the tuner keeps the fastest that runs and matches.

Takes 4-D [batch, heads, seq, head] or packed 3-D [batch, seq, heads*head] Q/K/V (heads from the attributes),
grouped-query K/V, a float additive or a boolean mask (broadcast over heads; a boolean one becomes 0 / -inf),
`is_causal` without a mask, any scale. A boolean mask's query row with no key to see gives zeros, as the
reference defines: the kernel zeroes those rows after SDPA (torch 2.13's CPU backends give zeros there too; no
backend promises it). A float mask's all -inf row is not checked - that would cost every BERT layer two more
kernels; the tuner's comparison with the reference drops a backend that differs on its sample, and ONNX exports
hide keys with finite fills.
Left to others: a KV cache (past_key/value) and softcap (`triton.flash_attention` takes both), nonpad_kv_seqlen,
sliding windows, the QK output (the reference).

`cuda.sdpa_quantize` takes a "quantizing" node (an Attention and the per-tensor QuantizeLinear of its output, as
INT8/FP8 builds fuse them): the attention on a torch backend, then the QuantizeLinear's own kernel - beside
`triton.flash_attention_quantize`, so that the tuner can weigh torch's faster attention (cuDNN's, on Hopper)
plus a quantize pass against the Triton kernel that stores 8 bits itself.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from kiln.ir.dtype import DType
from kiln.ir.graph import Node, TensorType
from kiln.kernels.base import Kernel, SubgraphRunner, Tactic
from kiln.kernels.norm.common import quantizing_view, separate_quantize
from kiln.kernels.registry import register

FLOATS = frozenset({DType.FLOAT32, DType.FLOAT16, DType.BFLOAT16})
BACKENDS = ["flash", "efficient", "cudnn", "math"]


def _backend(name: str) -> Any:
    from torch.nn.attention import SDPBackend

    return {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[name]


class Sdpa(Tactic):
    name = "cuda.sdpa"
    ops = frozenset({"Attention"})
    devices = frozenset({"cuda"})
    space = {"backend": BACKENDS}
    priority = 40

    def applicable(self, node: Node, device: torch.device) -> bool:
        a = node.attrs
        if device.type not in self.devices or len(node.outputs) != 1 or len(node.inputs) > 4:
            return False
        if a["softcap"] or a["left_window_size"] >= 0 or a["right_window_size"] >= 0 or a["qk_matmul_output_mode"]:
            return False
        if a["softmax_precision"] not in (None, DType.FLOAT32):
            return False
        qkv = node.inputs[:3]
        types = [v.type if v is not None else None for v in qkv]
        if not all(isinstance(t, TensorType) and t.dtype in FLOATS and t.rank in (3, 4) for t in types):
            return False
        if len({t.dtype for t in types}) != 1 or len({t.rank for t in types}) != 1:  # type: ignore[union-attr]
            return False
        mask = node.inputs[3] if len(node.inputs) > 3 else None
        if mask is not None:
            if a["is_causal"] or not isinstance(mask.type, TensorType):
                return False
            if not mask.type.dtype.is_float and mask.type.dtype is not DType.BOOL:
                return False
            if mask.type.rank is None or mask.type.rank > 4:
                return False
        return True

    def node_configs(self, node: Node) -> list[dict[str, Any]]:
        return _masked_last(self.configs(), node)

    def build(self, node: Node, config: dict[str, Any], device: torch.device,
              run_subgraph: SubgraphRunner | None = None) -> Kernel:
        a = node.attrs
        backend = _backend(config.get("backend", "flash"))
        causal = bool(a["is_causal"])
        scale = a["scale"]
        qh, kvh = a["q_num_heads"], a["kv_num_heads"]

        def run(xs: list[Any]) -> list[Any]:
            q, k, v = xs[0], xs[1], xs[2]
            mask = xs[3] if len(xs) > 3 else None
            packed = q.dim() == 3
            if packed:
                q = q.view(q.shape[0], q.shape[1], qh, -1).transpose(1, 2)
                k = k.view(k.shape[0], k.shape[1], kvh, -1).transpose(1, 2)
                v = v.view(v.shape[0], v.shape[1], kvh, -1).transpose(1, 2)
            if causal and q.shape[2] != k.shape[2]:
                raise ValueError("is_causal with different query and key lengths is left to the reference")
            dead = None
            if mask is not None:
                while mask.dim() < 4:
                    mask = mask.unsqueeze(0)
                if mask.dtype == torch.bool:
                    dead = ~mask.any(-1, keepdim=True)
                    mask = torch.where(mask, torch.zeros((), dtype=q.dtype, device=q.device),
                                       torch.full((), float("-inf"), dtype=q.dtype, device=q.device))
                else:
                    mask = mask.to(q.dtype)
            gqa = k.shape[1] != q.shape[1]
            from torch.nn.attention import sdpa_kernel

            with sdpa_kernel([backend]):
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                                   enable_gqa=gqa)
            if dead is not None:  # rows with no key to see: zeros whatever the backend did (no host sync)
                y = y.masked_fill(dead, 0.0)
            if packed:
                y = y.transpose(1, 2).reshape(y.shape[0], y.shape[2], -1)
            return [y]

        return run


def _masked_last(cfgs: list[dict[str, Any]], attention: Node) -> list[dict[str, Any]]:
    """`cfgs` with the flash backend last when `attention` has a mask (FlashAttention takes none: as the first
    config, the only one timed below the default level, it left every masked attention - BERT's, every LLM
    export's - to the next tactic)."""
    if len(attention.inputs) > 3 and attention.inputs[3] is not None:
        return sorted(cfgs, key=lambda c: c.get("backend") == "flash")
    return cfgs


class SdpaQuantize(Tactic):
    """A "quantizing" Attention node as `cuda.sdpa` (one config per backend but math) followed by the node's
    QuantizeLinear alone; the float output too when the node keeps it."""

    name = "cuda.sdpa_quantize"
    ops = frozenset({"Fused"})
    devices = frozenset({"cuda"})
    space = {"backend": [b for b in BACKENDS if b != "math"]}
    priority = 65  # untimed builds (level 0) keep the one-kernel triton.flash_attention_quantize (60)

    def applicable(self, node: Node, device: torch.device) -> bool:
        view = quantizing_view(node, ("Attention",))
        return view is not None and _SDPA.applicable(view.op, device)

    def node_configs(self, node: Node) -> list[dict[str, Any]]:
        view = quantizing_view(node, ("Attention",))
        return self.configs() if view is None else _masked_last(self.configs(), view.op)

    def build(self, node: Node, config: dict[str, Any], device: torch.device,
              run_subgraph: SubgraphRunner | None = None) -> Kernel:
        view = quantizing_view(node, ("Attention",))
        assert view is not None
        at = [view.at[v] for v in view.op.inputs if v is not None]
        attention = _SDPA.build(view.op, config, device)
        quantize = separate_quantize(view, device)

        def run(xs: list[Any]) -> list[Any]:
            (y,) = attention([xs[i] for i in at])
            return ([y] if view.keep_y else []) + quantize([y])

        return run


_SDPA = Sdpa()
register(_SDPA)
register(SdpaQuantize())
