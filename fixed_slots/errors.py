"""Errors caused by what the user asked for, as opposed to bugs in fixed_slots.

`main.py` prints a `UserError` as one or two plain lines and exits with code 2 (no traceback);
anything else is our bug and keeps its traceback. Subclasses also derive from the builtin that
describes them (ValueError, FileNotFoundError, ...) so library callers can catch either.
"""
from __future__ import annotations


class UserError(Exception):
    """A mistake in the config, flags, data or workdir; the message says what and how to fix it."""


class ConfigError(UserError, ValueError):
    """A config key or value is invalid (names the key)."""


class WorkdirError(UserError, RuntimeError):
    """The workdir cannot be used as asked (held by another run, no checkpoint, changed config)."""


class DataError(UserError, ValueError):
    """The data is missing or unreadable (names the dataset, split, file or record)."""
