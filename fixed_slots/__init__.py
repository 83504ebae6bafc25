"""fixed_slots: implicit slot attention in JAX/Flax.

`fixed_point_layer` is the reusable core (JAX only); models, data and the trainer live in
the subpackages and are imported on demand. Importing the package itself loads nothing (the
command line sets its environment, e.g. XLA's log level, before jax loads).
"""
from typing import Any

__all__ = ["fixed_point_layer"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "fixed_point_layer":
        from fixed_slots.fixed_point import fixed_point_layer

        return fixed_point_layer
    raise AttributeError(f"module 'fixed_slots' has no attribute {name!r}")
