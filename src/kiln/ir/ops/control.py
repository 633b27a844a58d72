"""Op table entries: control."""

from __future__ import annotations
