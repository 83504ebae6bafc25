"""Config mechanics: load a config file, apply overrides, describe a config, check its values.

Nothing here knows a model, a dataset or a training knob. The defaults live beside the configs
(configs/common.py); each section's checks live with the code that owns the section and use the
helpers below (`check_ranges`, `check_choices`); the entry points (training, evaluation,
`fixed_slots.trained.load`) run them. This module imports nothing of fixed_slots but its errors
(tests/test_imports.py keeps it so).
"""
from __future__ import annotations

import ast
import importlib.util
import math
import os
import sys
from typing import Any, Callable, Mapping, Sequence

import ml_collections

from fixed_slots.errors import ConfigError

# (predicate, what the value must be) for one key; a table maps dotted keys to these.
Range = tuple[Callable[[Any], bool], str]


def _config_package_root(path: str) -> str | None:
    """The folder that holds a config file's package (e.g. the checkout for configs/x.py), so
    that config files can `from configs import common` whatever the working directory."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isfile(os.path.join(folder, "__init__.py")):
        return os.path.dirname(folder)
    return None


def load_config_module(path: str) -> Any:
    """The module of a config file (its package root made importable first)."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} not found; the configs are in configs/, e.g. "
                          "--config=configs/default.py")
    root = _config_package_root(path)
    if root is not None and root not in sys.path:
        sys.path.insert(0, root)
    spec = importlib.util.spec_from_file_location("config_file", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def from_file(path: str, assignments: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """get_config() of a config file (as main.py's --config), with `override` assignments.

    `path:variant` calls `get_config("variant")` (ml_collections' config_flags convention, e.g.
    `configs/default.py:tiny`); a file whose get_config takes no argument has no variants.
    """
    path, sep, variant = path.partition(":")
    module = load_config_module(path)
    config = module.get_config(variant) if sep else module.get_config()
    return override(config, assignments)


def override(config: ml_collections.ConfigDict, assignments: Sequence[str]
             ) -> ml_collections.ConfigDict:
    """A copy of `config` with "key.path=value" assignments applied (the scripts' --set flags).

    Values are Python literals (`64`, `1e-3`, `'cudnn'`, `(1, 2)`); anything else is a string.
    Unknown keys and values of the wrong type raise ValueError naming the assignment.
    """
    config = config.copy_and_resolve_references()
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        if not sep or not key:
            raise ValueError(f"override {assignment!r}: expected key.path=value")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
        if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
            raise ValueError(f"override {assignment!r}: config has no key {key!r}")
        try:
            setattr(node, leaf, value)
        except TypeError as e:
            raise ValueError(f"override {assignment!r}: {e}") from None
    return config


def describe(config: ml_collections.ConfigDict,
             choices: Mapping[str, Sequence[Any]] | None = None) -> str:
    """The config as `key = value` lines, with the allowed values of the choice keys."""
    allowed = dict(choices or {})
    lines = []

    def walk(prefix: str, node: ml_collections.ConfigDict) -> None:
        for key in node.keys():  # insertion order: the order the config file reads
            value = node[key]
            name = f"{prefix}{key}"
            if isinstance(value, ml_collections.ConfigDict):
                lines.append(f"{name}:")
                walk(name + ".", value)
                continue
            line = f"{name} = {value!r}"
            if name in allowed:
                line = f"{line:<48}  # one of: {', '.join(str(a) for a in allowed[name])}"
            lines.append(line)

    walk("", config)
    return "\n".join(lines)


def flatten(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """{"a.b.c": value} of every leaf, in the config's order."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: ml_collections.ConfigDict) -> None:
        for key, value in node.items():
            if isinstance(value, ml_collections.ConfigDict):
                walk(f"{prefix}{key}.", value)
            else:
                flat[f"{prefix}{key}"] = value

    walk("", config)
    return flat


# ----------------------------------------------------------------------------- checks

def lookup(config: ml_collections.ConfigDict, key: str) -> tuple[bool, Any]:
    """(True, value) for a dotted key, (False, None) if the config lacks it."""
    node = config
    for part in key.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def bad_value(key: str, value: Any, expected: str) -> ConfigError:
    """The one error of a config value out of its domain, naming the key."""
    return ConfigError(f"config.{key}={value!r} is invalid: expected {expected}")


def check_ranges(config: ml_collections.ConfigDict, ranges: Mapping[str, Range]) -> None:
    """Every key of `ranges` the config has satisfies its predicate (else ConfigError)."""
    for key, (ok, expected) in ranges.items():
        present, value = lookup(config, key)
        if present and not ok(value):
            raise bad_value(key, value, expected)


def check_choices(config: ml_collections.ConfigDict,
                  choices: Mapping[str, Sequence[Any]]) -> None:
    """Every key of `choices` the config has (and has set) takes one of its values."""
    for key, allowed in choices.items():
        present, value = lookup(config, key)
        if present and value is not None and value not in allowed:
            raise bad_value(key, value, "one of " + ", ".join(repr(a) for a in allowed))


def check_finite(config: ml_collections.ConfigDict) -> None:
    """No float anywhere in the config is inf or NaN (a learning rate of inf trains NaNs)."""
    for key, value in flatten(config).items():
        values = value if isinstance(value, (tuple, list)) else (value,)
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                raise bad_value(key, value, "a finite number")


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v  # not NaN


POSITIVE_INT: Range = (lambda v: is_int(v) and v >= 1, "a positive integer")
NON_NEGATIVE_INT: Range = (lambda v: is_int(v) and v >= 0, "an integer >= 0 (0 turns it off)")
POSITIVE: Range = (lambda v: is_number(v) and v > 0, "a number > 0")
OPTIONAL_POSITIVE: Range = (lambda v: v is None or (is_number(v) and v > 0), "None or a number > 0")
OPTIONAL_POSITIVE_INT: Range = (lambda v: v is None or (is_int(v) and v >= 1),
                                "None or a positive integer")
UNIT_OPEN: Range = (lambda v: is_number(v) and 0 <= v < 1, "a number in [0, 1)")
UNIT_EXCLUSIVE: Range = (lambda v: is_number(v) and 0 < v < 1, "a number in (0, 1)")
UNIT_HALF_OPEN: Range = (lambda v: is_number(v) and 0 < v <= 1, "a number in (0, 1]")
POSITIVE_INTS: Range = (lambda v: isinstance(v, (tuple, list)) and len(v) > 0
                        and all(is_int(x) and x >= 1 for x in v),
                        "a non-empty tuple of positive ints")
# A seed jax.random.key takes (uint32) and numpy's generators too.
SEED: Range = (lambda v: is_int(v) and 0 <= v < 2 ** 32, "an integer in [0, 2**32)")
