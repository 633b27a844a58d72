"""Op table entries: cast."""

from __future__ import annotations
