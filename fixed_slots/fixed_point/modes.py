"""Config strings for the gradient estimator, with the paper's update count.

The paper's convention (Chang et al. 2022, Algorithm 1 / Fig. 2), which `num_iterations` = T follows:
  unroll     T updates, all differentiated (vanilla slot attention).
  neumannK   T updates without gradient, then K more updates differentiated by backpropagation
             (T + K updates). The paper's Fig. 11 "higher-order Neumann approximations require
             backpropagating through more iterations"; neumann1 is its default, the "one extra line"
             `slots = step(stop_gradient(iterate(slots)))`. In the layer: Phantom steps, damping 1.
  seriesK    T updates without gradient, then one differentiated update whose backward pass uses K
             terms of the Neumann series g (I + J + ... + J^(K-1)) at the last point (T + 1 updates).
             series1 == neumann1; for K > 1 another approximation than the paper's (J frozen at z*).
  implicit   T updates without gradient, then one update whose backward pass solves the adjoint
             u = g + u J iteratively (T + 1 updates).
Table 2 crosses a forward solver with a gradient estimator, each with T forward updates + 1:
  IN = naive Iteration forward, Neumann (first-order) backward   (== neumann1, the paper's default)
  IB = naive Iteration forward, Broyden adjoint solve backward
  BN = Broyden forward,         Neumann (first-order) backward
  BB = Broyden forward,         Broyden adjoint solve backward
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

from fixed_slots.fixed_point import options

# name -> (solver, layer gradient, order K, adjoint solver)
_FIXED = {
    "unroll": ("iterate", "unroll", 1, "iterate"),
    "implicit": ("iterate", "implicit", 1, "iterate"),
    "IN": ("iterate", "phantom", 1, "iterate"),
    "IB": ("iterate", "implicit", 1, "broyden"),
    # Broyden's estimate after T evaluations is its next point x_T (not f of its last point), so
    # BN evaluates T + 1 times and differentiates the last one (first-order series).
    "BN": ("broyden", "neumann", 1, "iterate"),
    "BB": ("broyden", "implicit", 1, "broyden"),
}
VALID_GRAD_MODES = ("unroll", "neumann1", "neumann2", "...", "neumannK", "series1", "...",
                    "seriesK", "implicit", "IN", "IB", "BN", "BB")


@dataclasses.dataclass(frozen=True)
class GradMode:
    """Forward solver x gradient estimator of one config string.

    `layer_options(T, **options)` gives the solver and gradient objects that run the paper's T
    iterations in this mode (see the module docstring for the update counts), e.g. for "IB" and
    T = 7: `{"solver": Iterate(max_iter=8), "grad": Implicit(adjoint=Broyden(max_iter=8))}`;
    `layer_kwargs(T)` is the same call in the string form.
    """
    solver: str
    grad: str  # the layer's gradient: "unroll" | "phantom" | "neumann" (series) | "implicit"
    order: int = 1  # K: differentiated updates (phantom) or series terms (neumann)
    adjoint_solver: str = "iterate"

    def num_updates(self, num_iterations: int) -> int:
        """Slot updates in one forward pass for the paper's T = num_iterations."""
        if self.grad == "unroll":
            return num_iterations
        if self.grad == "phantom":
            return num_iterations + self.order
        return num_iterations + 1

    def layer_kwargs(self, num_iterations: int) -> dict[str, Any]:
        """`fixed_point_layer` keyword arguments for T = num_iterations."""
        if not isinstance(num_iterations, int) or num_iterations < 1:
            raise ValueError(f"num_iterations must be a positive int, got {num_iterations!r}")
        kwargs: dict[str, Any] = {"solver": self.solver, "grad": self.grad}
        if self.grad == "unroll":
            kwargs["max_iter"] = num_iterations
        elif self.grad == "phantom":
            # T solver evaluations without gradient, then K undamped steps through autodiff.
            kwargs.update(max_iter=num_iterations, phantom_steps=self.order, phantom_damping=1.0)
        else:
            # T + 1 evaluations: the last one is the differentiated update; its input z_T is the
            # point where the series / adjoint is taken.
            kwargs.update(max_iter=num_iterations + 1, adjoint_solver=self.adjoint_solver)
            if self.grad == "neumann":
                kwargs["neumann_order"] = self.order
        return kwargs


    def layer_options(self, num_iterations: int, **string_options: Any) -> dict[str, Any]:
        """{"solver": ..., "grad": ...} objects for T = num_iterations.

        string_options are the string form's flat options that the mode leaves open (tol,
        damping, anderson_memory, broyden_memory, adjoint_max_iter, adjoint_tol,
        adjoint_on_failure, ...); one the mode sets (max_iter, phantom_steps, ...) is refused.
        """
        kwargs = self.layer_kwargs(num_iterations)
        clash = sorted(set(string_options) & set(kwargs))
        if clash:
            raise ValueError(f"{', '.join(clash)} set by the grad mode; choose them through it")
        solver, grad = options.resolve(kwargs.pop("solver"), kwargs.pop("grad"),
                                       {**kwargs, **string_options})
        return {"solver": solver, "grad": grad}


def parse_grad_mode(name: str) -> GradMode:
    """Maps `unroll`, `neumannK`, `seriesK`, `implicit`, `IN`, `IB`, `BN`, `BB` to a GradMode."""
    if not isinstance(name, str):
        raise ValueError(f"grad mode must be a string, got {name!r}")
    if name in _FIXED:
        return GradMode(*_FIXED[name])
    match = re.fullmatch(r"(neumann|series)([1-9][0-9]*)", name)
    if match:
        kind, order = match.group(1), int(match.group(2))
        return GradMode("iterate", "phantom" if kind == "neumann" else "neumann", order)
    raise ValueError(
        f"unknown grad mode {name!r}; valid: unroll, neumannK (K >= 1, e.g. neumann1: the "
        "paper's K backpropagated updates after T without gradient), seriesK (K Neumann-series "
        "terms at the fixed point), implicit, IN, IB, BN, BB (Table 2: forward Iteration/Broyden "
        "x backward Neumann/Broyden)")
