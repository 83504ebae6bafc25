"""Launching real multi-process jobs of `main.py` on localhost (CPU, gloo) for the tests.

    job = Job(2, ["--config=configs/default.py:tiny", f"--workdir={w}"], log_dir=tmp_path)
    job.start(); codes = job.wait(timeout=240)     # a hang kills every process and fails

Each process gets `devices_per_process` fake CPU devices and the FIXED_SLOTS_* variables a real
launcher would set (see fixed_slots/train/sharding.py). Output goes to one log file per process
(no pipes to fill up). Every wait has a timeout: a hung job fails the test instead of CI.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The tiny config with the summaries that are not under test switched off, a loss every step,
# and the libraries' INFO logs on (orbax's save lines, every process's scalars).
# The end-of-run evaluation is off: test_multihost's evaluation test runs it across processes.
TINY = ["--config=configs/default.py:tiny", "--config.train.log_every_steps=1",
        "--config.train.image_every_steps=0", "--config.train.jacobian_every_steps=0",
        "--config.train.evaluate_at_end=false", "--verbosity=0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def process_env(process_id: int, num_processes: int, port: int, devices: int,
                extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    for name in list(env):  # nothing inherited from an outer job or test configuration
        if name.startswith(("FIXED_SLOTS_", "JAX_COORDINATOR")):
            del env[name]
    env.update({
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_DISABLE_MOST_OPTIMIZATIONS": "true",
        "PYTHONUNBUFFERED": "1",
    })
    if num_processes > 1:
        env.update({
            "FIXED_SLOTS_COORDINATOR": f"localhost:{port}",
            "FIXED_SLOTS_NUM_PROCESSES": str(num_processes),
            "FIXED_SLOTS_PROCESS_ID": str(process_id),
        })
    env.update(extra or {})
    return env


class JobTimeout(AssertionError):
    """The job did not finish in time (every process was killed)."""


class Job:
    """N processes of `python main.py ARGS` joined into one jax.distributed job."""

    def __init__(self, num_processes: int, args: list[str], *, log_dir: Path,
                 devices_per_process: int = 2, env: dict[str, str] | None = None,
                 name: str = "job", process_args: dict[int, list[str]] | None = None):
        """`process_args`: extra arguments of some processes (a job whose processes disagree)."""
        self.num_processes = num_processes
        self.args = list(args)
        self.process_args = dict(process_args or {})
        self.devices = devices_per_process
        self.extra_env = dict(env or {})
        self.log_paths = [Path(log_dir) / f"{name}.process{i}.log" for i in range(num_processes)]
        self.procs: list[subprocess.Popen] = []
        self.exit_times: list[float | None] = [None] * num_processes

    def start(self) -> "Job":
        port = free_port()
        for i, path in enumerate(self.log_paths):
            with open(path, "wb") as log:
                self.procs.append(subprocess.Popen(
                    [sys.executable, "main.py", *self.args, *self.process_args.get(i, [])],
                    cwd=ROOT, stdout=log,
                    stderr=subprocess.STDOUT,
                    env=process_env(i, self.num_processes, port, self.devices, self.extra_env)))
        return self

    def poll(self) -> list[int | None]:
        codes = [p.poll() for p in self.procs]
        now = time.monotonic()
        for i, code in enumerate(codes):
            if code is not None and self.exit_times[i] is None:
                self.exit_times[i] = now
        return codes

    def kill_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            p.wait(timeout=30)

    def wait(self, timeout: float) -> list[int]:
        """Return codes once every process exits; after `timeout` s kill all and fail."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            codes = self.poll()
            if all(c is not None for c in codes):
                return codes
            time.sleep(0.2)
        self.kill_all()
        raise JobTimeout(f"job did not finish within {timeout:.0f} s; every process was "
                         f"killed.\n{self.tails()}")

    def wait_for(self, process: int, pattern: str, timeout: float) -> re.Match:
        """The first match of `pattern` in a process's log; fails (killing all) on timeout or
        if the process exits before printing it."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern, re.MULTILINE)
        while time.monotonic() < deadline:
            match = regex.search(self.log(process))
            if match:
                return match
            if self.poll()[process] is not None:  # (poll records exit times)
                self.kill_all()
                raise AssertionError(f"process {process} exited before printing {pattern!r}."
                                     f"\n{self.tails()}")
            time.sleep(0.2)
        self.kill_all()
        raise JobTimeout(f"process {process} did not print {pattern!r} within {timeout:.0f} s."
                         f"\n{self.tails()}")

    def send(self, process: int, sig: int = signal.SIGTERM) -> None:
        self.procs[process].send_signal(sig)

    def log(self, process: int) -> str:
        return self.log_paths[process].read_text(errors="replace")

    def tails(self, lines: int = 25) -> str:
        parts = []
        for i in range(self.num_processes):
            text = [l for l in self.log(i).splitlines() if not l.startswith("W")]
            parts.append(f"--- process {i} (last {lines} lines) ---\n" + "\n".join(text[-lines:]))
        return "\n".join(parts)


def run_job(num_processes: int, args: list[str], *, log_dir: Path, timeout: float,
            name: str = "job", **kwargs) -> Job:
    """Start, wait, and assert every process exited 0 (the logs in the message if not)."""
    job = Job(num_processes, args, log_dir=log_dir, name=name, **kwargs).start()
    codes = job.wait(timeout)
    assert codes == [0] * num_processes, f"exit codes {codes}\n{job.tails()}"
    return job
