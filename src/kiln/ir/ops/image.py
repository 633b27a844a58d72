"""Op table entries: image."""

from __future__ import annotations
