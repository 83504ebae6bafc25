"""fixed_point_layer under JAX transformations: shard_map, higher-order AD, checkpointed unroll.

References: the unsharded call, autodiff of a long unrolled solve, and a Python loop with
stop_gradient (the definition of the first-order estimator).
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

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
)
from fixed_point_problems import N, tanh_map as f, tanh_problem

WEIGHTS = jnp.linspace(-1.0, 2.0, N)


# --------------------------------------------------------------------------- shard_map

CASES = [
    (Iterate(12), Unroll()),
    (Iterate(12), Series(2)),
    (Iterate(12), Neumann(2)),
    (Iterate(12), Implicit(Iterate(12))),
    (Anderson(12, tol=1e-5, memory=3), Implicit(Anderson(12, tol=1e-6, memory=3))),
    (Broyden(12, tol=1e-5, memory=4), Implicit(Broyden(12, memory=4))),
    (Iterate(12, damping=0.8), Implicit(GMRES(max_iter=2, tol=1e-6))),
]


@pytest.mark.parametrize("solver,grad", CASES, ids=lambda o: type(o).__name__)
def test_shard_map_with_default_check_vma_matches_the_unsharded_call(solver, grad):
    assert len(jax.devices()) == 8
    mesh = jax.make_mesh((8,), ("data",))
    params, _ = tanh_problem()
    xs = jax.random.normal(jax.random.key(1), (16, N))
    kw = dict(solver=solver, grad=grad, batch_axis=0)

    def local(params, x, probe):  # per-device rows; probe [rows, 3]
        z, info = fixed_point_layer(f, params, jnp.zeros_like(x), x, probe=probe, **kw)
        return z, info.final_residual

    def loss(params, x, probe, fn):
        z, residual = fn(params, x, probe)
        return jnp.sum(z * WEIGHTS) + 0.0 * jnp.sum(residual)

    sharded = jax.shard_map(local, mesh=mesh, in_specs=(P(), P("data"), P("data")),
                            out_specs=(P("data"), P("data")))  # check_vma=True (the default)
    rows = NamedSharding(mesh, P("data"))
    grad_fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 2)), static_argnums=3)
    v_s, (g_s, probe_s) = grad_fn(params, jax.device_put(xs, rows),
                                  jax.device_put(jnp.zeros((16, 3)), rows), sharded)
    v_u, (g_u, probe_u) = grad_fn(params, xs, jnp.zeros((16, 3)), local)
    np.testing.assert_allclose(v_s, v_u, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_s), jax.tree.leaves(g_u)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(probe_s[:, 1], probe_u[:, 1])  # same adjoint steps per row
    np.testing.assert_allclose(probe_s[:, 0], probe_u[:, 0], rtol=1e-3, atol=1e-6)


# --------------------------------------------------------------------------- higher order

def _loss(params, x, solver, grad):
    z, _ = fixed_point_layer(f, params, jnp.zeros(N, x.dtype), x, solver=solver, grad=grad)
    return jnp.dot(WEIGHTS.astype(x.dtype), z) + 0.3 * jnp.sum(z ** 2)


def _penalty(params, x, solver, grad):
    """A gradient penalty ||dL/dx||^2: its gradient is reverse-over-reverse through the layer."""
    return jnp.sum(jax.grad(_loss, argnums=1)(params, x, solver, grad) ** 2)


EXACT = [Implicit(Iterate(90)), Implicit(GMRES(max_iter=3, tol=1e-12)),
         Implicit(Anderson(60, tol=1e-13)), Series(70)]


@pytest.mark.parametrize("grad", EXACT, ids=lambda g: repr(g)[:40])
def test_reverse_over_reverse_matches_autodiff_of_a_long_unroll(grad):
    with jax.enable_x64(True):
        params, x = tanh_problem(jnp.float64)
        solver = Iterate(90)
        penalty = jax.jit(jax.value_and_grad(_penalty, argnums=(0, 1)), static_argnums=(2, 3))
        value, got = penalty(params, x, solver, grad)
        value_ref, ref = penalty(params, x, solver, Unroll())
        np.testing.assert_allclose(value, value_ref, rtol=1e-9)
        assert float(jnp.abs(ref[0]["W"]).max()) > 1e-3  # a non-trivial second derivative
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
            np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("grad", EXACT[:1] + EXACT[-1:], ids=["implicit", "series"])
def test_forward_over_reverse_matches_autodiff_of_a_long_unroll(grad):
    with jax.enable_x64(True):
        params, x = tanh_problem(jnp.float64)
        solver = Iterate(90)

        def hvp(grad):  # Hessian-vector product of the loss w.r.t. x
            return jax.jvp(lambda xx: jax.grad(_loss, argnums=1)(params, xx, solver, grad),
                           (x,), (WEIGHTS.astype(jnp.float64),))[1]

        np.testing.assert_allclose(hvp(grad), hvp(Unroll()), rtol=1e-8, atol=1e-11)


def test_first_order_series_is_stop_gradient_at_every_order():
    """Series(1) is f(stop_gradient(z)): its second derivative treats z as a constant too."""
    with jax.enable_x64(True):
        params, x = tanh_problem(jnp.float64)
        T = 6

        def reference_loss(params, x):
            z = jnp.zeros(N)
            for _ in range(T - 1):
                z = f(params, z, x)
            z = f(params, jax.lax.stop_gradient(z), x)
            return jnp.dot(WEIGHTS, z) + 0.3 * jnp.sum(z ** 2)

        def reference(params, x):
            return jnp.sum(jax.grad(reference_loss, argnums=1)(params, x) ** 2)

        got = jax.grad(_penalty, argnums=(0, 1))(params, x, Iterate(T), Series(1))
        ref = jax.grad(reference, argnums=(0, 1))(params, x)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)


def test_reverse_over_reverse_with_a_batch_axis_and_a_closure():
    with jax.enable_x64(True):
        params, _ = tanh_problem(jnp.float64)
        xs = jax.random.normal(jax.random.key(2), (3, N), jnp.float64)

        def penalty(W, b, xs, grad):
            def loss(xs):
                # W is closed over (closure conversion); b is an explicit parameter.
                z, _ = fixed_point_layer(lambda b, z, x: f({"W": W, "b": b}, z, x), b,
                                         jnp.zeros((3, N)), xs, solver=Iterate(90),
                                         grad=grad, batch_axis=0)
                return jnp.sum(z ** 2)
            return jnp.sum(jax.grad(loss)(xs) ** 2)

        g = jax.grad(penalty, argnums=(0, 1))
        got = g(params["W"], params["b"], xs, Implicit(Iterate(90)))
        ref = g(params["W"], params["b"], xs, Unroll())
        for a, b in zip(got, ref):
            np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-11)


# --------------------------------------------------------------------------- checkpointed unroll

def _attention_step(p, z, x):
    """A step whose internals ([batch, inputs, slots] attention) dwarf its state."""
    a = jax.nn.softmax(jnp.einsum("bnd,bsd->bns", x, z @ p), axis=-1)
    return jnp.tanh(jnp.einsum("bns,bnd->bsd", a, x) @ p.T + z)


@pytest.mark.parametrize("unrolled", [False, True])  # the checkpointed loop against either
def test_checkpointed_unroll_gives_the_same_gradient_with_less_memory(unrolled):
    # float64: the two compile to different fusions, float32 would differ by its round-off
    with jax.enable_x64(True):
        p = 0.1 * jax.random.normal(jax.random.key(0), (8, 8), jnp.float64)
        x = jax.random.normal(jax.random.key(1), (2, 64, 8), jnp.float64)
        z0 = jnp.zeros((2, 3, 8), jnp.float64)

        def loss(p, grad):
            z, _ = fixed_point_layer(_attention_step, p, z0, x, solver=Iterate(20),
                                     grad=grad, batch_axis=0)
            return jnp.sum(z ** 2)

        plain = jax.jit(jax.grad(loss), static_argnums=1)
        reference = Unroll(unrolled=unrolled)
        np.testing.assert_allclose(plain(p, Unroll(checkpoint=True)), plain(p, reference),
                                   rtol=1e-12, atol=1e-14)
        memory = {c: plain.lower(p, Unroll(checkpoint=True) if c else reference).compile()
                  .memory_analysis().temp_size_in_bytes for c in (False, True)}
    assert memory[True] < 0.5 * memory[False], memory


def _collectives_in_loops(hlo: str) -> int:
    """all-reduce ops inside the bodies of the compiled program's while loops."""
    bodies = set(re.findall(r"body=%?([\w.\-]+)", hlo))
    blocks = re.findall(r"\n%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}", hlo, re.S)
    return sum(body.count(" all-reduce(") for name, body in blocks if name in bodies)


@pytest.mark.parametrize("unrolled", [False, True])
def test_an_unrolled_loop_all_reduces_its_gradient_once_under_data_parallelism(unrolled):
    """Batch sharded over 8 devices: a rolled loop's backward all-reduces the gradient of f's
    parameters in every iteration; Unroll(unrolled=True) leaves it to the one combined
    all-reduce after the loop."""
    from jax.sharding import AxisType, NamedSharding

    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    p = 0.1 * jax.random.normal(jax.random.key(0), (8, 8))
    x = jax.random.normal(jax.random.key(1), (8, 16, 8))

    def loss(p, x):
        z, _ = fixed_point_layer(_attention_step, p, jnp.zeros((8, 3, 8)), x,
                                 solver=Iterate(5), grad=Unroll(unrolled=unrolled),
                                 batch_axis=0)
        return jnp.sum(z ** 2)

    grad = jax.jit(jax.grad(loss), in_shardings=(NamedSharding(mesh, P()),
                                                 NamedSharding(mesh, P("data"))))
    hlo = grad.lower(p, x).compile().as_text()
    assert " all-reduce(" in hlo
    assert (_collectives_in_loops(hlo) > 0) == (not unrolled)


def test_explicit_mesh_axes_are_refused_with_one_message_and_auto_axes_work():
    from jax.sharding import AxisType, NamedSharding
    if not hasattr(jax, "set_mesh"):
        pytest.skip("this jax has no Explicit sharding mode")
    params, _ = tanh_problem()
    xs = jax.random.normal(jax.random.key(1), (16, N))

    def run(x):
        return fixed_point_layer(f, params, jnp.zeros_like(x), x, solver=Anderson(10, tol=1e-5),
                                 grad=Implicit(), batch_axis=0)[0]

    explicit = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
    with jax.set_mesh(explicit):
        x = jax.device_put(xs, NamedSharding(explicit, P("data")))
        with pytest.raises(ValueError, match=r"Explicit mesh axes \['data'\]"):
            jax.jit(run)(x)
    auto = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    got = jax.jit(run)(jax.device_put(xs, NamedSharding(auto, P("data"))))
    np.testing.assert_allclose(got, run(xs), rtol=1e-5, atol=1e-6)
