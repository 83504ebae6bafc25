"""The official SLATE learning-rate decay (validation plateau), against the official loop."""
import math

import numpy as np
import pytest

from fixed_slots.train.plateau import ValidationPlateau
from fixed_slots.train.trainer import train_and_evaluate
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
    return config


def test_resumed_run_continues_the_same_schedule(tmp_path):
    full = train_and_evaluate(_config(5), str(tmp_path / "full"))
    first = train_and_evaluate(_config(3), str(tmp_path / "split"))
    second = train_and_evaluate(_config(5), str(tmp_path / "split"),
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
