"""Multi-process jobs: real `main.py` processes joined by jax.distributed on localhost (CPU, gloo).

The subprocess tests launch 1, 2 or 4 processes of the tiny config with a few fake CPU devices
each and compare them with one process over the same number of devices: the same global batches
(checked through FIXED_SLOTS_DEBUG_BATCH_LOG fingerprints), the same loss curve, the same
evaluation metrics; resume after a restart, after SIGTERM to one process, after kill -9 of one
process. Every subprocess wait has a timeout, so a hang fails instead of blocking CI.
The fast tests at the top check the pieces in-process: environment parsing and the sampler.
"""
from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fixed_slots.data.pipeline import make_loader
from fixed_slots.data.sampler import ProcessSliceSampler
from fixed_slots.errors import ConfigError, DataError
from fixed_slots import sharding
from fixed_slots.sharding import DistributedSetupError, distributed_arguments
from helpers import load_config
from multihost_helpers import TINY, Job, run_job

# 32 training scenes, global batch 8: one epoch is 4 steps.
NUM_TRAIN = 32
EPOCH_STEPS = NUM_TRAIN // 8
SMALL = TINY + [f"--config.data.num_train={NUM_TRAIN}"]
LONGER = "--accept_config_change=train.num_steps"  # a restart that trains further
JOB_TIMEOUT = 300  # seconds for one job on a busy 2-core machine; a hang fails after this


# --- environment -> jax.distributed.initialize arguments ---------------------------------------

def test_no_variables_mean_one_process():
    assert distributed_arguments({}) is None
    assert distributed_arguments({"FIXED_SLOTS_DISTRIBUTED": "off",
                                  "FIXED_SLOTS_COORDINATOR": "h:1"}) is None


def test_explicit_variables_become_initialize_arguments():
    env = {"FIXED_SLOTS_COORDINATOR": "node0:1234", "FIXED_SLOTS_NUM_PROCESSES": "4",
           "FIXED_SLOTS_PROCESS_ID": "3", "FIXED_SLOTS_LOCAL_DEVICE_IDS": "0,1",
           "FIXED_SLOTS_HEARTBEAT_TIMEOUT_S": "30", "FIXED_SLOTS_INITIALIZATION_TIMEOUT_S": "60"}
    assert distributed_arguments(env) == {
        "coordinator_address": "node0:1234", "num_processes": 4, "process_id": 3,
        "local_device_ids": [0, 1], "heartbeat_timeout_seconds": 30,
        "initialization_timeout": 60}


def test_auto_leaves_the_rest_to_jax_cluster_detection():
    assert distributed_arguments({"FIXED_SLOTS_DISTRIBUTED": "auto"}) == {}
    # JAX's own variable keeps JAX's meaning: what is missing is detected (SLURM, MPI, TPU).
    assert distributed_arguments({"JAX_COORDINATOR_ADDRESS": "n:5"}) == {
        "coordinator_address": "n:5"}


@pytest.mark.parametrize("env, names", [
    ({"FIXED_SLOTS_COORDINATOR": "h:1", "FIXED_SLOTS_NUM_PROCESSES": "2"},
     "FIXED_SLOTS_PROCESS_ID"),
    ({"FIXED_SLOTS_NUM_PROCESSES": "2", "FIXED_SLOTS_PROCESS_ID": "0"},
     "FIXED_SLOTS_COORDINATOR"),
    ({"FIXED_SLOTS_COORDINATOR": "h", "FIXED_SLOTS_NUM_PROCESSES": "2",
      "FIXED_SLOTS_PROCESS_ID": "0"}, "host:port"),
    ({"FIXED_SLOTS_COORDINATOR": "h:1", "FIXED_SLOTS_NUM_PROCESSES": "2",
      "FIXED_SLOTS_PROCESS_ID": "2"}, "FIXED_SLOTS_PROCESS_ID=2 must be below"),
    ({"FIXED_SLOTS_COORDINATOR": "h:1", "FIXED_SLOTS_NUM_PROCESSES": "two",
      "FIXED_SLOTS_PROCESS_ID": "0"}, "FIXED_SLOTS_NUM_PROCESSES='two'"),
    ({"FIXED_SLOTS_DISTRIBUTED": "yes"}, "FIXED_SLOTS_DISTRIBUTED='yes'"),
    ({"FIXED_SLOTS_DISTRIBUTED": "auto", "FIXED_SLOTS_LOCAL_DEVICE_IDS": "0;1"},
     "FIXED_SLOTS_LOCAL_DEVICE_IDS"),
])
def test_incomplete_setups_fail_naming_the_variable(env, names):
    with pytest.raises(DistributedSetupError, match=re.escape(names)):
        distributed_arguments(env)


def test_a_batch_that_does_not_split_over_the_devices_names_the_config_keys():
    mesh = sharding.make_mesh()  # the 8 fake test devices
    with pytest.raises(ConfigError, match=r"batch of 4 examples .* config.eval.batch_size"):
        sharding.put_batch({"image": np.zeros((4, 2), np.float32)}, mesh)


def test_lockstep_iteration_in_one_process_is_the_plain_iteration():
    assert list(sharding.in_lockstep(iter([1, 2, 3]))) == [1, 2, 3]
    assert np.array_equal(sharding.to_host(np.arange(3)), np.arange(3))


# --- which examples each process reads -----------------------------------------------------------

def _config():
    config = load_config("default:tiny")
    config.data.num_train = NUM_TRAIN
    return config


def _global_batches(config, num_processes: int, steps: int, split: str = "train", **kwargs):
    """Per step, the concatenated per-process example fingerprints (process order)."""
    loaders = [make_loader(config, split, global_batch_size=8, shard_index=i,
                           shard_count=num_processes, seed=0, **kwargs)
               for i in range(num_processes)]
    batches = [[sharding.example_fingerprints(next(loader)["image"]) for loader in loaders]
               for _ in range(steps)]
    return batches, loaders


def _epoch_fingerprints(config) -> set[str]:
    loader = make_loader(config, "train", global_batch_size=8, shard_index=0, shard_count=1,
                         seed=0, num_epochs=1, shuffle=False)
    return {fp for batch in loader for fp in sharding.example_fingerprints(batch["image"])}


def test_global_batches_do_not_depend_on_the_number_of_processes():
    config = _config()
    everything = _epoch_fingerprints(config)
    assert len(everything) == NUM_TRAIN
    one, _ = _global_batches(config, 1, 2 * EPOCH_STEPS)
    for n in (2, 4):
        parts, loaders = _global_batches(config, n, 2 * EPOCH_STEPS)
        assert [sum(p, []) for p in parts] == [sum(p, []) for p in one]
        for step in parts:  # disjoint within a step
            assert len(set(sum(step, []))) == 8
        for epoch in range(2):  # every example once per epoch, none missing
            seen = [fp for step in parts[epoch * EPOCH_STEPS:(epoch + 1) * EPOCH_STEPS]
                    for fp in sum(step, [])]
            assert sorted(seen) == sorted(everything)
        # The loader state is the same on every process: any process's checkpoint fits all.
        states = {loader.get_state() for loader in loaders}
        assert len(states) == 1
    # Two epochs are shuffled differently.
    assert sum(one[0], []) != sum(one[EPOCH_STEPS], [])


def test_a_saved_position_resumes_every_process_exactly():
    config = _config()
    parts, loaders = _global_batches(config, 2, 3)
    state = loaders[0].get_state()
    after, _ = _global_batches(config, 2, 6)
    for i in range(2):
        fresh = make_loader(config, "train", global_batch_size=8, shard_index=i, shard_count=2,
                            seed=0)
        fresh.set_state(state)  # process 0's state, also on process 1
        assert sharding.example_fingerprints(next(fresh)["image"]) == after[3][i]


def test_resuming_with_another_number_of_processes_is_refused():
    config = _config()
    _, loaders = _global_batches(config, 2, 1)
    four = make_loader(config, "train", global_batch_size=8, shard_index=0, shard_count=4,
                       seed=0)
    with pytest.raises(DataError, match="number of hosts"):
        four.set_state(loaders[0].get_state())


def test_finite_streams_give_every_process_the_same_number_of_batches():
    config = _config()
    config.data.num_eval = 20  # 2 complete global batches of 8, 4 records left over
    one, _ = _global_batches(config, 1, 2, "validation", num_epochs=1, shuffle=False)
    four, loaders = _global_batches(config, 4, 2, "validation", num_epochs=1, shuffle=False)
    assert [sum(p, []) for p in one] == [sum(p, []) for p in four]
    assert all(next(loader, None) is None for loader in loaders)


def test_sampler_repr_names_the_process_count_not_the_index():
    a, b = (ProcessSliceSampler(10, global_batch_size=4, shard_index=i, shard_count=2,
                                shuffle=True, num_epochs=None, seed=0) for i in (0, 1))
    assert repr(a) == repr(b) and "shard_count=2" in repr(a)
    with pytest.raises(ValueError, match="not divisible"):
        ProcessSliceSampler(10, global_batch_size=3, shard_index=0, shard_count=2,
                            shuffle=False, num_epochs=1, seed=0)


# --- real processes ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def jax_env(tmp_path_factory) -> dict[str, str]:
    """A compilation cache shared by the jobs of this test session (the same programs recur)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # shared by the xdist workers of this session
    cache = base / "multihost-jax-cache"
    cache.mkdir(exist_ok=True)
    return {"JAX_COMPILATION_CACHE_DIR": str(cache),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}


def _loss_points(workdir: Path) -> list[tuple[int, float]]:
    from fixed_slots.experiments.events import read_scalars

    return sorted(read_scalars(str(workdir))["loss"])


def _losses(workdir: Path) -> dict[int, float]:
    points = _loss_points(workdir)
    assert len({step for step, _ in points}) == len(points), f"a step written twice: {points}"
    return dict(points)


def _batch_log(prefix: Path, process: int) -> list[list[str]]:
    path = Path(f"{prefix}.process{process}")
    return [json.loads(line) for line in path.read_text().splitlines()]


def _global_from_logs(prefix: Path, num_processes: int, steps: int) -> list[list[str]]:
    """The first `steps` global batches a job consumed (later lines are prefetched)."""
    logs = [_batch_log(prefix, i) for i in range(num_processes)]
    assert all(len(log) >= steps for log in logs)
    return [sum((log[k] for log in logs), []) for k in range(steps)]


def _checkpoint_steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _assert_close(a: dict, b: dict, rtol: float, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert math.isclose(a[k], b[k], rel_tol=rtol, abs_tol=1e-6), (what, k, a[k], b[k])


def _assert_mesh_logged(job: Job, num_processes: int, devices_per_process: int) -> None:
    total = num_processes * devices_per_process
    held = []
    for i in range(num_processes):
        log = job.log(i)
        assert f"Process {i} of {num_processes}; {devices_per_process} local of {total} global " \
               f"devices." in log
        match = re.search(rf"Mesh \{{'data': {total}\}} over {num_processes} processes: "
                          rf"process {i} holds devices \[([0-9, ]+)\]", log)
        assert match, job.tails()
        held += [int(d) for d in match.group(1).split(",")]
    assert len(set(held)) == total  # every process sees the global mesh, each its own part


def test_two_processes_train_like_one_and_resume(tmp_path, jax_env):
    """2 processes x 2 devices vs 1 process x 4 devices: mesh, batches, losses, event files,
    checkpoints, restart, and evaluation."""
    one, two = tmp_path / "one", tmp_path / "two"
    six = ["--config.train.num_steps=6"]

    # The reference: one process, 6 steps (one and a half epochs).
    run_job(1, SMALL + six + [f"--workdir={one}"], log_dir=tmp_path, name="one",
            devices_per_process=4, timeout=JOB_TIMEOUT,
            env=dict(jax_env, FIXED_SLOTS_DEBUG_BATCH_LOG=str(tmp_path / "b_one")))
    reference_batches = _global_from_logs(tmp_path / "b_one", 1, 6)
    reference_losses = _losses(one)
    assert sorted(reference_losses) == [1, 2, 3, 4, 5, 6]

    # Two processes, 4 steps (one epoch).
    job = run_job(2, SMALL + ["--config.train.num_steps=4", f"--workdir={two}"],
                  log_dir=tmp_path, name="two", timeout=JOB_TIMEOUT,
                  env=dict(jax_env, FIXED_SLOTS_DEBUG_BATCH_LOG=str(tmp_path / "b_two")))
    _assert_mesh_logged(job, 2, 2)
    # The global batch is the union of disjoint per-process rows, the same as one process's,
    # and the epoch holds every example once.
    logs = [_batch_log(tmp_path / "b_two", i) for i in range(2)]
    for k in range(EPOCH_STEPS):
        assert len(logs[0][k]) == len(logs[1][k]) == 4
        assert not set(logs[0][k]) & set(logs[1][k])
        assert logs[0][k] + logs[1][k] == reference_batches[k]
    epoch = [fp for k in range(EPOCH_STEPS) for fp in logs[0][k] + logs[1][k]]
    assert sorted(epoch) == sorted(_epoch_fingerprints(_config()))
    # Only process 0 writes event files (one file, each step once); process 1 logs its scalars.
    assert len(list(two.glob("events.out.tfevents.*"))) == 1
    assert [step for step, _ in _loss_points(two)] == [1, 2, 3, 4]
    assert re.search(r"\] \[4\] .*loss=", job.log(1)) and not re.search(r"\] \[4\] ", job.log(0))
    # Checkpoints: each step once, finalised (no temporary directory), saved by both processes.
    assert _checkpoint_steps(two) == [2, 4]
    assert not [p for p in (two / "checkpoints").iterdir() if "tmp" in p.name]
    for i in range(2):
        for step in (2, 4):
            assert re.search(rf"Finished save in .* @ \S*/checkpoints/{step}\b", job.log(i))

    # Restart both processes for 2 more steps: same step, same data position, same losses.
    job = run_job(2, SMALL + six + [f"--workdir={two}", LONGER], log_dir=tmp_path,
                  name="two_resumed",
                  timeout=JOB_TIMEOUT,
                  env=dict(jax_env, FIXED_SLOTS_DEBUG_BATCH_LOG=str(tmp_path / "b_resumed")))
    for i in range(2):
        assert re.search(r"Resumed from \S+ at step 4\b", job.log(i)), job.tails()
    assert _global_from_logs(tmp_path / "b_resumed", 2, 2) == reference_batches[4:6]
    assert _checkpoint_steps(two) == [2, 4, 6]
    assert len(list(two.glob("events.out.tfevents.*"))) == 2  # one per run, process 0's
    _assert_close(_losses(two), reference_losses, 1e-5, "loss curve, 2 processes vs 1")

    # Evaluation (with autoregressive decoding) of the same checkpoint by 1 and 2 processes.
    evaluation = ["--config=configs/default.py:tiny", "--mode=eval", "--config.eval.num_batches=2",
                  f"--config.data.num_train={NUM_TRAIN}", "--verbosity=0", f"--workdir={two}"]
    run_job(1, evaluation, log_dir=tmp_path, name="eval_one", devices_per_process=4,
            timeout=JOB_TIMEOUT, env=jax_env)
    alone = json.loads((two / "eval" / "metrics.json").read_text())
    job = run_job(2, evaluation, log_dir=tmp_path, name="eval_two", timeout=JOB_TIMEOUT,
                  env=jax_env)
    _assert_mesh_logged(job, 2, 2)
    together = json.loads((two / "eval" / "metrics.json").read_text())
    numbers = {k for k, v in alone.items() if isinstance(v, (int, float))}
    assert {"mse_slot_recon", "mse_dvae_recon", "ari", "fg_ari", "num_images"} <= numbers
    assert alone["num_images"] == together["num_images"] == 16
    _assert_close({k: together[k] for k in numbers}, {k: alone[k] for k in numbers}, 1e-4,
                  "evaluation, 2 processes vs 1")


def test_four_processes_train_like_one(tmp_path, jax_env):
    two_steps = SMALL + ["--config.train.num_steps=2"]
    run_job(1, two_steps + [f"--workdir={tmp_path / 'one'}"], log_dir=tmp_path, name="one",
            devices_per_process=4, timeout=JOB_TIMEOUT,
            env=dict(jax_env, FIXED_SLOTS_DEBUG_BATCH_LOG=str(tmp_path / "b_one")))
    job = run_job(4, two_steps + [f"--workdir={tmp_path / 'four'}"], log_dir=tmp_path,
                  name="four", devices_per_process=1, timeout=JOB_TIMEOUT,
                  env=dict(jax_env, FIXED_SLOTS_DEBUG_BATCH_LOG=str(tmp_path / "b_four")))
    _assert_mesh_logged(job, 4, 1)
    four = _global_from_logs(tmp_path / "b_four", 4, 2)
    assert four == _global_from_logs(tmp_path / "b_one", 1, 2)
    assert all(len(set(batch)) == 8 for batch in four)
    _assert_close(_losses(tmp_path / "four"), _losses(tmp_path / "one"), 1e-5,
                  "loss curve, 4 processes vs 1")


def _lost_process_named(log: str, process: int) -> bool:
    """JAX's coordination service names the task whose heartbeats stopped."""
    return bool(re.search(rf"stopped sending heartbeats\):\s*{process}\b|[Tt]ask {process} "
                          r"heartbeat timeout", log))


def test_sigterm_and_kill_of_one_process(tmp_path, jax_env):
    """SIGTERM to process 1: both save the same step and exit 0; the job resumes there.
    kill -9 of process 1: process 0 fails within the heartbeat timeout, naming process 1; the
    job resumes from the last complete checkpoint."""
    workdir = tmp_path / "run"
    long_run = SMALL + [f"--workdir={workdir}", "--config.train.num_steps=1000",
                        "--config.train.checkpoint_every_steps=3"]
    job = Job(2, long_run, log_dir=tmp_path, name="term", env=jax_env).start()
    job.wait_for(1, r"\] \[4\] .*loss=", JOB_TIMEOUT)
    job.send(1, signal.SIGTERM)
    assert job.wait(120) == [0, 0], job.tails()
    stopped = _checkpoint_steps(workdir)[-1]
    assert 4 < stopped < 1000
    for i in range(2):  # the same step saved by both, process 0 never got a signal
        assert re.search(rf"Finished save in .* @ \S*/checkpoints/{stopped}\b", job.log(i))
        assert re.search(rf"\] \[{stopped + 1}\] ", job.log(i)) is None

    # A short heartbeat timeout only here: a busy CI machine must not trip it elsewhere.
    job = Job(2, long_run, log_dir=tmp_path, name="kill",
              env=dict(jax_env, FIXED_SLOTS_HEARTBEAT_TIMEOUT_S="10")).start()
    for i in range(2):
        job.wait_for(i, rf"Resumed from \S+ at step {stopped}\b", JOB_TIMEOUT)
    job.wait_for(1, rf"\] \[{stopped + 4}\] .*loss=", JOB_TIMEOUT)
    job.procs[1].kill()
    killed_at = time.monotonic()
    codes = job.wait(120)  # never hangs: JobTimeout fails the test
    assert codes[1] == -signal.SIGKILL and codes[0] != 0, job.tails()
    assert job.exit_times[0] - killed_at < 60, "process 0 took too long to give up"
    assert _lost_process_named(job.log(0), 1), job.tails()

    # Resume from the last complete checkpoint (an interrupted save is not one).
    last = _checkpoint_steps(workdir)[-1]
    assert last >= stopped
    job = run_job(2, SMALL + [f"--workdir={workdir}", f"--config.train.num_steps={last + 1}",
                              LONGER],
                  log_dir=tmp_path, name="resumed", timeout=JOB_TIMEOUT, env=jax_env)
    for i in range(2):
        assert re.search(rf"Resumed from \S+ at step {last}\b", job.log(i)), job.tails()
    assert _checkpoint_steps(workdir)[-1] == last + 1
    assert not [p for p in (workdir / "checkpoints").iterdir() if "tmp" in p.name]
    assert np.isfinite(_losses(workdir)[last + 1])


# --- processes that disagree, processes that fail at start-up -----------------------------------

def _error_lines(job: Job, process: int) -> list[str]:
    return [line for line in job.log(process).splitlines() if line.startswith("error: ")]


def test_processes_with_different_configs_are_refused(tmp_path, jax_env):
    """Process 1 with another learning rate: both refuse with the same line, exit 2, write
    nothing (instead of training two different models, or a C++ abort for other shapes)."""
    workdir = tmp_path / "run"
    job = Job(2, SMALL + [f"--workdir={workdir}"], log_dir=tmp_path, name="mismatch",
              env=jax_env, process_args={1: ["--config.optim.main_lr=0.001"]}).start()
    assert job.wait(JOB_TIMEOUT) == [2, 2], job.tails()
    lines = [_error_lines(job, i) for i in range(2)]
    assert lines[0] == lines[1] and len(lines[0]) == 1, job.tails()
    assert re.search(r"do not share one config: process 1 differs from process 0 in "
                     r"optim\.main_lr: 0\.0006 on process 0, 0\.001 on process 1\b", lines[0][0])
    assert not workdir.exists()


_HEARTBEAT_S = 10  # the test's heartbeat timeout (a busy CI machine would trip a shorter one)


def _fails_then_job_stops(job: Job, failing: int, error: str) -> tuple[float, float]:
    """(seconds from the failing process's error line to its exit, seconds from its exit to
    the last other process's exit); asserts the codes: 2 for it, non-zero for the others."""
    job.wait_for(failing, rf"^error: .*{error}", JOB_TIMEOUT)
    printed = time.monotonic()
    codes = job.wait(JOB_TIMEOUT)
    assert codes[failing] == 2 and all(c != 0 for c in codes), (codes, job.tails())
    assert len(_error_lines(job, failing)) == 1, job.tails()
    others = [t for i, t in enumerate(job.exit_times) if i != failing]
    return job.exit_times[failing] - printed, max(others) - job.exit_times[failing]


def test_a_process_failing_at_start_up_stops_the_job_within_the_heartbeat_timeout(tmp_path,
                                                                                   jax_env):
    """One process fails at start-up while the other goes on into a collective that waits for
    it: the failing process leaves at once (not after JAX's 5-minute shutdown barrier) and the
    other stops within the heartbeat timeout, non-zero, with a line naming what was lost."""
    env = dict(jax_env, FIXED_SLOTS_HEARTBEAT_TIMEOUT_S=str(_HEARTBEAT_S))
    wait = _HEARTBEAT_S / 2  # a failing process waits this long for others failing too
    slack = 15  # seconds of a busy 2-core machine

    # Process 1 fails: its --workdir is a file (say, storage not mounted on its host).
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    job = Job(2, SMALL + [f"--workdir={tmp_path / 'one'}"], log_dir=tmp_path, name="fail1",
              env=env, process_args={1: [f"--workdir={not_a_dir}"]}).start()
    leaving, stopping = _fails_then_job_stops(job, 1, "is a file")
    assert leaving < wait + slack and stopping < _HEARTBEAT_S + slack, (leaving, stopping)
    assert _lost_process_named(job.log(0), 1), job.tails()

    # Process 0 fails: the workdir is in use (only process 0 takes the lock), the coordinator
    # goes with it and process 1 stops at once.
    held = tmp_path / "held"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from fixed_slots.train.workdir import "
         "WorkdirLock; lock = WorkdirLock(sys.argv[1]); print('locked', flush=True); "
         "time.sleep(600)", str(held)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        job = Job(2, SMALL + [f"--workdir={held}"], log_dir=tmp_path, name="fail0",
                  env=env).start()
        leaving, stopping = _fails_then_job_stops(job, 0, "in use by another run")
    finally:
        holder.kill()
        holder.wait()
    assert leaving < wait + slack and stopping < slack, (leaving, stopping)
    assert re.search(r"leader task was preempted/died|another task died|Connection reset|"
                     r"UNAVAILABLE", job.log(1)), job.tails()
