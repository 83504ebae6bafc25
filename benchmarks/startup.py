"""Time from the README's command to the first training step, with a cold and a warm cache.

Starts `python main.py ARGS --workdir=<fresh empty dir> --config.train.log_every_steps=1` (the
override only makes step 1 print its progress line, which is what is timed), reads its output
as it comes, and stops the process (SIGKILL) once the line `step 1/N` appears: seconds from the
start of the process to that line (imports, data, model, compilation of the train step and the
step itself), and the process's peak resident memory up to then. Each run gets a new workdir,
so none resumes; the runs share one compilation cache directory (`FIXED_SLOTS_CACHE_DIR`, see
`fixed_slots/cli.py`), empty at the start unless `--cache_dir` names one: the first run is the
cold start, the others find the train step compiled.

  python benchmarks/startup.py                                  # the README's default, 2 runs
  python benchmarks/startup.py --runs=3 -- --config=configs/default.py:tiny
  python benchmarks/startup.py --cache=off                      # every run compiles
"""
from __future__ import annotations

import argparse
import json
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIRST_STEP = re.compile(r"\bstep 1/\d+")


def time_to_first_step(args: list[str], env: dict[str, str], timeout: float) -> dict:
    """One run of main.py: seconds to its `step 1/N` line and its peak RSS (MiB) until then."""
    workdir = tempfile.mkdtemp(prefix="startup_run_")
    cmd = [sys.executable, os.path.join(ROOT, "main.py"), *args, f"--workdir={workdir}",
           "--config.train.log_every_steps=1"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    seconds, tail = None, []
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    buffer = b""
    try:
        while seconds is None and time.perf_counter() - start < timeout:
            if not selector.select(timeout=1.0):
                if proc.poll() is not None:
                    break
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                text = line.decode(errors="replace")
                tail = (tail + [text])[-20:]
                if FIRST_STEP.search(text):
                    seconds = time.perf_counter() - start
                    break
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        _, _, usage = os.wait4(proc.pid, 0)
        proc.stdout.close()
        shutil.rmtree(workdir, ignore_errors=True)
    if seconds is None:
        raise SystemExit(f"no 'step 1/' line within {timeout:.0f} s; last output:\n"
                         + "\n".join(tail))
    return {"seconds": seconds, "peak_rss_mib": usage.ru_maxrss / 1024}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=2, help="runs; the first one is the cold start")
    p.add_argument("--cache", choices=("fresh", "off"), default="fresh",
                   help="fresh: a new empty cache shared by the runs; off: no cache at all")
    p.add_argument("--cache_dir", default=None, help="use (and keep) this cache directory")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds allowed per run")
    p.add_argument("--json", default=None, help="also write the figures here")
    p.add_argument("main_args", nargs="*", help="main.py's arguments (after --); default: "
                   "--config=configs/default.py, the README's command")
    a = p.parse_args(argv)
    main_args = a.main_args or ["--config=configs/default.py"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    made = None
    if a.cache == "off":
        env["FIXED_SLOTS_CACHE_DIR"] = "off"
    else:
        made = None if a.cache_dir else tempfile.mkdtemp(prefix="startup_cache_")
        env["FIXED_SLOTS_CACHE_DIR"] = a.cache_dir or made
    try:
        runs = [time_to_first_step(main_args, env, a.timeout) for _ in range(a.runs)]
    finally:
        if made:
            shutil.rmtree(made, ignore_errors=True)
    label = "off" if a.cache == "off" else ("given" if a.cache_dir else "fresh")
    print(f"# python main.py {' '.join(main_args)} --workdir=<new>: seconds to the first "
          f"step's line; compilation cache {label}; {time.strftime('%Y-%m-%d %H:%M')}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| run | cache | seconds to step 1 | peak RSS MiB |\n|---|---|---|---|")
    for i, r in enumerate(runs):
        state = "off" if a.cache == "off" else ("cold" if i == 0 and not a.cache_dir else "warm")
        print(f"| {i + 1} | {state} | {r['seconds']:.1f} | {r['peak_rss_mib']:.0f} |")
    out = {"args": main_args, "cache": label, "runs": runs}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
