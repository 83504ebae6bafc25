"""Our console lines: the `fixed_slots` logger, independent of absl's verbosity.

Third-party libraries log through absl (orbax alone prints ~40 INFO lines per checkpoint);
`fixed_slots.cli` raises absl's threshold to WARNING unless `--verbosity` is given, and our own
progress and status lines go through this logger, which prints INFO to stderr on its own handler.

A live line (the progress line on a terminal, `live_line`) is redrawn in place at the bottom of
the terminal; a log line printed meanwhile clears it, prints, and redraws it, so the two never
overwrite each other.
"""
from __future__ import annotations

import logging
import sys
import threading
import time
from typing import TextIO

logger = logging.getLogger("fixed_slots")

_live = {"stream": None, "text": ""}  # the open in-place line, if any
# Re-entrant: the trainer's signal handler logs, and it can run while the main thread is
# inside emit() holding this lock (a plain Lock deadlocked a SIGTERM'd run there).
_lock = threading.RLock()


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        level = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        return f"{stamp} {level}{record.getMessage()}"


class _Handler(logging.StreamHandler):
    """A stream handler that keeps the live line below what it prints."""

    def emit(self, record: logging.LogRecord) -> None:
        with _lock:
            live = _live["stream"]
            if live is not None:
                live.write("\r\033[K")  # clear the live line, print, redraw it
            super().emit(record)
            if live is not None:
                live.write(_live["text"])
                live.flush()


def configure(stream=None) -> None:
    """Prints our INFO lines (and above) to `stream` (stderr); idempotent."""
    if any(getattr(h, "_fixed_slots", False) for h in logger.handlers):
        return
    handler = _Handler(stream or sys.stderr)
    handler.setFormatter(_Format())
    handler._fixed_slots = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # absl's handler would print it a second time


def live_line(stream: TextIO, text: str) -> None:
    """Draws `text` as the in-place line of a terminal `stream` (replacing the previous one)."""
    with _lock:
        stream.write("\r\033[K" + text)
        stream.flush()
        _live["stream"], _live["text"] = stream, text


def end_live_line(stream: TextIO, text: str | None = None) -> None:
    """Ends the in-place line (drawing `text` as its last state) so output continues below."""
    with _lock:
        if text is not None:
            stream.write("\r\033[K" + text)
        if _live["stream"] is not None or text is not None:
            stream.write("\n")
            stream.flush()
        _live["stream"], _live["text"] = None, ""


def info(message: str, *args) -> None:
    logger.info(message, *args)


def warning(message: str, *args) -> None:
    logger.warning(message, *args)
