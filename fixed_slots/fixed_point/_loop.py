"""The one iteration loop shared by forward solves and adjoint solves."""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from fixed_slots.fixed_point._flat import row_norm, select_rows
from fixed_slots.fixed_point._solvers import Stepper

# Keeps the relative residual finite when f(x) = 0.
_RESIDUAL_EPS = 1e-8


class LoopResult(NamedTuple):
    x: jax.Array  # [batch, features] the point where f was evaluated for the output
    fx: jax.Array  # [batch, features] f(x): the returned fixed-point estimate
    aux: Any  # f's auxiliary output at x (None when f has none)
    residuals: jax.Array  # [batch, max_iter] relative residual per evaluation, NaN after stopping
    steps: jax.Array  # [batch] int32 evaluations spent on each row
    final_residual: jax.Array  # [batch] relative residual of the returned pair
    final_abs_residual: jax.Array | None = None  # [batch] ||f(x) - x|| of the returned pair


def relative_residual(x: jax.Array, fx: jax.Array, norm: str = "two") -> jax.Array:
    """||f(x) - x|| / (||f(x)|| + eps) per row; at a fixed point this is the paper's ||f(z)-z||/||z||.

    The denominator uses f(x) rather than x so that a zero initial state (common in DEQs) does
    not blow the first residual up. `norm`: see _flat.row_norm.
    """
    return row_norm(fx - x, norm) / (row_norm(fx, norm) + _RESIDUAL_EPS)


def reached(relative: jax.Array, absolute: jax.Array, tol: float | None,
            atol: float | None) -> jax.Array:
    """Per row: relative residual < tol or absolute residual <= atol (False where neither is
    set): the one stopping and convergence test of the forward solvers."""
    out = jnp.zeros(relative.shape, bool)
    if tol is not None:
        out = out | (relative < tol)
    if atol is not None:
        out = out | (absolute <= atol)
    return out


# ---------------------------------------------------------------- shard_map (check_vma=True)
# Under shard_map every value carries the set of mesh axes it varies over, and a loop's carry
# must keep its type. Fresh constants (counters, NaN traces, solver memories) start invariant
# while the body makes them depend on the sharded state, so the initial carry is cast to vary
# over every axis the state and f's output vary over. Outside shard_map these sets are empty.

def _varying_axes(aval: Any) -> frozenset:
    mat = getattr(aval, "manual_axis_type", None)  # jax >= 0.10
    if mat is not None:
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", ()))  # earlier versions


def vary(tree: Any, axes: frozenset) -> Any:
    if not axes:
        return tree
    cast = getattr(jax.lax, "pcast", None)

    def one(leaf):
        missing = tuple(sorted(axes - _varying_axes(jax.typeof(leaf))))
        if not missing:
            return leaf
        if cast is not None:
            return cast(leaf, missing, to="varying")
        return jax.lax.pvary(leaf, missing)

    return jax.tree.map(one, tree)


def varying_axes(*examples: Any) -> frozenset:
    """Every manual mesh axis some leaf of `examples` (arrays or ShapeDtypeStructs) varies over."""
    axes = frozenset()
    for leaf in jax.tree.leaves(examples):
        axes |= _varying_axes(leaf if isinstance(leaf, jax.ShapeDtypeStruct) else jax.typeof(leaf))
    return axes


def run_solver(
    F: Callable[[jax.Array], tuple[jax.Array, Any]],
    x0: jax.Array,
    stepper: Stepper,
    *,
    max_iter: int,
    tol: float | None,
    return_best: bool,
    atol: float | None = None,
    norm: str = "two",
    differentiable: bool,
    checkpoint: bool = False,
    unrolled: bool = False,
    aux_template: Any = None,
    select_aux: Callable[[jax.Array, Any, Any], Any] | None = None,
) -> LoopResult:
    """Runs `max_iter` evaluations of F (fewer where rows reach `tol` or `atol`: a row stops once
    its relative residual is below tol or its absolute one ||F(x) - x|| at most atol; both, and
    the residuals returned, in `norm`).

    F maps [batch, features] -> ([batch, features], aux). Rows that reach `tol` are frozen: their
    iterate, solver memory and output stop changing, so they do not depend on slower rows.
    differentiable=True runs a `scan` that reverse-mode autodiff can go through (the unrolled
    baseline; checkpoint=True rematerialises each iteration in the backward pass); otherwise a
    `while_loop` that exits once every row has converged. unrolled=True (with differentiable)
    compiles the scan as straight-line code (options.Unroll refuses it with checkpoint).
    """
    batch = x0.shape[0]
    state0 = stepper.init(x0)
    nan_trace = jnp.full((batch, max_iter), jnp.nan, jnp.float32)
    carry0 = (
        jnp.zeros((), jnp.int32),  # evaluations so far
        x0,
        state0,
        x0,  # x_out
        x0,  # fx_out (overwritten by the first evaluation)
        aux_template,
        jnp.full((batch,), jnp.inf, jnp.float32),  # residual of the output pair
        jnp.full((batch,), jnp.inf, jnp.float32),  # its absolute residual
        nan_trace,
        jnp.zeros((batch,), bool),  # done
        jnp.zeros((batch,), jnp.int32),  # steps
    )
    axes = varying_axes(x0, jax.eval_shape(F, x0))
    carry0 = vary(carry0, axes)

    def body(carry):
        k, x, state, x_out, fx_out, aux_out, res_out, abs_out, trace, done, steps = carry
        fx, aux = F(x)
        r = jax.lax.stop_gradient(relative_residual(x, fx, norm)).astype(jnp.float32)
        a = jax.lax.stop_gradient(row_norm(fx - x, norm)).astype(jnp.float32)
        active = ~done
        trace = trace.at[:, k].set(jnp.where(active, r, jnp.nan))
        steps = steps + active.astype(jnp.int32)
        take = active & (r <= res_out) if return_best else active
        x_out = select_rows(take, x, x_out)
        fx_out = select_rows(take, fx, fx_out)
        res_out = jnp.where(take, r, res_out)
        abs_out = jnp.where(take, a, abs_out)
        if select_aux is not None:
            aux_out = select_aux(take, aux, aux_out)
        if tol is not None or atol is not None:
            done = done | (active & reached(r, a, tol, atol))
        x_next, new_state = stepper.update(x, fx, state)
        keep_going = ~done
        x = select_rows(keep_going, x_next, x)
        state = jax.tree.map(
            lambda new, old: select_rows(keep_going, new, old)
            if new.ndim >= 1 and new.shape[0] == batch else new,
            new_state, state)
        return vary((k + 1, x, state, x_out, fx_out, aux_out, res_out, abs_out, trace, done,
                     steps), axes)

    if differentiable:
        step = jax.checkpoint(body, prevent_cse=False) if checkpoint else body
        carry, _ = jax.lax.scan(lambda c, _: (step(c), None), carry0, None, length=max_iter,
                                unroll=unrolled)
    else:
        carry = jax.lax.while_loop(
            lambda c: (c[0] < max_iter) & ~jnp.all(c[9]), body, carry0)
    _, _, _, x_out, fx_out, aux_out, res_out, abs_out, trace, _, steps = carry
    return LoopResult(x_out, fx_out, aux_out, trace, steps, res_out, abs_out)
