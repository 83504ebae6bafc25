"""The paper's update count and gradients, against references written in plain JAX.

Chang et al. (2022), Algorithm 1 / Fig. 2: the implicit model runs T slot updates without gradient
and then one more with it (T + 1 updates); vanilla runs T updates with gradient. Fig. 11's order K
backpropagates through the last K updates after the T without gradient. The references below are
plain Python loops over the module's own step (no fixed_point_layer), so a wrong iteration count,
a wrong point of differentiation or a gradient leaking from the no-gradient phase shows up here.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fixed_slots import models
from fixed_slots.fixed_point import FixedPointInfo, Neumann, parse_grad_mode
from fixed_slots.modules.slot_attention import SlotAttention, torch_xavier_uniform_3d
from helpers import load_config

B, N, D_IN, S, D, T = 2, 10, 8, 3, 8, 3


def _keys_values(sa: SlotAttention, inputs):
    """k, v [B, N, H, d] exactly as Locatello et al. compute them, from the module's layers."""
    x = sa.norm_inputs(inputs)
    head = sa.slot_size // sa.num_heads
    k = sa.project_k(x).reshape(*x.shape[:2], sa.num_heads, head) * head ** -0.5
    v = sa.project_v(x).reshape(*x.shape[:2], sa.num_heads, head)
    return k, v


def reference_slots(sa: SlotAttention, inputs, slots0, mode: str, T: int):
    """(slots, attention) of the paper's procedure for `mode`, as plain loops."""
    k, v = _keys_values(sa, inputs)
    z, attn = slots0, None
    if mode == "unroll":
        for _ in range(T):
            z, attn = sa.step(z, k, v)
        return z, attn
    kind, order = ("neumann", int(mode[7:])) if mode.startswith("neumann") else (mode, 1)
    for _ in range(T):  # "with torch.no_grad(): for t in range(T): slots = step(slots)"
        z = jax.lax.stop_gradient(sa.step(z, k, v)[0])
    if kind == "neumann":
        for _ in range(order):  # backpropagate through the last K updates
            z, attn = sa.step(z, k, v)
        return z, attn
    raise ValueError(mode)


def _module(grad: str) -> SlotAttention:
    return SlotAttention(D_IN, D, 2 * D, num_slots=S, num_iterations=T, grad=grad,
                         rngs=nnx.Rngs(0))


def _loss_and_grads(fn, module, inputs, weights):
    graphdef, state = nnx.split(module)

    def loss(state, x):
        slots, attn = fn(nnx.merge(graphdef, state), x)
        return jnp.sum(slots * weights) + jnp.sum(attn[..., :3])

    return jax.value_and_grad(loss, argnums=(0, 1))(state, inputs)


def _assert_trees_close(a, b, rtol=2e-5, atol=1e-6):
    """Leafwise closeness. atol is relative to the leaf's largest entry, floored at 1e-5 of the
    tree's largest (float32 round-off on gradients that are exactly zero in exact arithmetic,
    e.g. the LayerNorm bias before the slot queries: a shift shared by all slots)."""
    floor = 1e-5 * max(float(np.abs(np.asarray(y)).max()) for y in jax.tree.leaves(b))
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        leaf_max = float(np.abs(y).max()) if y.size else 0.0
        np.testing.assert_allclose(x, y, rtol=rtol, atol=max(atol * leaf_max, floor),
                                   err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("grad", ["unroll", "neumann1", "IN", "neumann2", "neumann3"])
def test_module_equals_plain_loops_forward_and_gradients(grad):
    x = jax.random.normal(jax.random.key(1), (B, N, D_IN))
    weights = jax.random.normal(jax.random.key(2), (B, S, D))
    module = _module(grad)
    slots0 = module.initial_slots(jax.random.key(3), B)
    ref_mode = "neumann1" if grad == "IN" else grad

    def ours(m, x):
        slots, attn, _ = m(x, None, slots_init=slots0)
        return slots, attn

    def reference(m, x):
        return reference_slots(m, x, slots0, ref_mode, T)

    (loss, grads) = _loss_and_grads(ours, module, x, weights)
    (ref_loss, ref_grads) = _loss_and_grads(reference, module, x, weights)
    # float32 round-off: neumann3 differs by 2.8e-6 on some CPUs (one more fusion of the same
    # sums); a wrong count of differentiated updates moves the loss by more than 1e-4.
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    _assert_trees_close(grads, ref_grads, atol=1e-5)


def test_update_counts_of_the_modes():
    def updates(name):  # the solver's evaluations, plus Neumann's differentiated updates
        options = parse_grad_mode(name).layer_options(7)
        extra = options["grad"].order if isinstance(options["grad"], Neumann) else 0
        return options["solver"].max_iter + extra

    counts = {name: updates(name) for name in ("unroll", "neumann1", "IN", "IB", "BN", "BB",
                                                "implicit", "neumann3", "series3")}
    assert counts == {"unroll": 7, "neumann1": 8, "IN": 8, "IB": 8, "BN": 8, "BB": 8,
                      "implicit": 8, "neumann3": 10, "series3": 8}


def test_neumann1_forward_is_T_plus_one_updates_and_unroll_T():
    x = jax.random.normal(jax.random.key(1), (B, N, D_IN))
    implicit, vanilla = _module("neumann1"), _module("unroll")
    slots0 = implicit.initial_slots(jax.random.key(3), B)
    k, v = _keys_values(implicit, x)
    z = slots0
    steps = []
    for _ in range(T + 1):
        z, _ = implicit.step(z, k, v)
        steps.append(z)
    np.testing.assert_allclose(implicit(x, None, slots_init=slots0)[0], steps[T], rtol=1e-5,
                               atol=1e-5)
    # float32 round-off of compiled loops against eager steps (1.5e-6 on this CPU); one update
    # more or fewer moves the slots by far more
    np.testing.assert_allclose(vanilla(x, None, slots_init=slots0)[0], steps[T - 1], rtol=1e-5,
                               atol=1e-5)
    assert np.abs(np.asarray(vanilla(x, None, slots_init=slots0)[0] - steps[T])).max() > 1e-3


def _dense_step_jacobian(sa, k, v, z):
    """J[b] = d step(z)[b] / d z[b] as [B, S*D, S*D] (examples are independent)."""
    def one(zb, kb, vb):
        return sa.step(zb[None], kb[None], vb[None])[0][0].reshape(-1)

    jac = jax.vmap(jax.jacobian(lambda zb, kb, vb: one(zb.reshape(S, D), kb, vb)))
    return jac(z.reshape(B, -1), k, v)


@pytest.mark.parametrize("grad", ["series2", "series4", "implicit", "IB"])
def test_series_and_implicit_adjoints_at_z_T_against_dense_references(grad):
    """seriesK: u = g (I + J + ... + J^(K-1)); implicit/IB: u = g (I - J)^-1, J taken at z_T (the
    input of the one differentiated update after T without gradient).

    The step's weights are shrunk so that the step is a contraction at z_T (spectral radius
    < 1, checked): at this initialisation it is ~1.6, where no iterative adjoint converges."""
    x = jax.random.normal(jax.random.key(1), (B, N, D_IN))
    weights = jax.random.normal(jax.random.key(2), (B, S, D))
    implicit = not grad.startswith("series")
    module = SlotAttention(D_IN, D, 2 * D, num_slots=S, num_iterations=T, grad=grad,
                           fixed_point_options={"adjoint_max_iter": 300} if implicit else None,
                           rngs=nnx.Rngs(0))
    for param in jax.tree.leaves(nnx.state(module.step, nnx.Param),
                                 is_leaf=lambda x: isinstance(x, nnx.Variable)):
        param[...] = 0.3 * param[...]
    slots0 = module.initial_slots(jax.random.key(3), B)
    graphdef, state = nnx.split(module)

    def ours(state):
        slots, _, _ = nnx.merge(graphdef, state)(x, None, slots_init=slots0)
        return jnp.sum(slots * weights)

    grads = jax.grad(ours)(state)

    def reference(state):
        sa = nnx.merge(graphdef, state)
        k, v = _keys_values(sa, x)
        z = slots0
        for _ in range(T):
            z = sa.step(z, k, v)[0]
        z_T = jax.lax.stop_gradient(z)
        jac = jax.lax.stop_gradient(_dense_step_jacobian(sa, k, v, z_T))  # [B, SD, SD]
        g = weights.reshape(B, -1)
        if not implicit:
            u, term = g, g
            for _ in range(int(grad[6:]) - 1):
                term = jnp.einsum("bi,bij->bj", term, jac)
                u = u + term
        else:
            eye = jnp.eye(S * D)
            assert float(jnp.max(jnp.abs(jnp.linalg.eigvals(jac)))) < 0.95  # the precondition
            u = jnp.linalg.solve(jnp.swapaxes(eye - jac, 1, 2), g[..., None])[..., 0]
        # Gradient through the one differentiated update, with cotangent u, z_T held fixed.
        return jnp.sum(sa.step(z_T, k, v)[0] * jax.lax.stop_gradient(u).reshape(B, S, D))

    ref_grads = jax.grad(reference)(state)
    _assert_trees_close(grads, ref_grads, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("grad", ["neumann1", "unroll", "neumann2"])
def test_full_slate_loss_matches_plain_loop_reference(grad, monkeypatch):
    """SLATE's whole loss and every parameter gradient with slot attention replaced by the loop."""
    config = load_config("default:tiny")
    config.grad = grad
    model = models.create(config, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    batch = {"image": jax.random.uniform(jax.random.key(0), (2, 16, 16, 3))}
    key, step = jax.random.key(1), jnp.int32(3)
    T_cfg = config.slot_attention.num_iterations

    def loss(p):
        out = nnx.merge(graphdef, p)(batch, key, step, train=True)
        return out.loss, out.metrics

    (ours, _), grads = jax.value_and_grad(loss, has_aux=True)(params)

    def reference_call(self, inputs, key, *, train=True, num_slots=None, num_iterations=None,
                       slots_init=None, adjoint_probe=None):
        slots0 = self.initial_slots(key, inputs.shape[0], num_slots)
        slots, attn = reference_slots(self, inputs, slots0, grad, T_cfg)
        zero = jnp.zeros((inputs.shape[0],))  # SLATE logs info.final_residual as a metric
        return slots, attn, FixedPointInfo(zero[:, None], zero.astype(jnp.int32), zero)

    monkeypatch.setattr(SlotAttention, "__call__", reference_call)
    (ref, _), ref_grads = jax.value_and_grad(loss, has_aux=True)(params)
    np.testing.assert_allclose(ours, ref, rtol=1e-6)
    _assert_trees_close(grads, ref_grads, rtol=1e-4, atol=1e-7)


def test_slot_initialisation_bound_matches_torch_xavier_on_1x1xD():
    """torch.nn.init.xavier_uniform_ on (1, 1, D): fan_in = fan_out = D, bound sqrt(3 / D)."""
    size = 192
    bound = (3.0 / size) ** 0.5
    sa = SlotAttention(size, size, size, num_slots=7, num_iterations=1, rngs=nnx.Rngs(0))
    for param in (sa.slots_mu, sa.slots_log_sigma):
        values = np.asarray(param[...])
        assert values.shape == (1, 1, size)
        assert np.abs(values).max() <= bound
        assert np.abs(values).max() > 0.9 * bound  # uses the whole range, not a narrower one
    many = np.asarray(torch_xavier_uniform_3d(jax.random.key(0), (1, 1, 100_000)))
    # U(-b, b) has standard deviation b / sqrt(3) = 1 / sqrt(D) for D = 100_000.
    np.testing.assert_allclose(many.std(), (1.0 / 100_000) ** 0.5, rtol=0.02)
    flax_bound = (6.0 / (1 + size)) ** 0.5  # what flax's xavier_uniform gives on this shape
    assert flax_bound > 1.35 * bound
