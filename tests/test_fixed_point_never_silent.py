"""Never silently wrong: every forward solver x adjoint solver x map, the implicit gradient is
either right or flagged (`failed` in the probe) with the documented policy applied.

Linear maps f(z) = A z + x, so the exact gradient g (I - A)^-1 is known for any z (also where
the forward solve does not converge): contractive, J = -1, a 90-degree rotation (|lambda| = 1),
and non-contractive with I - A invertible (|lambda| = 1.5). Float64, so "right" is 1e-6.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fixed_slots.fixed_point import layer as layer_module
from fixed_slots.fixed_point import (
    GMRES,
    Anderson,
    Broyden,
    Implicit,
    Iterate,
    fixed_point_layer,
)

ROTATION = np.array([[0.0, -1.0], [1.0, 0.0]])
MAPS = {
    "contractive": 0.5 * ROTATION + 0.2 * np.eye(2),
    "J=-1": -np.eye(2),
    "rotation": ROTATION,
    "non-contractive": 1.5 * ROTATION,
}
FORWARD = [Iterate(40), Anderson(40, tol=1e-10)]
ADJOINTS = [Iterate(40), Iterate(40, tol=1e-9), Anderson(40), Anderson(40, tol=1e-9),
            Broyden(40), GMRES()]
G = np.array([1.0, -2.0])  # dL/dz


def _grad(A, solver, grad, probe):
    def loss(x, probe):
        z, _ = fixed_point_layer(lambda A, z, x: z @ A.T + x, A, jnp.zeros(2), x,
                                 solver=solver, grad=grad, probe=probe)
        return jnp.dot(jnp.asarray(G), z)

    x = jnp.array([0.3, 0.7])
    if probe is None:
        return jax.jit(jax.grad(loss))(x, None), None
    return jax.jit(jax.grad(loss, argnums=(0, 1)))(x, probe)


@pytest.mark.parametrize("map_name", MAPS)
@pytest.mark.parametrize("adjoint", ADJOINTS, ids=repr)
def test_the_implicit_gradient_is_right_or_flagged_with_the_policy_applied(adjoint, map_name,
                                                                           monkeypatch):
    with jax.enable_x64(True):
        A = jnp.asarray(MAPS[map_name])
        exact = G @ np.linalg.inv(np.eye(2) - MAPS[map_name])  # g (I - A)^-1
        for solver in FORWARD:
            got, stats = _grad(A, solver, Implicit(adjoint, on_failure="nan"), jnp.zeros(3))
            got, failed = np.asarray(got), float(stats[2])
            if failed:
                assert np.all(np.isnan(got)), (solver, got)
            else:
                np.testing.assert_allclose(got, exact, rtol=1e-6, atol=1e-9,
                                           err_msg=f"{solver}: finite, wrong, not flagged")
            # Without a probe (the custom_jvp's transpose): the same outcome.
            no_probe, _ = _grad(A, solver, Implicit(adjoint, on_failure="nan"), None)
            np.testing.assert_array_equal(np.isnan(np.asarray(no_probe)), np.isnan(got))
            if not failed:
                np.testing.assert_allclose(no_probe, got, rtol=1e-9, atol=1e-12)
            # fallback: a failed solve returns the first-order answer u = g, with a warning.
            monkeypatch.setattr(layer_module, "_fallback_count", [0])
            if failed:
                with pytest.warns(RuntimeWarning, match="adjoint solve failed"):
                    fallback, _ = _grad(A, solver, Implicit(adjoint), jnp.zeros(3))
                np.testing.assert_allclose(fallback, G, rtol=1e-12)


def test_the_grid_exercises_both_outcomes():
    """The maps are chosen so some solves fail and some succeed (else the test above could
    pass vacuously): the iteration fails at |lambda| >= 1, GMRES never."""
    with jax.enable_x64(True):
        outcomes = {}
        for name, A in MAPS.items():
            for adjoint in (Iterate(40), GMRES()):
                _, stats = _grad(jnp.asarray(A), Anderson(40, tol=1e-10),
                                 Implicit(adjoint, on_failure="nan"), jnp.zeros(3))
                outcomes[name, type(adjoint).__name__] = float(stats[2])
        assert outcomes["contractive", "Iterate"] == 0.0
        assert all(outcomes[name, "Iterate"] == 1.0 for name in MAPS if name != "contractive")
        assert all(outcomes[name, "GMRES"] == 0.0 for name in MAPS)
