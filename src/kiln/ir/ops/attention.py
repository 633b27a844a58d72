"""Op table entries: attention."""

from __future__ import annotations
