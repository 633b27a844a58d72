"""Op table entries: conv."""

from __future__ import annotations
