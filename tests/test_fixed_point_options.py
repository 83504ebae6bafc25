"""fixed_point_layer's option objects and what happens when a solve fails.

References are written from the definitions (dense Jacobians, closed forms); the layer's own
internals are never used to compute an expected value.
"""
import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fixed_slots.fixed_point import (
    GMRES,
    Anderson,
    Broyden,
    FixedPointInfo,
    Implicit,
    Iterate,
    Neumann,
    Series,
    Unroll,
    fixed_point_layer,
)
from fixed_slots.fixed_point import layer as layer_module

N = 5
WEIGHTS = jnp.linspace(-1.0, 2.0, N)


def make_problem(seed: int = 0, contraction: float = 0.8):
    k1, k2 = jax.random.split(jax.random.key(seed))
    W = jax.random.normal(k1, (N, N))
    return contraction * W / jnp.linalg.norm(W, 2), jax.random.normal(k2, (N,))


def f_additive(W, z, x):
    # x enters additively (df/dx = I), so dL/dx is exactly the adjoint u. z: [N] or [batch, N].
    return jnp.tanh(z @ W.T) + x


def dense_jacobian(W, z, x):
    return jax.jacobian(lambda zz: f_additive(W, zz, x))(z)


# --------------------------------------------------------------------------- validation

@pytest.mark.parametrize("make,message", [
    (lambda: Iterate(max_iter=0), "Iterate: max_iter must be a positive int, got 0"),
    (lambda: Iterate(max_iter=2.5), "Iterate: max_iter must be a positive int"),
    (lambda: Iterate(max_iter=True), "Iterate: max_iter must be a positive int"),
    (lambda: Iterate(tol=0.0), r"Iterate: tol must be None or > 0"),
    (lambda: Iterate(tol="small"), "Iterate: tol must be a number"),
    (lambda: Iterate(damping=0.0), r"Iterate: damping must be in \(0, 1\]"),
    (lambda: Anderson(memory=0), "Anderson: memory must be a positive int"),
    (lambda: Anderson(mixing=1.5), r"Anderson: mixing must be in \(0, 1\]"),
    (lambda: Anderson(regularization=-1.0), "Anderson: regularization must be >= 0"),
    (lambda: Anderson(regularization=float("inf")), "Anderson: regularization must be a finite"),
    (lambda: Iterate(tol=float("inf")), "Iterate: tol must be a finite number"),
    (lambda: GMRES(tol=float("nan")), "GMRES: tol must be a finite number"),
    (lambda: Broyden(memory=-3), "Broyden: memory must be a positive int"),
    (lambda: GMRES(tol=None), "GMRES: tol must be > 0"),
    (lambda: GMRES(restart=0), "GMRES: restart must be a positive int"),
    (lambda: Unroll(checkpoint="yes"), "Unroll: checkpoint must be True or False"),
    (lambda: Unroll(unrolled=1), "Unroll: unrolled must be True or False"),
    (lambda: Unroll(checkpoint=True, unrolled=True), "checkpoint=True needs the rolled loop"),
    (lambda: Neumann(order=0), "Neumann: order must be a positive int"),
    (lambda: Neumann(damping=2.0), r"Neumann: damping must be in \(0, 1\]"),
    (lambda: Series(order=0), "Series: order must be a positive int"),
    (lambda: Implicit(adjoint="gmres"), "Implicit: adjoint must be Iterate, Anderson, Broyden"),
    (lambda: Implicit(on_failure="ignore"), "Implicit: on_failure must be one of fallback, nan"),
    (lambda: Implicit(callback=3), "Implicit: callback must be callable"),
])
def test_objects_validate_at_construction(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_objects_are_frozen_hashable_and_replace_revalidates():
    solver = Anderson(max_iter=30, tol=1e-5, memory=3)
    assert hash(solver) == hash(Anderson(max_iter=30, tol=1e-5, memory=3))
    with pytest.raises(dataclasses.FrozenInstanceError):
        solver.max_iter = 3
    assert dataclasses.replace(solver, max_iter=12).max_iter == 12
    with pytest.raises(ValueError, match="max_iter must be a positive int"):
        dataclasses.replace(solver, max_iter=-1)


def test_integer_like_options_are_accepted():
    W, x = make_problem()
    solver = Iterate(max_iter=np.int64(5), tol=np.float32(1e-3))
    assert type(solver.max_iter) is int and type(solver.tol) is float
    assert Series(order=np.int32(2)).order == 2
    z1, info1 = fixed_point_layer(f_additive, W, jnp.zeros(N), x, solver=Iterate(np.int64(5)),
                                  grad=Series(np.int64(2)))
    z2, info2 = fixed_point_layer(f_additive, W, jnp.zeros(N), x, solver=Iterate(5),
                                  grad=Series(2))
    np.testing.assert_array_equal(z1, z2)
    assert info1.residuals.shape == (5,)
    zb, _ = fixed_point_layer(f_additive, W, jnp.zeros((2, N)), jnp.stack([x, x]),
                              batch_axis=np.int64(0), solver=Iterate(5))
    np.testing.assert_allclose(zb[1], z1, rtol=1e-6)


def test_traced_options_are_refused_with_a_clear_message():
    W, x = make_problem()

    @jax.jit
    def with_traced_tol(tol):
        return fixed_point_layer(f_additive, W, jnp.zeros(N), x, solver=Iterate(tol=tol))[0]

    with pytest.raises(ValueError, match="tol must be a static Python number, not a traced"):
        with_traced_tol(1e-3)

    @jax.jit
    def with_traced_budget(n):
        return fixed_point_layer(f_additive, W, jnp.zeros(N), x, solver=Iterate(max_iter=n))[0]

    with pytest.raises(ValueError, match="max_iter must be a static Python int, not a traced"):
        with_traced_budget(4)
    # The supported way: a static argument.
    z = jax.jit(lambda x, tol: fixed_point_layer(f_additive, W, jnp.zeros(N), x,
                                                 solver=Iterate(50, tol=tol))[0],
                static_argnums=1)(x, 1e-4)
    assert z.shape == (N,)


@pytest.mark.parametrize("kwargs,message", [
    ({"solver": Iterate(), "max_iter": 3}, "flat option max_iter= was removed"),
    ({"grad": Implicit(), "adjoint_max_iter": 3}, "flat option adjoint_max_iter= was removed"),
    ({"solver": GMRES()}, "GMRES solves the linear adjoint only"),
    ({"grad": Iterate()}, "grad must be Unroll, Neumann, Series or Implicit"),
    ({"probe": jnp.zeros(2)}, r"probe must be a float array of shape \[3\]"),
    ({"probe": jnp.zeros(3, jnp.int32)}, r"probe must be a float array"),
])
def test_bad_combinations_raise_clear_errors(kwargs, message):
    W, x = make_problem()
    with pytest.raises(ValueError, match=message):
        fixed_point_layer(f_additive, W, jnp.zeros(N), x, **kwargs)


def test_info_has_a_converged_status_and_three_field_construction_still_works():
    W, x = make_problem()
    _, info = fixed_point_layer(f_additive, W, jnp.zeros(N), x, solver=Iterate(60, tol=1e-5))
    assert bool(info.converged) and float(info.final_residual) < 1e-5
    _, info = fixed_point_layer(f_additive, W, jnp.zeros(N), x, solver=Iterate(2, tol=1e-5))
    assert not bool(info.converged)
    _, info = fixed_point_layer(f_additive, W, jnp.zeros(N), x, solver=Iterate(2))
    assert bool(info.converged)  # no tol: a fixed count was asked for; only finiteness counts
    zero = jnp.zeros(3)
    assert FixedPointInfo(zero[:, None], zero.astype(jnp.int32), zero).converged is None


def test_throw_raises_at_run_time_when_the_forward_solve_does_not_converge():
    W, x = make_problem()
    run = jax.jit(lambda x, n: fixed_point_layer(
        f_additive, W, jnp.zeros((2, N)), jnp.stack([x, 0.5 * x]), batch_axis=0,
        solver=Iterate(n, tol=1e-5), throw=True)[0], static_argnums=1)
    assert run(x, 80).shape == (2, N)
    with pytest.raises(Exception, match="forward solve did not converge for 2 example"):
        jax.block_until_ready(run(x, 2))


# --------------------------------------------------------------------------- the probe

def _probe_grad(W, x, probe, **kw):
    def loss(x, probe):
        z, _ = fixed_point_layer(f_additive, W, jnp.zeros(x.shape), x, probe=probe, **kw)
        return jnp.sum(z * WEIGHTS)

    return jax.jit(jax.grad(loss, argnums=(0, 1)))(x, probe)


@pytest.mark.parametrize("adjoint", [Iterate(4), Anderson(4), Broyden(4), GMRES(1, tol=1e-3)])
def test_probe_cotangent_is_the_adjoint_residual_and_steps(adjoint):
    W, x = make_problem(contraction=0.9)
    u, stats = _probe_grad(W, x, jnp.zeros(3), solver=Iterate(100), grad=Implicit(adjoint))
    z_star, _ = fixed_point_layer(f_additive, W, jnp.zeros(N), x, solver=Iterate(100))
    J = dense_jacobian(W, z_star, x)
    dense = float(jnp.linalg.norm(u @ (jnp.eye(N) - J) - WEIGHTS) / jnp.linalg.norm(WEIGHTS))
    np.testing.assert_allclose(float(stats[0]), dense, rtol=2e-2, atol=1e-6)
    if isinstance(adjoint, GMRES):
        # 1 (the first-order pair) + 1 (the initial residual) + the Krylov vectors built until
        # the residual estimate reaches tol (inside the cycle: fewer than the N of a full one)
        # + 1 (the true residual). One vector fewer must miss tol: the stop is at the first
        # vector that reaches it.
        assert 4 <= float(stats[1]) < 2 + N + 1
        assert float(stats[0]) < 1e-3
        fewer = int(stats[1]) - 4  # the cycle's vectors, minus one
        _, short = _probe_grad(W, x, jnp.zeros(3), solver=Iterate(100),
                               grad=Implicit(GMRES(1, tol=1e-3, restart=max(fewer, 1)),
                                             on_failure="nan"))
        assert fewer == 0 or float(short[0]) >= 1e-3
    else:
        assert float(stats[1]) == 4
    assert float(stats[2]) == 0.0


def test_probe_is_per_example_and_works_under_vmap():
    W, _ = make_problem(contraction=0.9)
    xs = jax.random.normal(jax.random.key(3), (3, N))

    def loss(xs, probe):
        z, _ = fixed_point_layer(f_additive, W, jnp.zeros((3, N)), xs, batch_axis=0, probe=probe,
                                 solver=Iterate(80), grad=Implicit(Iterate(60, tol=1e-5)))
        return jnp.sum(z * WEIGHTS)

    u, stats = jax.jit(jax.grad(loss, argnums=(0, 1)))(xs, jnp.zeros((3, 3)))
    assert stats.shape == (3, 3)
    z_star = jax.jit(lambda xs: fixed_point_layer(f_additive, W, jnp.zeros((3, N)), xs,
                                                  batch_axis=0, solver=Iterate(80))[0])(xs)
    for i in range(3):
        J = dense_jacobian(W, z_star[i], xs[i])
        dense = jnp.linalg.norm(u[i] @ (jnp.eye(N) - J) - WEIGHTS) / jnp.linalg.norm(WEIGHTS)
        assert float(dense) < 1e-4 and float(stats[i, 0]) < 1e-4
        assert 1 <= float(stats[i, 1]) < 60
    # vmap of the unbatched layer: the probe is vmapped with it.
    u_v, stats_v = jax.vmap(lambda x, p: _probe_grad(
        W, x, p, solver=Iterate(80), grad=Implicit(Iterate(60, tol=1e-5))))(xs, jnp.zeros((3, 3)))
    np.testing.assert_allclose(u_v, u, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(stats_v[:, 1], stats[:, 1])


@pytest.mark.parametrize("order", [1, 3])
def test_probe_under_series_reports_the_truncation_residual(order):
    W, x = make_problem(contraction=0.9)
    u, stats = _probe_grad(W, x, jnp.zeros(3), solver=Iterate(100), grad=Series(order))
    z_star, _ = fixed_point_layer(f_additive, W, jnp.zeros(N), x, solver=Iterate(100))
    J = dense_jacobian(W, z_star, x)
    # u = g (I + ... + J^(K-1)), so u (I - J) - g = -g J^K.
    expected = jnp.linalg.norm(WEIGHTS @ jnp.linalg.matrix_power(J, order)) / jnp.linalg.norm(
        WEIGHTS)
    np.testing.assert_allclose(float(stats[0]), float(expected), rtol=1e-4)
    assert float(stats[1]) == order - 1 and float(stats[2]) == 0.0


@pytest.mark.parametrize("grad", [Unroll(), Neumann(2)])
def test_probe_is_zero_where_there_is_no_adjoint_solve(grad):
    W, x = make_problem()
    _, stats = _probe_grad(W, x, jnp.zeros(3), solver=Iterate(10), grad=grad)
    np.testing.assert_array_equal(stats, jnp.zeros(3))


# --------------------------------------------------------------------------- failing adjoints

def _repro_loss(a, probe, grad):
    """Issue 12's repro: f(z) = a z + x with a = 2 (not a contraction); Anderson finds z* = -x."""
    z, _ = fixed_point_layer(lambda p, z, x: p["a"] * z + x, {"a": a}, jnp.zeros(3), jnp.ones(3),
                             solver=Anderson(max_iter=30), grad=grad, probe=probe)
    return jnp.sum(z)


_repro_grad = jax.jit(jax.grad(_repro_loss, argnums=(0, 1)), static_argnums=2)


def _repro(grad):
    return _repro_grad(2.0, jnp.zeros(3), grad)  # compiled once per gradient object


def test_diverging_adjoint_is_never_silent(monkeypatch):
    monkeypatch.setattr(layer_module, "_fallback_count", [0])
    # The exact gradient: z* = -x / (a - 1), dz*/da = x / (a - 1)^2, summed over 3 entries.
    exact = 3.0
    with pytest.warns(RuntimeWarning, match=r"adjoint solve failed for 1 example.*first-order gradient \(u = g\)"):
        g, stats = _repro(Implicit(Iterate(30)))  # the iterative adjoint, on_failure="fallback"
        jax.effects_barrier()
    # Fallback: the first-order term u = g, i.e. dL/da = sum(z*) = -3, flagged.
    np.testing.assert_allclose(float(g), -exact, rtol=1e-5)
    assert float(stats[0]) > 1e6 and float(stats[2]) == 1.0

    g, stats = _repro(Implicit(Iterate(30), on_failure="nan"))
    assert np.isnan(float(g)) and float(stats[2]) == 1.0

    with pytest.raises(Exception, match="adjoint solve failed for 1 example"):
        jax.block_until_ready(_repro(Implicit(Iterate(30), on_failure="raise")))
        jax.effects_barrier()

    # A linear solver does not need a contraction: GMRES (the default) and Anderson get it right.
    for adjoint in (None, GMRES(), Anderson(30)):
        g, stats = _repro(Implicit(adjoint))
        np.testing.assert_allclose(float(g), exact, rtol=1e-4)
        assert float(stats[0]) < 1e-4 and float(stats[2]) == 0.0


def test_fallback_warnings_do_not_spam(monkeypatch):
    monkeypatch.setattr(layer_module, "_fallback_count", [0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(12):
            _repro(Implicit(Iterate(30)))
        jax.effects_barrier()
    messages = [str(w.message) for w in caught if "adjoint solve failed" in str(w.message)]
    assert len(messages) == 2, messages  # the 1st and the 10th failure
    assert "1 failed backward pass(es)" in messages[0] and "10 failed" in messages[1]


def _stall_loss(a, probe, grad, x):
    """f(z) = a z + x at a = -1: z* = x / 2, dz*/da = x / 4; the adjoint iteration u <- g - u
    alternates between 0 and g, and its residual never falls below the first-order answer's."""
    z, _ = fixed_point_layer(lambda p, z, x: p * z + x, a, jnp.zeros(3), x,
                             solver=Anderson(max_iter=30), grad=grad, probe=probe)
    return jnp.sum(z)


@pytest.mark.parametrize("on_failure", ["fallback", "nan"])
def test_a_stalled_adjoint_is_a_failure_and_the_default_adjoint_solves_it(on_failure):
    """jaxopt's simple_grads case (J = -1 at the solution): the default Implicit() is exact, and
    the iterative adjoint, which stalls at the first-order residual, is reported as failed."""
    x = jnp.array([1.0, 2.0, 3.0])
    exact = float(jnp.sum(x)) / 4.0  # d/da sum(x / (1 - a)) at a = -1
    grad = jax.jit(jax.grad(_stall_loss, argnums=(0, 1)), static_argnums=2)
    g, stats = grad(-1.0, jnp.zeros(3), Implicit(on_failure=on_failure), x)
    np.testing.assert_allclose(float(g), exact, rtol=1e-5)
    assert float(stats[2]) == 0.0 and float(stats[0]) < 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        g, stats = grad(-1.0, jnp.zeros(3), Implicit(Iterate(8), on_failure=on_failure), x)
        jax.effects_barrier()
    assert float(stats[2]) == 1.0  # stalled: residual 1, the first-order answer's
    np.testing.assert_allclose(float(stats[0]), 1.0, rtol=1e-6)
    if on_failure == "nan":
        assert np.isnan(float(g))
    else:  # the first-order term u = g: d/da = sum(z*) = 3, flagged, not exact
        np.testing.assert_allclose(float(g), float(jnp.sum(x)) / 2.0, rtol=1e-5)


def test_an_adjoint_that_misses_its_tolerance_is_a_failure():
    """A contraction whose tol-bounded adjoint runs out of budget above tol has failed; the same
    solve with the budget to reach tol has not."""
    x = jnp.ones(3)
    grad = jax.jit(jax.grad(_stall_loss, argnums=(0, 1)), static_argnums=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        _, short = grad(0.9, jnp.zeros(3), Implicit(Iterate(5, tol=1e-4)), x)
        jax.effects_barrier()
    assert 1e-4 < float(short[0]) < 1.0 and float(short[2]) == 1.0  # progress, but not to tol
    _, enough = grad(0.9, jnp.zeros(3), Implicit(Iterate(200, tol=1e-4)), x)
    # Iterate's tol is on its own measure ||H(u) - u|| / ||H(u)|| (||u|| ~ 10 ||g|| here), the
    # probe reports ||u (I - J) - g|| / ||g||: ~10x larger at the same u.
    assert float(enough[2]) == 0.0 and float(enough[0]) < 1e-3


def test_failure_is_per_example_and_the_callback_sees_it():
    # Row 0 contracts (a = 0.5), row 1 does not (a = 2): only row 1 falls back.
    records = []
    a = jnp.array([[0.5], [2.0]])

    def loss(x, probe):
        z, _ = fixed_point_layer(lambda a, z, x: a * z + x, a, jnp.zeros((2, 3)), x,
                                 batch_axis=0, solver=Anderson(30), probe=probe,
                                 grad=Implicit(Iterate(30), callback=records.append))
        return jnp.sum(z)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        u, stats = jax.grad(loss, argnums=(0, 1))(jnp.ones((2, 3)), jnp.zeros((2, 3)))
        jax.effects_barrier()
    np.testing.assert_allclose(u[0], 1.0 / (1.0 - 0.5) * jnp.ones(3), rtol=1e-5)  # exact
    np.testing.assert_allclose(u[1], jnp.ones(3), rtol=1e-6)  # fallback u = g
    np.testing.assert_array_equal(stats[:, 2], [0.0, 1.0])
    record = records.pop()
    np.testing.assert_array_equal(record["adjoint_failed"], [False, True])
    np.testing.assert_allclose(record["adjoint_residual"], stats[:, 0], rtol=1e-6)


def test_an_error_inside_f_keeps_its_own_type_with_the_layers_note():
    """A numpy f on tracers: JAX's own TracerArrayConversionError, not a rebuilt exception
    (rebuilding it as type(e)(message) used to end in an AttributeError)."""
    import numpy as onp

    with pytest.raises(jax.errors.TracerArrayConversionError) as caught:
        fixed_point_layer(lambda p, z, x: onp.tanh(z) + x, 0.0, jnp.zeros(3), jnp.ones(3))
    notes = getattr(caught.value, "__notes__", None)
    if notes is not None:  # Python >= 3.11
        assert any("fixed_point_layer: raised by f" in n for n in notes)
