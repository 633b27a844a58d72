"""What one run measured: a result per mode, grouped per (model, batch). Everything here goes to the JSON file."""

from __future__ import annotations

from dataclasses import dataclass, field

from benchmarks.checks import OutputCheck
from benchmarks.modes import TORCH_MODES
from benchmarks.timing import Stats

OK, FAILED, ERROR, SKIPPED = "ok", "FAILED", "error", "skipped"
KILN_GOAL = 0.75  # kiln's median over the fastest PyTorch mode's


@dataclass
class ModeResult:
    """One mode of one case. status: ok, FAILED (timed, but its outputs miss the cosine bar), error or skipped."""

    mode: str
    status: str = OK
    stats: Stats | None = None
    setup_s: dict[str, float] = field(default_factory=dict)
    checks: list[OutputCheck] = field(default_factory=list)  # vs eager at the same precision
    checks_fp32: list[OutputCheck] = field(default_factory=list)  # vs eager fp32 (when the precision is lower)
    peak_mem_mb: float | None = None
    error: str | None = None
    traceback: str | None = None

    @property
    def timed(self) -> bool:
        return self.stats is not None


@dataclass
class CaseResult:
    """Every mode of one (model, batch, precision)."""

    model: str
    batch: int
    precision: str
    device: str
    modes: list[ModeResult] = field(default_factory=list)
    eager_vs_fp32: list[OutputCheck] = field(default_factory=list)  # context: what the precision itself costs
    export_s: float | None = None
    min_cosine: float = 0.0

    def mode(self, name: str) -> ModeResult | None:
        return next((m for m in self.modes if m.mode == name), None)

    def best_torch(self) -> ModeResult | None:
        """The fastest PyTorch mode whose outputs pass the check."""
        timed = [m for m in self.modes if m.mode in TORCH_MODES and m.stats is not None and m.status == OK]
        return min(timed, key=lambda m: m.stats.median_ms) if timed else None  # type: ignore[union-attr]

    def ratio(self, name: str) -> float | None:
        """`name`'s median over the fastest PyTorch mode's median."""
        best, m = self.best_torch(), self.mode(name)
        if best is None or m is None or m.stats is None or best.stats is None:
            return None
        return m.stats.median_ms / best.stats.median_ms
