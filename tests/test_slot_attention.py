"""Slot attention as a fixed point: equivariance, forward identity across modes, gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fixed_slots.modules.slot_attention import GRUCell, SlotAttention

B, N, D_IN, S, D = 2, 12, 8, 4, 16
MODES = ["unroll", "neumann1", "neumann3", "implicit", "IN", "IB", "BN", "BB"]


def make(grad="neumann1", iters=3, **kw):
    return SlotAttention(D_IN, D, 2 * D, num_slots=S, num_iterations=iters, grad=grad,
                         rngs=nnx.Rngs(0), **kw)


def inputs(seed=1):
    return jax.random.normal(jax.random.key(seed), (B, N, D_IN))


def test_shapes_and_attention_normalised_over_slots():
    slots, attn, info = make()(inputs(), jax.random.key(2))
    assert slots.shape == (B, S, D) and attn.shape == (B, S, N)
    np.testing.assert_allclose(attn.sum(axis=1), 1.0, rtol=1e-5)
    assert info.residuals.shape == (B, 3)


def test_permutation_equivariance_over_slots_and_invariance_over_inputs():
    model = make()
    x = inputs()
    slots0 = model.initial_slots(jax.random.key(3), B)
    out, attn, _ = model(x, None, slots_init=slots0)
    perm_s = jnp.array([2, 0, 3, 1])
    out_p, attn_p, _ = model(x, None, slots_init=slots0[:, perm_s])
    np.testing.assert_allclose(out_p, out[:, perm_s], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(attn_p, attn[:, perm_s], rtol=1e-5, atol=1e-6)
    perm_n = jax.random.permutation(jax.random.key(4), N)
    out_n, attn_n, _ = model(x[:, perm_n], None, slots_init=slots0)
    np.testing.assert_allclose(out_n, out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(attn_n, attn[:, :, perm_n], rtol=1e-5, atol=1e-6)


def test_forward_of_neumann1_at_T_is_unroll_at_T_plus_one():
    """The paper's count: T updates without gradient + 1 with it (tests/test_paper_convention.py)."""
    x, key = inputs(), jax.random.key(2)
    a = make("unroll", iters=6)(x, key)
    b = make("neumann1", iters=5)(x, key)
    # The last update runs outside the solver's loop for neumann1: equal up to float32 round-off.
    np.testing.assert_allclose(a[0], b[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(a[1], b[1], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("grad", MODES)
def test_gradients_finite_and_reach_inputs_and_params(grad):
    model = make(grad, iters=4)
    graphdef, state = nnx.split(model)

    def loss(state, x):
        slots, _, _ = nnx.merge(graphdef, state)(x, jax.random.key(2))
        return jnp.sum(slots ** 2)

    g_state, g_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(state, inputs())
    leaves = jax.tree.leaves(g_state)
    assert all(np.isfinite(np.asarray(l)).all() for l in leaves)
    assert float(jnp.abs(g_x).sum()) > 0
    step_grads = nnx.split(nnx.merge(graphdef, g_state).step)[1]
    assert all(float(jnp.abs(l).sum()) > 0 for l in jax.tree.leaves(step_grads))
    # Slot initialisation parameters get gradients only when unrolling (z0 is irrelevant to z*).
    mu_grad = float(jnp.abs(nnx.merge(graphdef, g_state).slots_mu[...]).sum())
    assert (mu_grad > 0) == (grad == "unroll")


def test_eval_iterations_differ_from_train():
    model = make(iters=2, eval_num_iterations=6)
    _, _, info_train = model(inputs(), jax.random.key(0), train=True)
    _, _, info_eval = model(inputs(), jax.random.key(0), train=False)
    assert info_train.residuals.shape[-1] == 2 and info_eval.residuals.shape[-1] == 6


def test_gru_cell_matches_pytorch_equations():
    cell = GRUCell(3, 5, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (4, 3))
    h = jax.random.normal(jax.random.key(2), (4, 5))
    w_ih, w_hh = np.asarray(cell.w_ih[...]), np.asarray(cell.w_hh[...])
    sig = lambda a: 1 / (1 + np.exp(-a))
    r = sig(x @ w_ih[:, :5] + h @ w_hh[:, :5])
    z = sig(x @ w_ih[:, 5:10] + h @ w_hh[:, 5:10])
    n = np.tanh(x @ w_ih[:, 10:] + r * (h @ w_hh[:, 10:]))
    np.testing.assert_allclose(cell(x, h), (1 - z) * n + z * h, rtol=1e-5, atol=1e-6)


def test_multi_head_matches_official_joint_softmax_reference():
    """The official step with heads: softmax over (heads x slots) jointly, written in NumPy."""
    model = SlotAttention(D_IN, D, 2 * D, num_slots=S, num_iterations=1, num_heads=2,
                          grad="unroll", rngs=nnx.Rngs(0))
    x, slots0 = inputs(), model.initial_slots(jax.random.key(3), B)
    out, attn, _ = model(x, None, slots_init=slots0)
    f, params, (k, v) = model.step_function(x)
    step = model.step
    k, v = np.asarray(k), np.asarray(v)  # [B, N, H, d]
    q = np.asarray(step.project_q(step.norm_slots(slots0))).reshape(B, S, 2, -1)
    logits = np.einsum("bnhd,bshd->bnhs", k, q).reshape(B, N, 2 * S)
    a = np.exp(logits - logits.max(-1, keepdims=True))
    a = (a / a.sum(-1, keepdims=True)).reshape(B, N, 2, S)
    np.testing.assert_allclose(attn, a.sum(2).transpose(0, 2, 1), rtol=1e-5, atol=1e-6)
    a = a + 1e-8
    a = a / a.sum(1, keepdims=True)
    updates = np.einsum("bnhs,bnhd->bshd", a, v).reshape(B, S, D)
    expected = step.gru(jnp.asarray(updates).reshape(-1, D), slots0.reshape(-1, D)).reshape(B, S, D)
    expected = expected + step.mlp_out(jax.nn.relu(step.mlp_in(step.norm_mlp(expected))))
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
