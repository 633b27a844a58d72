"""Op table entries: signal."""

from __future__ import annotations
