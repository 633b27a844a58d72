"""The device fingerprint stored in every engine: what the plan was tuned for."""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class DeviceInfo:
    kind: str  # "cuda" or "cpu"
    name: str  # "NVIDIA H100 80GB HBM3" / the CPU model
    arch: str  # "sm_90" / "x86_64"
    sm_count: int = 0
    memory_bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(d: dict[str, Any]) -> DeviceInfo:
        return DeviceInfo(str(d["kind"]), str(d["name"]), str(d["arch"]), int(d.get("sm_count", 0)),
                          int(d.get("memory_bytes", 0)))

    def short(self) -> str:
        return f"{self.name} ({self.arch})"

    def compatible(self, other: DeviceInfo) -> bool:
        """Engines are tuned per GPU model: same kind, architecture, name and SM count. CPUs of the same
        architecture share engines (CPU tactics do not depend on the exact model)."""
        if self.kind != other.kind or self.arch != other.arch:
            return False
        if self.kind == "cpu":
            return True
        return self.name == other.name and self.sm_count == other.sm_count


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def describe(device: str | torch.device = "cpu") -> DeviceInfo:
    dev = torch.device(device)
    if dev.type == "cuda":
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        p = torch.cuda.get_device_properties(idx)
        return DeviceInfo("cuda", p.name, f"sm_{p.major}{p.minor}", int(p.multi_processor_count),
                          int(p.total_memory))
    if dev.type == "cpu":
        return DeviceInfo("cpu", _cpu_name(), platform.machine() or "cpu")
    raise ValueError(f"unsupported device '{device}' (use 'cpu' or 'cuda[:N]')")
