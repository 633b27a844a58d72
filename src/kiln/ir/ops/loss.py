"""Op table entries: loss."""

from __future__ import annotations
