"""Where a train step's time goes: device busy time, kernels per step, top kernels, HLO op counts.

Runs N train steps pipelined (enqueued back to back, one block at the end) under `jax.profiler`,
reads the trace back with `jax.profiler.ProfileData` and prints:
  - device busy time per step (the union of the kernel intervals) against the step's wall time;
  - the host time of one call (the median `PjitFunction(train_step)` event on the python line:
    pytree flatten, argument checks, enqueue, output arrays);
  - kernels per step and the top kernels by total time;
  - static op counts of the compiled step's HLO (`hlo_op_counts`): the ops XLA launches per step
    (fusions, custom calls, copies, ...; a loop body counted once), comparable on any backend.

On a GPU the kernels are the events on the device plane's stream lines. On a CPU there is no
device plane: the "kernels" are the XLA CPU runtime's thunks (fusions, XNNPACK/oneDNN calls,
dots) on the host plane's XLA client threads, and busy time is when at least one thread runs one.
The output says which it read.

  python benchmarks/profile_step.py --config=configs/slate_clevr.py --steps=10    # GPU
  python benchmarks/profile_step.py --config=configs/default.py:tiny --steps=3            # CPU, seconds
  python benchmarks/profile_step.py --config=configs/slate_clevr.py --hlo_only    # counts only
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import tempfile
import time
from typing import Iterable

import jax
import numpy as np

from fixed_slots import configlib
from fixed_slots.train import trainer
from fixed_slots import sharding
from fixed_slots.train.train_step import build

# HLO instructions that launch nothing (bookkeeping or control flow whose bodies are counted).
_NOT_LAUNCHED = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while",
                 "conditional", "call", "after-all", "partition-id", "replica-id",
                 "opt-barrier", "add-dependency", "domain", "async-done", "async-update",
                 "copy-done", "send-done", "recv-done"}
# Attributes naming computations that run as launches of their own (not fused bodies).
_LAUNCHED_CALLS = re.compile(r"\b(?:condition|body|to_apply|true_computation|false_computation)"
                             r"=%?([\w.\-]+)|branch_computations=\{([^}]*)\}|calls=%?([\w.\-]+)")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*.*?\s([a-z][\w\-]*)\(")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")


def hlo_op_counts(hlo_text: str) -> dict[str, int]:
    """Opcode -> count of the ops the compiled module launches, from `compiled.as_text()`.

    Walks from the entry computation into while/conditional/call bodies (each counted once) and
    async wrappers, never into fusion bodies or reduction lambdas: a fusion is one op, as it is
    one kernel (or one CPU thunk). "total" is the sum.
    """
    computations: dict[str, list[str]] = {}
    entry, name = None, None
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header and "->" in line:
            name = header.group(2)
            computations[name] = []
            if header.group(1):
                entry = name
        elif line.strip() == "}":
            name = None
        elif name is not None:
            computations[name].append(line)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    counts: collections.Counter = collections.Counter()
    seen, todo = set(), [entry]
    while todo:
        comp = todo.pop()
        if comp in seen or comp not in computations:
            continue
        seen.add(comp)
        for line in computations[comp]:
            match = _INSTRUCTION.match(line)
            if not match:
                continue
            opcode = match.group(1)
            if opcode not in _NOT_LAUNCHED:
                counts[opcode] += 1
            if opcode in ("while", "conditional", "call", "async-start"):
                for m in _LAUNCHED_CALLS.finditer(line):
                    for group in m.groups():
                        if group:
                            todo.extend(c.strip().lstrip("%") for c in group.split(","))
    counts["total"] = sum(counts.values())
    return dict(counts)


def format_counts(counts: dict[str, int], top: int = 8) -> str:
    rest = sorted(((n, op) for op, n in counts.items() if op != "total"), reverse=True)
    return (f"{counts.get('total', 0)} ops: "
            + ", ".join(f"{op} {n}" for n, op in rest[:top])
            + (", ..." if len(rest) > top else ""))


# --- reading a trace ------------------------------------------------------------------------

_DERIVED_LINES = {"Steps", "XLA Modules", "XLA Ops", "XLA TraceMe", "Framework Name Scope",
                  "Framework Ops", "Source code", "Launch Stats", "TensorFlow Name Scope",
                  "TensorFlow Ops", "Async XLA Ops"}
_CPU_BOOKKEEPING = ("end: ", "ThreadpoolListener", "ThunkExecutor", "ProcessMarker",
                    "SlinkyThreadPool")  # thread-pool waits, not work
# CPU control-flow thunks enclose their bodies' thunks (which are events of their own).
_CPU_CONTROL = re.compile(r"^(while|conditional|call)(\.\d+)?$")


def _union_ns(intervals: Iterable[tuple[int, int]]) -> int:
    total, end = 0, None
    for s, e in sorted(intervals):
        if end is None or s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def kernel_events(profile) -> tuple[str, list[tuple[str, int, int]]]:
    """(what was read, [(name, start_ns, end_ns)]) of the kernels in a jax.profiler trace."""
    devices = [p for p in profile.planes if p.name.startswith("/device:")
               and not p.name.startswith("/device:CUSTOM")]
    events = []
    if devices:
        for plane in devices:
            lines = [l for l in plane.lines if l.name not in _DERIVED_LINES]
            streams = [l for l in lines if l.name.startswith("Stream")]
            for line in streams or lines:
                events += [(e.name, e.start_ns, e.end_ns) for e in line.events]
        names = ", ".join(sorted({p.name for p in devices}))
        return f"device kernels ({names}, stream lines)", events
    host = profile.find_plane_with_name("/host:CPU")
    if host is None:
        raise RuntimeError("the trace has neither a device plane nor /host:CPU")
    for line in host.lines:
        if line.name == "python" or not line.name.startswith(("tf_XLA", "XLA", "tf_pjrt")):
            continue
        events += [(e.name, e.start_ns, e.end_ns) for e in line.events
                   if not e.name.startswith(_CPU_BOOKKEEPING) and e.duration_ns > 0
                   and not _CPU_CONTROL.match(e.name)]
    return "CPU thunks (no device plane: XLA CPU runtime threads on /host:CPU)", events


def host_call_us(profile, function: str = "train_step") -> float | None:
    """Median duration of the jitted step's C++ dispatch events (`PjitFunction(...)`) on the
    host plane (the calling thread's line, named after the process): the host time of one call,
    flatten to enqueue."""
    host = profile.find_plane_with_name("/host:CPU")
    if host is None:
        return None
    durations = [e.duration_ns for line in host.lines for e in line.events
                 if e.name.startswith("PjitFunction") and function in e.name]
    return float(np.median(durations)) / 1e3 if durations else None


def summarise_trace(trace_dir: str, steps: int, wall_s: float, top: int) -> dict:
    from jax.profiler import ProfileData

    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
    if not paths:
        raise RuntimeError(f"jax.profiler wrote no .xplane.pb under {trace_dir}")
    profile = ProfileData.from_file(paths[-1])
    what, events = kernel_events(profile)
    if not events:
        raise RuntimeError(f"no {what} in the trace")
    busy_ns = _union_ns((s, e) for _, s, e in events)
    by_name: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for name, s, e in events:
        by_name[name][0] += e - s
        by_name[name][1] += 1
    total_ns = sum(e - s for _, s, e in events)
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "read": what,
        "host_call_us": host_call_us(profile),
        "wall_ms_per_step": 1e3 * wall_s / steps,
        "busy_ms_per_step": busy_ns / 1e6 / steps,
        "busy_fraction": busy_ns / 1e9 / wall_s,
        "kernels_per_step": len(events) / steps,
        "distinct_kernels": len(by_name),
        "top": [{"name": n, "ms_per_step": t / 1e6 / steps, "calls_per_step": c / steps,
                 "share": t / total_ns} for n, (t, c) in ranked],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/slate_clevr.py")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override (repeatable)")
    parser.add_argument("--compute_dtype", default=None)
    parser.add_argument("--batch", type=int, default=None, help="override the batch size")
    parser.add_argument("--steps", type=int, default=10, help="traced steps (pipelined)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--top", type=int, default=15, help="kernels listed")
    parser.add_argument("--hlo_only", action="store_true",
                        help="only the compiled step's HLO op counts (no run, no trace)")
    parser.add_argument("--flat_optimizer", action=argparse.BooleanOptionalAction, default=True,
                        help="--no-flat_optimizer: the per-leaf optimizer (before/after counts)")
    parser.add_argument("--trace_dir", default=None, help="keep the trace here (default: temp)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    config = configlib.from_file(args.config, args.set)
    if args.compute_dtype:
        config.train.compute_dtype = args.compute_dtype
    if args.batch:
        config.train.batch_size = args.batch
    sharding.split_cpu(config)  # a CPU host split into devices as the trainer splits it
    trainer.check_config(config)
    mesh = sharding.make_mesh(config.train.num_devices)
    _, state, step = build(config, mesh, flat_optimizer=args.flat_optimizer)
    size = config.data.image_size
    batch = sharding.put_batch({"image": np.random.default_rng(0).random(
        (config.train.batch_size, size, size, 3), np.float32)}, mesh)
    key = jax.random.key(0)
    # Compiled once here; calling `step` afterwards reuses it through jit's C++ fast path (the
    # Compiled object's own __call__ is a slower Python path the trainer never takes).
    compiled = step.lower(state, batch, key).compile()
    counts = hlo_op_counts(compiled.as_text())
    device = jax.devices()[0]
    out = {"device": f"{device.device_kind} ({jax.default_backend()})", "jax": jax.__version__,
           "config": args.config, "overrides": args.set, "batch": config.train.batch_size,
           "compute_dtype": config.train.compute_dtype, "grad": config.grad,
           "iters": config.slot_attention.num_iterations, "flat_optimizer": args.flat_optimizer,
           "date": time.strftime("%Y-%m-%d"), "hlo_ops": counts, "devices": mesh.size}
    print(f"# {out['device']}, jax {out['jax']}, {args.config}"
          f"{''.join(' --set=' + x for x in args.set)}, batch {out['batch']}, "
          f"{out['compute_dtype']}, {out['grad']} T={out['iters']}, "
          f"{'flat' if args.flat_optimizer else 'per-leaf'} optimizer, {mesh.size} "
          f"device{'s' * (mesh.size > 1)} (kernels counted on all), {out['date']}")
    print(f"compiled step HLO: {format_counts(counts)}")
    if not args.hlo_only:
        for _ in range(max(args.warmup, 1)):
            state, metrics = step(state, batch, key)
        jax.block_until_ready((state, metrics))
        trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="profile_step_")
        with jax.profiler.trace(trace_dir):
            start = time.perf_counter()
            for i in range(args.steps):
                with jax.profiler.StepTraceAnnotation("train", step_num=i):
                    state, metrics = step(state, batch, key)
            jax.block_until_ready((state, metrics))
            wall = time.perf_counter() - start
        trace = summarise_trace(trace_dir, args.steps, wall, args.top)
        out["trace"] = trace
        print(f"read: {trace['read']}")
        print(f"{args.steps} steps pipelined: {trace['wall_ms_per_step']:.2f} ms/step, busy "
              f"{trace['busy_ms_per_step']:.2f} ms/step ({trace['busy_fraction']:.0%}), "
              f"{trace['kernels_per_step']:.0f} kernels/step ({trace['distinct_kernels']} "
              f"distinct); host time per call "
              f"{'n/a' if trace['host_call_us'] is None else format(trace['host_call_us'], '.0f')}"
              f" us")
        print("\n| kernel | ms/step | calls/step | share of kernel time |\n|---|---|---|---|")
        for k in trace["top"]:
            print(f"| `{k['name'][:80]}` | {k['ms_per_step']:.3f} | {k['calls_per_step']:.1f} "
                  f"| {k['share']:.1%} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
