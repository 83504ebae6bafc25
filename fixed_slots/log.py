"""Our console lines: the `fixed_slots` logger, independent of absl's verbosity.

Third-party libraries log through absl (orbax alone prints ~40 INFO lines per checkpoint);
`fixed_slots.cli` raises absl's threshold to WARNING unless `--verbosity` is given, and our own
progress and status lines go through this logger, which prints INFO to stderr on its own handler.
"""
from __future__ import annotations

import logging
import sys
import time

logger = logging.getLogger("fixed_slots")


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        level = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        return f"{stamp} {level}{record.getMessage()}"


def configure(stream=None) -> None:
    """Prints our INFO lines (and above) to `stream` (stderr); idempotent."""
    if any(getattr(h, "_fixed_slots", False) for h in logger.handlers):
        return
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_Format())
    handler._fixed_slots = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # absl's handler would print it a second time


def info(message: str, *args) -> None:
    logger.info(message, *args)


def warning(message: str, *args) -> None:
    logger.warning(message, *args)
