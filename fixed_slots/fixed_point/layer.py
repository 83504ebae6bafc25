"""`fixed_point_layer`: solve z* = f(params, z*, *args) and differentiate through it.

Forward: a solver object (Iterate, Anderson, Broyden; options.py) runs up to `max_iter`
evaluations of f; the output is f(x) at the last (or, with return_best, the lowest-residual)
evaluation point x. Backward, chosen by the gradient object:
  Unroll    autodiff through every iteration (vanilla slot attention; optionally checkpointed).
  Neumann   the paper's estimator: autodiff through K (damped) updates from the detached
            solution; K = 1 is its "one extra line" `step(stop_gradient(z))`.
  Series    u = g (I + J + ... + J^(K-1)), J = df/dz at x. K = 1 is exactly the gradient of
            `f(params, stop_gradient(x), *args)`.
  Implicit  solve the adjoint u = g + u J with an adjoint solver (implicit function theorem).
For Series/Implicit the output's cotangent is mapped to params, args and closed-over arrays;
z0 gets a zero cotangent, since the fixed point does not depend on where the solver started.

How Series/Implicit are differentiated (two custom rules):
  `_solve_point`    custom_jvp: the forward solve (a while_loop, never taped); its tangent is
                    dz = (I - J)^-1 f_w dw (Implicit, a custom_linear_solve with the failure
                    policy in it) or the truncated series (Series), f linearised once at x.
                    Without a probe the layer is this rule alone: forward mode works, and
                    reverse mode is its transpose (the transposed solve is the adjoint solve
                    u = g (I - J)^-1, policy included), O(1) memory in the iterations.
  `_implicit_layer` custom_vjp, used with a probe: the same first-order reverse mode (saves
                    params, args and x; recomputes f at x) that also writes the adjoint
                    statistics into the probe's cotangent; reverse mode only. Its backward pass
                    is made of differentiable operations (_adjoint.py) and `_solve_point`
                    carries the tangent, hence reverse-over-reverse and forward-over-reverse.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import threading
import warnings
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fixed_slots.fixed_point import _adjoint, options
from fixed_slots.fixed_point._flat import make_flattener, select_rows
from fixed_slots.fixed_point._fn import split_output
from fixed_slots.fixed_point._loop import LoopResult, reached, run_solver
from fixed_slots.fixed_point._solvers import make_stepper
from fixed_slots.fixed_point.options import (
    GMRES,
    Gradient,
    Implicit,
    Iterate,
    Neumann,
    Series,
    Unroll,
)

PyTree = Any

# Columns of the probe's cotangent: the adjoint solve's outcome.
PROBE_FIELDS = ("residual", "steps", "failed")


class FixedPointInfo(NamedTuple):
    """Solver diagnostics (no gradient). Per-example with a batch axis, else one row squeezed.

    residuals: [max_iter] (or [batch, max_iter]) relative residual ||f(z)-z|| / ||f(z)|| at each
      evaluation, in the solver's `norm`; NaN for evaluations skipped after reaching `tol`.
    steps: [] (or [batch]) number of f evaluations spent.
    final_residual: [] (or [batch]) relative residual of the returned estimate's evaluation.
    converged: [] (or [batch]) bool: final_residual < tol or final_abs_residual <= atol;
      without either (a fixed number of evaluations is what was asked for) only that the
      residual is finite. None where an info is built by hand with three fields.
    final_abs_residual: [] (or [batch]) ||f(z) - z|| of the returned estimate's evaluation.
    """
    residuals: jax.Array
    steps: jax.Array
    final_residual: jax.Array
    converged: jax.Array | None = None
    final_abs_residual: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything static about one call (hashable: a nondiff argument of the custom rules)."""
    solver: options.ForwardSolver
    grad: Gradient
    batch_axis: int | None
    return_best: bool
    has_aux: bool
    with_probe: bool


# --------------------------------------------------------------------------- checks

def _explicit_axes(tree: PyTree) -> set:
    """Mesh axes of jax's Explicit sharding mode ("sharding in types") that a leaf is sharded
    over; empty under the default Auto axes and shard_map's Manual ones."""
    axes = set()
    for leaf in jax.tree.leaves(tree):
        try:
            sharding = jax.typeof(leaf).sharding
            explicit = set(getattr(sharding.mesh, "explicit_axes", ()) or ())
            spec = sharding.spec
        except Exception:  # a Python scalar, an older jax: nothing sharded in types
            continue
        for entry in spec:
            for name in (entry if isinstance(entry, tuple) else (entry,)):
                if name is not None and name in explicit:
                    axes.add(name)
    return axes


def _check_not_explicitly_sharded(params, z0, args) -> None:
    axes = _explicit_axes((params, z0, args))
    if axes:
        raise ValueError(
            f"fixed_point_layer: an input is sharded over Explicit mesh axes {sorted(axes)} "
            "(jax.make_mesh's sharding-in-types mode), which the layer does not support. Use "
            "Auto axes (jax.make_mesh(..., axis_types=(jax.sharding.AxisType.Auto,) * n)) or "
            "call it inside jax.shard_map.")


def _check_state_structure(f, params, z0, args, has_aux) -> None:
    """Traces f abstractly. Raises on a state that f does not preserve."""
    try:
        out = jax.eval_shape(f, params, z0, *args)
    except Exception as e:
        # The exception itself, unchanged (rebuilding it as type(e)(message) breaks types whose
        # constructor takes other arguments, as JAX's tracer errors do); the layer's context
        # goes in a note, shown under the message in the traceback (Python >= 3.11).
        if hasattr(e, "add_note"):
            e.add_note("fixed_point_layer: raised by f(params, z0, *args), traced with "
                       "jax.eval_shape to check that f preserves the state's structure")
        raise
    if has_aux and not (isinstance(out, tuple) and len(out) == 2):
        raise ValueError("fixed_point_layer: has_aux=True but f did not return a pair (z, aux).")
    out, _ = split_output(out, has_aux)
    z_shapes = jax.eval_shape(lambda z: z, z0)
    if jax.tree.structure(out) != jax.tree.structure(z_shapes):
        raise ValueError(
            "fixed_point_layer: f must return a state with the same pytree structure as z0.\n"
            f"  z0:      {jax.tree.structure(z_shapes)}\n  f(z0):   {jax.tree.structure(out)}")
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(z_shapes), jax.tree.leaves(out)):
        if a.shape != b.shape or a.dtype != b.dtype:
            raise ValueError(
                "fixed_point_layer: f must preserve the shape and dtype of every state leaf; at "
                f"{jax.tree_util.keystr(path) or 'the root'} z0 is {a.dtype}{list(a.shape)} but "
                f"f returns {b.dtype}{list(b.shape)}.")


def _check_probe(probe: Any, batch: int, batch_axis: int | None) -> None:
    want = (len(PROBE_FIELDS),) if batch_axis is None else (batch, len(PROBE_FIELDS))
    shape = getattr(probe, "shape", None)
    dtype = getattr(probe, "dtype", None)
    if shape != want or dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"fixed_point_layer: probe must be a float array of shape {list(want)} "
            f"({', '.join(PROBE_FIELDS)}{' per example' if batch_axis is not None else ''}), "
            f"e.g. jnp.zeros({want}); got {probe!r:.80}")


# --------------------------------------------------------------------------- forward solve

def _make_aux_selector(batch_axis: int | None, batch: int):
    """Chooses per-row between two aux pytrees (leaves carrying the batch axis are per example)."""

    def select(take, new, old):
        def one(n, o):
            if batch_axis is not None and n.ndim > 0 and n.shape[batch_axis % n.ndim] == batch:
                shape = [1] * n.ndim
                shape[batch_axis % n.ndim] = batch
                return jnp.where(take.reshape(shape), n, o)
            return jnp.where(jnp.any(take), n, o)

        return jax.tree.map(one, new, old)

    return select


def _solve(fn: Callable, plan: _Plan, params, z0, args, consts, *, differentiable: bool,
           checkpoint: bool = False, unrolled: bool = False):
    """Runs the forward solver. fn(params, z, args, *consts) -> (z, aux).

    Returns (x_star tree, z_out tree, aux, LoopResult).
    """
    flatten, unflatten, batch = make_flattener(z0, plan.batch_axis)

    def F(x):
        z, aux = fn(params, unflatten(x), args, *consts)
        return flatten(z), aux

    x0 = flatten(z0)
    aux_template = select_aux = None
    if plan.has_aux:
        aux_shapes = jax.eval_shape(lambda x: F(x)[1], x0)
        aux_template = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shapes)
        select_aux = _make_aux_selector(plan.batch_axis, batch)
    result = run_solver(
        F, x0, make_stepper(plan.solver), max_iter=plan.solver.max_iter, tol=plan.solver.tol,
        atol=plan.solver.atol, norm=plan.solver.norm, return_best=plan.return_best,
        differentiable=differentiable, checkpoint=checkpoint, unrolled=unrolled,
        aux_template=aux_template,
        select_aux=select_aux)
    return unflatten(result.x), unflatten(result.fx), result.aux, result


def _info(result: LoopResult, plan: _Plan) -> FixedPointInfo:
    final, final_abs = result.final_residual, result.final_abs_residual
    tol, atol = plan.solver.tol, plan.solver.atol
    if tol is None and atol is None:
        converged = jnp.isfinite(final)
    else:
        converged = reached(final, final_abs, tol, atol)
    info = FixedPointInfo(result.residuals, result.steps, final, converged, final_abs)
    if plan.batch_axis is None:
        info = FixedPointInfo(*(a[0] for a in info))
    return jax.tree.map(jax.lax.stop_gradient, info)


def _zero_tangent(tree: PyTree) -> PyTree:
    def zero(x):
        x = jnp.asarray(x)
        if jnp.issubdtype(x.dtype, jnp.inexact):
            return jnp.zeros_like(x)
        return np.zeros(x.shape, jax.dtypes.float0)

    return jax.tree.map(zero, tree)


# --------------------------------------------------------------------------- Neumann / Implicit

@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _solve_point(fn, plan: _Plan, params, z0, args, consts):
    """(x*, z_out = f(x*), aux, residuals, steps, final_residual, final_abs_residual); the solve
    is never taped."""
    x_star, z_out, aux, r = _solve(fn, plan, params, z0, args, consts, differentiable=False)
    return x_star, z_out, aux, r.residuals, r.steps, r.final_residual, r.final_abs_residual


@_solve_point.defjvp
def _solve_point_jvp(fn, plan: _Plan, primals, tangents):
    params, z0, args, consts = primals
    d_params, _, d_args, d_consts = tangents  # the solution does not depend on z0
    out = _solve_point(fn, plan, params, z0, args, consts)  # differentiable at higher orders
    x = out[0]
    flatten, unflatten, _ = make_flattener(x, plan.batch_axis)

    def state(p, z, a, c):
        return fn(p, z, a, *c)[0]

    # b = (df/dw) dw at x; then dx from the gradient's linear map.
    _, b = jax.jvp(lambda p, a, c: state(p, x, a, c), (params, args, consts),
                   (d_params, d_args, d_consts))
    grad = plan.grad
    if isinstance(grad, Series) and grad.order == 1:
        return out, (_zero_tangent(x), b) + tuple(_zero_tangent(o) for o in out[2:])
    # f linearised at x once: every J v below reuses its residuals, so reverse mode (the
    # transpose of this rule) recomputes nothing per adjoint step and keeps O(1) memory.
    _, jvp_z = jax.linearize(lambda z: state(params, z, args, consts), x)

    def A(v):  # J v
        return flatten(jvp_z(unflatten(v)))

    b_flat = flatten(b)
    if isinstance(grad, Series):  # dz = (I + ... + J^(K-1)) b = b + J dx
        dx_flat, _ = _adjoint.neumann_series(A, b_flat, grad.order - 1, with_stats=False)
        dx = unflatten(dx_flat)
        dz = jax.tree.map(jnp.add, b, unflatten(A(dx_flat)))
    else:
        # dz = dx = (I - J)^-1 b; transposed (reverse mode), the solve is the adjoint
        # u = g (I - J)^-1 itself, so the failure policy sees the cotangent g as its rhs.
        floor = _judging_floor(x, b_flat.dtype)
        dx_flat, _ = _adjoint.linear_solve(A, b_flat, grad.adjoint, floor, _policy(grad, plan))
        dx = dz = unflatten(dx_flat)
    return out, (dx, dz) + tuple(_zero_tangent(o) for o in out[2:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _implicit_layer(fn, plan: _Plan, params, z0, args, consts, probe):
    _, z_out, aux, *stats = _solve_point(fn, plan, params, z0, args, consts)
    return z_out, aux, _info(LoopResult(None, None, None, *stats), plan)


def _implicit_fwd(fn, plan: _Plan, params, z0, args, consts, probe):
    x_star, z_out, aux, *stats = _solve_point(fn, plan, params, z0, args, consts)
    info = _info(LoopResult(None, None, None, *stats), plan)
    return (z_out, aux, info), (params, x_star, args, consts, probe)


def _implicit_bwd(fn, plan: _Plan, residuals, cotangents):
    params, x_star, args, consts, probe = residuals
    flatten, unflatten, _ = make_flattener(x_star, plan.batch_axis)
    g = flatten(cotangents[0])
    _, vjp_z = jax.vjp(lambda z: fn(params, z, args, *consts)[0], x_star)

    def A(u):  # u J
        return flatten(vjp_z(unflatten(u))[0])

    grad = plan.grad
    want_stats = plan.with_probe or (isinstance(grad, Implicit) and grad.callback is not None)
    if isinstance(grad, Series):
        u, stats = _adjoint.neumann_series(A, g, grad.order, with_stats=want_stats)
    else:
        u, stats = _adjoint.linear_solve(A, g, grad.adjoint, _judging_floor(x_star, g.dtype),
                                         _policy(grad, plan))
    _, vjp_w = jax.vjp(lambda p, a, c: fn(p, x_star, a, *c)[0], params, args, consts)
    d_params, d_args, d_consts = vjp_w(unflatten(u))
    d_probe = None
    if plan.with_probe:
        columns = jnp.stack([c.astype(probe.dtype) for c in stats], axis=-1)  # [batch, 3]
        d_probe = _squeeze(plan, columns)
    return d_params, _zero_tangent(x_star), d_args, d_consts, d_probe


_implicit_layer.defvjp(_implicit_fwd, _implicit_bwd)


def _judging_floor(state: PyTree, solve_dtype: Any) -> float:
    """The adjoint's tolerance floor: the solve's dtype, and the narrowest float f runs in."""
    floats = [jnp.asarray(leaf).dtype for leaf in jax.tree.leaves(state)
              if jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating)]
    narrowest = min(floats, key=lambda d: d.itemsize) if floats else None
    return _adjoint.tolerance_floor(solve_dtype, narrowest)


def _squeeze(plan: _Plan, tree: PyTree) -> PyTree:
    return tree if plan.batch_axis is not None else jax.tree.map(lambda a: a[0], tree)


# --------------------------------------------------------------------------- failure policies

_fallback_count = [0]
_fallback_lock = threading.Lock()


def _warn_fallback(num_failed, residual) -> None:
    """Host side of on_failure="fallback": warns at the 1st, 10th, 100th, ... failed solve."""
    if int(np.sum(num_failed)) == 0:  # under vmap the guarding cond runs both branches
        return
    num_failed, residual = np.sum(num_failed), np.max(residual)
    with _fallback_lock:
        _fallback_count[0] += 1
        count = _fallback_count[0]
    if count != 10 ** round(math.log10(count)):
        return
    warnings.warn(
        f"fixed_point_layer: the implicit adjoint solve failed for {int(num_failed)} example(s) "
        f"(relative residual {float(residual):.3g}: it diverged, stalled, or did not reach its "
        "tol; an iterative adjoint fails so when the spectral radius of df/dz is >= 1); the "
        "first-order gradient (u = g) was used for them. "
        f"{count} failed backward pass(es) so far; next warning at {10 * count}. Use "
        "Implicit(adjoint=GMRES(...)) or a contractive f; the probe reports every solve.",
        RuntimeWarning, stacklevel=2)


def _raise_failure(num_failed, residual) -> None:
    if int(np.sum(num_failed)) == 0:
        return
    num_failed, residual = np.sum(num_failed), np.max(residual)
    raise FloatingPointError(
        f"fixed_point_layer: the implicit adjoint solve failed for {int(num_failed)} example(s) "
        f"(relative residual {float(residual):.3g}: it diverged, stalled, did not reach its "
        f"tol, or is not finite; on_failure='raise')")


def _on_failure(grad: Implicit, u: jax.Array, g: jax.Array, stats: _adjoint.SolveStats
                ) -> jax.Array:
    failed = stats.failed
    if grad.on_failure == "nan":
        return select_rows(failed, jnp.full_like(u, jnp.nan), u)
    worst = jnp.max(jnp.where(failed, stats.residual, -jnp.inf))
    report = _warn_fallback if grad.on_failure == "fallback" else _raise_failure
    jax.lax.cond(jnp.any(failed),
                 lambda: jax.debug.callback(report, jnp.sum(failed), worst),
                 lambda: None)
    return select_rows(failed, g, u) if grad.on_failure == "fallback" else u


def _policy(grad: Implicit, plan: _Plan) -> _adjoint.Policy:
    """The documented failure policy and the user's callback, for every solve of (I - J)."""

    def apply(v: jax.Array, rhs: jax.Array, stats: _adjoint.SolveStats) -> jax.Array:
        v = _on_failure(grad, v, rhs, stats)
        if grad.callback is not None:
            jax.debug.callback(grad.callback, _squeeze(plan, {
                "adjoint_residual": stats.residual, "adjoint_steps": stats.steps,
                "adjoint_failed": stats.failed}))
        return v

    return apply


def _raise_not_converged(num, residual, tol) -> None:
    if int(np.sum(num)) == 0:
        return
    num, residual = np.sum(num), np.max(residual)
    raise FloatingPointError(
        f"fixed_point_layer: the forward solve did not converge for {int(num)} example(s) "
        f"(final relative residual {float(residual):.3g}, {tol}; throw=True)")


def _throw_if_not_converged(info: FixedPointInfo, tol: float | None) -> None:
    bad = ~info.converged
    worst = jnp.max(jnp.where(bad, info.final_residual, -jnp.inf))
    jax.lax.cond(jnp.any(bad),
                 lambda: jax.debug.callback(
                     functools.partial(_raise_not_converged, tol=tol), jnp.sum(bad), worst),
                 lambda: None)


# --------------------------------------------------------------------------- the layer

def fixed_point_layer(
    f: Callable[..., PyTree],
    params: PyTree,
    z0: PyTree,
    *args: Any,
    solver: options.ForwardSolver = Iterate(),
    grad: Gradient = Series(),
    batch_axis: int | None = None,
    return_best: bool = False,
    has_aux: bool = False,
    probe: jax.Array | None = None,
    throw: bool = False,
    **removed_options: Any,
) -> tuple[PyTree, FixedPointInfo]:
    """Finds z* = f(params, z*, *args) and returns (z*, info), differentiable per `grad`.

    Args:
      f: pure function `f(params, z, *args) -> z` (or `(z, aux)` with has_aux) over pytrees.
        It may close over arrays; those get gradients too (closure conversion).
      params, z0, *args: pytrees. params and args receive cotangents; z0 is the initial state.
      solver: Iterate(max_iter, tol, damping) | Anderson(...) | Broyden(...).
      grad: Unroll(checkpoint) | Neumann(order, damping) | Series(order) |
        Implicit(adjoint, on_failure, callback).
      batch_axis: the axis of every state leaf that indexes independent examples; residuals,
        solver memory, stopping and adjoint statistics are then per example. None treats z as
        one problem.
      return_best: return the lowest-residual evaluation instead of the last.
      has_aux: f returns (z, aux); the layer then returns ((z*, aux*), info), aux* being f's
        aux at the returned evaluation, without gradient in every mode.
      probe: optional float array [3] ([batch, 3] with batch_axis), e.g. zeros. Its cotangent
        is set by the backward pass to (adjoint relative residual ||u (I - J) - g|| / ||g||,
        adjoint steps, failed 0/1): `jax.grad` with respect to the probe returns the adjoint
        solve's outcome (Implicit and Series; zeros for Unroll and Neumann). Its value is unused.
        With a probe, Series/Implicit support reverse mode only (a custom_vjp); without one,
        forward mode too (jvp, jacfwd, linearize, hessian).
      throw: raise at run time when the forward solve did not converge (info.converged false).
      **removed_options: the flat options of the removed string form (max_iter=, tol=, ...)
        are refused with a message naming the object that owns each now.

    Returns:
      (z_star, info) or ((z_star, aux), info) with has_aux; info is a FixedPointInfo.
    """
    options.check_call(solver, grad, removed_options)
    if isinstance(grad, Implicit) and grad.adjoint is None:
        grad = dataclasses.replace(grad, adjoint=GMRES())  # converges where I - J is invertible
    if batch_axis is not None:
        batch_axis = options._static_int("fixed_point_layer", "batch_axis", batch_axis,
                                         minimum=-(2 ** 31))
    _check_not_explicitly_sharded(params, z0, args)
    _check_state_structure(f, params, z0, args, has_aux)
    _, _, batch = make_flattener(z0, batch_axis)
    if probe is not None:
        _check_probe(probe, batch, batch_axis)
    plan = _Plan(solver, grad, batch_axis, bool(return_best), bool(has_aux), probe is not None)

    def fn(p, z, a, *no_consts):  # the one place f's output convention is unpacked
        return split_output(f(p, z, *a), has_aux)

    if isinstance(grad, Unroll):
        _, z_out, aux, result = _solve(fn, plan, params, z0, args, (), differentiable=True,
                                       checkpoint=grad.checkpoint, unrolled=grad.unrolled)
        info = _info(result, plan)
    elif isinstance(grad, Neumann):
        _, z_out, aux, result = _solve(
            fn, plan, *jax.lax.stop_gradient((params, z0, args)), (), differentiable=False)
        z = jax.lax.stop_gradient(z_out)
        for _ in range(grad.order):
            fz, aux = fn(params, z, args)
            z = jax.tree.map(lambda zi, fi: (1.0 - grad.damping) * zi + grad.damping * fi, z, fz)
        z_out = z
        info = _info(result, plan)
    else:
        # Closed-over arrays become explicit inputs of the custom rules (and get cotangents).
        converted, consts = jax.closure_convert(fn, params, z0, args)
        if probe is None:
            # The custom_jvp alone: forward mode (jvp, jacfwd, linearize, hessian) and reverse
            # mode as its transpose (the same adjoint solve and failure policy).
            _, z_out, aux, *stats = _solve_point(converted, plan, params, z0, args,
                                                 tuple(consts))
            info = _info(LoopResult(None, None, None, *stats), plan)
        else:
            # The custom_vjp, whose backward pass also writes the adjoint statistics into the
            # probe's cotangent (reverse mode only).
            z_out, aux, info = _implicit_layer(converted, plan, params, z0, args,
                                               tuple(consts), probe)
    if throw:
        _throw_if_not_converged(
            info, f"tol {solver.tol}" + ("" if solver.atol is None else f", atol {solver.atol}")
            + ("" if solver.norm == "two" else f", {solver.norm} norm"))
    if has_aux:
        return (z_out, jax.lax.stop_gradient(aux)), info
    return z_out, info
