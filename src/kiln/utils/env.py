"""Every environment flag kiln reads, typed, in one place."""

from __future__ import annotations

import os
from dataclasses import dataclass


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class Env:
    dump_graphs: str | None
    """KILN_DUMP_GRAPHS=DIR: write the graph after every pass, numbered."""
    verbose: bool
    """KILN_VERBOSE=1: debug logging and full tracebacks in the CLI."""
    cache_dir: str
    """KILN_CACHE_DIR: where timing caches and lazily built engines go (default ~/.cache/kiln)."""


def env() -> Env:
    """Read the flags now (tests change them at run time, so this is not cached)."""
    return Env(
        dump_graphs=os.environ.get("KILN_DUMP_GRAPHS") or None,
        verbose=_flag("KILN_VERBOSE"),
        cache_dir=os.environ.get("KILN_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "kiln"),
    )
