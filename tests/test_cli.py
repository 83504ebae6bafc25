"""main.py as a user meets it: one-line errors with exit code 2, a quiet console, show_config,
one run per workdir, and a resumed run refusing a changed config."""
import glob
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from fixed_slots.errors import WorkdirError
from fixed_slots.train import workdir as workdir_lib
from helpers import ROOT, load_config

TINY = ["--config=configs/default.py:tiny", "--config.train.image_every_steps=0",
        "--config.train.jacobian_every_steps=0"]


def _env():
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")


def _main(args, timeout=300):
    return subprocess.run([sys.executable, "main.py", *args], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def _assert_user_error(result, *needles):
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert 1 <= len(lines) <= 2, result.stderr
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)


@pytest.mark.parametrize("args, needles", [
    (["--config.grda=neumann1"], ["'config.grda' does not exist", "did you mean 'grad'",
                                  "keys of config: data, eval, grad"]),
    (["--config.optim.main_lrr=1"], ["did you mean 'main_lr'", "keys of config.optim"]),
    (["--config.train.batch_size=abc"], ["batch_size=abc"]),
    (["--config.grad=neuman1"], ["unknown grad mode 'neuman1'", "neumannK"]),
    (["--config.optim.main_lr=-0.001"], ["config.optim.main_lr=-0.001 is invalid",
                                         "a number > 0"]),
    (["--config.slate.dropout=1.5"], ["config.slate.dropout=1.5", "[0, 1)"]),
    (["--config.optim.decay=sometimes"], ["config.optim.decay='sometimes'", "'plateau'"]),
    (["--accept_config_change=train.num_stepz"], ["unknown config keys: train.num_stepz"]),
    (["--config.data.seed=-1"], ["config.data.seed=-1 is invalid", "[0, 2**32)"]),
    (["--config.seed=4294967296"], ["config.seed=4294967296 is invalid", "[0, 2**32)"]),
])
def test_user_mistakes_are_one_or_two_lines_and_exit_2(tmp_path, args, needles):
    workdir = tmp_path / "run"
    result = _main([*TINY, f"--workdir={workdir}", *args])
    _assert_user_error(result, *needles)
    assert not workdir.exists()  # refused before anything was written


def test_missing_config_file_and_missing_workdir_flag(tmp_path):
    _assert_user_error(_main(["--config=configs/nope.py", f"--workdir={tmp_path}"]),
                       "config file 'configs/nope.py' not found")
    _assert_user_error(_main(TINY), "--workdir is required")


def test_show_config_lists_keys_values_and_choices():
    result = _main(["--config=configs/slate_clevr.py", "--mode=show_config",
                    "--config.grad=unroll", "--config.train.num_devices=1"])
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "grad = 'unroll'" in out and "# one of: unroll, neumann1" in out
    assert "slot_attention.num_iterations = 7" in out
    assert "optim.decay = " in out and "validation_plateau" in out
    assert "model.name = 'slate'" in out and "slot_autoencoder" in out
    # Validated after the listing: batch 50 over the 8 test devices is named.
    bad = _main(["--config=configs/slate_clevr.py", "--mode=show_config"])
    assert bad.returncode == 2 and "grad = 'neumann1'" in bad.stdout
    assert "config.train.batch_size=50 is invalid" in bad.stderr


def test_workdir_lock_names_the_holder_and_dies_with_it(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from fixed_slots.train.workdir import "
         "WorkdirLock; lock = WorkdirLock(sys.argv[1]); print('locked', flush=True); time.sleep(600)",
         str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(WorkdirError, match=rf"in use by another run \(pid {holder.pid} on"):
            workdir_lib.WorkdirLock(str(tmp_path))
        _assert_user_error(_main([*TINY, f"--workdir={tmp_path}"]), "in use by another run",
                           f"pid {holder.pid}")
        assert not (tmp_path / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
    # The kernel released the killed holder's lock: nothing is left stuck.
    with workdir_lib.WorkdirLock(str(tmp_path)):
        pass


def test_config_differences_free_accepted_and_refused_keys():
    base = workdir_lib.config_record(load_config("default:tiny"))
    changed = dict(base, **{"grad": "unroll", "train.num_steps": 9, "eval.batch_size": 4,
                            "train.log_every_steps": 7, "slot_attention.num_slots": 5})
    changed["new.key.from.a.later.version"] = 1
    refused, allowed = workdir_lib.config_differences(base, changed, ["train.num_steps"])
    assert refused == ["grad: 'neumann1' -> 'unroll'", "slot_attention.num_slots: 3 -> 5"]
    assert allowed == ["eval.batch_size: 8 -> 4", "train.log_every_steps: 2 -> 7",
                       "train.num_steps: 4 -> 9"]
    json.dumps(base)  # stored as checkpoint metadata



def test_kill_after_checkpoint_keeps_its_metrics_and_changed_config_is_refused(tmp_path):
    """Metrics of every step a checkpoint covers are on disk before the checkpoint (kill -9
    right after it loses none of them); resuming with another grad mode or seed is refused,
    a deliberate longer run is accepted with --accept_config_change."""
    from fixed_slots.experiments.events import read_scalars

    workdir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "main.py", *TINY, f"--workdir={workdir}",
         "--config.train.num_steps=100000", "--config.train.log_every_steps=1",
         "--config.train.checkpoint_every_steps=3"],
        cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    try:
        while time.time() < deadline and not (workdir / "checkpoints" / "3").is_dir():
            time.sleep(0.05)
        assert (workdir / "checkpoints" / "3").is_dir(), "no checkpoint in time"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    steps = [step for step, _ in read_scalars(str(workdir)).get("loss", [])]
    assert {1, 2, 3} <= set(steps), steps

    for flag, name in (("--config.grad=unroll", "grad"), ("--config.seed=7", "seed")):
        result = _main([*TINY, f"--workdir={workdir}", "--config.train.num_steps=100000",
                        "--config.train.log_every_steps=1",
                        "--config.train.checkpoint_every_steps=3", flag])
        assert result.returncode == 2, result.stderr[-2000:]
        assert "holds a run trained with another config" in result.stderr
        assert f"--accept_config_change={name}" in result.stderr
        assert "Traceback" not in result.stderr
    result = _main([*TINY, f"--workdir={workdir}", "--config.train.num_steps=4",
                    "--config.train.log_every_steps=1",
                    "--config.train.checkpoint_every_steps=3",
                    "--accept_config_change=train.num_steps"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Resumed from" in result.stderr and "train.num_steps: 100000 -> 4" in result.stderr


def test_default_console_has_our_lines_only(tmp_path):
    result = _main([*TINY, f"--workdir={tmp_path}", "--config.train.num_steps=2",
                    "--config.train.checkpoint_every_steps=1"])
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    # Two checkpoints were written: orbax's ~40 INFO lines each are not on the console.
    assert not [line for line in lines if "orbax" in line or "checkpoint_manager" in line]
    assert not [line for line in lines if "libtpu" in line or "xla_bridge" in line]
    assert any("step 2/2 (100.0%)  loss " in line and "cross_entropy" in line for line in lines)
    # A run that reached num_steps is evaluated: one summary line, the metrics file beside it.
    summary = [line for line in lines if "Evaluation at step 2 on " in line]
    assert summary and "fg_ari " in summary[0] and "token-resolution ceiling" in summary[0]
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["step"] == 2
    assert len(lines) <= 6, lines



def _untouched(path: pathlib.Path) -> list[str]:
    """What a refused run could have left in `path`."""
    return [name for name in (".lock", "checkpoints", "eval") if (path / name).exists()]


def test_the_file_system_root_as_workdir_is_refused_and_nothing_written():
    before = _untouched(pathlib.Path("/"))
    _assert_user_error(_main([*TINY, "--workdir=/"]), "--workdir=/ is the file system root")
    assert _untouched(pathlib.Path("/")) == before


def test_a_file_as_workdir_is_refused_and_nothing_written(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("keep me")
    dangling = tmp_path / "gone"
    dangling.symlink_to(tmp_path / "nowhere")
    for workdir, needle in ((path, "notes.txt is a file: "),
                            (path / "run", "is under {path}, which is a file"),
                            (dangling, "gone is not a directory")):
        _assert_user_error(_main([*TINY, f"--workdir={workdir}"]), needle.format(path=path))
    assert path.read_text() == "keep me" and sorted(tmp_path.iterdir()) == [dangling, path]


def _read_only(path: pathlib.Path):
    """Makes `path` read-only for this process (chmod; as root, which chmod does not stop, the
    immutable attribute); returns the undo, or skips the test where neither works."""
    if os.geteuid() != 0:
        path.chmod(0o555)
        return lambda: path.chmod(0o755)
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("running as root without chattr: no directory is read-only here")
    return lambda: subprocess.run(["chattr", "-i", str(path)], check=True)


def test_a_read_only_workdir_is_refused_and_nothing_written(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    undo = _read_only(workdir)
    try:
        assert not os.access(workdir, os.W_OK)
        _assert_user_error(_main([*TINY, f"--workdir={workdir}"]),
                           f"--workdir={workdir} is not writable")
        _assert_user_error(_main([*TINY, f"--workdir={workdir / 'new'}"]),
                           f"its parent {workdir} is not writable")
    finally:
        undo()
    assert list(workdir.iterdir()) == []


def test_a_checkpoint_without_a_config_record_is_not_resumed(tmp_path):
    """A checkpoint record without `config` (an older fixed_slots, another program) cannot be
    checked against the run's config: resuming is refused, not done unchecked."""
    import jax.numpy as jnp

    from fixed_slots.train.checkpoint import Checkpointer

    with Checkpointer(tmp_path / "checkpoints") as ckpt:
        ckpt.save(1, state_pytree={"w": jnp.zeros(3)}, rng=None, metadata={})
    _assert_user_error(_main([*TINY, f"--workdir={tmp_path}"]),
                       "the checkpoint at step 1", "records no config")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1"]
