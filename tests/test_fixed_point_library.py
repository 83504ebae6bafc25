"""fixed_point_layer as a library: each feature against an independent reference.

The references are written from the definitions (dense Jacobians, plain Python loops, runs of one
example alone), never by calling the layer's own internals.
"""
import inspect
import os
import pathlib
import subprocess
import sys
import textwrap
import typing

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import fixed_slots.fixed_point as fp
from fixed_slots.fixed_point import (
    GMRES,
    Anderson,
    Broyden,
    Implicit,
    Iterate,
    Neumann,
    Series,
    Unroll,
    fixed_point_layer,
    jacobian_frobenius_penalty,
)

N = 5
DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "fixed_point.md"


def make_problem(seed: int = 0, contraction: float = 0.7):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    W = jax.random.normal(k1, (N, N))
    W = contraction * W / jnp.linalg.norm(W, 2)
    b = 0.1 * jax.random.normal(k2, (N,))
    x = jax.random.normal(k3, (N,))
    return {"W": W, "b": b}, x


def f(params, z, x):
    return jnp.tanh(params["W"] @ z + params["b"] + x)


WEIGHTS = jnp.linspace(-1.0, 2.0, N)


# --------------------------------------------------------------------------- public surface

PUBLIC = [
    "ADJOINT_SOLVERS",
    "Anderson",
    "Broyden",
    "FixedPointInfo",
    "GMRES",
    "GradMode",
    "Implicit",
    "Iterate",
    "Neumann",
    "Series",
    "Unroll",
    "fixed_point_layer",
    "jacobian_frobenius_penalty",
    "jacobian_spectral_norm",
    "parse_grad_mode",
]


def test_public_surface_is_exactly_the_documented_list():
    assert sorted(fp.__all__) == sorted(PUBLIC)
    docs = DOCS.read_text()
    for name in PUBLIC:
        assert hasattr(fp, name), name
        assert f"`{name}" in docs, f"{name} is exported but not documented in {DOCS.name}"
    assert fp.ADJOINT_SOLVERS == ("iterate", "anderson", "broyden", "gmres")


def test_the_layer_works_without_the_training_stack():
    """What the light install (`pip install .`, checked by .ci/run) relies on, in a subprocess:
    the training stack made unimportable, the layer still solves and differentiates."""
    code = textwrap.dedent("""
        import sys
        heavy = ("flax", "optax", "orbax", "ml_collections", "absl", "clu", "grain",
                 "tensorflow_datasets", "tensorboardX", "PIL", "matplotlib")
        for name in heavy:
            sys.modules[name] = None  # import fails, find_spec returns None: "not installed"
        import jax, jax.numpy as jnp
        import fixed_slots
        from fixed_slots.fixed_point import Implicit, fixed_point_layer
        g = jax.grad(lambda a: jnp.sum(fixed_point_layer(
            lambda a, z, x: jnp.tanh(a * z + x), a, jnp.zeros(3), jnp.ones(3),
            grad=Implicit())[0]))(0.5)
        assert jnp.isfinite(g)
        assert not any(sys.modules.get(name) for name in heavy)
        try:
            import fixed_slots.train
        except ImportError as e:
            assert '".[train]"' in str(e) and "missing: flax" in str(e), e
        else:
            raise AssertionError("fixed_slots.train imported without the training stack")
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=pathlib.Path(__file__).resolve().parents[1], timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]


def _check_function(fn, name):
    assert inspect.getdoc(fn), f"{name} has no docstring"
    hints = typing.get_type_hints(fn)  # also checks that string annotations resolve
    for param in inspect.signature(fn).parameters.values():
        if param.name == "self":
            continue
        assert param.name in hints, f"{name}: parameter {param.name} has no type hint"
    assert "return" in hints, f"{name} has no return type hint"


def test_every_export_has_a_docstring_and_type_hints():
    for name in fp.__all__:
        obj = getattr(fp, name)
        if isinstance(obj, tuple):
            assert all(isinstance(s, str) for s in obj), name
        elif inspect.isclass(obj):
            assert inspect.getdoc(obj), f"{name} has no docstring"
            assert typing.get_type_hints(obj), f"{name} has no annotated fields"
            for attr, member in vars(obj).items():
                if inspect.isfunction(member) and not attr.startswith("_"):
                    assert "return" in typing.get_type_hints(member), f"{name}.{attr}"
        else:
            assert callable(obj), name
            _check_function(obj, name)


# --------------------------------------------------------------------------- Frobenius penalty

def _dense_jacobian(params, z, x):
    return jax.jacobian(lambda zz: f(params, zz, x))(z)


def test_frobenius_penalty_is_unbiased_for_the_dense_frobenius_norm():
    params, x = make_problem()
    z = jax.random.normal(jax.random.key(7), (N,))
    J = _dense_jacobian(params, z, x)
    exact = float(jnp.sum(J ** 2))
    keys = jax.random.split(jax.random.key(1), 4000)
    for normalize, scale in ((True, N), (False, 1)):
        samples = jax.jit(jax.vmap(lambda k: jacobian_frobenius_penalty(
            f, params, z, x, key=k, normalize=normalize)))(keys)
        np.testing.assert_allclose(float(jnp.mean(samples)), exact / scale, rtol=0.04)


def test_frobenius_penalty_per_sample_equals_dense_formula_on_a_pytree_state():
    params, x = make_problem()

    def g(p, state, xx):
        a = jnp.tanh(p["W"][:3, :3] @ state["a"] + state["b"][0, 0] * xx[:3])
        b = 0.5 * jnp.sin(state["b"]) + 0.1 * jnp.sum(state["a"] ** 2)
        return {"a": a, "b": b}

    state = {"a": jnp.array([0.3, -0.2, 0.5]), "b": jnp.array([[0.4, -1.0], [0.2, 0.7]])}
    key, num_samples = jax.random.key(3), 3
    got = jacobian_frobenius_penalty(g, params, state, x, key=key, num_samples=num_samples)

    # Reproduce the documented sampling: one key per sample, then one per state leaf.
    leaves, treedef = jax.tree.flatten(state)
    flat0, unravel = jax.flatten_util.ravel_pytree(state)
    J = jax.jacobian(lambda v: jax.flatten_util.ravel_pytree(g(params, unravel(v), x))[0])(flat0)
    total = 0.0
    for key_i in jax.random.split(key, num_samples):
        keys = jax.random.split(key_i, len(leaves))
        eps = jax.tree.unflatten(treedef, [jax.random.normal(k, l.shape, l.dtype)
                                           for k, l in zip(keys, leaves)])
        eps_flat = jax.flatten_util.ravel_pytree(eps)[0]
        total += float(jnp.sum((eps_flat @ J) ** 2))
    np.testing.assert_allclose(float(got), total / num_samples / flat0.size, rtol=1e-5)


def test_frobenius_penalty_gradient_matches_dense_hutchinson_with_the_same_noise():
    params, x = make_problem()
    z = jax.random.normal(jax.random.key(7), (N,))
    key = jax.random.key(11)
    eps = jax.random.normal(jax.random.split(jax.random.split(key, 1)[0], 1)[0], (N,))

    def dense(p, xx):
        J = jax.jacobian(lambda zz: f(p, zz, xx))(z)
        return jnp.sum((eps @ J) ** 2) / N

    ours = lambda p, xx: jacobian_frobenius_penalty(f, p, z, xx, key=key)
    np.testing.assert_allclose(ours(params, x), dense(params, x), rtol=1e-5)
    g_ours = jax.grad(ours, argnums=(0, 1))(params, x)
    g_ref = jax.grad(dense, argnums=(0, 1))(params, x)
    for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref)):
        assert np.isfinite(np.asarray(a)).all()
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # z is a given point: the penalty does not differentiate into it.
    dz = jax.grad(lambda zz: jacobian_frobenius_penalty(f, params, zz, x, key=key))(z)
    np.testing.assert_array_equal(dz, jnp.zeros(N))


# --------------------------------------------------------------------------- Neumann (the paper's)

@pytest.mark.parametrize("steps,damping", [(1, 1.0), (3, 0.5)])
def test_neumann_gradient_equals_autodiff_through_k_damped_steps(steps, damping):
    params, x = make_problem()
    z0, T = 0.1 * jnp.ones(N), 12

    def reference(p, xx, z0):
        z = z0
        for _ in range(T):  # forward solve, plain iteration
            z = f(p, z, xx)
        z = jax.lax.stop_gradient(z)
        for _ in range(steps):
            z = (1.0 - damping) * z + damping * f(p, z, xx)
        return jnp.dot(WEIGHTS, z)

    def ours(p, xx, z0):
        z, _ = fixed_point_layer(f, p, z0, xx, solver=Iterate(T),
                                 grad=Neumann(order=steps, damping=damping))
        return jnp.dot(WEIGHTS, z)

    v1, g1 = jax.value_and_grad(ours, argnums=(0, 1, 2))(params, x, z0)
    v2, g2 = jax.value_and_grad(reference, argnums=(0, 1, 2))(params, x, z0)
    np.testing.assert_allclose(v1, v2, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(g1[2], jnp.zeros(N))  # detached from the solve


# --------------------------------------------------------------------------- return_best

# A non-normal 2-d map whose damped iteration has a non-monotone relative residual.
A_OSC = jnp.array([[0.3, 2.5], [0.0, -0.6]])
B_OSC = jnp.array([0.5, -0.3])


def f_osc(A, z, b):
    return jnp.tanh(z) @ A.T + b  # works on [2] and on [batch, 2]


def _reference_trace(z0, damping, T):
    """Plain loop: evaluation points, f at them, relative residuals (the layer's definition)."""
    z, xs, fxs, res = np.asarray(z0, np.float64), [], [], []
    A, b = np.asarray(A_OSC, np.float64), np.asarray(B_OSC, np.float64)
    for _ in range(T):
        fz = np.tanh(z) @ A.T + b
        xs.append(z)
        fxs.append(fz)
        res.append(np.linalg.norm(fz - z) / (np.linalg.norm(fz) + 1e-8))
        z = (1 - damping) * z + damping * fz
    return np.array(xs), np.array(fxs), np.array(res)


def test_return_best_returns_the_lowest_residual_evaluation():
    T, damping = 6, 0.5
    solver = Iterate(T, damping=damping)
    z0s = jnp.array([[3.0, -3.0], [2.0, 2.0]])
    refs = [_reference_trace(z0, damping, T) for z0 in z0s]
    best = [int(np.argmin(r)) for _, _, r in refs]
    assert best == [2, 1], best  # interior minima, different per row
    for (_, _, r), k in zip(refs, best):
        assert r[-1] > 1.4 * r[k]  # the last evaluation is clearly worse

    def g_aux(A, z, b):
        return f_osc(A, z, b), {"input": z}

    for i, z0 in enumerate(z0s):
        xs, fxs, r = refs[i]
        k = best[i]
        (z, aux), info = fixed_point_layer(g_aux, A_OSC, z0, B_OSC, solver=solver,
                                           return_best=True, has_aux=True)
        np.testing.assert_allclose(info.residuals, r, rtol=1e-5)
        np.testing.assert_allclose(z, fxs[k], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(aux["input"], xs[k], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(info.final_residual, r[k], rtol=1e-5)
        z_last, info_last = fixed_point_layer(f_osc, A_OSC, z0, B_OSC, solver=solver)
        np.testing.assert_allclose(z_last, fxs[-1], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(info_last.final_residual, r[-1], rtol=1e-5)

    # Per example with a batch axis: each row keeps its own best evaluation.
    zb, info = fixed_point_layer(f_osc, A_OSC, z0s, B_OSC, solver=solver, return_best=True,
                                 batch_axis=0)
    for i, k in enumerate(best):
        np.testing.assert_allclose(zb[i], refs[i][1][k], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(info.final_residual[i], refs[i][2][k], rtol=1e-5)

    # Series(1)'s gradient is taken at the returned (best) evaluation point.
    x_best = jnp.asarray(refs[0][0][best[0]], jnp.float32)
    g = jax.grad(lambda A: jnp.sum(fixed_point_layer(
        f_osc, A, z0s[0], B_OSC, solver=solver, return_best=True, grad=Series(1))[0]))(A_OSC)
    g_ref = jax.grad(lambda A: jnp.sum(f_osc(A, x_best, B_OSC)))(A_OSC)
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- eval iterations

def test_more_iterations_at_evaluation_than_at_training():
    from flax import nnx

    from fixed_slots.modules.slot_attention import SlotAttention

    model = SlotAttention(8, 16, 32, num_slots=3, num_iterations=2, eval_num_iterations=6,
                          rngs=nnx.Rngs(0))
    inputs = jax.random.normal(jax.random.key(1), (2, 10, 8))

    @nnx.jit(static_argnames="train")
    def run(model, inputs, train):
        return model(inputs, jax.random.key(2), train=train)[2]

    train_info, eval_info = run(model, inputs, True), run(model, inputs, False)
    assert train_info.residuals.shape == (2, 2)
    assert eval_info.residuals.shape == (2, 6)
    # Same initial slots: the first two evaluations coincide, then the eval run keeps going.
    np.testing.assert_allclose(eval_info.residuals[:, :2], train_info.residuals, rtol=1e-5)
    assert (np.asarray(eval_info.final_residual) < np.asarray(train_info.final_residual)).all()
    np.testing.assert_array_equal(eval_info.steps, [6, 6])


# --------------------------------------------------------------------------- adjoint callback

def f_additive(W, z, x):
    # x enters additively (df/dx = I), so dL/dx is exactly the adjoint u.
    return jnp.tanh(W @ z) + x


ADJOINTS = {"iterate": Iterate, "anderson": Anderson, "broyden": Broyden,
            "gmres": lambda budget, tol: GMRES(budget, 1e-6 if tol is None else tol)}


@pytest.mark.parametrize("adjoint_solver", ["iterate", "anderson", "broyden", "gmres"])
def test_adjoint_callback_reports_the_true_adjoint_residual(adjoint_solver):
    params, x = make_problem(contraction=0.9)
    W = params["W"]
    records = []

    def loss(W, x, budget, tol):
        grad = Implicit(ADJOINTS[adjoint_solver](budget, tol), callback=records.append)
        z, _ = fixed_point_layer(f_additive, W, jnp.zeros(N), x, solver=Iterate(100), grad=grad)
        return jnp.dot(WEIGHTS, z)

    z_star, _ = fixed_point_layer(f_additive, W, jnp.zeros(N), x, solver=Iterate(100))
    J = jax.jacobian(lambda z: f_additive(W, z, x))(z_star)
    # A small budget leaves a residual large enough to compare meaningfully.
    budget = 1 if adjoint_solver == "gmres" else 4
    grad_fn = jax.jit(jax.grad(loss, argnums=1), static_argnums=(2, 3))
    u = grad_fn(W, x, budget, None)
    jax.effects_barrier()
    assert len(records) == 1
    stats = records.pop()
    dense = float(jnp.linalg.norm(u @ (jnp.eye(N) - J) - WEIGHTS) / jnp.linalg.norm(WEIGHTS))
    # vjps spent: the budget; GMRES: 1 (first-order term) + 1 (initial residual) + one restart
    # of min(20, N) Arnoldi vectors and its residual.
    assert int(stats["adjoint_steps"]) == (2 + N + 1 if adjoint_solver == "gmres" else budget)
    assert not bool(stats["adjoint_failed"])
    if adjoint_solver == "gmres":
        assert float(stats["adjoint_residual"]) < 1e-4 and dense < 1e-4
    else:
        assert dense > 1e-4
        np.testing.assert_allclose(float(stats["adjoint_residual"]), dense, rtol=2e-2)

    if adjoint_solver != "gmres":
        u = jax.grad(loss, argnums=1)(W, x, 200, 1e-5)  # eager grad calls it too
        jax.effects_barrier()
        stats = records.pop()
        assert 1 <= int(stats["adjoint_steps"]) < 200
        dense = float(jnp.linalg.norm(u @ (jnp.eye(N) - J) - WEIGHTS) / jnp.linalg.norm(WEIGHTS))
        assert float(stats["adjoint_residual"]) < 1e-4 and dense < 1e-4


def test_adjoint_callback_is_per_example_with_a_batch_axis():
    params, _ = make_problem()
    xs = jax.random.normal(jax.random.key(4), (3, N))
    records = []
    fb = lambda W, z, xx: jax.vmap(lambda zi, xi: f_additive(W, zi, xi))(z, xx)
    jax.grad(lambda W: jnp.sum(fixed_point_layer(
        fb, W, jnp.zeros((3, N)), xs, solver=Iterate(40), batch_axis=0,
        grad=Implicit(Iterate(50, tol=1e-5), callback=records.append))[0]))(params["W"])
    jax.effects_barrier()
    stats = records.pop()
    assert stats["adjoint_residual"].shape == (3,) and stats["adjoint_steps"].shape == (3,)
    assert (np.asarray(stats["adjoint_steps"]) < 50).all()


# --------------------------------------------------------------------------- closures

GRADS = [Unroll(), Series(2), Implicit(Iterate(40)), Neumann(2, damping=0.7)]


@pytest.mark.parametrize("grad", GRADS, ids=lambda g: type(g).__name__)
def test_closed_over_traced_arrays_get_the_explicit_argument_gradient(grad):
    params, x = make_problem()
    kw = dict(solver=Iterate(40), grad=grad)

    def explicit(W, b, x):
        z, _ = fixed_point_layer(lambda p, z, xx: jnp.tanh(p[0] @ z + p[1] + xx), (W, b),
                                 jnp.zeros(N), x, **kw)
        return jnp.dot(WEIGHTS, z)

    def closed(W, b, x):
        W_closed = 1.0 * W  # a traced value inside the differentiated function
        z, _ = fixed_point_layer(lambda p, z, xx: jnp.tanh(W_closed @ z + p + xx), b,
                                 jnp.zeros(N), x, **kw)
        return jnp.dot(WEIGHTS, z)

    g1 = jax.jit(jax.grad(explicit, argnums=(0, 1, 2)))(params["W"], params["b"], x)
    g2 = jax.jit(jax.grad(closed, argnums=(0, 1, 2)))(params["W"], params["b"], x)
    assert float(jnp.abs(g1[0]).sum()) > 0
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("grad", GRADS, ids=lambda g: type(g).__name__)
def test_closed_over_nnx_module_gets_the_explicit_state_gradient(grad):
    from flax import nnx

    model = nnx.Linear(N, N, rngs=nnx.Rngs(0))
    model.kernel[...] = 0.3 * model.kernel[...]
    graphdef, state = nnx.split(model)
    x = jnp.linspace(-1.0, 1.0, N)
    kw = dict(solver=Iterate(40), grad=grad)

    def explicit(state):
        step = lambda s, z, xx: jnp.tanh(nnx.merge(graphdef, s)(z) + xx)
        z, _ = fixed_point_layer(step, state, jnp.zeros(N), x, **kw)
        return jnp.dot(WEIGHTS, z)

    def closed(state):
        module = nnx.merge(graphdef, state)  # split/merge outside the layer
        z, _ = fixed_point_layer(lambda _, z, xx: jnp.tanh(module(z) + xx), None,
                                 jnp.zeros(N), x, **kw)
        return jnp.dot(WEIGHTS, z)

    g1 = jax.jit(jax.grad(explicit))(state)
    g2 = jax.jit(jax.grad(closed))(state)
    assert jax.tree.structure(g1) == jax.tree.structure(g2)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- batching

def slow_problem():
    """Symmetric W, eigenvalues spread in [-1, 1]: with scale c the map contracts by ~1.2 c."""
    Q, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(0), (N, N)))
    return Q @ jnp.diag(jnp.array([1.0, -0.9, 0.7, -0.5, 0.3])) @ Q.T


def f_scaled(W, z, x, c):
    """Per-example contraction c: the example with the largest c converges slowly."""
    return c * (W @ z + 0.2 * jnp.tanh(z)) + x


def f_scaled_batch(W, z, x, c):
    return jax.vmap(f_scaled, in_axes=(None, 0, 0, 0))(W, z, x, c)


@pytest.mark.parametrize("solver", [Iterate(80, tol=1e-5), Anderson(80, tol=1e-5, memory=3),
                                    Broyden(80, tol=1e-5, memory=6)],
                         ids=lambda s: type(s).__name__)
def test_batch_axis_gives_each_example_its_own_solve(solver):
    W = slow_problem()
    c = jnp.array([0.2, 0.75, 0.3, 0.25])
    xs = jax.random.normal(jax.random.key(9), (4, N))
    kw = dict(solver=solver)
    zb, ib = jax.jit(lambda xs: fixed_point_layer(
        f_scaled_batch, W, jnp.zeros((4, N)), xs, c, batch_axis=0, **kw))(xs)
    zv, iv = jax.jit(jax.vmap(lambda x, ci: fixed_point_layer(
        f_scaled, W, jnp.zeros(N), x, ci, **kw)))(xs, c)
    steps = np.asarray(ib.steps)
    assert steps[1] > 1.5 * steps[[0, 2, 3]].max(), steps  # one slow example
    assert steps[1] < 80
    single = jax.jit(lambda x, ci: fixed_point_layer(f_scaled, W, jnp.zeros(N), x, ci, **kw))
    for i in range(4):
        z1, i1 = single(xs[i], c[i])
        for z, info in ((zb[i], jax.tree.map(lambda a: a[i], ib)),
                        (zv[i], jax.tree.map(lambda a: a[i], iv))):
            assert int(info.steps) == int(i1.steps)
            # Same iterations; a batched matvec sums in another order than a single one, and
            # Broyden's rank-one updates carry that float32 round-off to a few 1e-6 (CPU-ISA
            # dependent), far below the solve's own error at tol=1e-5.
            np.testing.assert_allclose(z, z1, rtol=1e-5, atol=2e-5)
            np.testing.assert_allclose(info.final_residual, i1.final_residual, rtol=1e-4,
                                       atol=1e-6)
            np.testing.assert_array_equal(np.isnan(info.residuals), np.isnan(i1.residuals))
            np.testing.assert_allclose(info.residuals, i1.residuals, rtol=1e-4, atol=1e-6)
    # Batch of one equals the unbatched call.
    z1b, i1b = fixed_point_layer(f_scaled_batch, W, jnp.zeros((1, N)), xs[1:2], c[1:2],
                                 batch_axis=0, **kw)
    z1, i1 = single(xs[1], c[1])
    np.testing.assert_allclose(z1b[0], z1, rtol=1e-6, atol=1e-6)
    assert int(i1b.steps[0]) == int(i1.steps)


def test_batch_axis_gradients_are_per_example():
    W = slow_problem()
    c = jnp.array([0.2, 0.75, 0.3])
    xs = jax.random.normal(jax.random.key(9), (3, N))
    kw = dict(solver=Iterate(60, tol=1e-5), grad=Implicit(Iterate(60, tol=1e-6)))
    gb = jax.grad(lambda xs: jnp.sum(fixed_point_layer(
        f_scaled_batch, W, jnp.zeros((3, N)), xs, c, batch_axis=0, **kw)[0] * WEIGHTS))(xs)
    for i in range(3):
        gi = jax.grad(lambda x: jnp.dot(WEIGHTS, fixed_point_layer(
            f_scaled, W, jnp.zeros(N), x, c[i], **kw)[0]))(xs[i])
        np.testing.assert_allclose(gb[i], gi, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("solver, grad", [
    (Iterate(30, tol=1e-6), Implicit()),  # the default adjoint, GMRES
    (Anderson(30, tol=1e-6), Implicit(Anderson(30))),
    (Broyden(30, tol=1e-6), Implicit(Broyden(30))),
    (Anderson(30, tol=1e-6), Unroll()),
])
def test_strict_dtype_promotion_and_rank_promotion_raise_are_supported(solver, grad):
    """Users who run JAX with jax_numpy_dtype_promotion='strict' and rank_promotion='raise'
    get the same gradient as under the standard rules (bf16 and float32 states, batched)."""
    W = 0.5 * jnp.eye(4) + 0.05
    x = jnp.stack([jnp.linspace(-1.0, 1.0, 4)] * 3)

    def loss(W, dtype):
        z, _ = fixed_point_layer(lambda W, z, x: jnp.tanh(z @ W.T + x), W.astype(dtype),
                                 jnp.zeros((3, 4), dtype), x.astype(dtype), solver=solver,
                                 grad=grad, batch_axis=0, probe=jnp.zeros((3, 3)))
        return jnp.sum(z.astype(jnp.float32))

    for dtype in (jnp.float32, jnp.bfloat16):
        expected = jax.grad(loss)(W, dtype)
        with jax.numpy_dtype_promotion("strict"), jax.numpy_rank_promotion("raise"):
            got = jax.grad(loss)(W, dtype)
        np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_complex_states_are_refused_with_one_message():
    with pytest.raises(ValueError, match="complex states are not supported"):
        fixed_point_layer(lambda p, z, x: 0.5 * z + x, 0.0, jnp.zeros(3, jnp.complex64),
                          jnp.ones(3, jnp.complex64))
