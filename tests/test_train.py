"""End-to-end training: sharding, resumption, signals, non-finite losses, config and data errors."""
import glob
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from fixed_slots.train.trainer import NonFiniteLossError, train_and_evaluate
from helpers import ROOT, load_config


def tiny(**overrides):
    config = load_config("default:tiny")
    config.train.log_every_steps = 1
    config.train.image_every_steps = 0
    config.train.jacobian_every_steps = 0
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def losses(history):
    return np.array([h["loss"] for h in history])


def test_sharded_equals_unsharded(tmp_path):
    assert jax.device_count() == 8
    one = train_and_evaluate(tiny(**{"train.num_devices": 1, "train.num_steps": 3}),
                             str(tmp_path / "one"))
    eight = train_and_evaluate(tiny(**{"train.num_devices": 8, "train.num_steps": 3}),
                               str(tmp_path / "eight"))
    assert [h["step"] for h in one] == [1, 2, 3]
    np.testing.assert_allclose(losses(one), losses(eight), rtol=2e-5)
    np.testing.assert_allclose([h["grad_norm"] for h in one], [h["grad_norm"] for h in eight],
                               rtol=1e-4)


def test_resume_equals_uninterrupted_and_writes_events(tmp_path):
    full = train_and_evaluate(tiny(**{"train.num_steps": 4}), str(tmp_path / "full"))
    first = train_and_evaluate(tiny(**{"train.num_steps": 2}), str(tmp_path / "split"))
    second = train_and_evaluate(tiny(**{"train.num_steps": 4}), str(tmp_path / "split"),
                                accept_config_change=["train.num_steps"])
    assert [h["step"] for h in second] == [3, 4]
    np.testing.assert_allclose(losses(first + second), losses(full), rtol=1e-6)
    assert glob.glob(str(tmp_path / "full" / "**" / "events.out.tfevents*"), recursive=True)
    assert (tmp_path / "full" / "checkpoints").is_dir()


def test_images_and_jacobian_are_written(tmp_path):
    config = tiny(**{"train.num_steps": 2, "train.image_every_steps": 2,
                     "train.jacobian_every_steps": 2})
    train_and_evaluate(config, str(tmp_path))
    events = glob.glob(str(tmp_path / "**" / "events.out.tfevents*"), recursive=True)
    payload = b"".join(pathlib.Path(e).read_bytes() for e in events)
    for tag in (b"jacobian_spectral_norm", b"gumbel_temperature", b"slot_residual", b"slate"):
        assert tag in payload, tag


def test_non_finite_loss_names_the_step_and_keeps_last_good_checkpoint(tmp_path):
    config = tiny(**{"train.num_steps": 6, "train.checkpoint_every_steps": 1})
    config.optim.main_lr = 1e30
    config.optim.dvae_lr = 1e30
    config.optim.use_warmup = False
    config.optim.clip = "none"
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss or gradient at step (\d+)") as e:
        train_and_evaluate(config, str(tmp_path))
    bad = int(e.value.args[0].split("at step ")[1].split(";")[0])
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and max(saved) <= bad


def _run_main(args, **kw):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "main.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, **kw)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "main.py", "--config=configs/default.py:tiny", f"--workdir={tmp_path}",
         "--config.train.num_steps=100000", "--config.train.checkpoint_every_steps=100000",
         "--config.train.log_every_steps=1", "--config.train.image_every_steps=0",
         "--config.train.jacobian_every_steps=0"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline:
        if glob.glob(str(tmp_path / "**" / "events.out.tfevents*"), recursive=True):
            # Event files appear with the first logged step: the loop is running.
            time.sleep(2)
            break
        time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("training did not start in time")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    saved = [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert saved, out[-3000:]
    # A stopped run says how to go on and leaves without the end-of-run evaluation (a preempted
    # job must exit promptly).
    assert "saving a checkpoint and stopping" in out and "the same command resumes" in out
    assert not (tmp_path / "eval").exists() and "Evaluation at step" not in out
    assert "Traceback" not in out


def test_missing_dataset_names_the_build_command(tmp_path):
    config = load_config("slate_clevr")
    config.data.data_dir = str(tmp_path / "tfds")
    config.train.num_devices = 1  # batch 50 does not split over the 8 test devices
    with pytest.raises(Exception, match=r"python -m fixed_slots.data_prep build clevr_mirror"):
        train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()  # nothing written for a run that cannot start


def test_slate_clevr_config_trains_on_a_built_fake_tree(tmp_path):
    from PIL import Image

    from fixed_slots.data_prep import cli

    source = tmp_path / "clevr_mirror_src"
    source.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(
            source / f"CLEVR_{i:06d}.png")
    data_dir = tmp_path / "tfds"
    assert cli.main(["build", "clevr_mirror", f"--source={source}", f"--data_dir={data_dir}"]) == 0
    config = load_config("slate_clevr")
    small = load_config("default:tiny")
    config.slate = small.slate
    config.slot_attention = small.slot_attention
    config.data.image_size = 16
    config.data.data_dir = str(data_dir)
    config.train = small.train
    config.train.image_every_steps = 0
    config.train.jacobian_every_steps = 0
    config.train.num_steps = 2
    history = train_and_evaluate(config, str(tmp_path / "run"))
    assert history and np.isfinite(history[-1]["loss"])


def test_train_step_compiles_once_and_bf16_loss_tracks_float32():
    from fixed_slots.data.pipeline import make_loader
    from fixed_slots import sharding
    from fixed_slots.train.trainer import build

    histories = {}
    for dtype in ("float32", "bfloat16"):
        config = tiny(**{"train.num_devices": 2, "train.compute_dtype": dtype})
        mesh = sharding.make_mesh(2)
        _, state, train_step = build(config, mesh)
        loader = make_loader(config, "train", global_batch_size=8, shard_index=0, shard_count=1,
                             seed=0)
        key = jax.random.key(0)
        histories[dtype] = []
        for _ in range(4):
            state, metrics = train_step(state, sharding.put_batch(next(loader), mesh), key)
            histories[dtype].append(float(metrics["loss"]))
        assert train_step._cache_size() == 1  # no recompilation across steps
    np.testing.assert_allclose(histories["bfloat16"], histories["float32"], rtol=0.05)


def test_backward_solve_outcome_is_logged_for_implicit_modes_only(tmp_path):
    """Issue 12: a diverging adjoint must never be invisible. At this initialisation the step's
    spectral radius exceeds 1 for some examples, so the plain iterative adjoint ("implicit")
    fails there: the metrics say so (and the fallback keeps the gradient finite)."""
    implicit = train_and_evaluate(tiny(**{"train.num_steps": 2, "grad": "implicit"}),
                                  str(tmp_path / "implicit"))
    for h in implicit:
        assert {"adjoint_residual", "adjoint_residual_max", "adjoint_steps",
                "adjoint_failed"} <= set(h)
        assert h["adjoint_steps"] == 3  # T + 1 evaluations by default (tiny: T = 2)
        assert 0.0 <= h["adjoint_failed"] <= 1.0 and np.isfinite(h["loss"])
    assert max(h["adjoint_residual_max"] for h in implicit) > 0
    plain = train_and_evaluate(tiny(**{"train.num_steps": 1}), str(tmp_path / "neumann1"))
    assert not [k for k in plain[0] if k.startswith("adjoint")]


def test_resuming_a_model_of_other_shapes_says_so_and_keeps_the_checkpoints(tmp_path):
    """A deliberate but shape-changing config change: the advice is about the config, not
    corruption, and nothing is renamed."""
    from fixed_slots.train.checkpoint import CheckpointRestoreError

    train_and_evaluate(tiny(**{"train.num_steps": 1}), str(tmp_path))
    wider = tiny(**{"train.num_steps": 2, "slot_attention.slot_size": 32})
    with pytest.raises(CheckpointRestoreError, match="hold a model of other shapes") as e:
        train_and_evaluate(wider, str(tmp_path),
                           accept_config_change=["slot_attention.slot_size", "train.num_steps"])
    assert "Nothing was renamed or deleted" in str(e.value)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1"]
