"""Forward mode through fixed_point_layer: jvp, jacfwd, linearize and hessian for Implicit and
Series, against autodiff of a long unroll (exact gradients), against reverse mode of the probe's
custom_vjp path (the same estimator, differentiated the other way), and the failure policy in
forward mode. Float64 problems, so agreement is to 1e-10, not float32 noise.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fixed_slots.fixed_point import layer as layer_module
from fixed_slots.fixed_point import (
    GMRES,
    Anderson,
    Implicit,
    Iterate,
    Neumann,
    Series,
    Unroll,
    fixed_point_layer,
)
from fixed_point_problems import N, tanh_map as f, tanh_problem

WEIGHTS = np.linspace(-1.0, 2.0, N)


def solve(params, x, grad, solver=Iterate(120), probe=None):
    z, _ = fixed_point_layer(f, params, jnp.zeros(N, jnp.float64), x, solver=solver, grad=grad,
                             probe=probe)
    return z


def loss(params, x, grad, solver=Iterate(120)):
    z = solve(params, x, grad, solver)
    return jnp.dot(WEIGHTS, z) + 0.3 * jnp.sum(z ** 2)


TRANSFORMS = {
    "jvp": lambda fn, x: jax.jvp(fn, (x,), (jnp.asarray(WEIGHTS),))[1],
    "jacfwd": lambda fn, x: jax.jacfwd(fn)(x),
    "linearize": lambda fn, x: jax.linearize(fn, x)[1](jnp.asarray(WEIGHTS)),
    "hessian": lambda fn, x: jax.hessian(lambda xx: jnp.sum(fn(xx) ** 2))(x),
}
# GMRES (the default adjoint) at a tolerance that makes "exact" mean 1e-9.
EXACT = [Implicit(GMRES(tol=1e-13)), Implicit(Iterate(120)), Implicit(Anderson(60, tol=1e-13)),
         Series(120)]


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("grad", EXACT, ids=lambda g: repr(g)[:48])
def test_forward_mode_matches_autodiff_of_a_long_unroll(grad, transform):
    with jax.enable_x64(True):
        params, x = tanh_problem(jnp.float64)
        got = jax.jit(lambda x: TRANSFORMS[transform](lambda xx: solve(params, xx, grad), x))(x)
        ref = jax.jit(lambda x: TRANSFORMS[transform](lambda xx: solve(params, xx, Unroll()),
                                                      x))(x)
        assert float(jnp.abs(ref).max()) > 1e-2
        np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12)


def test_forward_mode_with_respect_to_params_and_a_closure():
    with jax.enable_x64(True):
        params, x = tanh_problem(jnp.float64)

        def z_of(W, grad):  # W closed over by f; b explicit
            return fixed_point_layer(lambda b, z, x: f({"W": W, "b": b}, z, x), params["b"],
                                     jnp.zeros(N), x, solver=Iterate(120), grad=grad)[0]

        got = jax.jacfwd(z_of)(params["W"], Implicit(GMRES(tol=1e-13)))
        ref = jax.jacfwd(z_of)(params["W"], Unroll())
        np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("grad", [Series(1), Series(3), Neumann(2), Implicit(Iterate(120))],
                         ids=repr)
def test_forward_mode_is_the_transpose_of_the_probes_reverse_mode(grad):
    """jacfwd (the custom_jvp) and jacrev with a probe (the custom_vjp): one estimator, both
    ways, for the truncated estimators too (which a long unroll does not match)."""
    with jax.enable_x64(True):
        params, x = tanh_problem(jnp.float64)
        forward = jax.jacfwd(lambda xx: solve(params, xx, grad))(x)
        reverse = jax.jacrev(lambda xx: solve(params, xx, grad, probe=jnp.zeros(3)))(x)
        unroll = jax.jacfwd(lambda xx: solve(params, xx, Unroll()))(x)
        np.testing.assert_allclose(forward, reverse, rtol=1e-10, atol=1e-13)
        if isinstance(grad, (Series, Neumann)):  # truncated: measurably not the exact one
            assert float(jnp.abs(forward - unroll).max()) > 1e-4


def test_series_1_tangent_treats_the_solution_as_a_constant():
    with jax.enable_x64(True):
        params, x = tanh_problem(jnp.float64)
        z_star = solve(params, x, Unroll())
        got = jax.jacfwd(lambda xx: solve(params, xx, Series(1)))(x)
        ref = jax.jacfwd(lambda xx: f(params, z_star, xx))(x)
        np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-13)


def test_reverse_mode_without_a_probe_is_the_probes_reverse_mode():
    """Without a probe reverse mode is the transpose of the tangent rule; with one it is the
    custom_vjp. Same gradients, every gradient object."""
    with jax.enable_x64(True):
        params, x = tanh_problem(jnp.float64)
        for grad in (Implicit(), Implicit(Iterate(40)), Series(1), Series(4)):
            def l(p, probe):
                z = solve(p, x, grad, probe=probe)
                return jnp.dot(WEIGHTS, z)
            without = jax.grad(l)(params, None)
            with_probe = jax.grad(l)(params, jnp.zeros(3))
            for a, b in zip(jax.tree.leaves(without), jax.tree.leaves(with_probe)):
                np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("mode", ["jvp", "grad"])
def test_forward_and_reverse_apply_the_failure_policy_at_j_equal_minus_one(mode, monkeypatch):
    """f(z) = a z + x at a = -1: z* = x / (1 - a) = x / 2, dz*/da = x / (1 - a)^2 = x / 4.
    Anderson solves the forward;
    an iterative adjoint cannot converge at J = -1, so 'nan' must give NaN, 'fallback' the
    first-order answer (dz = f_a da = z*), GMRES the exact one, in both modes."""
    monkeypatch.setattr(layer_module, "_fallback_count", [0])  # it warns at the 1st failure
    with jax.enable_x64(True):
        a, x = jnp.float64(-1.0), jnp.float64(3.0)

        def z_of(a, grad):
            return fixed_point_layer(lambda p, z, x: p * z + x, a, jnp.float64(0.0), x,
                                     solver=Anderson(30, tol=1e-12), grad=grad)[0]

        def derivative(grad):
            if mode == "jvp":
                return float(jax.jvp(lambda a: z_of(a, grad), (a,), (1.0,))[1])
            return float(jax.grad(z_of)(a, grad))

        assert abs(derivative(Implicit()) - float(x / 4)) < 1e-9  # the default adjoint: GMRES
        assert np.isnan(derivative(Implicit(Iterate(50), on_failure="nan")))
        with pytest.warns(RuntimeWarning, match="adjoint solve failed"):
            first_order = derivative(Implicit(Iterate(50)))
        assert abs(first_order - float(x / 2)) < 1e-9  # u = g: dz = f_a = z*
        with pytest.raises(Exception, match="on_failure='raise'"):
            jax.block_until_ready(derivative(Implicit(Iterate(50), on_failure="raise")))


def test_reverse_mode_memory_does_not_grow_with_the_solvers_iterations():
    """O(1) memory in the iterations without a probe too: the solve is never taped."""
    with jax.enable_x64(True):
        params, x = tanh_problem(jnp.float64)

        def temp_bytes(max_iter):
            g = jax.jit(jax.grad(lambda p: loss(p, x, Implicit(), Iterate(max_iter))))
            return g.lower(params).compile().memory_analysis().temp_size_in_bytes

        def unrolled_bytes(max_iter):
            g = jax.jit(jax.grad(lambda p: loss(p, x, Unroll(), Iterate(max_iter))))
            return g.lower(params).compile().memory_analysis().temp_size_in_bytes

        assert temp_bytes(10) == temp_bytes(1000)
        assert unrolled_bytes(1000) > unrolled_bytes(10)  # the measure can see growth


def test_forward_mode_with_a_batch_axis_under_vmap_and_jit():
    with jax.enable_x64(True):
        params, _ = tanh_problem(jnp.float64)
        xs = jax.random.normal(jax.random.key(3), (4, N), jnp.float64)

        def z_of(xs, grad):
            return fixed_point_layer(f, params, jnp.zeros((4, N)), xs, solver=Iterate(120),
                                     grad=grad, batch_axis=0)[0]

        tangent = jnp.ones_like(xs)
        exact = Implicit(GMRES(tol=1e-13))
        got = jax.jit(lambda xs: jax.jvp(lambda v: z_of(v, exact), (xs,), (tangent,))[1])(xs)
        ref = jax.jvp(lambda v: z_of(v, Unroll()), (xs,), (tangent,))[1]
        np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12)
        per_row = jax.vmap(lambda x: jax.jacfwd(lambda v: solve(params, v, exact))(x))(xs)
        ref_rows = jax.vmap(lambda x: jax.jacfwd(lambda v: solve(params, v, Unroll()))(x))(xs)
        np.testing.assert_allclose(per_row, ref_rows, rtol=1e-9, atol=1e-12)


def test_forward_mode_with_a_probe_is_refused_by_jax_not_wrong():
    """With a probe the layer is a custom_vjp (reverse mode only): jvp raises, it never returns
    a tangent that ignores the solve."""
    with jax.enable_x64(True):
        params, x = tanh_problem(jnp.float64)
        with pytest.raises(TypeError, match="custom_vjp"):
            jax.jvp(lambda xx: solve(params, xx, Implicit(), probe=jnp.zeros(3)), (x,), (x,))
