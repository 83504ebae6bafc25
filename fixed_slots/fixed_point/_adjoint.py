"""Linear solves of the implicit gradient: one helper per strategy, all differentiable.

On [batch, features] rows, with A a linear map (A(v) = v J for the adjoint, built from a vjp;
A(v) = J v for tangents, built from a jvp):
  neumann_series(A, b, K)   b + A(b) + ... + A^(K-1)(b)
  linear_solve(A, b, s)     v = (I - A)^-1 b with solver object s (Iterate/Anderson/Broyden
                            on v = b + A(v), or GMRES on (I - A) v = b)
Both are made of differentiable operations: the series is K - 1 applications of A, and the
solve is a `lax.custom_linear_solve`, whose derivatives are themselves linear solves. So the
backward pass of `fixed_point_layer` can be differentiated again (reverse-over-reverse).

Every solve starts at v1 = b + A(b) (the two-term series), so ||A(b)|| / ||b||, the residual of
the first-order answer v = b, is known for free. A solve has failed when its returned residual is
not finite; when it did not reach its solver's `tol` (by the solver's own stopping measure;
tolerances below `_EPS_FACTOR` machine epsilons of the dtype count as that floor, which float32
cannot beat reliably); and, for a fixed budget (`tol=None`), when it ended no better than the first-order
answer (diverged, or stalled as the iteration does at J = -1 or a rotation).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from fixed_slots.fixed_point import options
from fixed_slots.fixed_point._flat import row_norm, select_rows
from fixed_slots.fixed_point._loop import vary, run_solver, varying_axes
from fixed_slots.fixed_point._solvers import make_stepper

Linear = Callable[[jax.Array], jax.Array]
_TINY = 1e-30  # ||b|| = 0 (a zero cotangent) gives residual 0 instead of 0/0


class SolveStats(NamedTuple):
    """Per row: [batch] each; no gradient."""
    residual: jax.Array  # ||v - A(v) - b|| / ||b|| of the returned v
    steps: jax.Array  # int32 applications of A spent (GMRES: its restart budget)
    failed: jax.Array  # bool: non-finite, or residual above the first-order answer's


def _relative(r: jax.Array, b: jax.Array) -> jax.Array:
    return row_norm(r) / (row_norm(b) + _TINY)


def neumann_series(A: Linear, b: jax.Array, order: int, with_stats: bool
                   ) -> tuple[jax.Array, SolveStats | None]:
    """b (I + A + ... + A^(order-1)); stats cost one more application of A (the next term)."""
    total, term = b, b
    first = None
    for i in range(order - 1):
        term = A(term)
        first = term if i == 0 else first
        total = total + term
    if not with_stats:
        return total, None
    nxt = A(term)  # u - A(u) - b = -A^order(b)
    first = nxt if first is None else first
    residual = jax.lax.stop_gradient(_relative(nxt, b))
    base = jax.lax.stop_gradient(_relative(first, b))
    steps = jnp.full(residual.shape, order - 1, jnp.int32)
    return total, SolveStats(residual, steps, _failed(residual, base))


# A tolerance below this many machine epsilons is taken as the floor when judging a solve: the
# residual of a float32 solve cannot be trusted much below ~1e-5.
_EPS_FACTOR = 64


def _failed(residual: jax.Array, base: jax.Array) -> jax.Array:
    """A truncated series: not finite, or worse than its first term (diverging)."""
    return ~jnp.isfinite(residual) | (residual > base)


def tolerance_floor(dtype: jnp.dtype, narrowest: jnp.dtype | None = None) -> float:
    """The smallest tolerance a solve in `dtype` is judged by: _EPS_FACTOR epsilons of it, and
    4 epsilons of the narrowest dtype f computes in (a bf16 state's vjps carry bf16 noise)."""
    floor = _EPS_FACTOR * float(jnp.finfo(dtype).eps)
    if narrowest is not None:
        floor = max(floor, 4 * float(jnp.finfo(narrowest).eps))
    return floor


def _solve_failed(residual: jax.Array, base: jax.Array, tol: float | None,
                  own_residual: jax.Array, floor: float, atol: float | None = None,
                  own_abs: jax.Array | None = None) -> jax.Array:
    """A solve, per row: not finite; with `tol` or `atol`, neither its own stopping measure
    `own_residual` at most tol (floored at `floor`, tolerance_floor) nor its absolute one
    `own_abs` at most atol; without either (a fixed budget), no better than the
    first-order answer (ties included: the iteration stalls at |eigenvalue| = 1), except where
    b has no first-order residual at all (A(b) = 0: v = b is exact)."""
    bad = ~jnp.isfinite(residual)
    if tol is not None or atol is not None:
        reached = jnp.zeros(residual.shape, bool)
        if tol is not None:
            reached = reached | (own_residual <= max(float(tol), floor))
        if atol is not None:
            reached = reached | (own_abs <= float(atol))
        return bad | ~reached
    slack = 1.0 - 16 * float(jnp.finfo(residual.dtype).eps)
    return bad | ((residual >= base * slack) & (base > 0))


def _solve(solver: options.AdjointSolver, matvec: Linear, b: jax.Array,
           floor: float | None = None) -> tuple[jax.Array, SolveStats]:
    """custom_linear_solve's `solve`: v with matvec(v) = (I - A) v = b. Not differentiated."""
    Ab = b - matvec(b)
    v1 = b + Ab
    base = _relative(Ab, b)
    if isinstance(solver, options.GMRES):
        v, steps = _gmres(matvec, b, v1, solver)
        steps = steps + 1
        own = own_abs = None  # GMRES stops on the residual below, relative to ||b||, or on atol
    else:
        def H(v):  # v = b + A(v) as a fixed point
            return b + v - matvec(v), None

        result = run_solver(H, v1, make_stepper(solver), max_iter=solver.max_iter - 1,
                            tol=solver.tol, atol=solver.atol, norm=solver.norm,
                            return_best=False, differentiable=False)
        v, steps = result.fx, result.steps + 1
        own = result.final_residual  # what its tol stops on: ||H(v) - v|| / ||H(v)||
        own_abs = result.final_abs_residual  # and its atol: ||H(v) - v||
    r = matvec(v) - b
    residual = _relative(r, b)
    floor = tolerance_floor(b.dtype) if floor is None else floor
    failed = _solve_failed(residual, base, solver.tol, residual if own is None else own, floor,
                           solver.atol, row_norm(r) if own_abs is None else own_abs)
    return v, SolveStats(residual, steps, failed)


def _gmres(matvec: Linear, b: jax.Array, x0: jax.Array, solver: options.GMRES
           ) -> tuple[jax.Array, jax.Array]:
    """Restarted GMRES, one Krylov space per row: (x [batch, n], matvecs spent [batch]).

    Each restart builds up to min(restart, n) Arnoldi vectors (classical Gram-Schmidt, twice),
    stopping inside the cycle once every active row's Givens residual estimate reaches the
    tolerance, and solves the small least-squares problem by SVD (robust to breakdown); rows
    whose true relative residual ||b - M x|| / ||b|| is below tol stop, as in the fixed-point
    loop (an optimistic estimate only costs another restart). Written here
    rather than jax.scipy's gmres so that each example is its own problem and the loops keep
    their types under shard_map.
    """
    batch, n = b.shape
    m = min(solver.restart, n)
    b_norm = row_norm(b) + _TINY
    axes = varying_axes(b, x0)

    def cycle(x, r, active):
        """One restart from x (residual r): Arnoldi vectors until each active row's residual
        estimate (Givens rotations of the Hessenberg matrix: |g_(j+1)| = ||r - M V y||)
        reaches the tolerance, at most m; then (x + V y, columns built per row)."""
        beta = row_norm(r)
        V = jnp.zeros((batch, m + 1, n), b.dtype).at[:, 0].set(r / _safe(beta)[:, None])
        H = jnp.zeros((batch, m + 1, m), b.dtype)
        rot = jnp.zeros((batch, 2, m), b.dtype)  # Givens cosines and sines so far
        g = jnp.zeros((batch, m + 1), b.dtype).at[:, 0].set(beta)
        columns = jnp.zeros((batch,), jnp.int32)
        idx = jnp.arange(m + 1, dtype=jnp.int32)

        def arnoldi(carry):
            j, V, H, rot, g, building, columns = carry
            w = matvec(V[:, j])
            mask = (idx <= j).astype(b.dtype)
            h = jnp.zeros((batch, m + 1), b.dtype)
            for _ in range(2):  # CGS2: re-orthogonalise once for float32 stability
                hi = jnp.einsum("bkn,bn->bk", V, w) * mask[None, :]
                w = w - jnp.einsum("bk,bkn->bn", hi, V)
                h = h + hi
            norm = row_norm(w)
            h = h.at[:, j + 1].set(norm)
            keep = building.astype(b.dtype)[:, None]  # finished rows add no column
            unit = w / _safe(norm)[:, None] * (norm > _TINY).astype(b.dtype)[:, None]
            V = V.at[:, j + 1].set(unit * keep)
            H = H.at[:, :, j].set(h * keep)
            # The residual estimate: rotate the new column by the earlier rotations, then
            # annihilate its subdiagonal entry with a new one, applied to g as well.
            hr = h
            for i in range(m):  # static; rotation i acts on entries (i, i + 1) when i < j
                c, sn = rot[:, 0, i], rot[:, 1, i]
                a, d = hr[:, i], hr[:, i + 1]
                on = i < j
                hr = hr.at[:, i].set(jnp.where(on, c * a + sn * d, a))
                hr = hr.at[:, i + 1].set(jnp.where(on, -sn * a + c * d, d))
            a, d = hr[:, j], hr[:, j + 1]
            radius = jnp.sqrt(a * a + d * d)
            c = jnp.where(radius > _TINY, a / _safe(radius), 1.0)
            sn = jnp.where(radius > _TINY, d / _safe(radius), 0.0)
            rot = rot.at[:, 0, j].set(c).at[:, 1, j].set(sn)
            gj = g[:, j]
            g = g.at[:, j].set(c * gj).at[:, j + 1].set(-sn * gj)
            columns = columns + building.astype(jnp.int32)
            building = building & ~_gmres_reached_norm(jnp.abs(g[:, j + 1]), b_norm, solver)
            return vary((j + 1, V, H, rot, g, building, columns), axes)

        carry = (jnp.zeros((), jnp.int32), V, H, rot, g, active, columns)
        _, V, H, _, _, _, columns = jax.lax.while_loop(
            lambda c: (c[0] < m) & jnp.any(c[5]), arnoldi, vary(carry, axes))
        # The small least-squares problem over each row's own columns (the rest are zero), by
        # SVD: robust to breakdown.
        e1 = jnp.zeros((batch, m + 1), b.dtype).at[:, 0].set(beta)
        y = jax.vmap(lambda h, e: jnp.linalg.lstsq(h, e)[0])(H, e1)  # [batch, m]
        return x + jnp.einsum("bk,bkn->bn", y, V[:, :m]), columns

    def body(carry):
        k, x, r, active, steps = carry
        x_new, columns = cycle(x, r, active)
        r_new = b - matvec(x_new)
        x = select_rows(active, x_new, x)
        r = select_rows(active, r_new, r)
        steps = steps + active.astype(jnp.int32) * (columns + 1)
        active = active & ~_gmres_reached(r, b_norm, solver)
        return vary((k + 1, x, r, active, steps), axes)

    r0 = b - matvec(x0)
    carry = (jnp.zeros((), jnp.int32), x0, r0, ~_gmres_reached(r0, b_norm, solver),
             jnp.ones((batch,), jnp.int32))
    carry = jax.lax.while_loop(lambda c: (c[0] < solver.max_iter) & jnp.any(c[3]), body,
                               vary(carry, axes))
    return carry[1], carry[4]


def _gmres_reached(r: jax.Array, b_norm: jax.Array, solver: options.GMRES) -> jax.Array:
    return _gmres_reached_norm(row_norm(r), b_norm, solver)


def _gmres_reached_norm(r_norm: jax.Array, b_norm: jax.Array, solver: options.GMRES
                        ) -> jax.Array:
    reached = r_norm / b_norm < solver.tol
    return reached if solver.atol is None else reached | (r_norm <= solver.atol)


def _safe(norm: jax.Array) -> jax.Array:
    return jnp.where(norm > _TINY, norm, 1.0)


Policy = Callable[[jax.Array, jax.Array, SolveStats], jax.Array]


def linear_solve(A: Linear, b: jax.Array, solver: options.AdjointSolver,
                 floor: float | None = None, policy: Policy | None = None
                 ) -> tuple[jax.Array, SolveStats]:
    """(I - A)^-1 b by `solver`, differentiable (its transpose is the same solver on A^T).
    `floor`: the smallest tolerance the solve is judged by (None: tolerance_floor(b.dtype)).
    `policy(v, rhs, stats) -> v`: what a failed solve returns; applied inside every solve of
    the system, so the transposed solve that reverse mode runs (u = g (I - J)^-1) obeys it too.
    """

    def matvec(v):
        return v - A(v)

    def solve(mv, rhs):
        v, stats = _solve(solver, mv, rhs, floor)
        return (v if policy is None else policy(v, rhs, stats)), stats

    v, stats = jax.lax.custom_linear_solve(matvec, b, solve, transpose_solve=solve, has_aux=True)
    return v, jax.tree.map(jax.lax.stop_gradient, stats)
