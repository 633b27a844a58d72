"""Op table entries: pool."""

from __future__ import annotations
