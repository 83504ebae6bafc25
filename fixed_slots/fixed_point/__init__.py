"""Fixed points with implicit differentiation, for any JAX function (imports only JAX).

    z_star, info = fixed_point_layer(f, params, z0, *args,
                                     solver=Iterate(max_iter=7),
                                     grad=Implicit(adjoint=Broyden(max_iter=30, tol=1e-6)))

The stable public surface is exactly `__all__` below (documented in docs/fixed_point.md):
  fixed_point_layer            solve z* = f(params, z*, *args) and differentiate through it
  FixedPointInfo               the per-call diagnostics it returns
  Iterate, Anderson, Broyden   forward (and adjoint) solvers; GMRES: adjoint only
  Unroll, Neumann, Series, Implicit   gradient estimators (Neumann: the paper's, backpropagation
                               through K updates; Series: the truncated series at the fixed point)
  jacobian_spectral_norm       largest singular value of df/dz (power iteration, no gradient)
  jacobian_frobenius_penalty   Hutchinson estimate of ||df/dz||_F^2 (a differentiable loss term)
  parse_grad_mode, GradMode    config strings ("unroll", "neumannK", "IN", "IB", "BN", "BB", ...)
  ADJOINT_SOLVERS              the config names of the adjoint solvers

Submodules (`layer`, `options`, `modes`, `diagnostics`, and the underscored ones) are private
implementation modules: import from `fixed_slots.fixed_point`, not from them.
"""
from fixed_slots.fixed_point.diagnostics import jacobian_frobenius_penalty, jacobian_spectral_norm
from fixed_slots.fixed_point.layer import FixedPointInfo, fixed_point_layer
from fixed_slots.fixed_point.modes import ADJOINT_SOLVERS, GradMode, parse_grad_mode
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

__all__ = [
    "ADJOINT_SOLVERS",
    "GMRES",
    "Anderson",
    "Broyden",
    "FixedPointInfo",
    "GradMode",
    "Implicit",
    "Iterate",
    "Neumann",
    "Series",
    "Unroll",
    "fixed_point_layer",
    "jacobian_frobenius_penalty",
    "jacobian_spectral_norm",
    "parse_grad_mode",
]

# Names removed in the one-vocabulary change: a message saying what replaced each.
_REMOVED = {
    "Phantom": "Phantom(steps, damping) was renamed Neumann(order, damping) (the paper's "
               "estimator); the truncated series that Neumann(order) used to be is Series(order)",
    "SOLVERS": "the string form was removed: use the objects Iterate, Anderson, Broyden",
    "GRAD_MODES": "the string form was removed: use the objects Unroll, Neumann, Series, "
                  "Implicit (config strings: parse_grad_mode)",
}


def __getattr__(name: str):
    if name in _REMOVED:
        raise AttributeError(f"fixed_slots.fixed_point.{name}: {_REMOVED[name]}")
    raise AttributeError(f"module 'fixed_slots.fixed_point' has no attribute {name!r}")
