"""Solver and gradient options as objects (as in optimistix / jaxopt): each owns its options.

    fixed_point_layer(f, params, z0, x,
                      solver=Anderson(max_iter=30, tol=1e-5),
                      grad=Implicit(adjoint=Broyden(max_iter=30, tol=1e-6)))

Forward solvers: `Iterate`, `Anderson`, `Broyden`. Adjoint solvers (inside `Implicit`): those
three and `GMRES`. Gradients: `Unroll`, `Neumann`, `Implicit`, `Phantom`. All are frozen
dataclasses validated at construction (a bad value raises ValueError naming the class and the
option); `dataclasses.replace(obj, max_iter=...)` re-validates. Options are static: they shape
the compiled program, so a traced value (an argument of a jitted function) is refused with a
message saying so; integer-like values (numpy integers) are accepted.

`resolve` turns the string form (`solver="anderson", max_iter=30, grad="implicit",
adjoint_solver="gmres", ...`: config strings and the original flat keyword arguments) into these
objects; it is the only place the string form is interpreted.
"""
from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any, Callable, Union

import jax

SOLVERS = ("iterate", "anderson", "broyden")
GRAD_MODES = ("unroll", "neumann", "implicit", "phantom")
ADJOINT_SOLVERS = ("iterate", "anderson", "broyden", "gmres")
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
    if math.isnan(out):
        raise _bad(owner, f"{name} must not be NaN")
    return out


def _tol(owner: str, value: Any, name: str = "tol") -> float | None:
    if value is None:
        return None
    out = _static_float(owner, name, value)
    if not out > 0:
        raise _bad(owner, f"{name} must be None or > 0, got {value!r}")
    return out


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

    max_iter: f evaluations (exactly this many unless `tol` is reached first).
    tol: stop once the relative residual ||f(z) - z|| / ||f(z)|| < tol (per example with
      batch_axis); None runs exactly max_iter evaluations.
    """
    max_iter: int = 7
    tol: float | None = None
    damping: float = 1.0

    def __post_init__(self) -> None:
        _set(self, max_iter=_static_int("Iterate", "max_iter", self.max_iter),
             tol=_tol("Iterate", self.tol),
             damping=_unit_interval("Iterate", "damping", self.damping))


@dataclasses.dataclass(frozen=True)
class Anderson:
    """Anderson acceleration (type II) with `memory` past pairs, mixing beta and a ridge.

    max_iter / tol as in `Iterate`. The ridge is `regularization` times the largest entry of the
    residual Gram matrix, so it is scale-free.
    """
    max_iter: int = 7
    tol: float | None = None
    memory: int = 5
    mixing: float = 1.0
    regularization: float = 1e-4

    def __post_init__(self) -> None:
        reg = _static_float("Anderson", "regularization", self.regularization)
        if reg < 0:
            raise _bad("Anderson", f"regularization must be >= 0, got {self.regularization!r}")
        _set(self, max_iter=_static_int("Anderson", "max_iter", self.max_iter),
             tol=_tol("Anderson", self.tol),
             memory=_static_int("Anderson", "memory", self.memory),
             mixing=_unit_interval("Anderson", "mixing", self.mixing), regularization=reg)


@dataclasses.dataclass(frozen=True)
class Broyden:
    """Limited-memory ("good") Broyden on g(z) = f(z) - z with `memory` rank-one updates.

    max_iter / tol as in `Iterate`.
    """
    max_iter: int = 7
    tol: float | None = None
    memory: int = 30

    def __post_init__(self) -> None:
        _set(self, max_iter=_static_int("Broyden", "max_iter", self.max_iter),
             tol=_tol("Broyden", self.tol),
             memory=_static_int("Broyden", "memory", self.memory))


@dataclasses.dataclass(frozen=True)
class GMRES:
    """Restarted GMRES on the adjoint's linear system (I - J^T) u = g (adjoint solver only).

    max_iter: restarts, each of up to `restart` Krylov vectors (one vjp each).
    tol: relative residual at which it stops (jax.scipy.sparse.linalg.gmres's tol).
    Unlike the fixed-point solvers it converges whenever I - J is invertible, also when the
    spectral radius of J is >= 1.
    """
    max_iter: int = 5
    tol: float = 1e-6
    restart: int = 20

    def __post_init__(self) -> None:
        tol = _tol("GMRES", self.tol)
        if tol is None:
            raise _bad("GMRES", "tol must be > 0, got None")
        _set(self, max_iter=_static_int("GMRES", "max_iter", self.max_iter), tol=tol,
             restart=_static_int("GMRES", "restart", self.restart))


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
    """
    checkpoint: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.checkpoint, bool):
            raise _bad("Unroll", f"checkpoint must be True or False, got {self.checkpoint!r}")


@dataclasses.dataclass(frozen=True)
class Neumann:
    """Truncated Neumann series at the solution: u = g (I + J + ... + J^(order-1)).

    order=1 is the paper's first-order estimator: exactly the gradient of
    f(params, stop_gradient(z), *args) at the last evaluation point z.
    """
    order: int = 1

    def __post_init__(self) -> None:
        _set(self, order=_static_int("Neumann", "order", self.order))


@dataclasses.dataclass(frozen=True)
class Implicit:
    """Implicit-function-theorem gradient: solve u = g + u J with an iterative adjoint solver.

    adjoint: Iterate | Anderson | Broyden | GMRES; None = Iterate with the forward solver's
      max_iter and no tol.
    on_failure: what a failed adjoint solve (non-finite, or relative residual
      ||u (I - J) - g|| / ||g|| > 1: worse than u = 0, i.e. diverging) does:
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
class Phantom:
    """Phantom gradient: backpropagation through `steps` damped steps from the detached solution.

    z <- (1 - damping) z + damping f(z), k = steps times, differentiated by autodiff; the value
    includes those steps. Phantom(steps=K, damping=1.0) is the paper's Fig. 11 order K.
    """
    steps: int = 1
    damping: float = 1.0

    def __post_init__(self) -> None:
        _set(self, steps=_static_int("Phantom", "steps", self.steps),
             damping=_unit_interval("Phantom", "damping", self.damping))


Gradient = Union[Unroll, Neumann, Implicit, Phantom]
_GRADIENT_TYPES = (Unroll, Neumann, Implicit, Phantom)


# --------------------------------------------------------------------------- the string form

_SOLVER_KEYS = ("max_iter", "tol", "damping", "anderson_memory", "anderson_mixing",
                "broyden_memory")
_GRAD_KEYS = ("neumann_order", "adjoint_solver", "adjoint_max_iter", "adjoint_tol",
              "adjoint_on_failure", "phantom_steps", "phantom_damping", "adjoint_callback")
STRING_OPTIONS = _SOLVER_KEYS + _GRAD_KEYS
_INT_KEYS = ("max_iter", "anderson_memory", "broyden_memory", "neumann_order", "adjoint_max_iter",
             "phantom_steps")
_UNIT_KEYS = ("damping", "anderson_mixing", "phantom_damping")


def resolve(solver: Any, grad: Any, options: dict[str, Any]
            ) -> tuple[ForwardSolver, Gradient]:
    """(solver, grad, flat options) of a `fixed_point_layer` call -> (solver, gradient) objects.

    Strings with flat options are the compatibility form; objects carry their own options, so
    flat options next to an object are refused (they would be silently ambiguous). Flat options
    that do not apply to the named solver or gradient (adjoint_max_iter with grad="neumann")
    are validated and ignored, so that one set of config options serves every mode.
    """
    owner = "fixed_point_layer"
    unknown = sorted(set(options) - set(STRING_OPTIONS))
    if unknown:
        raise _bad(owner, f"unknown option(s) {', '.join(unknown)}; the string form accepts "
                          f"{', '.join(STRING_OPTIONS)}")
    uses_objects = not isinstance(solver, str) or not isinstance(grad, str)
    if options and uses_objects:
        raise _bad(owner, f"flat option(s) {', '.join(sorted(options))} belong to the string "
                          "form (solver='iterate', grad='neumann', ...); with solver/grad "
                          "objects set them on the objects, e.g. Iterate(max_iter=...), "
                          "Implicit(adjoint=Broyden(max_iter=...))")
    o = dict(options)
    for name, value in o.items():  # errors name the flat option the caller wrote
        if name in _INT_KEYS:
            o[name] = _static_int(owner, name, value) if value is not None else None
        elif name in ("tol", "adjoint_tol"):
            o[name] = _tol(owner, value, name)
        elif name in _UNIT_KEYS:
            o[name] = _unit_interval(owner, name, value)
    if o.get("adjoint_on_failure", "fallback") not in ON_FAILURE:
        raise _bad(owner, f"adjoint_on_failure must be one of {', '.join(ON_FAILURE)}, got "
                          f"{o['adjoint_on_failure']!r}")
    if o.get("adjoint_solver", "iterate") not in ADJOINT_SOLVERS:
        raise _bad(owner, f"unknown adjoint_solver {o['adjoint_solver']!r}; valid: "
                          f"{', '.join(ADJOINT_SOLVERS)}")
    max_iter = o.get("max_iter", 7)
    anderson = dict(memory=o.get("anderson_memory", 5), mixing=o.get("anderson_mixing", 1.0))
    broyden = dict(memory=o.get("broyden_memory", 30))

    if isinstance(solver, str):
        tol = o.get("tol")
        if solver == "iterate":
            solver = Iterate(max_iter, tol, o.get("damping", 1.0))
        elif solver == "anderson":
            solver = Anderson(max_iter, tol, **anderson)
        elif solver == "broyden":
            solver = Broyden(max_iter, tol, **broyden)
        else:
            raise _bad(owner, f"unknown solver {solver!r}; valid solvers: {', '.join(SOLVERS)}")
    elif not isinstance(solver, _FORWARD_TYPES):
        hint = " (GMRES solves the linear adjoint only)" if isinstance(solver, GMRES) else ""
        raise _bad(owner, f"solver must be Iterate, Anderson, Broyden or one of the names "
                          f"{', '.join(SOLVERS)}; got {solver!r}{hint}")

    if isinstance(grad, str):
        if grad == "unroll":
            grad = Unroll()
        elif grad == "neumann":
            grad = Neumann(o.get("neumann_order", 1))
        elif grad == "phantom":
            grad = Phantom(o.get("phantom_steps", 1), o.get("phantom_damping", 1.0))
        elif grad == "implicit":
            name = o.get("adjoint_solver", "iterate")
            budget = o.get("adjoint_max_iter")
            budget = max_iter if budget is None else budget
            tol = o.get("adjoint_tol")
            if name == "iterate":
                adjoint = Iterate(budget, tol)
            elif name == "anderson":
                adjoint = Anderson(budget, tol, **anderson)
            elif name == "broyden":
                adjoint = Broyden(budget, tol, **broyden)
            else:
                adjoint = GMRES(budget, 1e-6 if tol is None else tol)
            grad = Implicit(adjoint, on_failure=o.get("adjoint_on_failure", "fallback"),
                            callback=o.get("adjoint_callback"))
        else:
            raise _bad(owner, f"unknown grad {grad!r}; valid gradient modes: "
                              f"{', '.join(GRAD_MODES)}")
    elif not isinstance(grad, _GRADIENT_TYPES):
        raise _bad(owner, f"grad must be Unroll, Neumann, Implicit, Phantom or one of the names "
                          f"{', '.join(GRAD_MODES)}; got {grad!r}")
    if isinstance(grad, Implicit) and grad.adjoint is None:
        grad = dataclasses.replace(grad, adjoint=Iterate(solver.max_iter))
    return solver, grad
