"""Op table entries: sequence."""

from __future__ import annotations
