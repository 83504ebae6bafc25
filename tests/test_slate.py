"""SLATE with implicit slot attention: gradients under every grad mode, dVAE isolation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fixed_slots import models
from helpers import load_config

GRAD_MODES = ["unroll", "neumann1", "neumann2", "implicit", "IN", "IB", "BN", "BB"]


def make(grad="neumann1"):
    config = load_config("default:tiny")
    config.grad = grad
    return models.create(config, rngs=nnx.Rngs(0)), config


def batch():
    return {"image": jax.random.uniform(jax.random.key(0), (2, 16, 16, 3))}


def split_grads(model, metric):
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(p):
        return nnx.merge(graphdef, p)(batch(), jax.random.key(1), jnp.int32(3)).metrics[metric]

    return nnx.merge(graphdef, jax.jit(jax.grad(loss))(params))


def total(module):
    return sum(float(jnp.abs(x).sum()) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


@pytest.mark.parametrize("grad", GRAD_MODES)
def test_loss_gradient_finite_and_reaches_encoder_through_slot_attention(grad):
    model, _ = make(grad)
    g = split_grads(model, "loss")
    leaves = jax.tree.leaves(nnx.state(g, nnx.Param))
    assert all(np.isfinite(np.asarray(x)).all() for x in leaves)
    # The pre-slot-attention MLP and the token embedding only get gradient through slot attention
    # (for the MLP) or through slot attention and the decoder (for the embedding).
    assert total(g.encoder.mlp_in) > 0
    assert total(g.encoder.slot_attention.project_k) > 0
    assert total(g.encoder.slot_attention.step) > 0
    assert total(g.dictionary) > 0


def test_cross_entropy_does_not_reach_the_dvae():
    model, _ = make()
    g = split_grads(model, "cross_entropy")
    assert total(g.dvae) == 0.0
    assert total(g.decoder) > 0
    g_mse = split_grads(model, "dvae_mse")
    assert total(g_mse.dvae) > 0 and total(g_mse.decoder) == 0.0


def test_bad_image_shape_is_a_clear_error():
    model, _ = make()
    with pytest.raises(ValueError, match=r"expects images \[batch, 16, 16, 3\].*got \(2, 16, 16\)"):
        model({"image": jnp.zeros((2, 16, 16))}, jax.random.key(0), jnp.int32(0))
    with pytest.raises(ValueError, match="image_size=16"):
        model({"image": jnp.zeros((2, 32, 32, 3))}, jax.random.key(0), jnp.int32(0))


def test_temperature_anneals_and_visualize_shapes():
    model, config = make()
    assert float(model.temperature(jnp.int32(0))) == pytest.approx(1.0)
    assert float(model.temperature(jnp.int32(config.slate.tau_steps))) == pytest.approx(0.1)
    pictures = model.visualize(batch(), jax.random.key(0), jnp.int32(0))
    assert pictures.recon.shape == pictures.dvae_recon.shape == (2, 16, 16, 3)
    assert pictures.masks.shape == (2, config.slot_attention.num_slots, 16, 16)
    assert pictures.per_slot is None and pictures.slot_deletion is None
    np.testing.assert_allclose(pictures.masks.sum(1), 1.0, rtol=1e-5)
