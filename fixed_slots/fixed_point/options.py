"""Solver and gradient options as objects (as in optimistix / jaxopt): each owns its options.

    fixed_point_layer(f, params, z0, x,
                      solver=Anderson(max_iter=30, tol=1e-5),
                      grad=Implicit(adjoint=Broyden(max_iter=30, tol=1e-6)))

Forward solvers: `Iterate`, `Anderson`, `Broyden`. Adjoint solvers (inside `Implicit`): those
three and `GMRES`. Gradients: `Unroll`, `Neumann` (the paper's estimator: backpropagation
through K updates), `Series` (the truncated series at the fixed point), `Implicit`. All are
frozen dataclasses validated at construction (a bad value raises ValueError naming the class
and the option); `dataclasses.replace(obj, max_iter=...)` re-validates. Options are static:
they shape the compiled program, so a traced value (an argument of a jitted function) is
refused with a message saying so; integer-like values (numpy integers) are accepted.

`check_call` is where the layer refuses what it no longer takes (the flat string form).
Config strings (`neumann1`, `IB`, ...) become these objects in modes.py, the only place.
"""
from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any, Callable, Union

import jax

from fixed_slots.fixed_point._flat import NORMS

ON_FAILURE = ("fallback", "nan", "raise")


def _bad(owner: str, message: str) -> ValueError:
    return ValueError(f"{owner}: {message}")


def _static_int(owner: str, name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, jax.core.Tracer):
        raise _bad(owner, f"{name} must be a static Python int, not a traced value (an argument "
                          "of a jitted function): it fixes the loop's length at compile time; "
                          "pass it as a static argument or close over a Python int")
    if isinstance(value, bool):
        raise _bad(owner, f"{name} must be a positive int, got {value!r}")
    try:
        out = operator.index(value)
    except TypeError:
        raise _bad(owner, f"{name} must be a positive int, got {value!r}") from None
    if out < minimum:
        what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise _bad(owner, f"{name} must be {what}, got {value!r}")
    return out


def _static_float(owner: str, name: str, value: Any) -> float:
    if isinstance(value, jax.core.Tracer):
        raise _bad(owner, f"{name} must be a static Python number, not a traced value (an "
                          "argument of a jitted function): solver options are compile-time "
                          "constants; pass it as a static argument or close over a Python float")
    if isinstance(value, bool):
        raise _bad(owner, f"{name} must be a number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise _bad(owner, f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(out):  # NaN, or inf (e.g. an infinite ridge: NaN iterates)
        raise _bad(owner, f"{name} must be a finite number, got {value!r}")
    return out


def _tol(owner: str, value: Any, name: str = "tol") -> float | None:
    if value is None:
        return None
    out = _static_float(owner, name, value)
    if not out > 0:
        raise _bad(owner, f"{name} must be None or > 0, got {value!r}")
    return out


def _norm(owner: str, value: Any) -> str:
    if not isinstance(value, str) or value not in NORMS:
        raise _bad(owner, f"norm must be one of {', '.join(map(repr, NORMS))}, got {value!r}")
    return value


def _unit_interval(owner: str, name: str, value: Any) -> float:
    out = _static_float(owner, name, value)
    if not 0.0 < out <= 1.0:
        raise _bad(owner, f"{name} must be in (0, 1], got {value!r}")
    return out


def _set(obj: Any, **values: Any) -> None:
    for name, value in values.items():
        object.__setattr__(obj, name, value)  # normalising a frozen dataclass in __post_init__


# --------------------------------------------------------------------------- solvers

@dataclasses.dataclass(frozen=True)
class Iterate:
    """Naive (Picard) iteration, optionally damped: z <- (1 - damping) z + damping f(z).

    max_iter: f evaluations (exactly this many unless `tol` or `atol` is reached first).
    tol: stop once the relative residual ||f(z) - z|| / ||f(z)|| < tol (per example with
      batch_axis); None: no relative criterion.
    atol: stop once the absolute residual ||f(z) - z|| <= atol (in `norm`, over the example's
      state; per example with batch_axis): what certifies a fixed point at or near 0, where the
      relative residual cannot get small. None: no absolute criterion. With neither, exactly
      max_iter evaluations; with both, a row stops at whichever it reaches first.
    norm: the norm of both residuals (and of `FixedPointInfo`'s): "two" (Euclidean, the
      default), "max" (largest absolute entry) or "rms" (Euclidean / sqrt(state size)), over
      each example's whole state (every leaf of a pytree). The relative residual is the same
      in "two" and "rms"; atol is not.
    """
    max_iter: int = 7
    tol: float | None = None
    damping: float = 1.0
    atol: float | None = None
    norm: str = "two"

    def __post_init__(self) -> None:
        _set(self, max_iter=_static_int("Iterate", "max_iter", self.max_iter),
             tol=_tol("Iterate", self.tol),
             damping=_unit_interval("Iterate", "damping", self.damping),
             atol=_tol("Iterate", self.atol, "atol"), norm=_norm("Iterate", self.norm))


@dataclasses.dataclass(frozen=True)
class Anderson:
    """Anderson acceleration (type II) with `memory` past pairs, mixing beta and a ridge.

    max_iter / tol / atol / norm as in `Iterate`. The ridge is `regularization` times the
    largest entry of the residual Gram matrix, so it is scale-free.
    """
    max_iter: int = 7
    tol: float | None = None
    memory: int = 5
    mixing: float = 1.0
    regularization: float = 1e-4
    atol: float | None = None
    norm: str = "two"

    def __post_init__(self) -> None:
        reg = _static_float("Anderson", "regularization", self.regularization)
        if reg < 0:
            raise _bad("Anderson", f"regularization must be >= 0, got {self.regularization!r}")
        _set(self, max_iter=_static_int("Anderson", "max_iter", self.max_iter),
             tol=_tol("Anderson", self.tol),
             memory=_static_int("Anderson", "memory", self.memory),
             mixing=_unit_interval("Anderson", "mixing", self.mixing), regularization=reg,
             atol=_tol("Anderson", self.atol, "atol"), norm=_norm("Anderson", self.norm))


@dataclasses.dataclass(frozen=True)
class Broyden:
    """Limited-memory ("good") Broyden on g(z) = f(z) - z with `memory` rank-one updates.

    max_iter / tol / atol / norm as in `Iterate`.
    """
    max_iter: int = 7
    tol: float | None = None
    memory: int = 30
    atol: float | None = None
    norm: str = "two"

    def __post_init__(self) -> None:
        _set(self, max_iter=_static_int("Broyden", "max_iter", self.max_iter),
             tol=_tol("Broyden", self.tol),
             memory=_static_int("Broyden", "memory", self.memory),
             atol=_tol("Broyden", self.atol, "atol"), norm=_norm("Broyden", self.norm))


@dataclasses.dataclass(frozen=True)
class GMRES:
    """Restarted GMRES on the adjoint's linear system (I - J^T) u = g (adjoint solver only).

    max_iter: restarts, each of up to `restart` Krylov vectors (one vjp each).
    tol: relative residual ||(I - J^T) u - g|| / ||g|| at which it stops (jax.scipy's gmres tol).
    atol: absolute residual ||(I - J^T) u - g|| at which it also stops (None: none).
    Both in the Euclidean norm, the one GMRES minimises (no `norm` option).
    Unlike the fixed-point solvers it converges whenever I - J is invertible, also when the
    spectral radius of J is >= 1.
    """
    max_iter: int = 5
    tol: float = 1e-6
    restart: int = 20
    atol: float | None = None

    def __post_init__(self) -> None:
        tol = _tol("GMRES", self.tol)
        if tol is None:
            raise _bad("GMRES", "tol must be > 0, got None")
        _set(self, max_iter=_static_int("GMRES", "max_iter", self.max_iter), tol=tol,
             restart=_static_int("GMRES", "restart", self.restart),
             atol=_tol("GMRES", self.atol, "atol"))


ForwardSolver = Union[Iterate, Anderson, Broyden]
AdjointSolver = Union[Iterate, Anderson, Broyden, GMRES]
_FORWARD_TYPES = (Iterate, Anderson, Broyden)
_ADJOINT_TYPES = (Iterate, Anderson, Broyden, GMRES)


# --------------------------------------------------------------------------- gradients

@dataclasses.dataclass(frozen=True)
class Unroll:
    """Backpropagation through every forward iteration (vanilla slot attention).

    checkpoint=True wraps each iteration in `jax.checkpoint`: the backward pass stores only the
    loop state per iteration and recomputes f's internals, trading one extra f evaluation per
    iteration for memory (benchmarks/fixed_point_memory.py).

    unrolled=True compiles the iterations as straight-line code instead of one rolled loop.
    Under data parallelism the backward pass of a rolled loop all-reduces the gradient of f's
    parameters inside every iteration; unrolled, XLA folds those into the step's one all-reduce
    (the README's SLATE on a CPU split into 4 devices, T=5: 182 -> 130 ms a step, less memory,
    BENCHMARKS.md). For a large f on one device the rolled loop can need less memory (the
    paper's Table 1 layer at T=7: 220 vs 350 MiB), and compilation grows with the count.
    Not with checkpoint=True: unrolled, XLA merges the recomputation with the forward pass and
    the memory saving is lost.
    """
    checkpoint: bool = False
    unrolled: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.checkpoint, bool):
            raise _bad("Unroll", f"checkpoint must be True or False, got {self.checkpoint!r}")
        if not isinstance(self.unrolled, bool):
            raise _bad("Unroll", f"unrolled must be True or False, got {self.unrolled!r}")
        if self.checkpoint and self.unrolled:
            raise _bad("Unroll", "checkpoint=True needs the rolled loop (unrolled, XLA merges "
                       "the recomputation with the forward pass: no memory is saved)")


@dataclasses.dataclass(frozen=True)
class Series:
    """Truncated Neumann series at the solution: u = g (I + J + ... + J^(order-1)).

    The backward pass of one differentiated update at the last evaluation point x, with J frozen
    at x (custom rules, O(1) memory in the iterations). order=1 is exactly the gradient of
    f(params, stop_gradient(x), *args); for order > 1 it is another approximation than
    `Neumann(order)` (which differentiates `order` further updates).
    """
    order: int = 1

    def __post_init__(self) -> None:
        _set(self, order=_static_int("Series", "order", self.order))


@dataclasses.dataclass(frozen=True)
class Implicit:
    """Implicit-function-theorem gradient: solve u = g + u J with an iterative adjoint solver.

    adjoint: Iterate | Anderson | Broyden | GMRES; None = GMRES(), which converges whenever
      I - J is invertible (also at spectral radius >= 1, where the iteration diverges or
      stalls). The cheap iterative adjoint (the paper's) is an explicit choice:
      Implicit(adjoint=Iterate(max_iter)).
    on_failure: what a failed adjoint solve does. Failed: the relative residual
      ||u (I - J) - g|| / ||g|| is not finite; or above the adjoint's `tol` (floored at 64
      machine epsilons: ~7.6e-6 in float32; 4 epsilons of a bf16 state, 0.031); or, for a fixed budget (tol None), no better than
      the first-order answer u = g (diverging, or stalled as at J = -1). Then:
      "fallback" uses the first-order term u = g for the failed examples and warns (at the 1st,
      10th, 100th, ... failure); "nan" makes their gradient NaN (a trainer's non-finite guard
      stops); "raise" raises at run time. The outcome always reaches the `probe`.
    callback: called on the host with {"adjoint_residual", "adjoint_steps", "adjoint_failed"}
      after each backward solve (works under jit).
    """
    adjoint: AdjointSolver | None = None
    on_failure: str = "fallback"
    callback: Callable[[dict], None] | None = None

    def __post_init__(self) -> None:
        if self.adjoint is not None and not isinstance(self.adjoint, _ADJOINT_TYPES):
            raise _bad("Implicit", f"adjoint must be Iterate, Anderson, Broyden, GMRES or None, "
                                   f"got {self.adjoint!r}")
        if self.on_failure not in ON_FAILURE:
            raise _bad("Implicit", f"on_failure must be one of {', '.join(ON_FAILURE)}, got "
                                   f"{self.on_failure!r}")
        if self.callback is not None and not callable(self.callback):
            raise _bad("Implicit", f"callback must be callable, got {self.callback!r}")


@dataclasses.dataclass(frozen=True)
class Neumann:
    """The paper's order-K Neumann estimator: backpropagation through `order` updates from the
    detached solution (Chang et al. 2022, Fig. 11: "higher-order Neumann approximations require
    backpropagating through more iterations").

    After the solver's evaluations (no gradient), z <- (1 - damping) z + damping f(z) runs
    `order` times under plain autodiff; the value includes those updates. Neumann(order=1) is the
    paper's "one extra line", `z = step(stop_gradient(z))` after the solver's T updates.
    damping < 1 is torchdeq's phantom gradient (Geng et al. 2021).
    """
    order: int = 1
    damping: float = 1.0

    def __post_init__(self) -> None:
        _set(self, order=_static_int("Neumann", "order", self.order),
             damping=_unit_interval("Neumann", "damping", self.damping))


Gradient = Union[Unroll, Neumann, Series, Implicit]
_GRADIENT_TYPES = (Unroll, Neumann, Series, Implicit)


# --------------------------------------------------------------------------- refused forms

# The flat keyword arguments of the removed string form -> the object that owns each now.
_FLAT_OPTIONS = {
    "max_iter": "solver=Iterate(max_iter=...) (or Anderson/Broyden)",
    "tol": "solver=Iterate(tol=...)",
    "damping": "solver=Iterate(damping=...)",
    "anderson_memory": "solver=Anderson(memory=...)",
    "anderson_mixing": "solver=Anderson(mixing=...)",
    "broyden_memory": "solver=Broyden(memory=...)",
    "neumann_order": "grad=Series(order=...) (the series the old neumann_order set; "
                     "Neumann(order) is now the paper's estimator)",
    "adjoint_solver": "grad=Implicit(adjoint=GMRES(...)) (or Iterate/Anderson/Broyden)",
    "adjoint_max_iter": "grad=Implicit(adjoint=GMRES(max_iter=...))",
    "adjoint_tol": "grad=Implicit(adjoint=GMRES(tol=...))",
    "adjoint_on_failure": "grad=Implicit(on_failure=...)",
    "adjoint_callback": "grad=Implicit(callback=...)",
    "phantom_steps": "grad=Neumann(order=...) (Phantom was renamed Neumann)",
    "phantom_damping": "grad=Neumann(damping=...) (Phantom was renamed Neumann)",
}
_GRAD_NAMES = {
    "unroll": "Unroll()",
    "neumann": "Series(order) (the truncated series grad='neumann' meant; Neumann(order) is now "
               "the paper's estimator, backpropagation through K updates)",
    "series": "Series(order)",
    "phantom": "Neumann(order, damping) (Phantom was renamed Neumann)",
    "implicit": "Implicit(adjoint=...)",
}


def check_call(solver: Any, grad: Any, flat_options: dict[str, Any]) -> None:
    """Refuses the removed string form with one message naming the object to use."""
    owner = "fixed_point_layer"
    for name in flat_options:
        hint = _FLAT_OPTIONS.get(name)
        if hint is not None:
            raise _bad(owner, f"the flat option {name}= was removed with the string form; use "
                              f"{hint}")
        raise TypeError(f"{owner}() got an unexpected keyword argument {name!r}")
    if isinstance(solver, str):
        name = {"iterate": "Iterate", "anderson": "Anderson", "broyden": "Broyden"}.get(solver)
        use = f"solver={name}(max_iter=...)" if name else "Iterate, Anderson or Broyden"
        raise _bad(owner, f"solver={solver!r}: the string form was removed; use {use}")
    if not isinstance(solver, _FORWARD_TYPES):
        hint = " (GMRES solves the linear adjoint only)" if isinstance(solver, GMRES) else ""
        raise _bad(owner, f"solver must be Iterate, Anderson or Broyden; got {solver!r}{hint}")
    if isinstance(grad, str):
        use = _GRAD_NAMES.get(grad, "Unroll, Neumann, Series or Implicit")
        raise _bad(owner, f"grad={grad!r}: the string form was removed; use grad={use}")
    if not isinstance(grad, _GRADIENT_TYPES):
        raise _bad(owner, f"grad must be Unroll, Neumann, Series or Implicit; got {grad!r}")
