"""Op table entries: string."""

from __future__ import annotations
