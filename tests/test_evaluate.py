"""`--mode=eval` and reading a trained model: metrics.json and titled pictures from the latest
checkpoint with the config stored with the run, the params-only restore (no optimizer, nothing
written), clear errors otherwise."""
import json
import logging
import os
import shutil

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from PIL import Image

from fixed_slots import models, trained
from fixed_slots.errors import UserError, WorkdirError
from fixed_slots.train import checkpoint
from fixed_slots.train.checkpoint import CheckpointRestoreError, Checkpointer
from fixed_slots.train.optim import make_optimizer, param_labels
from fixed_slots.train.train_step import TrainState
from fixed_slots.train.trainer import train
from helpers import load_config

# A failed tensorstore read of a corrupt file can later call back into orbax's already-closed
# event loop ("Event loop is closed", reported during whichever test runs then): harmless.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def tiny():
    config = load_config("default:tiny")
    config.train.image_every_steps = 0
    config.train.jacobian_every_steps = 0
    config.train.num_steps = 2
    config.train.evaluate_at_end = False
    return config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A real tiny SLATE training run (2 steps, one checkpoint at step 2), not yet evaluated."""
    path = tmp_path_factory.mktemp("run")
    train(tiny(), str(path))
    return path


def listing(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_evaluate_writes_metrics_and_titled_pictures(workdir):
    config = tiny()
    metrics = trained.evaluate(str(workdir))  # the stored config: no config file needed
    with open(workdir / "eval" / "metrics.json") as f:
        on_disk = json.load(f)
    assert on_disk == metrics
    with open(workdir / "eval" / "per_image.json") as f:
        per_image = json.load(f)
    assert len(per_image["fg_ari"]) == metrics["num_images"]
    assert np.mean(per_image["fg_ari"]) == pytest.approx(metrics["fg_ari"], rel=1e-5)
    assert np.std(per_image["fg_ari"], ddof=1) == pytest.approx(metrics["fg_ari_std"], rel=1e-4)
    assert metrics["step"] == 2 and metrics["num_images"] == config.eval.batch_size
    # Sum over 16x16x3 pixel values in [0, 1]: between 0 and 768.
    assert 0 < metrics["mse_slot_recon"] < 16 * 16 * 3
    assert 0 < metrics["mse_dvae_recon"] < 16 * 16 * 3
    assert -1 <= metrics["ari"] <= 1 and -1 <= metrics["fg_ari"] <= 1
    assert metrics["fid"].startswith("skipped")
    slate = np.asarray(Image.open(workdir / "eval" / "slate.png"))
    deletion = np.asarray(Image.open(workdir / "eval" / "slot_deletion.png"))
    # Rows of 16-pixel images enlarged so the column titles fit, under a strip of titles.
    rows, s = min(config.eval.num_images, config.eval.batch_size), 3
    for grid, columns in ((slate, 3 + s), (deletion, 1 + s)):
        tile = (grid.shape[1] + 2) // columns - 2
        assert tile % 16 == 0 and tile >= 64
        title = grid.shape[0] - (rows * tile + (rows - 1) * 2)
        assert title > 0 and (grid[:title] > 200).any()  # light text on the dark strip


def test_evaluate_with_missing_inception_weights_file_is_a_clear_error(workdir):
    with pytest.raises(FileNotFoundError, match="inception_weights") as error:
        trained.evaluate(str(workdir),
                         overrides=[f"eval.inception_weights='{workdir / 'nope.npz'}'"])
    assert isinstance(error.value, UserError)  # checked before any work, printed as one line


def test_evaluate_without_checkpoint_is_a_clear_error_and_writes_nothing(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint in .*checkpoints: train first"):
        trained.evaluate(str(tmp_path))
    with pytest.raises(WorkdirError):  # a user's mistake: main.py prints it without traceback
        trained.load(str(tmp_path), tiny())
    assert listing(tmp_path) == []


def test_evaluation_uses_the_runs_config_and_refuses_one_that_changes_it(workdir):
    """A config that changes the model or the data is refused, naming each key; keys free to
    change (evaluation settings, data location, inference iterations) apply."""
    changed = tiny()
    changed.slot_attention.num_iterations = 1
    changed.grad = "unroll"
    changed.data.seed = 5
    with pytest.raises(WorkdirError) as error:
        trained.evaluate(str(workdir), changed)
    message = str(error.value)
    for key in ("slot_attention.num_iterations", "grad", "data.seed"):
        assert key in message
    with pytest.raises(WorkdirError, match="data.seed would change the model or the data"):
        trained.evaluate(str(workdir), overrides=["data.seed=5"])
    free = trained.resolve_config(str(workdir), overrides=[
        "eval.num_images=1", "slot_attention.eval_num_iterations=4", "data.data_dir='/x'"])
    assert (free.eval.num_images, free.slot_attention.eval_num_iterations) == (1, 4)
    assert free.slot_attention.num_iterations == tiny().slot_attention.num_iterations


def test_load_works_from_another_directory_without_a_config(workdir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here: the stored config is what is read
    model = trained.load(str(workdir))
    enc = model.encode_slots(np.zeros((1, 16, 16, 3), np.float32), jax.random.key(0))
    assert enc.slots.shape == (1, 3, 16)
    assert listing(tmp_path) == []


def test_non_finite_params_are_never_evaluated(workdir, tmp_path):
    shutil.copytree(workdir / "checkpoints", tmp_path / "checkpoints")
    config = tiny()
    _, params = models.split_params(models.create(config, rngs=nnx.Rngs(config.seed)))
    labels = param_labels(params, models.get("slate").learning_rate_group)
    state = TrainState.create(params, make_optimizer(config.optim, labels))
    bad = state.replace(params=jax.tree.map(lambda x: x * np.nan, state.params))
    with Checkpointer(tmp_path / "checkpoints") as ckpt:
        ckpt.save(3, state_pytree={"state": bad}, rng=jax.random.key(0),
                  metadata=ckpt.read_metadata(2))
    with pytest.raises(UserError, match="parameters at step 3 .* are not finite"):
        trained.evaluate(str(tmp_path))
    assert not (tmp_path / "eval").exists()


def test_load_gives_the_trained_params_without_optimizer(workdir):
    config = tiny()
    before = listing(workdir / "checkpoints")
    model = trained.load(str(workdir))
    # The reference: the full train state restored the way the trainer resumes.
    _, params = models.split_params(models.create(config, rngs=nnx.Rngs(config.seed)))
    labels = param_labels(params, models.get("slate").learning_rate_group)
    full_target = {"state": TrainState.create(params, make_optimizer(config.optim, labels))}
    with Checkpointer(workdir / "checkpoints") as ckpt:
        full = ckpt.restore_latest(full_target)
    assert full[0] == 2
    _, loaded = models.split_params(model)
    expected = full[1]["state"].params
    assert jax.tree.structure(loaded) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The same config given as a file (with the run's changes) works too, and the model runs.
    path = os.path.join(os.path.dirname(__file__), "..", "configs", "default.py") + ":tiny"
    again = trained.load(str(workdir), path, step=2, overrides=[
        "train.image_every_steps=0", "train.jacobian_every_steps=0", "train.num_steps=2",
        "train.evaluate_at_end=False"])
    enc = again.encode_slots(np.zeros((1, 16, 16, 3), np.float32), jax.random.key(0))
    assert enc.slots.shape == (1, 3, 16)
    assert listing(workdir / "checkpoints") == before  # reading wrote nothing


# --- checkpoint.restore_params on small states ------------------------------------------------


def _state(seed):
    params = {"dvae": {"w": jax.random.normal(jax.random.key(seed), (32, 64))},
              "blocks": [{"b": np.arange(5, dtype=np.float32) * seed}]}
    tx = optax.adam(1e-3)
    return TrainState.create(params, tx)


def _abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state.params)


def _garble(step_dir):
    # 8 bytes inverted in the largest data file: tensorstore decodes it, the fingerprint does not.
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "d" in p.parts]
    path = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 8] = bytes(255 - b for b in data[middle:middle + 8])
    path.write_bytes(bytes(data))


def test_restore_params_reads_only_params_and_changes_nothing(tmp_path, caplog):
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        for step in (1, 2):
            ckpt.save(step, state_pytree={"state": _state(step)}, rng=jax.random.key(0))
    before = listing(tmp_path)
    step, params = checkpoint.restore_params(tmp_path / "ckpt", _abstract(_state(0)))
    assert step == 2
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(_state(2).params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert isinstance(params["blocks"], list)  # the target's structure
    assert checkpoint.restore_params(tmp_path / "ckpt", _abstract(_state(0)), step=1)[0] == 1
    with pytest.raises(FileNotFoundError, match="no checkpoint at step 7"):
        checkpoint.restore_params(tmp_path / "ckpt", _abstract(_state(0)), step=7)
    assert checkpoint.restore_params(tmp_path / "none", _abstract(_state(0))) is None
    assert listing(tmp_path) == before  # nothing created, renamed or cleaned

    # A garbled newest step: skipped with a warning, left where it is; asked for, it fails.
    _garble(tmp_path / "ckpt" / "2")
    with caplog.at_level(logging.WARNING):
        step, params = checkpoint.restore_params(tmp_path / "ckpt", _abstract(_state(0)))
    assert step == 1
    assert any("step 2" in r.getMessage() and "fingerprint" in r.getMessage()
               for r in caplog.records)
    assert listing(tmp_path) == before
    with pytest.raises(Exception, match="fingerprint"):
        checkpoint.restore_params(tmp_path / "ckpt", _abstract(_state(0)), step=2)
    _garble(tmp_path / "ckpt" / "1")
    with pytest.raises(CheckpointRestoreError, match="2 checkpoint"):
        checkpoint.restore_params(tmp_path / "ckpt", _abstract(_state(0)))


def test_restore_params_with_the_wrong_model_names_the_mismatch(workdir, tmp_path):
    shutil.copytree(workdir / "checkpoints", tmp_path / "checkpoints")
    config = tiny()
    config.slate.d_model = 32  # not the trained model's width
    with pytest.raises(WorkdirError, match="slate.d_model"):  # the config guard first
        trained.load(str(tmp_path), config)
    model_class_target = models.abstract_params(config)[1]
    with pytest.raises(CheckpointRestoreError, match="none could be restored"):
        checkpoint.restore_params(tmp_path / "checkpoints", model_class_target)
