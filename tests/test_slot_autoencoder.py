"""Slot-attention autoencoder: shapes, alpha masks, gradients under grad modes, ARI, training."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fixed_slots import models
from fixed_slots.train.trainer import check_config
from helpers import adam_losses, load_config, synthetic_scenes

GRAD_MODES = ["unroll", "neumann1", "implicit", "BB"]


def make(grad="neumann1"):
    config = load_config("slot_autoencoder_synthetic:tiny")
    config.grad = grad
    return models.create(config, rngs=nnx.Rngs(0)), config


def synthetic_batch(config, n=4):
    image, raw = synthetic_scenes(config, n)
    return {"image": image, "mask": jnp.asarray(raw["mask"], jnp.int32)}


def total(module):
    return sum(float(jnp.abs(x).sum()) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def test_forward_shapes_and_alpha_masks_sum_to_one():
    model, config = make()
    batch = synthetic_batch(config)
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, batch, key):  # one compilation for every entry point
        m = nnx.merge(graphdef, state)
        return (m(batch, key, jnp.int32(0)), m({"image": batch["image"]}, key, jnp.int32(0)),
                m.evaluation_pictures(batch, key), m.visualize(batch, key, jnp.int32(0)),
                m.encode_slots(batch["image"], key), m.evaluate_batch(batch, key))

    out, no_mask, arrays, vis, enc, ev = run(state, batch, jax.random.key(0))
    s, h = config.slot_attention.num_slots, config.data.image_size
    assert out.outputs["recon"].shape == (4, h, h, 3)
    assert out.outputs["recons"].shape == (4, s, h, h, 3)
    assert out.outputs["masks"].shape == (4, s, h, h)
    np.testing.assert_allclose(out.outputs["masks"].sum(1), 1.0, rtol=1e-5)
    assert set(out.metrics) == {"loss", "mse", "slot_residual", "ari", "fg_ari"}
    assert all(m.shape == () for m in out.metrics.values())
    np.testing.assert_allclose(out.metrics["mse"], out.metrics["loss"] / 4, rtol=1e-6)
    for name in ("ari", "fg_ari"):
        assert -1.0 <= float(out.metrics[name]) <= 1.0
    assert "ari" not in no_mask.metrics  # no masks in the batch, no segmentation metric

    assert arrays.per_slot.shape == (4, s, h, h, 3)
    assert arrays.slot_deletion.shape == (4, s, h, h, 3)
    assert vis.slot_deletion is None and vis.dvae_recon is None
    np.testing.assert_allclose(vis.recon, arrays.recon, atol=1e-6)
    np.testing.assert_allclose(vis.per_slot, arrays.per_slot, atol=1e-6)
    assert enc.slots.shape == (4, s, config.slot_attention.slot_size)
    assert enc.attention.shape == (4, s, h * h)
    assert enc.sa_inputs.shape[:2] == (4, h * h) and enc.tokens is None
    assert {k: v.shape for k, v in ev.per_example.items()} == {
        "mse_recon": (4,), "slot_residual": (4,), "ari": (4,), "fg_ari": (4,)}


@pytest.mark.parametrize("grad", GRAD_MODES)
def test_loss_gradient_finite_and_reaches_cnn_through_slot_attention(grad):
    model, config = make(grad)
    batch = {"image": synthetic_batch(config)["image"]}
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(p):
        return nnx.merge(graphdef, p)(batch, jax.random.key(1), jnp.int32(0)).loss

    g = nnx.merge(graphdef, jax.jit(jax.grad(loss))(params))
    leaves = jax.tree.leaves(nnx.state(g, nnx.Param))
    assert all(np.isfinite(np.asarray(x)).all() for x in leaves)
    # The CNN is reached only through slot attention (the decoder sees nothing but slots).
    assert total(g.encoder.cnn.convs[0]) > 0
    assert total(g.encoder.slot_attention.project_k) > 0
    assert total(g.encoder.slot_attention.step) > 0


def test_adam_steps_reduce_the_loss_on_a_fixed_batch():
    model, config = make()
    losses = adam_losses(model, {"image": synthetic_batch(config, n=8)["image"]})
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.7 * losses[0], losses


def test_bad_image_size_and_decoder_config_are_clear_errors():
    model, config = make()
    with pytest.raises(ValueError, match=r"\[batch, 16, 16, 3\].*got \(2, 32, 32, 3\)"):
        model({"image": jnp.zeros((2, 32, 32, 3))}, jax.random.key(0), jnp.int32(0))
    with pytest.raises(ValueError, match="image_size=16"):
        model.encode_slots(jnp.zeros((2, 16, 16)), jax.random.key(0))
    config.autoencoder.broadcast_size = 4
    with pytest.raises(ValueError, match="broadcast_size=4"):
        models.create(config, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("name", ["slot_autoencoder_synthetic", "slot_autoencoder_clevr",
                                  "slot_autoencoder_synthetic:tiny"])
def test_configs_validate_and_build(name):
    config = load_config(name)
    check_config(config)
    assert config.model.name == "slot_autoencoder"
    model = nnx.eval_shape(lambda: models.create(config, rngs=nnx.Rngs(0)))
    h = config.data.image_size
    assert model.decoder.resolution == (h, h)
    if name == "slot_autoencoder_clevr":
        assert (h, config.slot_attention.num_slots, config.data.crop) == (128, 7, "clevr")
        assert config.data.name == "clevr_with_masks"


@pytest.mark.parametrize("name", ["default:tiny", "slot_autoencoder_synthetic:tiny",
                                  "set_prediction_synthetic:tiny"])
def test_every_model_follows_the_contract(name):
    from fixed_slots.fixed_point import FixedPointInfo
    from fixed_slots.models.common import slot_jacobian_spectral_norm
    from fixed_slots.models.protocol import EvalBatch, Pictures, SlotEncoding, SlotModel

    config = load_config(name)
    model = nnx.eval_shape(lambda: models.create(config, rngs=nnx.Rngs(0)))
    assert isinstance(model, SlotModel)
    h, s = config.data.image_size, config.slot_attention.num_slots
    image = jnp.zeros((2, h, h, 3))
    key = jax.random.key(0)
    graphdef, state = nnx.split(model)

    def run(fn):  # shapes only: fn(model) traced, nothing computed
        return jax.eval_shape(lambda st: fn(nnx.merge(graphdef, st)), state)

    enc = run(lambda m: m.encode_slots(image, key))
    assert isinstance(enc, SlotEncoding) and isinstance(enc.info, FixedPointInfo)
    assert enc.slots.shape == (2, s, config.slot_attention.slot_size)
    assert (enc.tokens is not None) == (name == "default:tiny")
    assert run(lambda m: slot_jacobian_spectral_norm(m, m.encode_slots(image, key), key)
               ).shape == (2,)
    assert isinstance(run(lambda m: m.visualize({"image": image}, key, jnp.int32(0))), Pictures)
    batch = {"image": image}
    if name == "set_prediction_synthetic:tiny":
        batch["target"] = jnp.zeros((2, s, model.layout.dim))
    assert isinstance(run(lambda m: m.evaluate_batch(batch, key)), EvalBatch)
    pictures = run(lambda m: m.evaluation_pictures(batch, key))
    assert pictures.masks.shape == (2, s, h, h)
    assert (pictures.slot_deletion is None) == (name == "set_prediction_synthetic:tiny")


def test_jacobian_norm_through_the_models_fixed_point_step():
    """`model.fixed_point_step` is the step the encoder iterates, and the power iteration on it
    equals the largest singular value of the dense Jacobian of one update (per example)."""
    from fixed_slots.models.common import slot_jacobian_spectral_norm

    model, config = make()
    image = synthetic_batch(config, n=2)["image"]
    key = jax.random.key(3)
    graphdef, state = nnx.split(model)

    @jax.jit
    def norms_and_jacobians(state):
        model = nnx.merge(graphdef, state)
        enc = model.encode_slots(image, key)
        norms = slot_jacobian_spectral_norm(model, enc, key, num_iters=200)
        f, params, args = model.fixed_point_step(enc.sa_inputs)
        slots = enc.slots

        def update(z, b):  # example b's update as a function of its own slots, flattened
            new, _ = f(params, slots.at[b].set(z.reshape(slots.shape[1:])), *args)
            return new[b].ravel()

        # The step is the model's own: iterated from the initial slots T + 1 times (neumann1:
        # T updates, then the one a gradient would go through), it gives the encoding.
        z = model.encoder.slot_attention.initial_slots(key, image.shape[0])
        for _ in range(config.slot_attention.num_iterations + 1):
            z, attention = f(params, z, *args)
        replayed = (z, attention, enc.slots, enc.attention)
        return norms, [jax.jacfwd(update)(slots[b].ravel(), b) for b in range(2)], replayed

    norms, jacobians, (z, attention, slots, enc_attention) = norms_and_jacobians(state)
    np.testing.assert_allclose(z, slots, atol=1e-6)
    np.testing.assert_allclose(attention, enc_attention, atol=1e-6)
    for b in range(2):
        np.testing.assert_allclose(norms[b], np.linalg.norm(np.asarray(jacobians[b]), 2),
                                   rtol=1e-3)
