"""The official SLATE learning-rate decay (validation plateau), against the official loop."""
import math

import numpy as np
import pytest

from fixed_slots.train.plateau import ValidationPlateau
from fixed_slots.train.trainer import train
from helpers import load_config


def official_decay_factors(val_losses, patience=4):
    """singhgautam/slate train.py's bookkeeping, transcribed: the factor after each epoch."""
    best_val_loss, stagnation_counter, lr_decay_factor = math.inf, 0, 1.0
    factors = []
    for val_loss in val_losses:
        if val_loss < best_val_loss:
            stagnation_counter = 0
            best_val_loss = val_loss
        else:
            stagnation_counter += 1
            if stagnation_counter >= patience:
                lr_decay_factor = lr_decay_factor / 2.0
                stagnation_counter = 0
        factors.append(lr_decay_factor)
    return factors


@pytest.mark.parametrize("seed", range(5))
def test_matches_the_official_bookkeeping_on_random_sequences(seed):
    rng = np.random.default_rng(seed)
    # Ties included: an equal loss is not an improvement.
    losses = np.round(np.cumsum(rng.normal(-0.05, 1.0, 60)), 0).tolist()
    rule = ValidationPlateau(patience=4, factor=0.5)
    ours = []
    for loss in losses:
        rule.update(loss)
        ours.append(rule.scale)
    assert ours == official_decay_factors(losses)


def test_state_round_trips_through_json_record():
    rule = ValidationPlateau(patience=3, factor=0.5)
    for loss in (5.0, 6.0, 6.0):
        rule.update(loss)
    restored = ValidationPlateau.from_dict(rule.to_dict(), patience=3, factor=0.5)
    assert restored == rule
    assert ValidationPlateau.from_dict(ValidationPlateau().to_dict(), 4, 0.5).best == math.inf


def _config(steps):
    config = load_config("default:tiny")
    config.optim.decay = "validation_plateau"
    config.optim.validation_every_steps = 1
    config.optim.plateau_patience = 1  # every non-improvement halves: the scale moves often
    config.train.log_every_steps = 1
    config.train.image_every_steps = 0
    config.train.jacobian_every_steps = 0
    config.train.num_steps = steps
    config.train.evaluate_at_end = False
    return config


def test_resumed_run_continues_the_same_schedule(tmp_path):
    full = train(_config(5), str(tmp_path / "full"))
    first = train(_config(3), str(tmp_path / "split"))
    second = train(_config(5), str(tmp_path / "split"),
                                accept_config_change=["train.num_steps"])
    split = first + second
    for key in ("loss", "learning_rate/main", "learning_rate/dvae"):
        np.testing.assert_allclose([h[key] for h in split], [h[key] for h in full], rtol=1e-6,
                                   err_msg=key)
    from fixed_slots.experiments.events import read_scalars

    scalars = read_scalars(str(tmp_path / "full"))
    assert [s for s, _ in scalars["validation/loss"]] == [1, 2, 3, 4, 5]
    scale = [v for _, v in scalars["learning_rate/scale"]]
    assert all(b in (a, a / 2) for a, b in zip([1.0] + scale, scale))
    # The rate logged at a step is the one its update used: the scale set by the validation
    # after the previous step.
    dvae_lr = _config(5).optim.dvae_lr  # never warmed up
    assert full[-1]["learning_rate/dvae"] == pytest.approx(dvae_lr * scale[-2])


def test_validation_loss_is_the_deterministic_eval_mode_pass_averaged_over_batches():
    """What the decay reads, against the same pass written out by hand: the model in eval mode
    (no dropout) on each validation batch with the validation stream's keys, averaged. With
    dropout on (train=True), or another key, or a batch left out, the numbers differ."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from fixed_slots import models, sharding
    from fixed_slots.data.pipeline import make_loader
    from fixed_slots.train.trainer import Stream, _Validation

    config = _config(2)
    config.train.num_devices = 1
    config.optim.validation_batches = 2
    assert config.slate.dropout > 0  # a pass with dropout on would not be deterministic
    mesh = sharding.make_mesh(1)
    graphdef, params = models.split_params(models.create(config, rngs=nnx.Rngs(3)))
    base_key, step = jax.random.key(7), 5
    ours = _Validation(config, graphdef, mesh).run(params, base_key, step)

    key = jax.random.fold_in(jax.random.fold_in(base_key, step), Stream.VALIDATION)
    loader = make_loader(config, "validation", global_batch_size=config.eval.batch_size,
                         seed=config.seed, num_epochs=1, shuffle=False)
    by_hand = []
    for index, batch in zip(range(2), loader):
        model = nnx.merge(graphdef, params)
        out = model({k: jnp.asarray(v) for k, v in batch.items()}, jax.random.fold_in(key, index),
                    jnp.int32(step), train=False)
        by_hand.append({name: float(out.metrics[name]) for name in ("loss", "dvae_mse",
                                                                     "cross_entropy")})
    for name in ("loss", "dvae_mse", "cross_entropy"):
        expected = np.mean([values[name] for values in by_hand])
        assert ours[f"validation/{name}"] == pytest.approx(expected, rel=1e-5), name
