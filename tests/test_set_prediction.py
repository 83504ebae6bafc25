"""Set predictor: shapes, Hungarian loss invariance, gradients, training, layouts, AP plumbing."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fixed_slots import models
from fixed_slots.train.trainer import check_config
from fixed_slots.data.sources import CLEVR_TARGET_LAYOUT
from fixed_slots.data.synthetic import SYNTHETIC_TARGET_LAYOUT, properties_to_target
from fixed_slots.eval.evaluator import ap_layout
from fixed_slots.eval.metrics import PropertyLayout, average_precisions
from fixed_slots.models import set_prediction
from fixed_slots.models.losses import hungarian_huber_loss
from helpers import adam_losses, load_config, synthetic_scenes


def make(grad="neumann1"):
    config = load_config("set_prediction_synthetic:tiny")
    config.grad = grad
    return models.create(config, rngs=nnx.Rngs(0)), config


def synthetic_batch(config, n=4):
    image, raw = synthetic_scenes(config, n)
    return {"image": image, "target": jnp.asarray(properties_to_target(raw))}


def total(module):
    return sum(float(jnp.abs(x).sum()) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def test_forward_shapes_loss_and_permutation_invariance():
    model, config = make()
    batch = synthetic_batch(config)
    s, k, d = config.slot_attention.num_slots, config.data.max_objects, SYNTHETIC_TARGET_LAYOUT.dim
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda b: nnx.merge(graphdef, state)(b, jax.random.key(0), jnp.int32(0)))
    out = forward(batch)
    assert set(out.metrics) == {"loss", "slot_residual"}
    pred = out.outputs["prediction"]
    assert pred.shape == (4, s, d) and out.outputs["target"].shape == (4, s, d)
    assert float(pred.min()) > 0 and float(pred.max()) < 1  # sigmoid on every entry
    # Targets are zero-padded to one row per slot; the loss is the metrics module's.
    np.testing.assert_array_equal(out.outputs["target"][:, k:], 0.0)
    np.testing.assert_allclose(out.loss, hungarian_huber_loss(pred, out.outputs["target"]),
                               rtol=1e-6)
    # Permuting the objects of each image leaves the matched loss unchanged.
    perm = jnp.asarray(np.random.default_rng(0).permutation(k))
    permuted = dict(batch, target=batch["target"][:, perm])
    out_p = forward(permuted)
    np.testing.assert_allclose(out_p.loss, out.loss, rtol=1e-6)
    assert not np.allclose(permuted["target"], batch["target"])


@pytest.mark.parametrize("grad", ["unroll", "implicit"])  # all modes: test_slot_autoencoder
def test_loss_gradient_finite_and_reaches_cnn_through_slot_attention(grad):
    model, config = make(grad)
    batch = synthetic_batch(config)
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(p):
        return nnx.merge(graphdef, p)(batch, jax.random.key(1), jnp.int32(0)).loss

    g = nnx.merge(graphdef, jax.jit(jax.grad(loss))(params))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(nnx.state(g, nnx.Param)))
    assert total(g.encoder.cnn.convs[0]) > 0
    assert total(g.encoder.slot_attention.step) > 0
    assert total(g.head_out) > 0


def test_adam_steps_reduce_the_loss_on_a_fixed_batch():
    model, config = make()
    losses = adam_losses(model, synthetic_batch(config, n=8))
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.7 * losses[0], losses


def test_evaluate_batch_feeds_average_precision():
    model, config = make()
    batch = synthetic_batch(config)
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(batch, key):
        m = nnx.merge(graphdef, state)
        return m.evaluate_batch(batch, key), m.visualize(batch, key, jnp.int32(0)).masks

    ev, masks = run(batch, jax.random.key(0))
    s = config.slot_attention.num_slots
    assert ev.per_example["loss"].shape == (4,)
    assert ev.generated is None
    p = ev.set_predictions
    assert p.prediction_prob.shape == (4, s)
    np.testing.assert_array_equal(p.target_visible, p.target[..., -1])
    layout = ap_layout(config)
    assert layout.position_scale == 6.0
    aps = average_precisions(p.prediction, p.prediction_prob, p.target, p.target_visible, layout)
    assert set(aps) == {"ap_inf", "ap_1", "ap_0.5", "ap_0.25", "ap_0.125"}
    assert all(0.0 <= v <= 1.0 for v in aps.values())
    # Perfect predictions (the targets, confident where visible) give AP 1 at every threshold.
    t = np.asarray(p.target)
    perfect = average_precisions(t, t[..., -1], t, t[..., -1], layout)
    assert all(v == pytest.approx(1.0) for v in perfect.values())
    assert masks.shape == (4, s, 16, 16)
    np.testing.assert_allclose(masks.sum(1), 1.0, rtol=1e-5)


def test_layouts_and_clear_errors():
    model, config = make()
    assert set_prediction.data_layout(config) == SYNTHETIC_TARGET_LAYOUT
    clevr = PropertyLayout.from_target_layout(CLEVR_TARGET_LAYOUT)
    assert clevr.position_dims == 3 and clevr.dim == CLEVR_TARGET_LAYOUT.dim - 1
    assert [n for n, _ in clevr.categorical_groups] == ["shape", "color", "size", "material"]
    # The data declares its target layout; a dataset without object properties is refused.
    other = load_config("set_prediction_synthetic:tiny")
    other.data.name = "clevr_with_masks"
    assert set_prediction.data_layout(other) == CLEVR_TARGET_LAYOUT
    other.data.name = "coco"
    with pytest.raises(ValueError, match="a dataset with per-object properties"):
        models.create(other, rngs=nnx.Rngs(0))
    batch = synthetic_batch(load_config("set_prediction_synthetic:tiny"))
    with pytest.raises(ValueError, match=r"expects images \[batch, 16, 16, 3\]"):
        model(dict(batch, image=jnp.zeros((4, 32, 32, 3))), jax.random.key(0), jnp.int32(0))
    with pytest.raises(ValueError, match=r"batch\['target'\] \[batch, objects, 18\]"):
        model(dict(batch, target=batch["target"][..., :-1]), jax.random.key(0), jnp.int32(0))
    with pytest.raises(ValueError, match="only 4 slots"):
        model(dict(batch, target=jnp.zeros((4, 6, 18))), jax.random.key(0), jnp.int32(0))


@pytest.mark.parametrize("name", ["set_prediction_synthetic", "set_prediction_clevr",
                                  "set_prediction_synthetic:tiny"])
def test_configs_validate_and_build(name):
    config = load_config(name)
    check_config(config)
    assert config.model.name == "set_prediction"
    model = nnx.eval_shape(lambda: models.create(config, rngs=nnx.Rngs(0)))
    assert model.layout.dim == set_prediction.data_layout(config).dim
    if name == "set_prediction_clevr":
        assert model.feature_resolution == (32, 32)
        assert (config.slot_attention.num_slots, model.layout.dim) == (10, 19)
