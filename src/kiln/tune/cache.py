"""The timing cache: tactic choices keyed by (op signature, shapes, dtypes, GPU, library versions, cache version).

A JSON file; rebuilding with it skips timing for every node it knows. Caches from several runs can be merged.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from typing import Any

from kiln.utils.errors import KilnError

CACHE_VERSION = 5  # 2: GPU candidates timed as CUDA-graph replays with L2 flushed; 3: the generated epilogues' GELU
# and 8-bit rounding got cheaper (km.gelu_narrow, km.round_to_8bit), so choices timed before are stale; 4: int8 and
# float8 layers have new candidates (the 4-warp 128x128x128 tile, triton.fp8_gemm_fast) a cached choice never met,
# and a norm or attention that quantizes its output got cheaper (km.quotient), which turns "fused" against "separate";
# 5: depthwise convs on channel counts that are not multiples of 16 got 2-3x faster (vector loads; max and global
# average pools got the same hint), convs of few input channels and transposes have new candidates
# (triton.stem_conv, cuda.transpose), and a candidate's time now includes the conversion of an output the plan
# keeps channels-last when the kernel wrote it otherwise
_KIND = "kiln-timing-cache"


class TimingCacheError(KilnError):
    """A timing cache file could not be read."""


def cache_key(signature: dict[str, Any]) -> str:
    blob = json.dumps({"v": CACHE_VERSION, **signature}, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


class TimingCache:
    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = None if path is None else os.fspath(path)
        self.entries: dict[str, dict[str, Any]] = {}
        self.hits = 0
        self.misses = 0
        if self.path is not None and os.path.exists(self.path):
            self.entries.update(_read(self.path))

    def get(self, key: str) -> dict[str, Any] | None:
        e = self.entries.get(key)
        if e is None:
            self.misses += 1
        else:
            self.hits += 1
        return e

    def put(self, key: str, entry: dict[str, Any]) -> None:
        self.entries[key] = entry

    def merge(self, other: TimingCache | Iterable[tuple[str, dict[str, Any]]]) -> int:
        """Add entries from another cache (existing keys keep their entry); returns how many were new."""
        items = other.entries.items() if isinstance(other, TimingCache) else other
        new = 0
        for k, v in items:
            if k not in self.entries:
                self.entries[k] = v
                new += 1
        return new

    def save(self, path: str | os.PathLike[str] | None = None) -> None:
        target = os.fspath(path) if path is not None else self.path
        if target is None:
            return
        if os.path.exists(target):  # keep what other builds wrote meanwhile
            self.merge(_read(target).items())
        tmp = f"{target}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump({"kind": _KIND, "version": CACHE_VERSION, "entries": self.entries}, f, sort_keys=True,
                      indent=0)
        os.replace(tmp, target)

    def __len__(self) -> int:
        return len(self.entries)


def _read(path: str) -> dict[str, dict[str, Any]]:
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, ValueError) as e:
        raise TimingCacheError(f"timing cache '{path}' cannot be read ({e})",
                               hint="delete it (it is rebuilt by the next build) or pass another path") from None
    if not isinstance(d, dict) or d.get("kind") != _KIND:
        raise TimingCacheError(f"'{path}' is not a kiln timing cache")
    if d.get("version") != CACHE_VERSION:
        return {}  # an older cache format: its timings are not comparable; start afresh
    return dict(d.get("entries", {}))
