"""One logging setup for every entry: timestamped lines on stderr, rank-aware, DeepSpeed's chatter tamed."""

from __future__ import annotations

import logging
import os
import sys

_CONFIGURED = False


def get_logger(name: str) -> logging.Logger:
    global _CONFIGURED
    if not _CONFIGURED:
        rank = os.environ.get("RANK", "0")
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s [nestor-ds r{rank}] %(levelname)s %(message)s", "%H:%M:%S")
        )
        root = logging.getLogger("nestor_ds")
        root.addHandler(handler)
        root.setLevel(os.environ.get("NESTOR_LOG_LEVEL", "INFO"))
        root.propagate = True  # pytest's caplog and user handlers still see our records
        _CONFIGURED = True
    return logging.getLogger(name if name.startswith("nestor_ds") else f"nestor_ds.{name}")
