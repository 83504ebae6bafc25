"""Config strings for the gradient estimator, with the paper's update count: the one place where
a config (`config.grad` and `config.slot_attention.fixed_point.*`) becomes solver and gradient
objects.

The paper's convention (Chang et al. 2022, Algorithm 1 / Fig. 2), which `num_iterations` = T follows:
  unroll     T updates, all differentiated (vanilla slot attention).      Iterate(T), Unroll()
             (unrolled=True up to UNROLLED_MAX_ITERATIONS updates)
  neumannK   T updates without gradient, then K more updates differentiated by backpropagation
             (T + K updates). The paper's Fig. 11 "higher-order Neumann approximations require
             backpropagating through more iterations"; neumann1 is its default, the "one extra
             line" `slots = step(stop_gradient(iterate(slots)))`.   Iterate(T), Neumann(K)
  seriesK    T updates without gradient, then one differentiated update whose backward pass uses K
             terms of the Neumann series g (I + J + ... + J^(K-1)) at the last point (T + 1 updates).
             series1 == neumann1; for K > 1 another approximation than the paper's (J frozen at z*).
                                                                          Iterate(T + 1), Series(K)
  implicit   T updates without gradient, then one update whose backward pass solves the adjoint
             u = g + u J iteratively (T + 1 updates).           Iterate(T + 1), Implicit(...)
Table 2 crosses a forward solver with a gradient estimator, each with T forward updates + 1:
  IN = naive Iteration forward, Neumann (first-order) backward   (== neumann1, the paper's default)
  IB = naive Iteration forward, Broyden adjoint solve backward    Implicit(Broyden(T + 1))
  BN = Broyden forward,         Neumann (first-order) backward    Broyden(T + 1), Series(1)
  BB = Broyden forward,         Broyden adjoint solve backward    Implicit(Broyden(T + 1))

Why BN is Series(1) and not Neumann(1): Broyden's estimate after T evaluations is its own next
point x_T (a quasi-Newton update from f(x_{T-1})), not f of its last evaluation. Broyden(T + 1)
evaluates f at x_T and Series(1) differentiates that evaluation with x_T detached: the paper's
`step(stop_gradient(z))` with z = Broyden's estimate, T + 1 evaluations. Neumann(1) after
Broyden(T) would instead take one plain iteration step from f(x_{T-1}), discarding Broyden's
last update: the same T + 1 evaluations, but not the Broyden-forward estimator of Table 2.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

from fixed_slots.fixed_point import options
from fixed_slots.fixed_point.options import (
    GMRES,
    Anderson,
    Broyden,
    Implicit,
    Iterate,
    Neumann,
    Series,
    Unroll,
)

# Config names of the adjoint solver (`slot_attention.fixed_point.adjoint_solver`).
ADJOINT_SOLVERS = ("iterate", "anderson", "broyden", "gmres")
# "unroll" compiles its loop unrolled (Unroll(unrolled=True)) up to this many updates.
UNROLLED_MAX_ITERATIONS = 8
# name -> (forward solver, gradient, order K, adjoint solver)
_FIXED = {
    "unroll": ("iterate", "unroll", 1, None),
    "implicit": ("iterate", "implicit", 1, "iterate"),
    "IN": ("iterate", "neumann", 1, None),
    "IB": ("iterate", "implicit", 1, "broyden"),
    "BN": ("broyden", "series", 1, None),  # see the module docstring
    "BB": ("broyden", "implicit", 1, "broyden"),
}
VALID_GRAD_MODES = ("unroll", "neumann1", "neumann2", "...", "neumannK", "series1", "...",
                    "seriesK", "implicit", "IN", "IB", "BN", "BB")
# The keys of config.slot_attention.fixed_point that layer_options reads (None = unset).
CONFIG_KEYS = ("tol", "damping", "anderson_memory", "broyden_memory", "adjoint_solver",
               "adjoint_max_iter", "adjoint_tol", "adjoint_on_failure")


@dataclasses.dataclass(frozen=True)
class GradMode:
    """Forward solver x gradient estimator of one config string.

    `layer_options(T, **config.slot_attention.fixed_point)` gives the solver and gradient objects
    that run the paper's T iterations in this mode (see the module docstring for the update
    counts), e.g. for "IB" and T = 7:
    `{"solver": Iterate(max_iter=8), "grad": Implicit(adjoint=Broyden(max_iter=8))}`.
    """
    solver: str  # "iterate" | "broyden"
    grad: str  # the layer's gradient: "unroll" | "neumann" | "series" | "implicit"
    order: int = 1  # K: differentiated updates (neumann) or series terms (series)
    adjoint_solver: str | None = None  # implicit modes: one of ADJOINT_SOLVERS

    def layer_options(self, num_iterations: int, **config: Any) -> dict[str, Any]:
        """{"solver": ..., "grad": ...} objects for T = num_iterations.

        config: the keys of `config.slot_attention.fixed_point` (CONFIG_KEYS; None = unset, the
        object's default). Keys that do not apply to this mode (broyden_memory for an iterate
        mode, adjoint_max_iter for neumann1) are validated and ignored, so one config serves
        every mode; adjoint_solver is refused outside the implicit modes (it would do nothing).
        """
        if not isinstance(num_iterations, int) or num_iterations < 1:
            raise ValueError(f"num_iterations must be a positive int, got {num_iterations!r}")
        unknown = sorted(set(config) - set(CONFIG_KEYS))
        if unknown:
            raise ValueError(f"unknown fixed_point option(s) {', '.join(unknown)}; valid: "
                             f"{', '.join(CONFIG_KEYS)}")
        c = {k: _checked(k, v) for k, v in config.items() if v is not None}
        adjoint_name = c.get("adjoint_solver", self.adjoint_solver)
        if "adjoint_solver" in c and self.grad != "implicit":
            raise ValueError(f"adjoint_solver={c['adjoint_solver']!r} applies to the modes that "
                             "solve an adjoint (implicit, IB, BB), not this one")
        # T + 1 evaluations except where every update is differentiated (unroll) or the K
        # differentiated updates come after the solver's T (neumann).
        budget = num_iterations if self.grad in ("unroll", "neumann") else num_iterations + 1
        tol = c.get("tol")
        if self.solver == "broyden":
            solver = Broyden(budget, tol, memory=c.get("broyden_memory", 30))
        else:
            solver = Iterate(budget, tol, damping=c.get("damping", 1.0))
        if self.grad == "unroll":
            # Straight-line for the short loops of slot attention (faster and smaller in both
            # SLATE settings measured, BENCHMARKS.md); a long loop compiles rolled.
            grad = Unroll(unrolled=budget <= UNROLLED_MAX_ITERATIONS)
        elif self.grad == "neumann":
            grad = Neumann(order=self.order)
        elif self.grad == "series":
            grad = Series(order=self.order)
        else:
            steps = c.get("adjoint_max_iter", budget)
            adjoint_tol = c.get("adjoint_tol")
            if adjoint_name == "iterate":
                adjoint = Iterate(steps, adjoint_tol)
            elif adjoint_name == "anderson":
                adjoint = Anderson(steps, adjoint_tol, memory=c.get("anderson_memory", 5))
            elif adjoint_name == "broyden":
                adjoint = Broyden(steps, adjoint_tol, memory=c.get("broyden_memory", 30))
            else:
                adjoint = GMRES(steps, 1e-6 if adjoint_tol is None else adjoint_tol)
            grad = Implicit(adjoint, on_failure=c.get("adjoint_on_failure", "fallback"))
        return {"solver": solver, "grad": grad}


def _checked(key: str, value: Any) -> Any:
    """One config value, validated with an error that names the config key."""
    if key in ("anderson_memory", "broyden_memory", "adjoint_max_iter"):
        return options._static_int(key, key, value)
    if key in ("tol", "adjoint_tol"):
        return options._tol(key, value, key)
    if key == "damping":
        return options._unit_interval(key, key, value)
    allowed = ADJOINT_SOLVERS if key == "adjoint_solver" else options.ON_FAILURE
    if value not in allowed:
        raise ValueError(f"{key}: must be one of {', '.join(allowed)}, got {value!r}")
    return value


def parse_grad_mode(name: str) -> GradMode:
    """Maps `unroll`, `neumannK`, `seriesK`, `implicit`, `IN`, `IB`, `BN`, `BB` to a GradMode."""
    if not isinstance(name, str):
        raise ValueError(f"grad mode must be a string, got {name!r}")
    if name in _FIXED:
        return GradMode(*_FIXED[name])
    match = re.fullmatch(r"(neumann|series)([1-9][0-9]*)", name)
    if match:
        return GradMode("iterate", match.group(1), int(match.group(2)))
    raise ValueError(
        f"unknown grad mode {name!r}; valid: unroll, neumannK (K >= 1, e.g. neumann1: the "
        "paper's K backpropagated updates after T without gradient), seriesK (K Neumann-series "
        "terms at the fixed point), implicit, IN, IB, BN, BB (Table 2: forward Iteration/Broyden "
        "x backward Neumann/Broyden)")
