"""The builder's configuration: a validated dataclass (the CLI's flags map onto it one to one)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kiln.runtime.plan import Profile, ShapeRange
from kiln.utils.errors import KilnError

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8")
FP8_CAPABILITY = (8, 9)
"""FP8 (E4M3) tensor cores: Ada (sm_89) and Hopper (sm_90) onwards."""


class ConfigError(KilnError):
    """A BuilderConfig value is out of range or inconsistent."""


def _shape(name: str, s: Any) -> tuple[int, ...]:
    try:
        return tuple(int(d) for d in s)
    except (TypeError, ValueError):
        raise ConfigError(f"shape for input '{name}' must be a sequence of ints, got {s!r}") from None


def as_profile(p: Profile | Mapping[str, Any]) -> Profile:
    """A Profile, from a Profile or {input: shape | (min, opt, max) | {"min":..,"opt":..,"max":..}}."""
    if isinstance(p, Profile):
        return p
    shapes: dict[str, ShapeRange] = {}
    for name, r in p.items():
        try:
            if isinstance(r, ShapeRange):
                shapes[name] = r
            elif isinstance(r, Mapping):
                shapes[name] = ShapeRange(_shape(name, r["min"]), _shape(name, r["opt"]), _shape(name, r["max"]))
            elif len(r) == 3 and all(isinstance(x, (list, tuple)) for x in r):
                shapes[name] = ShapeRange(_shape(name, r[0]), _shape(name, r[1]), _shape(name, r[2]))
            else:
                shapes[name] = ShapeRange.fixed(_shape(name, r))
        except (ValueError, KeyError) as e:
            raise ConfigError(f"profile for input '{name}': {e}") from None
    return Profile(shapes)


def default_calibrator(precision: str) -> str:
    """How activation ranges are chosen when the user does not say: entropy for int8 (clipping rare outliers buys
    resolution for the 255 levels), the observed maximum for fp8 (E4M3's exponent covers the range; clipping only
    loses). Measured on all-MiniLM-L6-v2 (CPU, fp8, 25 layers): minmax embeddings cosine 0.9970 to FP32,
    percentile 0.9922, entropy 0.7101."""
    return "minmax" if precision == "fp8" else "entropy"


@dataclass
class BuilderConfig:
    """How to build an engine.

    precision: "fp32" (GPU: TF32 matmuls unless tf32=False), "fp16" or "bf16" (GPU only): the whole graph
        computes in that type, FP32 accumulation inside the kernels; inputs and outputs keep their types.
    device: "cpu" or "cuda[:N]".
    profiles: shape ranges for dynamic inputs, one dict (or Profile) per optimization profile:
        {"input": (min_shape, opt_shape, max_shape)} or {"input": fixed_shape}.
    timing_cache: a file; timings found there are reused, new ones are added.
    opt_level: 0 = first applicable tactic, no timing; 1-2 = time the best-ranked tactics (first configs);
        3 (default) = time every applicable tactic, searching small spaces (<= 16 configurations) whole and
        larger ones at their first configuration; 4-5 = search every tactic's full space.
    time_budget_s: stop timing after this long (remaining nodes take their first tactic).
    memory_limit_bytes: refuse plans whose activation arena is larger.
    deterministic: same model + same timing cache -> byte-identical engine file (no timestamps or timings
        recorded; choices not in the cache are made without timing).
    calibration / calibrator / calibration_cache: for precision="int8" (Q/DQ on every Conv/Gemm/MatMul input;
        the layers are folded into int8 GEMM/conv kernels, chosen where the tuner finds them faster). On a GPU
        the layers left in float compute in FP16 (FP32 where their values leave FP16's range), as TensorRT's
        --int8 --fp16 does; `kiln build` shows the mix. precision="fp8" is the same with FP8 E4M3 (per-tensor
        activation scales; weights per tensor for GEMMs, per output channel for convs; on FP8 tensor cores);
        refused on GPUs older than sm_89; on the CPU it runs through torch's FP8 matmul and the reference
        (correct, not fast).
    layer_precision: {layer-name glob: "fp32"} layers kept in FP32 in an fp16/bf16 build. The build also keeps
        in FP32 every layer whose values leave FP16's range on the calibration data (when given with fp16, up to
        64 samples; else on random inputs at the profiles' opt shapes), and reports each with its reason.
    """

    precision: str = "fp32"
    tf32: bool = True
    device: str = "cpu"
    profiles: Sequence[Profile | Mapping[str, Any]] = field(default_factory=list)
    timing_cache: str | os.PathLike[str] | None = None
    opt_level: int = 3
    time_budget_s: float | None = None
    memory_limit_bytes: int | None = None
    deterministic: bool = False
    layer_precision: Mapping[str, str] = field(default_factory=dict)
    """Layer-name glob -> "fp32": layers an fp16/bf16 build keeps in FP32 (besides those it finds overflowing)."""
    calibration: Any = None
    """INT8 (scales) or FP16 (ranges that decide FP32 layers): samples - a directory of .npy/.npz files, or an
    iterable of {input: array} dicts."""
    calibrator: str | None = None
    """None: "entropy" for int8, "minmax" for fp8 (see `default_calibrator`)."""
    calibration_cache: str | os.PathLike[str] | None = None
    """INT8: a JSON file of tensor scales, written by the first build and reused by later ones."""
    accuracy_check: Any = None
    """INT8: held-out samples (as `calibration`): the quantized graph is compared with the float one on them."""
    accuracy_target: str | None = None
    """INT8: "cosine>=X" or "top1>=X"; layers most responsible for the loss stay float until it is met."""
    pdl: bool | None = None
    """GPU: launch kiln's Triton kernels with programmatic dependent launch (sm_90+; `kiln.kernels.pdl`), stored in
    the engine; None: as the KILN_PDL environment variable says where the engine runs (on unless it is "0")."""
    refine: bool = True
    """GPU, opt_level >= 3: after tuning, try the candidates that came close to each choice in the whole engine
    (captured in a CUDA graph, where kernels overlap their neighbours) and keep those that make it faster
    (`kiln.tune.refine`; at most 30 s, within time_budget_s)."""

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got '{self.precision}'")
        try:
            dev = torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ConfigError(f"device must be 'cpu' or 'cuda[:N]', got '{self.device}'") from None
        if dev.type not in ("cpu", "cuda"):
            raise ConfigError(f"device must be 'cpu' or 'cuda[:N]', got '{self.device}'")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device '{self.device}' was asked for, but no CUDA GPU is available",
                              hint="build with device='cpu', or on a machine with an NVIDIA GPU")
        if self.precision in ("fp16", "bf16") and dev.type == "cpu":
            raise ConfigError(f"precision {self.precision} needs a GPU; kiln's CPU tactics compute in fp32",
                              hint="use precision='fp32' on CPU")
        if self.calibrator is None:
            self.calibrator = default_calibrator(self.precision)
        if self.precision in ("int8", "fp8"):
            from kiln.precision.calibration import CALIBRATORS

            if self.calibrator not in CALIBRATORS:
                raise ConfigError(f"calibrator must be one of {', '.join(CALIBRATORS)}, got '{self.calibrator}'")
            if self.calibration is None and (self.calibration_cache is None
                                             or not os.path.exists(self.calibration_cache)):
                raise ConfigError(f"an {self.precision} build needs calibration data (or an existing calibration "
                                  f"cache)", hint=f"kiln build --{self.precision} --calib DIR (a folder of .npy/.npz "
                                                  f"input samples)")
        if self.precision == "fp8" and dev.type == "cuda" and torch.cuda.get_device_capability(dev) < FP8_CAPABILITY:
            major, minor = torch.cuda.get_device_capability(dev)
            raise ConfigError(f"precision fp8 was asked for, but {torch.cuda.get_device_name(dev)} (sm_{major}{minor}) "
                              f"has no FP8 tensor cores (sm_89 and newer: Ada, Hopper)",
                              hint="build with --int8 or --fp16 on this GPU")
        if self.precision == "bf16" and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
            # Never build something else when a precision was asked for (TensorRT 11's silent fallback hurts).
            raise ConfigError(f"precision bf16 was asked for, but {torch.cuda.get_device_name(dev)} has no BF16 "
                              f"support", hint="build with precision='fp16' (or 'fp32') on this GPU")
        if self.calibration is not None and self.precision == "fp32":
            raise ConfigError("calibration data was given for an fp32 build, which has no ranges to choose",
                              hint="add --int8 (calibrated int8), or --fp16 (the data decides which layers stay "
                                   "fp32)")
        if (self.accuracy_check is not None or self.accuracy_target) and self.precision not in ("int8", "fp8"):
            raise ConfigError("an accuracy check applies to int8 and fp8 builds",
                              hint="add --int8 (or --fp8), or drop the check")
        if self.accuracy_target and self.accuracy_check is None:
            raise ConfigError(f"accuracy target '{self.accuracy_target}' needs held-out data to check it on",
                              hint="kiln build --int8 --calib DIR --accuracy-check DIR2 --accuracy-target ...")
        if self.accuracy_target:
            from kiln.precision.accuracy import Target

            Target.parse(self.accuracy_target)
        if self.layer_precision and self.precision not in ("fp16", "bf16"):
            raise ConfigError("layer precisions were given for an fp32 build: every layer is fp32 already",
                              hint="build with precision='fp16' or 'bf16' (--fp16/--bf16) to mix precisions")
        for pattern, prec in self.layer_precision.items():
            if prec != "fp32":
                raise ConfigError(f"layer precision '{pattern}:{prec}': only fp32 can be pinned",
                                  hint="pin the layers that must stay fp32; the rest follow the build's precision")
        if not isinstance(self.opt_level, int) or not 0 <= self.opt_level <= 5:
            raise ConfigError(f"opt_level must be an integer from 0 to 5, got {self.opt_level!r}")
        if self.time_budget_s is not None and self.time_budget_s < 0:
            raise ConfigError(f"time_budget_s must be >= 0, got {self.time_budget_s}")
        if self.memory_limit_bytes is not None and self.memory_limit_bytes <= 0:
            raise ConfigError(f"memory_limit_bytes must be > 0, got {self.memory_limit_bytes}")
        self.profiles = [as_profile(p) for p in self.profiles]

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    def to_json(self) -> dict[str, Any]:
        return {
            "precision": self.precision, "tf32": self.tf32, "device": self.device, "opt_level": self.opt_level,
            "time_budget_s": self.time_budget_s, "memory_limit_bytes": self.memory_limit_bytes,
            "deterministic": self.deterministic, "layer_precision": dict(self.layer_precision), "pdl": self.pdl,
            "refine": self.refine,
            "calibrator": self.calibrator if self.precision in ("int8", "fp8") else None,
            "profiles": [p.to_json() for p in self.profiles],  # type: ignore[union-attr]
        }
