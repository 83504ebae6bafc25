"""End-to-end training: sharding, resumption, signals, non-finite losses, config and data errors."""
import glob
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from fixed_slots.experiments.events import read_scalars
from fixed_slots.train.trainer import NonFiniteLossError, train
from helpers import ROOT, load_config


def tiny(**overrides):
    config = load_config("default:tiny")
    config.train.log_every_steps = 1
    config.train.image_every_steps = 0
    config.train.jacobian_every_steps = 0
    config.train.evaluate_at_end = False
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
    one = train(tiny(**{"train.num_devices": 1, "train.num_steps": 3}),
                             str(tmp_path / "one"))
    eight = train(tiny(**{"train.num_devices": 8, "train.num_steps": 3}),
                               str(tmp_path / "eight"))
    assert [h["step"] for h in one] == [1, 2, 3]
    np.testing.assert_allclose(losses(one), losses(eight), rtol=2e-5)
    np.testing.assert_allclose([h["grad_norm"] for h in one], [h["grad_norm"] for h in eight],
                               rtol=1e-4)


def test_resume_equals_uninterrupted_and_writes_events(tmp_path):
    full = train(tiny(**{"train.num_steps": 4}), str(tmp_path / "full"))
    first = train(tiny(**{"train.num_steps": 2}), str(tmp_path / "split"))
    second = train(tiny(**{"train.num_steps": 4}), str(tmp_path / "split"),
                                accept_config_change=["train.num_steps"])
    assert [h["step"] for h in second] == [3, 4]
    np.testing.assert_allclose(losses(first + second), losses(full), rtol=1e-6)
    assert glob.glob(str(tmp_path / "full" / "**" / "events.out.tfevents*"), recursive=True)
    assert (tmp_path / "full" / "checkpoints").is_dir()


def test_images_and_jacobian_are_written(tmp_path):
    config = tiny(**{"train.num_steps": 2, "train.image_every_steps": 2,
                     "train.jacobian_every_steps": 2})
    train(config, str(tmp_path))
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
    with pytest.raises(NonFiniteLossError,
                       match=r"non-finite loss, gradient or parameters at step (\d+)") as e:
        train(config, str(tmp_path))
    bad = int(e.value.args[0].split("at step ")[1].split(";")[0])
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and max(saved) <= bad


def _run_main(args, **kw):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "main.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, **kw)


def _start_training(tmp_path, *extra):
    """A tiny training subprocess that runs for long; returns (process, lines read so far, a
    function waiting for a line containing a text)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "main.py", "--config=configs/default.py:tiny", f"--workdir={tmp_path}",
         "--config.train.num_steps=100000", "--config.train.checkpoint_every_steps=100000",
         "--config.train.log_every_steps=1", "--config.train.image_every_steps=0",
         "--config.train.jacobian_every_steps=0", *extra],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []

    def read():
        for line in proc.stdout:
            lines.append(line)

    reader = __import__("threading").Thread(target=read, daemon=True)
    reader.start()

    def wait_for(text, timeout=600):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if any(text in line for line in lines):
                return
            if proc.poll() is not None:
                break
            time.sleep(0.2)
        proc.kill()
        pytest.fail(f"no line with {text!r} in time:\n{''.join(lines)[-3000:]}")

    def finish(timeout=600):
        proc.wait(timeout=timeout)
        reader.join(timeout=10)
        return "".join(lines)

    return proc, wait_for, finish


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    proc, wait_for, finish = _start_training(tmp_path)
    wait_for("step 2/")  # compiled and stepping (log lines are per step)
    proc.send_signal(signal.SIGTERM)
    out = finish()
    assert proc.returncode == 0, out[-3000:]
    saved = [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert saved, out[-3000:]
    # A stopped run says how to go on and leaves without the end-of-run evaluation (a preempted
    # job must exit promptly).
    assert "saving a checkpoint and stopping" in out and "the same command resumes" in out
    assert not (tmp_path / "eval").exists() and "Evaluation at step" not in out
    assert "Traceback" not in out


def test_two_sigterms_50_ms_apart_stop_without_saving(tmp_path):
    """Both arrive while the main thread is inside a step (one call of the Python handler):
    the wakeup fd counts them, so the second one still means 'stop now, no checkpoint'."""
    proc, wait_for, finish = _start_training(tmp_path)
    wait_for("step 2/")
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out = finish()
    assert proc.returncode == 130, out[-3000:]
    assert "interrupted" in out
    saved = [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert saved == [], out[-3000:]


def test_a_stop_during_compilation_is_heard_at_once_and_acted_on_after_it(tmp_path):
    proc, wait_for, finish = _start_training(tmp_path)
    wait_for("Compiling the train step")
    proc.send_signal(signal.SIGINT)
    wait_for("saving a checkpoint and stopping")  # the handler runs during compilation
    out = finish()
    assert proc.returncode == 0, out[-3000:]
    assert out.index("saving a checkpoint and stopping") < out.index("Compiled the train step")
    assert "Stopped at step 1 of 100000" in out


def test_a_second_signal_handled_inside_the_first_still_stops_at_once():
    """Python runs a handler between bytecodes, so a second signal's handler can run nested
    inside the first one's; the count must not lose it (it once read the count before the
    nested call and wrote it back after). And a KeyboardInterrupt that Python swallowed (raised
    inside a garbage-collector callback) is raised again by `check`."""
    from fixed_slots.train.trainer import _StopFlag

    flag = _StopFlag()
    try:
        nested = []

        def deliveries():
            if not nested:
                nested.append(True)
                flag._handle(signal.SIGTERM, None)  # the second signal, inside the first
            return 1

        flag._deliveries = deliveries
        with pytest.raises(KeyboardInterrupt):
            flag._handle(signal.SIGTERM, None)
        assert flag.stop and nested
        with pytest.raises(KeyboardInterrupt):
            flag.check()
    finally:
        flag.restore()


def test_two_stops_during_compilation_exit_130_at_once(tmp_path):
    """The step compiles in a background thread from setup on: a second Ctrl-C then leaves at
    once with 130 ("interrupted"), not XLA's abort (134) on an interpreter exiting under it."""
    proc, wait_for, finish = _start_training(tmp_path)
    wait_for("Compiling the train step")
    time.sleep(2.5)  # past tracing: XLA is compiling (~10 s for the tiny step on 2 cores)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out = finish()
    # (On a machine that compiles the tiny step within 2.5 s this only checks the exit code.)
    assert proc.returncode == 130 and "interrupted" in out, out[-3000:]


def test_the_train_step_compiles_once_fresh_and_resumed(tmp_path, caplog):
    """Compiled ahead (abstract state, first batch), the first call finds the executable: one
    compilation of the train step per run, when it starts fresh and when it resumes."""
    import logging

    def compilations(run):
        caplog.clear()
        previous = jax.config.jax_log_compiles
        jax.config.update("jax_log_compiles", True)  # global: the compile thread logs too
        try:
            with caplog.at_level(logging.WARNING):
                history = run()
        finally:
            jax.config.update("jax_log_compiles", previous)
        messages = [r.getMessage() for r in caplog.records]  # "Compiling jit(train_step) with"
        return history, sum(m.startswith("Compiling") and "(train_step)" in m.split(" with ")[0]
                            for m in messages)

    fresh, count = compilations(lambda: train(tiny(**{"train.num_steps": 2}), str(tmp_path)))
    assert [h["step"] for h in fresh] == [1, 2] and count == 1, count
    resumed, count = compilations(
        lambda: train(tiny(**{"train.num_steps": 3}), str(tmp_path),
                      accept_config_change=("train.num_steps",)))
    assert [h["step"] for h in resumed] == [3] and count == 1, count


def test_missing_dataset_names_the_build_command(tmp_path):
    config = load_config("slate_clevr")
    config.data.data_dir = str(tmp_path / "tfds")
    config.train.num_devices = 1  # batch 50 does not split over the 8 test devices
    with pytest.raises(Exception, match=r"python -m fixed_slots.data_prep build clevr_mirror"):
        train(config, str(tmp_path / "run"))
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
    config.eval = small.eval
    config.eval.batch_size = 2  # the fake tree's validation split has 6 images
    history = train(config, str(tmp_path / "run"))
    assert history and np.isfinite(history[-1]["loss"])
    assert (tmp_path / "run" / "eval" / "metrics.json").is_file()  # evaluated at the end


def test_train_step_compiles_once_and_bf16_loss_tracks_float32():
    from fixed_slots.data.pipeline import make_loader
    from fixed_slots import sharding
    from fixed_slots.train.train_step import build

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
            histories[dtype].append(float(metrics.compute()["loss"]))
        assert train_step._cache_size() == 1  # no recompilation across steps
    np.testing.assert_allclose(histories["bfloat16"], histories["float32"], rtol=0.05)


def test_backward_solve_outcome_is_logged_for_implicit_modes_only(tmp_path):
    """A diverging adjoint must never be invisible. At this initialisation the step's
    spectral radius exceeds 1 for some examples, so the plain iterative adjoint ("implicit")
    fails there: the metrics say so (and the fallback keeps the gradient finite)."""
    implicit = train(tiny(**{"train.num_steps": 2, "grad": "implicit"}),
                                  str(tmp_path / "implicit"))
    for h in implicit:
        assert {"adjoint_residual", "adjoint_residual_max", "adjoint_steps",
                "adjoint_failed"} <= set(h)
        assert h["adjoint_steps"] == 3  # T + 1 evaluations by default (tiny: T = 2)
        assert 0.0 <= h["adjoint_failed"] <= 1.0 and np.isfinite(h["loss"])
    assert max(h["adjoint_residual_max"] for h in implicit) > 0
    plain = train(tiny(**{"train.num_steps": 1}), str(tmp_path / "neumann1"))
    assert not [k for k in plain[0] if k.startswith("adjoint")]


def test_resuming_a_model_of_other_shapes_says_so_and_keeps_the_checkpoints(tmp_path):
    """A deliberate but shape-changing config change: the advice is about the config, not
    corruption, and nothing is renamed."""
    from fixed_slots.train.checkpoint import CheckpointRestoreError

    train(tiny(**{"train.num_steps": 1}), str(tmp_path))
    wider = tiny(**{"train.num_steps": 2, "slot_attention.slot_size": 32})
    with pytest.raises(CheckpointRestoreError, match="hold a model of other shapes") as e:
        train(wider, str(tmp_path),
                           accept_config_change=["slot_attention.slot_size", "train.num_steps"])
    assert "Nothing was renamed or deleted" in str(e.value)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1"]


def _files(path):
    return sorted((str(p.relative_to(path)), p.stat().st_size) for p in path.rglob("*")
                  if p.is_file())


def test_evaluations_reach_tensorboard_at_several_steps(tmp_path, monkeypatch):
    """eval/* scalars on a cadence (no decoding) and at the end (full), from a tiny run's own
    event files; the end's equal WORKDIR/eval/metrics.json. The freed heap is given back once
    the step is compiled and after each evaluation."""
    from fixed_slots import host_memory

    releases = []
    release = host_memory.release_freed_memory
    monkeypatch.setattr(host_memory, "release_freed_memory",
                        lambda: releases.append(1) or release())
    train(tiny(**{"train.num_steps": 4, "train.eval_every_steps": 2,
                  "train.evaluate_at_end": True}), str(tmp_path))
    scalars = read_scalars(str(tmp_path))
    assert [step for step, _ in scalars["eval/fg_ari"]] == [2, 4]
    assert len(releases) == 1 + 2
    for tag in ("eval/ari", "eval/fg_ari_std", "eval/mse_dvae_recon", "eval/slot_residual",
                "eval/fg_ari_token_ceiling"):
        assert [step for step, _ in scalars[tag]] == [2, 4], tag
    # The autoregressive reconstruction is decoded only by the full evaluation at the end.
    assert [step for step, _ in scalars["eval/mse_slot_recon"]] == [4]
    with open(tmp_path / "eval" / "metrics.json") as f:
        final = json.load(f)
    assert final["step"] == 4 and final["full"] is True
    assert scalars["eval/fg_ari"][-1][1] == pytest.approx(final["fg_ari"], rel=1e-6)
    assert scalars["steps_per_second"] and scalars["loss"][-1][0] == 4


def test_rerun_of_a_finished_run_says_so_and_writes_nothing(tmp_path, caplog):
    import logging
    import shutil

    config = tiny(**{"train.num_steps": 2, "train.evaluate_at_end": True})
    train(config, str(tmp_path))
    before = _files(tmp_path)
    with caplog.at_level(logging.INFO, logger="fixed_slots"):
        assert train(config, str(tmp_path)) == []
    assert "This run is complete: step 2 of 2" in caplog.text
    assert str(tmp_path / "eval") in caplog.text
    assert _files(tmp_path) == before  # no new event file, checkpoint or evaluation
    # Killed during its evaluation: the rerun evaluates the last step, and only that.
    shutil.rmtree(tmp_path / "eval")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fixed_slots"):
        train(config, str(tmp_path))
    assert "has no evaluation of that step: evaluating it now" in caplog.text
    with open(tmp_path / "eval" / "metrics.json") as f:
        assert json.load(f)["step"] == 2
    steps = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == ["2"] or steps == ["1", "2"]


def test_the_console_says_when_it_compiles_and_how_long_it_took(tmp_path, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="fixed_slots"):
        train(tiny(**{"train.num_steps": 1}), str(tmp_path))
    messages = [r.getMessage() for r in caplog.records]
    compiling = [i for i, m in enumerate(messages) if m.startswith("Compiling the train step")]
    compiled = [i for i, m in enumerate(messages) if m.startswith("Compiled the train step")]
    assert compiling and compiled and compiling[0] < compiled[0]
    assert " s." in messages[compiled[0]]


@pytest.mark.parametrize("name", ["default:tiny", "slot_autoencoder_synthetic:tiny",
                                  "set_prediction_synthetic:tiny"])
def test_slot_attention_grad_norm_covers_exactly_the_slot_attention_params(name):
    """Fig. 1b/5's gradient norm: every model's SlotAttention parameters, and nothing else."""
    from flax import nnx

    from fixed_slots import models
    from fixed_slots.modules.slot_attention import SlotAttention
    from fixed_slots.train.train_step import slot_attention_leaves, split_params

    model = models.create(load_config(name), rngs=nnx.Rngs(0))
    found = [m for _, m in nnx.iter_modules(model) if isinstance(m, SlotAttention)]
    assert len(found) == 1
    expected = jax.tree.leaves(nnx.state(found[0], nnx.Param))
    _, params = split_params(model)
    selected = slot_attention_leaves(params)
    assert len(selected) == len(expected) > 0
    assert sorted(x.size for x in selected) == sorted(x.size for x in expected)
    assert sum(x.size for x in selected) < sum(x.size for x in jax.tree.leaves(params))
