"""`--mode=eval` and reading a trained model: metrics.json and titled pictures from the latest
checkpoint, the params-only restore (no optimizer, nothing written), clear errors otherwise."""
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
from fixed_slots.eval.evaluate import evaluate
from fixed_slots.train import checkpoint
from fixed_slots.train.checkpoint import CheckpointRestoreError, Checkpointer
from fixed_slots.train.optim import make_optimizer
from fixed_slots.train.train_step import TrainState
from fixed_slots.train.trainer import train_and_evaluate
from helpers import load_config

# A failed tensorstore read of a corrupt file can later call back into orbax's already-closed
# event loop ("Event loop is closed", reported during whichever test runs then): harmless.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def tiny():
    config = load_config("default:tiny")
    config.train.image_every_steps = 0
    config.train.jacobian_every_steps = 0
    config.train.num_steps = 2
    return config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A real tiny SLATE training run (2 steps, one checkpoint at step 2)."""
    path = tmp_path_factory.mktemp("run")
    train_and_evaluate(tiny(), str(path))
    return path


def listing(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_evaluate_writes_metrics_and_titled_pictures(workdir):
    config = tiny()
    metrics = evaluate(config, str(workdir))
    with open(workdir / "eval" / "metrics.json") as f:
        on_disk = json.load(f)
    assert on_disk == metrics
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
    config = tiny()
    config.eval.inception_weights = str(workdir / "nope.npz")
    with pytest.raises(FileNotFoundError, match="inception_weights") as error:
        evaluate(config, str(workdir))
    assert isinstance(error.value, UserError)  # checked before any work, printed as one line


def test_evaluate_without_checkpoint_is_a_clear_error_and_writes_nothing(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint in .*checkpoints: train first"):
        evaluate(tiny(), str(tmp_path))
    with pytest.raises(WorkdirError):  # a user's mistake: main.py prints it without traceback
        trained.load(tiny(), str(tmp_path))
    assert listing(tmp_path) == []


def test_load_gives_the_trained_params_without_optimizer(workdir):
    config = tiny()
    before = listing(workdir / "checkpoints")
    model = trained.load(config, str(workdir))
    # The reference: the full train state restored the way the trainer resumes.
    _, params = models.split_params(models.create(config, rngs=nnx.Rngs(config.seed)))
    full_target = {"state": TrainState.create(params, make_optimizer(config.optim, params))}
    with Checkpointer(workdir / "checkpoints") as ckpt:
        full = ckpt.restore_latest(full_target)
    assert full[0] == 2
    _, loaded = models.split_params(model)
    expected = full[1]["state"].params
    assert jax.tree.structure(loaded) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # A config file path works too, and the loaded model runs.
    again = trained.load(os.path.join(os.path.dirname(__file__), "..", "configs", "default.py") + ":tiny",
                         str(workdir), step=2)
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
    with pytest.raises(CheckpointRestoreError, match="none could be restored"):
        trained.load(config, str(tmp_path))
