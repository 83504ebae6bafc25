"""Absolute tolerances: `atol` on the forward solvers and the adjoint solvers.

The relative residual ||f(z) - z|| / ||f(z)|| cannot certify a fixed point at 0 (jaxopt's
geometric-decay case: f(z) = z / 2 has relative residual 1 at every z != 0); `atol` can.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fixed_slots.fixed_point import (
    GMRES,
    Anderson,
    Broyden,
    Implicit,
    Iterate,
    fixed_point_layer,
)


def halve(p, z, x):
    return p * z + x  # p = 0.5, x = 0: the fixed point is 0


def test_a_fixed_point_at_zero_converges_on_atol_and_never_on_tol():
    """jaxopt's geometric decay, Iterate: relative residual 1 at every step, atol certifies."""
    with jax.enable_x64(True):
        z0 = jnp.full((3,), 4.0)
        _, info_rel = fixed_point_layer(halve, 0.5, z0, jnp.zeros(3), solver=Iterate(20, tol=1e-3))
        assert not bool(info_rel.converged) and int(info_rel.steps) == 20
        z, info = fixed_point_layer(halve, 0.5, z0, jnp.zeros(3),
                                    solver=Iterate(20, tol=1e-3, atol=1e-4))
        assert bool(info.converged) and int(info.steps) == 17  # 0.5^17 * ||z0|| / 2 <= 1e-4
        assert float(info.final_abs_residual) <= 1e-4
        assert float(jnp.linalg.norm(z)) <= 1e-4  # f(z), within its residual of 0


@pytest.mark.parametrize("solver_type", [Anderson, Broyden])
def test_atol_stops_the_accelerated_solvers(solver_type):
    with jax.enable_x64(True):
        z, info = fixed_point_layer(halve, 0.5, jnp.full((3,), 4.0), jnp.zeros(3),
                                    solver=solver_type(60, atol=1e-9))
        assert bool(info.converged) and int(info.steps) < 60
        assert float(info.final_abs_residual) <= 1e-9 and float(jnp.linalg.norm(z)) <= 1e-9


def test_atol_stops_each_example_on_its_own_scale():
    with jax.enable_x64(True):
        z0 = jnp.array([[1e-12, 0.0], [1.0, 0.0]])  # row 0 already within atol
        _, info = fixed_point_layer(halve, 0.5, z0, jnp.zeros((2, 2)),
                                    solver=Iterate(80, atol=1e-10), batch_axis=0)
        steps = np.asarray(info.steps)
        assert steps[0] == 1 and 30 < steps[1] < 80
        assert np.all(np.asarray(info.converged))
        assert np.all(np.asarray(info.final_abs_residual) <= 1e-10)


def test_converged_without_atol_is_unchanged_and_throw_names_atol():
    with jax.enable_x64(True):
        _, info = fixed_point_layer(halve, 0.5, jnp.ones(2), jnp.zeros(2), solver=Iterate(5))
        assert bool(info.converged)  # no criterion: only finiteness, as before
        with pytest.raises(Exception, match="atol 1e-12"):
            jax.block_until_ready(fixed_point_layer(
                halve, 0.5, jnp.ones(2), jnp.zeros(2), solver=Iterate(5, atol=1e-12),
                throw=True))


@pytest.mark.parametrize("adjoint", [Iterate(400, atol=1e-10), Anderson(200, atol=1e-10),
                                     GMRES(50, tol=1e-300, restart=2, atol=1e-10)],
                         ids=lambda a: type(a).__name__)
def test_an_adjoint_solve_stops_and_succeeds_on_atol(adjoint):
    """tol unreachable (or absent), atol reachable: the solve stops early on atol, is not
    reported failed, and its absolute residual is within atol."""
    with jax.enable_x64(True):
        W = 0.9 * jnp.eye(4)[::-1]  # J = 0.9 P (P a permutation): an iteration converges

        def loss(x, probe):
            z, _ = fixed_point_layer(lambda W, z, x: z @ W.T + x, W, jnp.zeros(4), x,
                                     solver=Iterate(500, tol=1e-14), grad=Implicit(adjoint),
                                     probe=probe)
            return jnp.sum(z * jnp.arange(1.0, 5.0))

        u, stats = jax.grad(loss, argnums=(0, 1))(jnp.ones(4), jnp.zeros(3))
        g = jnp.arange(1.0, 5.0)
        exact = jnp.linalg.solve((jnp.eye(4) - W).T, g)  # u = g (I - J)^-1, J = W
        assert float(stats[2]) == 0.0  # not failed
        assert float(jnp.linalg.norm(u @ (jnp.eye(4) - W) - g)) <= 2e-10
        np.testing.assert_allclose(u, exact, atol=1e-8)
        budget = adjoint.max_iter * (adjoint.restart + 1 if isinstance(adjoint, GMRES) else 1)
        assert float(stats[1]) < budget  # it stopped on atol, not on the budget


def test_an_unreached_atol_is_a_failed_adjoint():
    with jax.enable_x64(True):
        W = 0.99 * jnp.eye(3)

        def loss(x, probe):
            z, _ = fixed_point_layer(lambda W, z, x: z @ W.T + x, W, jnp.zeros(3), x,
                                     solver=Iterate(3000, tol=1e-13),
                                     grad=Implicit(Iterate(5, atol=1e-12), on_failure="nan"),
                                     probe=probe)
            return jnp.sum(z)

        u, stats = jax.grad(loss, argnums=(0, 1))(jnp.ones(3), jnp.zeros(3))
        assert float(stats[2]) == 1.0 and bool(jnp.all(jnp.isnan(u)))


@pytest.mark.parametrize("bad", [0, -1e-3, float("nan"), float("inf"), "small", True])
@pytest.mark.parametrize("owner", [Iterate, Anderson, Broyden, GMRES])
def test_bad_atol_is_refused(owner, bad):
    with pytest.raises((ValueError, TypeError), match="atol"):
        owner(atol=bad)
