"""Op table entries: rnn."""

from __future__ import annotations
