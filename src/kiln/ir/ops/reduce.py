"""Op table entries: reduce."""

from __future__ import annotations
