"""Op table entries: random."""

from __future__ import annotations
