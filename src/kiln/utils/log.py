"""kiln's logger: one named logger, configured once by the CLI."""

from __future__ import annotations

import logging

logger = logging.getLogger("kiln")


def setup(verbose: bool = False) -> None:
    if logger.handlers:
        logger.setLevel(logging.DEBUG if verbose else logging.INFO)
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[kiln] %(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
