"""Fixed points with implicit differentiation, for any JAX function (imports only JAX).

    z_star, info = fixed_point_layer(f, params, z0, *args,
                                     solver=Iterate(max_iter=7),
                                     grad=Implicit(adjoint=Broyden(max_iter=30, tol=1e-6)))

The stable public surface is exactly `__all__` below (documented in docs/fixed_point.md):
  fixed_point_layer            solve z* = f(params, z*, *args) and differentiate through it
  FixedPointInfo               the per-call diagnostics it returns
  Iterate, Anderson, Broyden   forward (and adjoint) solvers; GMRES: adjoint only
  Unroll, Neumann, Implicit, Phantom   gradient estimators
  jacobian_spectral_norm       largest singular value of df/dz (power iteration, no gradient)
  jacobian_frobenius_penalty   Hutchinson estimate of ||df/dz||_F^2 (a differentiable loss term)
  parse_grad_mode, GradMode    config strings ("unroll", "neumannK", "IN", "IB", "BN", "BB", ...)
  SOLVERS, GRAD_MODES, ADJOINT_SOLVERS   the valid names of the string form

Submodules (`layer`, `options`, `modes`, `diagnostics`, and the underscored ones) are private
implementation modules: import from `fixed_slots.fixed_point`, not from them.
"""
from fixed_slots.fixed_point.diagnostics import jacobian_frobenius_penalty, jacobian_spectral_norm
from fixed_slots.fixed_point.layer import FixedPointInfo, fixed_point_layer
from fixed_slots.fixed_point.modes import GradMode, parse_grad_mode
from fixed_slots.fixed_point.options import (
    ADJOINT_SOLVERS,
    GMRES,
    GRAD_MODES,
    SOLVERS,
    Anderson,
    Broyden,
    Implicit,
    Iterate,
    Neumann,
    Phantom,
    Unroll,
)

__all__ = [
    "ADJOINT_SOLVERS",
    "GMRES",
    "GRAD_MODES",
    "SOLVERS",
    "Anderson",
    "Broyden",
    "FixedPointInfo",
    "GradMode",
    "Implicit",
    "Iterate",
    "Neumann",
    "Phantom",
    "Unroll",
    "fixed_point_layer",
    "jacobian_frobenius_penalty",
    "jacobian_spectral_norm",
    "parse_grad_mode",
]
