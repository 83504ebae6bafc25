"""f's calling convention, in one place: f(params, z, *args) -> z, or (z, aux) with has_aux."""
from __future__ import annotations

from typing import Any, Callable

PyTree = Any


def split_output(out: Any, has_aux: bool) -> tuple[PyTree, Any]:
    """f's output -> (new state, aux); aux is None without has_aux."""
    return out if has_aux else (out, None)


def state_map(f: Callable[..., Any], params: PyTree, args: tuple, has_aux: bool
              ) -> Callable[[PyTree], PyTree]:
    """z -> f(params, z, *args)'s new state (aux dropped): the map whose Jacobian is J."""

    def g(z):
        return split_output(f(params, z, *args), has_aux)[0]

    return g
