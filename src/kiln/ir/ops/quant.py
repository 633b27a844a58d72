"""Op table entries: quant."""

from __future__ import annotations
