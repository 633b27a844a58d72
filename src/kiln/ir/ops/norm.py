"""Op table entries: norm."""

from __future__ import annotations
