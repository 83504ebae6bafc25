"""Forward (and adjoint) fixed-point solvers on [batch, features] matrices.

Every solver is a pair of pure functions with static shapes:
  init(x0) -> state
  update(x, fx, state) -> (x_next, state)
where fx = F(x) was evaluated by the caller. One f evaluation per step, so `max_iter` is the
exact number of f evaluations whatever the solver: the cost is deterministic.
Rows are independent problems (see _flat.py): nothing mixes information across rows.
The public option objects (options.py) are turned into steppers by `make_stepper`.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from fixed_slots.fixed_point import options


class Stepper(NamedTuple):
    init: Callable[[jax.Array], Any]
    update: Callable[[jax.Array, jax.Array, Any], tuple[jax.Array, Any]]


def iterate(damping: float = 1.0) -> Stepper:
    """Naive (Picard) iteration, optionally damped: x <- (1 - d) x + d f(x)."""

    def init(x0):
        return ()

    def update(x, fx, state):
        if damping == 1.0:
            return fx, state
        return (1.0 - damping) * x + damping * fx, state

    return Stepper(init, update)


class _AndersonState(NamedTuple):
    xs: jax.Array  # [batch, memory, features] past evaluation points
    fs: jax.Array  # [batch, memory, features] f at those points
    count: jax.Array  # [] number of stored pairs (saturates at memory)
    head: jax.Array  # [] slot the next pair is written to


def anderson(memory: int = 5, mixing: float = 1.0, regularization: float = 1e-4) -> Stepper:
    """Anderson acceleration (type II), as in Walker & Ni and the DEQ tutorial.

    Mixing coefficients alpha minimise ||sum_i alpha_i (f(x_i) - x_i)|| with sum alpha = 1, solved
    per row through the bordered normal equations; unfilled memory slots get alpha = 0.
    """
    def init(x0):
        batch, features = x0.shape
        zeros = jnp.zeros((batch, memory, features), x0.dtype)
        return _AndersonState(zeros, zeros, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))

    def update(x, fx, state):
        xs = state.xs.at[:, state.head].set(x)
        fs = state.fs.at[:, state.head].set(fx)
        count = jnp.minimum(state.count + 1, memory)
        # slots fill in order 0..memory-1 before wrapping
        valid = jnp.arange(memory, dtype=count.dtype) < count
        residuals = fs - xs  # [batch, memory, features]
        gram = jnp.einsum("bif,bjf->bij", residuals, residuals)
        pair_valid = valid[:, None] & valid[None, :]
        gram = jnp.where(pair_valid, gram, 0.0)
        # Scale the ridge by the Gram's size so it stays meaningful at any residual magnitude;
        # unfilled slots get a unit diagonal and a zero border, which forces their alpha to 0.
        scale = jnp.maximum(jnp.max(jnp.abs(gram), axis=(1, 2)), 1e-30)  # [batch]
        diag = jnp.where(valid[None, :], regularization * scale[:, None], 1.0)  # [batch, memory]
        system = gram + diag[:, :, None] * jnp.eye(memory, dtype=x.dtype)[None]
        border = valid.astype(x.dtype)
        batch = x.shape[0]
        top = jnp.concatenate([jnp.zeros((batch, 1, 1), x.dtype),
                               jnp.broadcast_to(border, (batch, 1, memory))], axis=2)
        rest = jnp.concatenate([jnp.broadcast_to(border[:, None], (batch, memory, 1)), system], axis=2)
        bordered = jnp.concatenate([top, rest], axis=1)  # [batch, memory + 1, memory + 1]
        rhs = jnp.zeros((batch, memory + 1), x.dtype).at[:, 0].set(1.0)
        alpha = jnp.linalg.solve(bordered, rhs[..., None])[:, 1:, 0]  # [batch, memory]
        mixed_f = jnp.einsum("bi,bif->bf", alpha, fs)
        mixed_x = jnp.einsum("bi,bif->bf", alpha, xs)
        x_next = mixing * mixed_f + (1.0 - mixing) * mixed_x
        return x_next, _AndersonState(xs, fs, count, (state.head + 1) % memory)

    return Stepper(init, update)


class _BroydenState(NamedTuple):
    us: jax.Array  # [batch, memory, features]
    vts: jax.Array  # [batch, memory, features]
    x_prev: jax.Array  # [batch, features]
    g_prev: jax.Array  # [batch, features] residual g = f(x) - x at x_prev
    started: jax.Array  # [] whether x_prev holds a real point
    head: jax.Array  # [] slot the next rank-one update is written to


def broyden(memory: int = 30, step_size: float = 1.0) -> Stepper:
    """Limited-memory ("good") Broyden on g(x) = f(x) - x, as in the DEQ code.

    The inverse Jacobian of g is approximated as -I + U V^T (starting from -I, i.e. a plain
    iteration step) with rank-one updates kept in a circular buffer of `memory` pairs.
    """
    def inv_matvec(us, vts, v):  # (-I + U V^T) v
        return -v + jnp.einsum("bmf,bm->bf", us, jnp.einsum("bmf,bf->bm", vts, v))

    def inv_rmatvec(us, vts, v):  # v^T (-I + U V^T)
        return -v + jnp.einsum("bm,bmf->bf", jnp.einsum("bf,bmf->bm", v, us), vts)

    def init(x0):
        batch, features = x0.shape
        zeros = jnp.zeros((batch, memory, features), x0.dtype)
        return _BroydenState(zeros, zeros, x0, jnp.zeros_like(x0), jnp.zeros((), bool),
                             jnp.zeros((), jnp.int32))

    def update(x, fx, state):
        g = fx - x
        dx = x - state.x_prev
        dg = g - state.g_prev
        vt = inv_rmatvec(state.us, state.vts, dx)
        denom = jnp.sum(vt * dg, axis=1, keepdims=True)
        # Skip the rank-one update where the secant pair is round-off: once a row has converged
        # and the iteration keeps going (no tol), dx and dg are noise and updates built from
        # them corrupt the inverse until the iterate blows up. Below a step of 100 eps |x| the
        # row keeps iterating with its last inverse (a chord step).
        eps = jnp.finfo(x.dtype).eps
        step_norm = jnp.sqrt(jnp.sum(dx * dx, axis=1, keepdims=True))
        x_norm = jnp.sqrt(jnp.sum(x * x, axis=1, keepdims=True))
        usable = (state.started & (jnp.abs(denom) > 1e-12)
                  & (step_norm > 100 * eps * x_norm))  # [batch, 1]
        safe = jnp.where(usable, denom, 1.0)
        u = (dx - inv_matvec(state.us, state.vts, dg)) / safe
        usable = usable & jnp.all(jnp.isfinite(u) & jnp.isfinite(vt), axis=1, keepdims=True)
        u = jnp.where(usable, u, 0.0)
        vt = jnp.where(usable, vt, 0.0)
        advance = jnp.any(usable)
        us = jnp.where(advance, state.us.at[:, state.head].set(u), state.us)
        vts = jnp.where(advance, state.vts.at[:, state.head].set(vt), state.vts)
        head = jnp.where(advance, (state.head + 1) % memory, state.head)
        x_next = x - step_size * inv_matvec(us, vts, g)
        return x_next, _BroydenState(us, vts, x, g, jnp.ones((), bool), head)

    return Stepper(init, update)


def make_stepper(solver: options.AdjointSolver) -> Stepper:
    """The stepper of a fixed-point solver object (GMRES is not a fixed-point stepper)."""
    if isinstance(solver, options.Iterate):
        return iterate(solver.damping)
    if isinstance(solver, options.Anderson):
        return anderson(solver.memory, solver.mixing, solver.regularization)
    if isinstance(solver, options.Broyden):
        return broyden(solver.memory)
    raise TypeError(f"no fixed-point stepper for {solver!r}")
