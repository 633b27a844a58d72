"""Op table entries: linalg."""

from __future__ import annotations
