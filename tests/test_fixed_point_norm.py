"""The `norm` of the forward and iterative adjoint solvers' residuals: "two", "max", "rms".

On the linear map f(z) = z / 2 + c from z0 = 0 the iterates are known exactly,
z_k = 2c (1 - 2^-k), with residual f(z_k) - z_k = c 2^-k: each norm's stopping step follows
from the norm of c alone.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fixed_slots.fixed_point import (
    Anderson,
    Broyden,
    GMRES,
    Implicit,
    Iterate,
    fixed_point_layer,
)


def half_plus(p, z, c):
    return p * z + c


# One large entry among many small ones: the three norms of c differ by large factors.
C = np.concatenate([[8.0], np.full(63, 0.5)])
NORM_OF_C = {"two": float(np.linalg.norm(C)), "max": 8.0,
             "rms": float(np.linalg.norm(C)) / 8.0}


def expected_steps(norm: str, atol: float) -> int:
    """First k >= 1 with ||c|| 2^-(k-1) <= atol: the residual of the k-th evaluation (z_{k-1})."""
    return 1 + math.ceil(math.log2(NORM_OF_C[norm] / atol))


@pytest.mark.parametrize("norm", ["two", "max", "rms"])
def test_atol_stops_at_the_step_its_norm_predicts(norm):
    with jax.enable_x64(True):
        c = jnp.asarray(C)
        z, info = fixed_point_layer(half_plus, 0.5, jnp.zeros(64), c,
                                    solver=Iterate(100, atol=1e-6, norm=norm))
        assert int(info.steps) == expected_steps(norm, 1e-6)
        assert bool(info.converged)
        # The reported absolute residual is that norm of f(x) - x, recomputed here.
        x = 2 * c * (1 - 0.5 ** (int(info.steps) - 1))
        r = np.asarray(half_plus(0.5, x, c) - x)
        recomputed = {"two": np.linalg.norm(r), "max": np.abs(r).max(),
                      "rms": np.linalg.norm(r) / 8.0}[norm]
        # (the residuals are kept in float32)
        np.testing.assert_allclose(float(info.final_abs_residual), recomputed, rtol=1e-6)
        error = np.asarray(z) - 2 * C  # = 2c 2^-steps: the last residual's half, in any norm
        assert {"two": np.linalg.norm(error), "max": np.abs(error).max(),
                "rms": np.linalg.norm(error) / 8.0}[norm] <= 1e-6


def test_the_relative_residual_uses_the_norm_too():
    """tol: max|f(z) - z| / max|f(z)| against the Euclidean ratio.

    From z0 = z* + d (z* = 2c) the iterates are z_k = z* + d 2^-k: with d not parallel to c the
    two ratios differ, while "rms" (a rescaled Euclidean norm) gives the Euclidean ratio.
    """
    with jax.enable_x64(True):
        c = jnp.asarray(C)
        d = np.zeros(64)
        d[-1] = 16.0
        z0 = jnp.asarray(2 * C + d)
        infos = {norm: fixed_point_layer(half_plus, 0.5, z0, c, solver=Iterate(8, norm=norm))[1]
                 for norm in ("two", "max", "rms")}
        k = np.arange(8)[:, None]
        x = 2 * C + d * 0.5 ** k  # [8, 64] the evaluated points
        fx = 0.5 * x + C
        want = {"two": np.linalg.norm(fx - x, axis=1) / (np.linalg.norm(fx, axis=1) + 1e-8),
                "max": np.abs(fx - x).max(1) / (np.abs(fx).max(1) + 1e-8)}
        want["rms"] = want["two"]  # scale-free ratio
        for norm, info in infos.items():
            np.testing.assert_allclose(np.asarray(info.residuals), want[norm], rtol=1e-6)
        assert not np.allclose(want["max"], want["two"], rtol=1e-2)


@pytest.mark.parametrize("solver_type", [Anderson, Broyden])
def test_accelerated_solvers_stop_in_the_max_norm(solver_type):
    with jax.enable_x64(True):
        c = jnp.asarray(C)
        z, info = fixed_point_layer(half_plus, 0.5, jnp.zeros(64), c,
                                    solver=solver_type(60, atol=1e-9, norm="max"))
        assert bool(info.converged) and int(info.steps) < 60
        assert float(jnp.max(jnp.abs(half_plus(0.5, z, c) - z))) <= 2e-9


def test_a_pytree_state_is_one_vector_per_example_for_every_norm():
    """max over every leaf of the example: the larger leaf's entry decides."""
    with jax.enable_x64(True):
        c = {"a": jnp.full((2, 3), 0.25), "b": jnp.full((2, 1), 4.0)}
        f = lambda p, z, c: jax.tree.map(lambda zi, ci: p * zi + ci, z, c)
        z0 = jax.tree.map(jnp.zeros_like, c)
        _, info = fixed_point_layer(f, 0.5, z0, c, solver=Iterate(60, atol=1e-6, norm="max"),
                                    batch_axis=0)
        # ||c||_max = 4 per example: 1 + ceil(log2(4e6)) = 23 evaluations.
        np.testing.assert_array_equal(np.asarray(info.steps), [23, 23])


@pytest.mark.parametrize("norm", ["two", "max", "rms"])
def test_an_iterative_adjoint_stops_in_its_norm_and_gives_the_exact_gradient(norm):
    """d/dp of sum(z*) for z* = p z* + c, z* = c / (1 - p): sum(c) / (1 - p)^2."""
    with jax.enable_x64(True):
        c = jnp.asarray(C)

        def loss(p):
            z, _ = fixed_point_layer(half_plus, p, jnp.zeros(64), c,
                                     solver=Iterate(200, atol=1e-13, norm=norm),
                                     grad=Implicit(Iterate(200, atol=1e-12, norm=norm),
                                                   on_failure="raise"))
            return jnp.sum(z)

        np.testing.assert_allclose(float(jax.grad(loss)(0.5)), C.sum() / 0.25, rtol=1e-9)


@pytest.mark.parametrize("norm, fails", [("rms", False), ("two", True)])
def test_the_adjoint_failure_test_uses_its_norm(norm, fails):
    """The adjoint's residual decays as 2^-k ||g||, g = ones(64): ||g||_rms = 1, ||g||_2 = 8.

    Twelve iterations reach atol = 1e-3 in the rms norm but not in the Euclidean one (~2e-3):
    the first gives the exact gradient, the second fails and the policy applies (NaN).
    """
    with jax.enable_x64(True):
        c = jnp.asarray(C)

        def loss(p):
            z, _ = fixed_point_layer(half_plus, p, jnp.zeros(64), c,
                                     solver=Iterate(200, atol=1e-13),
                                     grad=Implicit(Iterate(12, atol=1e-3, norm=norm),
                                                   on_failure="nan"))
            return jnp.sum(z)

        g = float(jax.grad(loss)(0.5))
        if fails:
            assert np.isnan(g)
        else:
            np.testing.assert_allclose(g, C.sum() / 0.25, rtol=1e-3)


@pytest.mark.parametrize("solver_type", [Iterate, Anderson, Broyden])
def test_an_unknown_norm_is_refused_with_its_name(solver_type):
    with pytest.raises(ValueError, match=rf"{solver_type.__name__}: norm must be one of 'two', "
                                         r"'max', 'rms', got 'l1'"):
        solver_type(norm="l1")
    with pytest.raises(ValueError, match="norm must be one of"):
        solver_type(norm=np.array([1.0, 2.0]))  # not a name (and no ambiguous truth value)


def test_gmres_has_no_norm_option():
    """GMRES minimises the Euclidean residual; its tolerances are in that norm only."""
    with pytest.raises(TypeError):
        GMRES(norm="max")


def test_throw_names_the_norm_it_judged_in():
    with jax.enable_x64(True):
        with pytest.raises(Exception, match="atol 1e-12, max norm"):
            jax.block_until_ready(fixed_point_layer(
                half_plus, 0.5, jnp.zeros(64), jnp.asarray(C),
                solver=Iterate(5, atol=1e-12, norm="max"), throw=True))
