"""Norm-family tactics for the GPU: generated Triton kernels for (Log)Softmax, LayerNormalization,
RMSNormalization (also quantizing their result, `triton.norm_quantize`, or normalizing a residual sum,
`triton.residual_norm`), GroupNormalization and
InstanceNormalization. They load without triton (and then apply to
nothing); the kernels themselves live in `triton_kernels`, imported when a tactic is built."""

from kiln.kernels.norm.groupnorm import TritonGroupNorm
from kiln.kernels.norm.layernorm import TritonLayerNorm, TritonNormQuantize, TritonResidualNorm, TritonRMSNorm
from kiln.kernels.norm.softmax import TritonSoftmax
from kiln.kernels.registry import register

for _t in (TritonSoftmax(), TritonLayerNorm(), TritonRMSNorm(), TritonNormQuantize(), TritonResidualNorm(),
           TritonGroupNorm()):
    register(_t)
