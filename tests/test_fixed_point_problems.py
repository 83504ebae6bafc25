"""Classic fixed-point problems, of the kinds optimistix's and jaxopt's suites use (written here
from their definitions, not copied): every forward solver reaches the known solution, the
implicit gradient agrees with central finite differences, forward mode (jvp, jacfwd) with
reverse mode, and float32 runs the same under strict dtype and rank promotion.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fixed_slots.fixed_point import GMRES, Anderson, Broyden, Implicit, Iterate, fixed_point_layer


def _rotation(theta):
    c, s = np.cos(theta), np.sin(theta)
    return np.array([[c, -s], [s, c]])


# name: (f(theta, y) -> y, theta, y0, known solution or None)
PROBLEMS = {
    "tanh": (lambda t, y: jnp.tanh(y + t), 1.0, 0.0, None),  # 0.96118...: the residual decides
    "cos (Dottie number)": (lambda t, y: t * jnp.cos(y), 1.0, 0.0, 0.7390851332151607),
    "exp (omega constant)": (lambda t, y: jnp.exp(-t * y), 1.0, 0.0, 0.5671432904097838),
    "Babylonian sqrt": (lambda t, y: 0.5 * (y + t / y), 2.0, 1.0, np.sqrt(2.0)),
    "linear contraction": (lambda t, y: jnp.asarray([[0.3, 0.2], [-0.1, 0.4]]) @ y + t,
                           np.array([1.0, -2.0]), np.zeros(2),
                           np.linalg.solve(np.eye(2) - np.array([[0.3, 0.2], [-0.1, 0.4]]),
                                           [1.0, -2.0])),
    "damped rotation": (lambda t, y: 0.9 * jnp.asarray(_rotation(1.2)) @ y + t,
                        np.array([0.5, 0.5]), np.zeros(2),
                        np.linalg.solve(np.eye(2) - 0.9 * _rotation(1.2), [0.5, 0.5])),
    "geometric decay to 0": (lambda t, y: t * y, 0.5, np.ones(3), np.zeros(3)),
    "pytree state": (lambda t, y: {"a": jnp.tanh(0.5 * y["b"] + t), "b": jnp.cos(y["a"]) / 2},
                     0.3, {"a": np.zeros(2), "b": np.zeros(2)}, None),
    "matrix state": (lambda t, y: 0.5 * jnp.tanh(y @ y.T / 3 + t) + 0.1, 0.2,
                     np.zeros((3, 3)), None),
    "quadratic root (jaxopt style)": (lambda t, y: y - 0.4 * (y ** 2 - t), 3.0, 1.0,
                                      np.sqrt(3.0)),
}
SOLVERS = [Iterate(2000, tol=1e-13, atol=1e-13), Anderson(200, tol=1e-13, atol=1e-13),
           Broyden(200, tol=1e-13, atol=1e-13)]


def _solve(name, theta, solver, grad=Implicit()):
    f, _, y0, _ = PROBLEMS[name]
    y0 = jax.tree.map(lambda a: jnp.asarray(a, theta.dtype), y0)  # the state in theta's dtype
    z, info = fixed_point_layer(lambda t, y: f(t, y), theta, y0, solver=solver, grad=grad)
    return z, info


def _total(tree):
    return sum(jnp.sum(jnp.sin(3.0 * leaf)) for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("name", PROBLEMS)
def test_each_solver_reaches_the_solution_and_the_implicit_gradient_is_exact(name, solver):
    """Every solver: the known solution to 1e-11 in the residual; Anderson's solve: the
    gradient against central finite differences, jvp and jacfwd against the gradient."""
    with jax.enable_x64(True):
        f, theta, _, known = PROBLEMS[name]
        theta = jnp.asarray(theta, jnp.float64)
        z, info = jax.jit(lambda t: _solve(name, t, solver))(theta)  # the solve alone
        assert bool(info.converged), (name, info.final_residual, info.final_abs_residual)
        residual = jax.tree.map(lambda a, b: jnp.max(jnp.abs(a - b)), f(theta, z), z)
        assert max(float(r) for r in jax.tree.leaves(residual)) < 1e-11
        if known is not None:
            np.testing.assert_allclose(np.asarray(z), np.asarray(known), rtol=1e-7, atol=1e-9)
        if not isinstance(solver, Anderson):
            return  # the gradients below depend on the solver only through the solution

        def loss(t):
            return _total(_solve(name, t, solver)[0])

        eps = 1e-6
        basis = jnp.asarray(np.eye(theta.size).reshape((theta.size,) + theta.shape))

        @jax.jit
        def everything(theta):  # one compilation: reverse, finite differences, forward
            fd = jax.vmap(lambda e: (loss(theta + eps * e) - loss(theta - eps * e)) / (2 * eps))(
                basis).reshape(theta.shape)
            tangent = jnp.ones_like(theta)
            return (jax.grad(loss)(theta), fd, jax.jvp(loss, (theta,), (tangent,))[1],
                    jax.jacfwd(loss)(theta))

        grad, fd, jvp, jacfwd = everything(theta)
        np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-7)
        # forward mode: jvp and jacfwd agree with reverse mode
        np.testing.assert_allclose(jvp, jnp.sum(grad), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(jacfwd, grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("x64", [False, True], ids=["float32", "float64"])
@pytest.mark.parametrize("name", ["tanh", "linear contraction", "pytree state", "matrix state"])
def test_strict_promotion_and_rank_raise_give_the_same_numbers(name, x64):
    with jax.enable_x64(x64):
        _check_strict(name, jnp.float64 if x64 else jnp.float32)


def _check_strict(name, dtype):
    f, theta, _, _ = PROBLEMS[name]
    theta = jnp.asarray(theta, dtype)

    def run(t):
        z, _ = _solve(name, t, Anderson(60, tol=1e-6))
        return _total(z)

    def everything(t):  # with a probe too: the custom_vjp's statistics columns
        probe_grad = jax.grad(lambda p: _total(fixed_point_layer(
            lambda t, y: f(t, y), t, jax.tree.map(lambda a: jnp.asarray(a, dtype),
                                                  PROBLEMS[name][2]),
            solver=Anderson(60, tol=1e-6), grad=Implicit(), probe=p)[0]))(jnp.zeros(3, dtype))
        return (run(t), jax.grad(run)(t), jax.jvp(run, (t,), (jnp.ones_like(t),))[1],
                probe_grad)

    expected = jax.jit(everything)(theta)
    with jax.numpy_dtype_promotion("strict"), jax.numpy_rank_promotion("raise"):
        got = jax.jit(everything)(theta)  # traced (and so checked) under the strict rules
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, rtol=1e-6)


# ------------------------------------------------- jaxopt's Anderson cases (from their definitions)

def test_anderson_solves_a_pure_rotation_that_iteration_never_converges_on():
    """f(y) = R y, R a rotation (|eigenvalues| = 1, fixed point 0): the iteration circles at
    constant radius and says so (not converged); Anderson, a linear problem in 2 dimensions
    with memory >= 2, reaches the fixed point, certified by atol."""
    with jax.enable_x64(True):
        R = jnp.asarray(_rotation(0.7))
        y0 = jnp.array([1.0, 0.5])
        f = lambda t, y: t @ y
        z_it, info_it = fixed_point_layer(f, R, y0, solver=Iterate(200, atol=1e-10))
        assert not bool(info_it.converged) and int(info_it.steps) == 200
        np.testing.assert_allclose(float(jnp.linalg.norm(z_it)), float(jnp.linalg.norm(y0)),
                                   rtol=1e-12)  # still on its circle
        z, info = fixed_point_layer(f, R, y0, solver=Anderson(50, memory=3, atol=1e-10))
        assert bool(info.converged) and int(info.steps) < 50
        assert float(jnp.linalg.norm(z)) <= 1e-9


def test_anderson_on_an_affine_contraction_in_many_dimensions():
    """y = M y + b, 30-d, ||M||_2 = 0.95: Anderson reaches solve(I - M, b) to 1e-10 in far fewer
    evaluations than the iteration (which needs ~ log(1e-10) / log(0.95) ~ 450), and the
    implicit gradient (a GMRES adjoint) of a loss of y* equals the closed form."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        M = rng.standard_normal((30, 30))
        M = 0.95 * M / np.linalg.norm(M, 2)
        b = rng.standard_normal(30)
        w = rng.standard_normal(30)
        exact = np.linalg.solve(np.eye(30) - M, b)
        f = lambda p, y: p["M"] @ y + p["b"]
        params = {"M": jnp.asarray(M), "b": jnp.asarray(b)}
        z, info = fixed_point_layer(f, params, jnp.zeros(30),
                                    solver=Anderson(200, memory=10, tol=1e-12))
        assert bool(info.converged) and int(info.steps) < 100
        np.testing.assert_allclose(np.asarray(z), exact, rtol=1e-9, atol=1e-10)
        g = jax.grad(lambda p: jnp.dot(jnp.asarray(w), fixed_point_layer(
            f, p, jnp.zeros(30), solver=Anderson(200, memory=10, tol=1e-12),
            grad=Implicit(GMRES(max_iter=10, tol=1e-11), on_failure="raise"))[0]))(params)
        u = np.linalg.solve((np.eye(30) - M).T, w)  # dL/db = (I - M)^-T w; dL/dM = u y*^T
        np.testing.assert_allclose(np.asarray(g["b"]), u, rtol=1e-7)
        np.testing.assert_allclose(np.asarray(g["M"]), np.outer(u, exact), rtol=1e-7, atol=1e-9)
