"""Correctness of fixed_point_layer against exact references on contractive maps.

f(W, z, x) = tanh(W z + U x + b) with ||W|| < 1 is a contraction, so the fixed point is unique
and the implicit-function-theorem gradient is computable densely:
  dz*/dtheta = (I - J)^-1 df/dtheta,  J = diag(1 - z*^2) W.
"""
import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from fixed_slots import fixed_point_layer
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
    jacobian_spectral_norm,
    parse_grad_mode,
)

N, M = 6, 4


@contextlib.contextmanager
def x64():
    with jax.enable_x64(True):
        yield


def make_problem(dtype=jnp.float32, seed=0, contraction=0.6):
    k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
    W = jax.random.normal(k1, (N, N), dtype)
    W = contraction * W / jnp.linalg.norm(W, 2)
    U = jax.random.normal(k2, (N, M), dtype) / np.sqrt(M)
    b = 0.1 * jax.random.normal(k3, (N,), dtype)
    x = jax.random.normal(k4, (M,), dtype)
    return {"W": W, "U": U, "b": b}, x


def f(params, z, x):
    return jnp.tanh(params["W"] @ z + params["U"] @ x + params["b"])


def loss_weights(dtype):
    return jnp.linspace(-1.0, 2.0, N, dtype=dtype)


def dense_ift_grads(params, x, z_star):
    """dL/dparams and dL/dx for L = w . z*, by solving (I - J)^T u = w densely."""
    w = loss_weights(z_star.dtype)
    J = jax.jacobian(lambda z: f(params, z, x))(z_star)
    u = jnp.linalg.solve((jnp.eye(N, dtype=z_star.dtype) - J).T, w)
    _, vjp = jax.vjp(lambda p, xx: f(p, z_star, xx), params, x)
    return vjp(u)


def layer_loss(params, x, **kw):
    z, _ = fixed_point_layer(f, params, jnp.zeros(N, x.dtype), x, **kw)
    return jnp.dot(loss_weights(x.dtype), z)


SOLVERS = {"iterate": Iterate, "anderson": Anderson, "broyden": Broyden}


@pytest.mark.parametrize("adjoint", [Iterate(200), Anderson(200), Broyden(200),
                                     GMRES(200, tol=1e-6)], ids=lambda a: type(a).__name__)
def test_implicit_matches_dense_ift_float64(adjoint):
    with x64():
        params, x = make_problem(jnp.float64)
        z_star, _ = fixed_point_layer(f, params, jnp.zeros(N), x, solver=Iterate(200))
        ref_p, ref_x = dense_ift_grads(params, x, z_star)
        gp, gx = jax.grad(layer_loss, argnums=(0, 1))(
            params, x, solver=Iterate(200), grad=Implicit(adjoint))
        for k in params:
            np.testing.assert_allclose(gp[k], ref_p[k], rtol=1e-4, atol=1e-10)
        np.testing.assert_allclose(gx, ref_x, rtol=1e-4, atol=1e-10)


@pytest.mark.parametrize("solver", ["iterate", "anderson", "broyden"])
def test_implicit_matches_dense_ift_float32(solver):
    params, x = make_problem(jnp.float32)
    z_star, _ = fixed_point_layer(f, params, jnp.zeros(N), x, solver=Iterate(100))
    ref_p, ref_x = dense_ift_grads(params, x, z_star)
    gp, gx = jax.grad(layer_loss, argnums=(0, 1))(
        params, x, solver=SOLVERS[solver](100), grad=Implicit(Iterate(100)))
    for k in params:
        np.testing.assert_allclose(gp[k], ref_p[k], rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(gx, ref_x, rtol=1e-3, atol=1e-6)


def test_series1_equals_stop_gradient_plus_one_step_exactly():
    params, x = make_problem()
    T = 7
    z0 = jnp.zeros(N)

    def reference(params, x):
        z = z0
        for _ in range(T - 1):
            z = f(params, z, x)
        z = f(params, jax.lax.stop_gradient(z), x)
        return jnp.dot(loss_weights(z.dtype), z)

    ours = jax.jit(jax.value_and_grad(
        lambda p, xx: layer_loss(p, xx, solver=Iterate(T), grad=Series(1)), argnums=(0, 1)))
    ref = jax.jit(jax.value_and_grad(reference, argnums=(0, 1)))
    (v1, (gp1, gx1)), (v2, (gp2, gx2)) = ours(params, x), ref(params, x)
    np.testing.assert_array_equal(v1, v2)
    for k in params:
        np.testing.assert_array_equal(gp1[k], gp2[k])
    np.testing.assert_array_equal(gx1, gx2)


def test_series_order_k_matches_truncated_series():
    params, x = make_problem()
    z_star, _ = fixed_point_layer(f, params, jnp.zeros(N), x, solver=Iterate(60))
    w = loss_weights(jnp.float32)
    J = jax.jacobian(lambda z: f(params, z, x))(z_star)
    _, vjp = jax.vjp(lambda p: f(p, z_star, x), params)
    for K in (1, 2, 5):
        u = sum(w @ jnp.linalg.matrix_power(J, i) for i in range(K))
        ref = vjp(u)[0]
        got = jax.grad(layer_loss)(params, x, solver=Iterate(60), grad=Series(K))
        for k in params:
            np.testing.assert_allclose(got[k], ref[k], rtol=1e-4, atol=1e-6)


def test_unroll_equals_autodiff_of_python_loop():
    params, x = make_problem()
    z0 = 0.3 * jnp.ones(N)
    T = 5

    def python_loop(params, x, z0):
        z = z0
        for _ in range(T):
            z = f(params, z, x)
        return jnp.dot(loss_weights(z.dtype), z)

    def ours(params, x, z0):
        z, _ = fixed_point_layer(f, params, z0, x, solver=Iterate(T), grad=Unroll())
        return jnp.dot(loss_weights(z.dtype), z)

    g_ref = jax.grad(python_loop, argnums=(0, 1, 2))(params, x, z0)
    g_ours = jax.grad(ours, argnums=(0, 1, 2))(params, x, z0)
    for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert float(jnp.abs(g_ours[2]).sum()) > 0  # unroll differentiates through z0


def test_implicit_approaches_unroll_as_iterations_grow():
    params, x = make_problem(contraction=0.8)
    implicit = jax.grad(layer_loss)(params, x, solver=Iterate(200), grad=Implicit(Iterate(200)))
    errors = []
    for T in (2, 5, 10, 40):
        unrolled = jax.grad(layer_loss)(params, x, solver=Iterate(T), grad=Unroll())
        errors.append(float(jnp.linalg.norm(unrolled["W"] - implicit["W"])))
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-4 * float(jnp.linalg.norm(implicit["W"])) + 1e-6


@pytest.mark.parametrize("grad", [Implicit(Iterate(120)), Unroll()], ids=["implicit", "unroll"])
def test_finite_differences(grad):
    with x64():
        params, x = make_problem(jnp.float64)
        fun = lambda p, xx: layer_loss(p, xx, solver=Iterate(120), grad=grad)
        check_grads(fun, (params, x), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("solver", ["iterate", "anderson", "broyden"])
def test_every_solver_reaches_the_fixed_point(solver):
    params, x = make_problem(contraction=0.9)
    z, info = fixed_point_layer(f, params, jnp.zeros(N), x, solver=SOLVERS[solver](80))
    np.testing.assert_allclose(z, f(params, z, x), atol=1e-5)
    assert float(info.final_residual) < 1e-5
    assert info.residuals.shape == (80,)


def test_anderson_and_broyden_converge_faster_than_iteration():
    params, x = make_problem(contraction=0.95, seed=3)
    res = {}
    for solver in ("iterate", "anderson", "broyden"):
        _, info = fixed_point_layer(f, params, jnp.zeros(N), x, solver=SOLVERS[solver](12))
        res[solver] = float(info.final_residual)
    assert res["anderson"] < res["iterate"] and res["broyden"] < res["iterate"], res


def test_damped_iteration_and_tolerance_early_exit():
    params, x = make_problem()
    z, info = fixed_point_layer(f, params, jnp.zeros(N), x,
                                solver=Iterate(200, tol=1e-5, damping=0.5))
    assert int(info.steps) < 200
    assert float(info.final_residual) < 1e-5
    assert np.isnan(np.asarray(info.residuals[int(info.steps):])).all()
    np.testing.assert_allclose(z, f(params, z, x), atol=1e-4)


def test_residual_trace_is_the_relative_residual():
    params, x = make_problem()
    z0 = jnp.zeros(N) + 0.5
    _, info = fixed_point_layer(f, params, z0, x, solver=Iterate(3))
    z = z0
    for k in range(3):
        fz = f(params, z, x)
        expected = jnp.linalg.norm(fz - z) / (jnp.linalg.norm(fz) + 1e-8)
        np.testing.assert_allclose(info.residuals[k], expected, rtol=1e-5)
        z = fz
    assert int(info.steps) == 3


def test_z0_gets_zero_cotangent_under_implicit_modes():
    params, x = make_problem()
    for grad in (Series(), Implicit(), Neumann()):
        g = jax.grad(lambda z0: jnp.sum(fixed_point_layer(f, params, z0, x, grad=grad)[0]))(
            jnp.ones(N))
        np.testing.assert_array_equal(g, jnp.zeros(N))


def test_vmap_jit_grad_compose_and_match_per_example():
    params, x = make_problem()
    xs = jax.random.normal(jax.random.key(5), (3, M))

    def loss(p, xx):
        return layer_loss(p, xx, solver=Iterate(50), grad=Implicit(Iterate(50)))

    batched = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))(params, xs)
    for i in range(3):
        single = jax.grad(loss)(params, xs[i])
        for k in params:
            np.testing.assert_allclose(batched[k][i], single[k], rtol=1e-5, atol=1e-7)
    # grad of a vmapped, jitted layer
    total = jax.grad(lambda p: jnp.sum(jax.jit(jax.vmap(lambda xx: loss(p, xx)))(xs)))(params)
    for k in params:
        np.testing.assert_allclose(total[k], batched[k].sum(0), rtol=1e-5, atol=1e-6)


def test_pytree_state_and_params():
    params, x = make_problem()
    nested = {"lin": {"W": params["W"], "U": params["U"]}, "b": (params["b"],)}

    def g(p, state, xx):
        a, b = state["a"], state["b"]
        za = jnp.tanh(p["lin"]["W"] @ a + p["lin"]["U"] @ xx + p["b"][0])
        zb = 0.5 * b + 0.1 * jnp.sum(a)
        return {"a": za, "b": zb}

    state0 = {"a": jnp.zeros(N), "b": jnp.zeros((2, 3))}
    for grad in (Unroll(), Neumann(), Series(), Implicit()):
        out, _ = fixed_point_layer(g, nested, state0, x, solver=Iterate(60), grad=grad)
        assert jax.tree.structure(out) == jax.tree.structure(state0)
        grads = jax.grad(lambda p: jnp.sum(fixed_point_layer(
            g, p, state0, x, solver=Iterate(60), grad=grad)[0]["b"]))(nested)
        assert jax.tree.structure(grads) == jax.tree.structure(nested)
        assert all(np.isfinite(np.asarray(l)).all() for l in jax.tree.leaves(grads))


def _dense_layer_step(apply, p, z, xx):
    return jnp.tanh(apply(p, z) + xx)


def test_flax_nnx_params_passed_explicitly():
    from flax import nnx

    model = nnx.Linear(N, N, rngs=nnx.Rngs(0))
    model.kernel[...] = model.kernel[...] * 0.3
    graphdef, state = nnx.split(model)
    x = jnp.linspace(-1, 1, N)

    def step(state, z, xx):
        return jnp.tanh(nnx.merge(graphdef, state)(z) + xx)

    def loss(state, grad):
        z, _ = fixed_point_layer(step, state, jnp.zeros(N), x, solver=Iterate(80), grad=grad)
        return jnp.sum(z ** 2)

    g_imp = jax.grad(loss)(state, Implicit(Iterate(80)))
    g_unr = jax.grad(loss)(state, Unroll())
    assert jax.tree.structure(g_imp) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(g_imp), jax.tree.leaves(g_unr)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_flax_linen_params_passed_explicitly():
    import flax.linen as nn

    dense = nn.Dense(N)
    x = jnp.linspace(-1, 1, N)
    variables = dense.init(jax.random.key(0), jnp.zeros(N))
    variables = jax.tree.map(lambda a: 0.3 * a, variables)

    def step(variables, z, xx):
        return jnp.tanh(dense.apply(variables, z) + xx)

    def loss(variables, grad):
        z, _ = fixed_point_layer(step, variables, jnp.zeros(N), x, solver=Iterate(80),
                                 grad=grad)
        return jnp.sum(z ** 2)

    g_imp = jax.grad(loss)(variables, Implicit(Iterate(80)))
    g_unr = jax.grad(loss)(variables, Unroll())
    for a, b in zip(jax.tree.leaves(g_imp), jax.tree.leaves(g_unr)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_info_is_static_shaped_and_gradient_free():
    params, x = make_problem()

    def loss(p):
        z, info = fixed_point_layer(f, p, jnp.zeros(N), x, solver=Iterate(5), grad=Unroll())
        return jnp.sum(z) + jnp.nansum(info.residuals) + info.final_residual

    g1 = jax.grad(loss)(params)
    g2 = jax.grad(lambda p: jnp.sum(fixed_point_layer(
        f, p, jnp.zeros(N), x, solver=Iterate(5), grad=Unroll())[0]))(params)
    for k in params:
        np.testing.assert_allclose(g1[k], g2[k], rtol=1e-6)
    _, info = jax.jit(lambda p: fixed_point_layer(f, p, jnp.zeros(N), x,
                                                  solver=Iterate(5)))(params)
    assert isinstance(info, FixedPointInfo) and info.residuals.shape == (5,)


def test_spectral_norm_matches_dense_largest_singular_value():
    params, x = make_problem(contraction=0.9)
    z_star, _ = fixed_point_layer(f, params, jnp.zeros(N), x, solver=Iterate(60))
    J = jax.jacobian(lambda z: f(params, z, x))(z_star)
    expected = np.linalg.svd(np.asarray(J), compute_uv=False)[0]
    got = jacobian_spectral_norm(f, params, z_star, x, num_iters=100)
    np.testing.assert_allclose(got, expected, rtol=1e-3)


def test_spectral_norm_per_example_with_batch_axis():
    params, _ = make_problem(contraction=0.9)
    xs = jax.random.normal(jax.random.key(1), (3, M))
    fb = lambda p, z, xx: jax.vmap(lambda zi, xi: f(p, zi, xi))(z, xx)
    z, _ = fixed_point_layer(fb, params, jnp.zeros((3, N)), xs, solver=Iterate(60),
                             batch_axis=0)
    got = jacobian_spectral_norm(fb, params, z, xs, num_iters=100, batch_axis=0)
    assert got.shape == (3,)
    for i in range(3):
        J = jax.jacobian(lambda zi: f(params, zi, xs[i]))(z[i])
        np.testing.assert_allclose(got[i], np.linalg.svd(np.asarray(J), compute_uv=False)[0],
                                   rtol=1e-3)


T_PAPER = 4


@pytest.mark.parametrize("name,solver,grad", [
    ("unroll", Iterate(T_PAPER), Unroll(unrolled=True)),  # T=7: straight-line
    ("neumann1", Iterate(T_PAPER), Neumann(1)),
    ("neumann3", Iterate(T_PAPER), Neumann(3)),
    ("series1", Iterate(T_PAPER + 1), Series(1)),
    ("series4", Iterate(T_PAPER + 1), Series(4)),
    ("implicit", Iterate(T_PAPER + 1), Implicit(Iterate(T_PAPER + 1))),
    ("IN", Iterate(T_PAPER), Neumann(1)),
    ("IB", Iterate(T_PAPER + 1), Implicit(Broyden(T_PAPER + 1))),
    ("BN", Broyden(T_PAPER + 1), Series(1)),
    ("BB", Broyden(T_PAPER + 1), Implicit(Broyden(T_PAPER + 1))),
])
def test_parse_grad_mode_gives_the_paper_count_as_objects(name, solver, grad):
    mode = parse_grad_mode(name)
    assert mode.layer_options(T_PAPER) == {"solver": solver, "grad": grad}
    params, x = make_problem()
    _, info = fixed_point_layer(f, params, jnp.zeros(N), x, **mode.layer_options(T_PAPER))
    assert info.residuals.shape == (solver.max_iter,)


def test_layer_options_take_the_open_options_and_refuse_the_ones_the_mode_sets():
    mode = parse_grad_mode("IB")
    opts = mode.layer_options(3, tol=1e-4, broyden_memory=5, adjoint_max_iter=9,
                              adjoint_on_failure="nan")
    assert opts == {"solver": Iterate(4, tol=1e-4),
                    "grad": Implicit(Broyden(9, memory=5), on_failure="nan")}
    assert parse_grad_mode("neumann2").layer_options(3, adjoint_max_iter=9)["grad"] == Neumann(2)
    assert parse_grad_mode("implicit").layer_options(3, adjoint_solver="gmres")["grad"] == (
        Implicit(GMRES(4, tol=1e-6)))
    with pytest.raises(ValueError, match="unknown fixed_point option.* max_iter"):
        mode.layer_options(3, max_iter=5)
    with pytest.raises(ValueError, match="adjoint_on_failure: must be one of"):
        mode.layer_options(3, adjoint_on_failure="ignore")
    with pytest.raises(ValueError, match="adjoint_max_iter must be a positive int"):
        mode.layer_options(3, adjoint_max_iter=0)
    with pytest.raises(ValueError, match="adjoint_solver='gmres' applies to the modes that"):
        parse_grad_mode("neumann1").layer_options(3, adjoint_solver="gmres")


@pytest.mark.parametrize("bad", ["neumann0", "neuman1", "ib", "vanilla", "", "neumann-1"])
def test_parse_grad_mode_rejects_unknown_strings_listing_valid_ones(bad):
    with pytest.raises(ValueError, match="valid: unroll, neumannK"):
        parse_grad_mode(bad)


@pytest.mark.parametrize("kwargs,message", [
    ({"solver": "iterate"}, r"solver='iterate': the string form was removed; use "
                            r"solver=Iterate\(max_iter=...\)"),
    ({"solver": "newton"}, "solver='newton': the string form was removed; use Iterate"),
    ({"grad": "neumann"}, r"grad='neumann': .* use grad=Series\(order\) .*Neumann\(order\) "
                          "is now the paper's estimator"),
    ({"grad": "phantom"}, r"use grad=Neumann\(order, damping\) \(Phantom was renamed"),
    ({"max_iter": 3}, r"flat option max_iter= was removed .* use solver=Iterate\(max_iter"),
    ({"neumann_order": 2}, r"neumann_order= .* use grad=Series\(order=...\)"),
    ({"adjoint_solver": "gmres"}, r"adjoint_solver= .* grad=Implicit\(adjoint=GMRES"),
    ({"phantom_steps": 2}, r"grad=Neumann\(order=...\) \(Phantom was renamed Neumann\)"),
])
def test_the_removed_string_form_is_refused_naming_the_object(kwargs, message):
    params, x = make_problem()
    with pytest.raises(ValueError, match=message):
        fixed_point_layer(f, params, jnp.zeros(N), x, **kwargs)
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_iters'"):
        fixed_point_layer(f, params, jnp.zeros(N), x, max_iters=3)


def test_mismatched_state_structure_raises():
    params, x = make_problem()
    with pytest.raises(ValueError, match="same pytree structure as z0"):
        fixed_point_layer(lambda p, z, xx: (f(p, z, xx), f(p, z, xx)), params, jnp.zeros(N), x)
    with pytest.raises(ValueError, match=r"preserve the shape and dtype.*float32\[3\]"):
        fixed_point_layer(lambda p, z, xx: z[:3], params, jnp.zeros(N), x)
    with pytest.raises(ValueError, match="did not return a pair"):
        fixed_point_layer(f, params, jnp.zeros(N), x, has_aux=True)


def test_has_aux_returns_aux_of_the_returned_evaluation():
    params, x = make_problem()

    def g(p, z, xx):
        new = f(p, z, xx)
        return new, {"input_norm": jnp.linalg.norm(z)}

    for grad in (Unroll(), Neumann(), Series(), Implicit()):
        (z, aux), info = fixed_point_layer(g, params, jnp.zeros(N), x, solver=Iterate(4),
                                           grad=grad, has_aux=True)
        assert aux["input_norm"].shape == ()
    # Without Neumann's extra updates the aux belongs to the last evaluation f(z_3), whose input
    # is z_3.
    (z, aux), _ = fixed_point_layer(g, params, jnp.zeros(N), x, solver=Iterate(4), has_aux=True)
    z3 = jnp.zeros(N)
    for _ in range(3):
        z3 = f(params, z3, x)
    np.testing.assert_allclose(aux["input_norm"], jnp.linalg.norm(z3), rtol=1e-6)
