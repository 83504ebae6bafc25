"""Runs a sweep: every run of a sweep file x every seed, train then evaluate, one workdir each.

  python -m fixed_slots.experiments.sweep --sweep=configs/sweeps/table2.py --workdir=W \
      --seeds=0,1,2 [--set=train.num_steps=1000 ...] [--only=vanilla,IN]

A sweep file defines `BASE` (a config path), optional `COMMON` overrides and `get_runs()` ->
[(run_name, {config key: value})]. Each run is `python main.py --config=BASE --config.k=v ...
--workdir=W/<run_name>/seed_<s>` followed by `--mode=eval`, so every run is reproducible from
its command line, which is written to W/<run_name>/seed_<s>/command.txt, and its output to
train.log / eval.log there. Runs that finished (an eval/metrics.json exists) are skipped, so an
interrupted sweep resumes. A run that fails (e.g. training stopped by a non-finite loss, as
vanilla slot attention may without gradient clipping) is recorded in failed.txt with its last
output line, is not evaluated, and the sweep goes on; the report shows it as failed (delete
failed.txt to try it again). Runs go seed by seed (every run of seed 0, then seed 1, ...): a
sweep stopped early still compares every run. `--only` keeps the named runs. Several sweep
processes can share a sweep: a run being trained or evaluated holds W/<run>/seed_<s>/sweep.lock
(the process id), and the others skip it (a lock whose process is gone is taken over). The exit
code is 1 when a run failed.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import subprocess
import sys
from typing import Any


def load_sweep(path: str):
    if not os.path.exists(path):
        raise FileNotFoundError(f"sweep file {path} does not exist")
    spec = importlib.util.spec_from_file_location("sweep_file", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name in ("BASE", "get_runs"):
        if not hasattr(module, name):
            raise ValueError(f"sweep file {path} must define {name}")
    return module


def _flag(key: str, value: Any) -> str:
    if isinstance(value, (tuple, list)):
        value = "(" + ",".join(str(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return f"--config.{key}={value}"


def run_commands(sweep_path: str, workdir: str, seeds: list[int], extra: dict[str, str],
                 only: list[str] | None = None) -> list[tuple[str, list[str]]]:
    """(run workdir, argv) for every train and eval command of the sweep, in order.

    `only`: names of the runs to keep (ValueError naming the sweep's runs for an unknown one).
    """
    sweep = load_sweep(sweep_path)
    common = dict(getattr(sweep, "COMMON", {}))
    runs = sweep.get_runs()
    if only:
        names = [name for name, _ in runs]
        unknown = [name for name in only if name not in names]
        if unknown:
            raise ValueError(f"--only names runs {unknown} that {sweep_path} does not have; "
                             f"its runs: {names}")
        runs = [(name, overrides) for name, overrides in runs if name in only]
    commands = []
    for seed in seeds:
        for name, overrides in runs:
            run_dir = os.path.join(workdir, name, f"seed_{seed}")
            settings = {**common, **overrides, "seed": seed, **extra}
            flags = [_flag(k, v) for k, v in settings.items()]
            base = [sys.executable, "main.py", f"--config={sweep.BASE}", *flags,
                    f"--workdir={run_dir}"]
            # The evaluation runs as its own step (eval.log; redone if only it failed), not as
            # main.py's evaluation at the end of training.
            commands.append((run_dir, base + ["--config.train.evaluate_at_end=false"]))
            commands.append((run_dir, base + ["--mode=eval"]))
    return commands


def _take_lock(path: str) -> bool:
    """Creates the lock file with this process id; False if a live process holds it."""
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                with open(path) as f:
                    pid = int(f.read().strip() or 0)
                os.kill(pid, 0)  # raises if no such process
                return False
            except (ValueError, ProcessLookupError):
                os.remove(path)  # stale: its sweep process is gone
                continue
            except PermissionError:
                return False  # alive, another user's
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        return True
    return False


def _run_logged(argv: list[str], cwd: str, log_path: str) -> tuple[int, str]:
    """Runs argv, copying its output (stdout and stderr) to the console and to log_path.

    Returns (exit code, last non-empty output line)."""
    last = ""
    with open(log_path, "a") as log, subprocess.Popen(
            argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            errors="replace") as child:
        for line in child.stdout:
            sys.stdout.write(line)
            log.write(line)
            if line.strip():
                last = line.strip()
        returncode = child.wait()
    sys.stdout.flush()
    return returncode, last


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a sweep of experiments.")
    parser.add_argument("--sweep", required=True, help="path to a configs/sweeps/*.py file")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--set", action="append", default=[],
                        help="extra override key=value applied to every run (repeatable)")
    parser.add_argument("--only", default="",
                        help="comma-separated run names to keep (default: every run)")
    parser.add_argument("--dry_run", action="store_true", help="print the commands only")
    args = parser.parse_args(argv)
    extra = {}
    for item in args.set:
        if "=" not in item:
            parser.error(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        extra[key] = value
    seeds = [int(s) for s in args.seeds.split(",")]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    only = [name for name in args.only.split(",") if name]
    try:
        commands = run_commands(args.sweep, args.workdir, seeds, extra, only)
    except ValueError as e:
        parser.error(str(e))
    failures = 0
    for run_dir, argv_ in commands:
        is_eval = argv_[-1] == "--mode=eval"
        command = " ".join(shlex.quote(a) for a in argv_)
        if args.dry_run:
            print(command)
            continue
        if os.path.exists(os.path.join(run_dir, "eval", "metrics.json")):
            print(f"skip (done): {run_dir}")
            continue
        failed_path = os.path.join(run_dir, "failed.txt")
        if os.path.exists(failed_path):
            print(f"skip (failed; delete {failed_path} to retry): {run_dir}", flush=True)
            continue
        os.makedirs(run_dir, exist_ok=True)
        lock = os.path.join(run_dir, "sweep.lock")
        if not _take_lock(lock):
            print(f"skip (another sweep process is running it): {run_dir}", flush=True)
            continue
        try:
            if not is_eval:
                with open(os.path.join(run_dir, "command.txt"), "w") as f:
                    f.write(command + "\n")
            print(f"run: {command}", flush=True)
            log_path = os.path.join(run_dir, "eval.log" if is_eval else "train.log")
            returncode, last = _run_logged(argv_, root, log_path)
        finally:
            os.remove(lock)
        if returncode:
            failures += 1
            with open(failed_path, "w") as f:
                f.write(f"exit code {returncode}: {last}\n{command}\n")
            print(f"FAILED (exit code {returncode}), the sweep goes on: {run_dir}: {last}",
                  flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
