"""Checkout shortcut: `python -m data_prep ...` runs `python -m fixed_slots.data_prep ...`.

The builders and the CLI live in `fixed_slots.data_prep` (installed with the package). This
folder is not installed (setup.py packages only `fixed_slots`): a generic top-level name such as
`data_prep` would collide in a user's environment. It exists so that the command still works
from a checkout's root.
"""
import importlib as _importlib


def __getattr__(name: str):
    # `from data_prep import cli` (older scripts run from a checkout): the installed modules.
    if name in ("cli", "builders"):
        return _importlib.import_module(f"fixed_slots.data_prep.{name}")
    raise AttributeError(f"module 'data_prep' has no attribute {name!r}")
