"""Where the train step's compilation goes: XLA's phases, its threads, and the kernels per function.

Builds the train step as the trainer does (the CPU split into devices included), lowers it, and
compiles it once under `jax.profiler`, the persistent compilation cache off, then prints:
  - seconds to lower (trace + StableHLO) and to compile;
  - the compiler thread's timeline: every XLA event longer than --min_ms, with its start (ms
    after the compilation began) and duration, nested events below the ones that hold them
    (HLO pass pipelines, thunk emission, LLVM code generation, ...);
  - each XLA thread's busy time (the union of its event intervals): how much of the
    compilation ran in parallel (on the CPU, the fusion emitters and LLVM run on a codegen pool);
  - the compiled step's kernels (fusions, dots, copies, ... of the entry computation) counted by
    the innermost function of ours in their source stack (HLO metadata), the program's size by
    model part: what a smaller program would have to remove.

  python benchmarks/compile_phases.py --config=configs/default.py --set=slate.dvae_hidden=64
  python benchmarks/compile_phases.py --config=configs/default.py:tiny --top=5   # seconds

One process, one compilation: the machine's load moves the seconds (run it twice, or beside
`benchmarks/startup.py`); the kernel counts are exact.
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import sys
import tempfile
import time

import jax
import numpy as np

from fixed_slots import configlib, sharding
from fixed_slots.train import trainer
from fixed_slots.train.train_step import build

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from profile_step import _union_ns  # noqa: E402  (the busy time of a set of intervals)

# Entry-computation instructions that run as kernels (the rest are bitcasts, tuples, parameters).
_KERNEL = re.compile(r"^\s*(?:ROOT )?%\S+ = .*? (fusion|dot|convolution|copy|concatenate|"
                     r"all-reduce|all-reduce-start|custom-call|while|conditional|call|sort|"
                     r"scatter|gather|reduce|transpose)\(")


def _table(text: str, name: str) -> list[str]:
    """Lines of one of the HLO text's trailing tables (FileNames, FunctionNames, ...)."""
    parts = text.split("\n" + name + "\n", 1)
    if len(parts) < 2:
        return []
    return [line for line in parts[1].split("\n\n", 1)[0].splitlines() if line[:1].isdigit()]


def kernels_by_function(hlo_text: str, package: str = "fixed_slots/") -> collections.Counter:
    """Kernels of the entry computation counted by the innermost frame in `package` of their
    source stack ('(no stack)' where the metadata has none, '(outside package)' where no
    frame is ours)."""
    files = {int(l.split()[0]): l.split(None, 1)[1].strip('"') for l in _table(hlo_text, "FileNames")}
    funcs = {int(l.split()[0]): l.split(None, 1)[1].strip('"')
             for l in _table(hlo_text, "FunctionNames")}
    locations, frames = {}, {}
    for line in _table(hlo_text, "FileLocations"):
        f = dict(re.findall(r"(\w+)=(\d+)", line))
        locations[int(line.split()[0])] = (files.get(int(f["file_name_id"]), "?"),
                                           funcs.get(int(f["function_name_id"]), "?"))
    for line in _table(hlo_text, "StackFrames"):
        f = dict(re.findall(r"(\w+)=(\d+)", line))
        frames[int(line.split()[0])] = (int(f["file_location_id"]), int(f["parent_frame_id"]))

    def innermost_ours(frame_id: int) -> str:
        seen = set()
        while frame_id in frames and frame_id not in seen:
            seen.add(frame_id)
            location, frame_id = frames[frame_id]
            file, function = locations.get(location, ("?", "?"))
            if package in file:
                return f"{file.split(package, 1)[1]}:{function}"
        return "(outside package)"

    entry = hlo_text[hlo_text.index("\nENTRY"):] if "\nENTRY" in hlo_text else hlo_text
    entry = entry.split("\n}\n", 1)[0]
    counts: collections.Counter = collections.Counter()
    for line in entry.splitlines():
        if not _KERNEL.match(line):
            continue
        frame = re.search(r"stack_frame_id=(\d+)", line)
        counts[innermost_ours(int(frame.group(1))) if frame else "(no stack)"] += 1
    return counts


def compile_profile(trace_dir: str) -> dict:
    """The compiler's events from a trace: per thread busy ms, and the timeline of the thread
    that ran the longest event (XLA's compile call)."""
    from jax.profiler import ProfileData

    paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    if not paths:
        raise RuntimeError(f"jax.profiler wrote no trace under {trace_dir}")
    lines = {}
    for plane in ProfileData.from_file(paths[0]).planes:
        for line in plane.lines:
            events = [(e.start_ns, e.start_ns + e.duration_ns, e.name) for e in line.events]
            if events and not line.name.startswith("python"):
                lines.setdefault(line.name, []).extend(events)
    if not lines:
        return {"threads": {}, "timeline": []}
    main_line = max(lines, key=lambda n: max(stop - start for start, stop, _ in lines[n]))
    t0 = min(start for start, _, _ in lines[main_line])
    threads = {}
    for name, events in lines.items():
        # Thread-pool lines are named "<pool>/<thread id>": one row per pool thread.
        threads[name] = {"busy_ms": _union_ns((s, e) for s, e, _ in events) / 1e6,
                         "events": len(events)}
    timeline = [{"start_ms": (s - t0) / 1e6, "ms": (e - s) / 1e6, "name": n}
                for s, e, n in sorted(lines[main_line])]
    return {"compiler_thread": main_line, "threads": threads, "timeline": timeline}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/default.py")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override (repeatable)")
    p.add_argument("--min_ms", type=float, default=50.0,
                   help="compiler-thread events shorter than this are left out of the timeline")
    p.add_argument("--top", type=int, default=20, help="functions listed by kernel count")
    p.add_argument("--json", default=None, help="also write every figure here")
    a = p.parse_args(argv)
    if a.min_ms < 0 or a.top < 1:
        p.error(f"--min_ms={a.min_ms} --top={a.top}: need --min_ms >= 0 and --top >= 1")
    config = configlib.from_file(a.config, a.set)
    sharding.split_cpu(config)  # a CPU host split into devices as the trainer splits it
    trainer.check_config(config)
    # A cache hit would time a read, not a compilation.
    jax.config.update("jax_enable_compilation_cache", False)
    mesh = sharding.make_mesh(config.train.num_devices)
    _, state, step = build(config, mesh)
    size = config.data.image_size
    batch = sharding.put_batch({"image": np.random.default_rng(0).random(
        (config.train.batch_size, size, size, 3), np.float32)}, mesh)
    start = time.perf_counter()
    lowered = step.lower(state, batch, jax.random.key(0))
    lower_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        start = time.perf_counter()
        compiled = lowered.compile()
        compile_s = time.perf_counter() - start
        jax.profiler.stop_trace()
        profile = compile_profile(trace_dir)
    kernels = kernels_by_function(compiled.as_text())
    device = jax.devices()[0]
    out = {"device": f"{device.device_kind} ({jax.default_backend()})", "jax": jax.__version__,
           "config": a.config, "overrides": a.set, "devices": mesh.size, "grad": config.grad,
           "date": time.strftime("%Y-%m-%d %H:%M"), "lower_s": lower_s, "compile_s": compile_s,
           "kernels": sum(kernels.values()), "kernels_by_function": dict(kernels.most_common()),
           **profile}
    print(f"# {out['device']}, jax {out['jax']}, {a.config}{''.join(' --set=' + s for s in a.set)}"
          f", {config.grad}, {mesh.size} device(s), {out['date']}")
    print(f"lower {lower_s:.2f} s, compile {compile_s:.2f} s, {out['kernels']} kernels")
    print(f"\ncompiler thread ({profile.get('compiler_thread', 'none')}), events >= "
          f"{a.min_ms:g} ms:\n| start ms | ms | event |\n|---|---|---|")
    for e in profile["timeline"]:
        if e["ms"] >= a.min_ms:
            print(f"| {e['start_ms']:.0f} | {e['ms']:.0f} | {e['name'][:80]} |")
    print("\n| thread | busy ms | events |\n|---|---|---|")
    for name, t in sorted(profile["threads"].items(), key=lambda kv: -kv[1]["busy_ms"]):
        if t["busy_ms"] >= a.min_ms:
            print(f"| {name[:40]} | {t['busy_ms']:.0f} | {t['events']} |")
    print("\n| kernels | innermost function of ours |\n|---|---|")
    for name, n in kernels.most_common(a.top):
        print(f"| {n} | {name} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
