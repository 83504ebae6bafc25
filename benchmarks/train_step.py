"""SLATE train-step speed, memory and FLOP utilisation; decode throughput with the KV cache.

Prints a markdown table: median ms/step blocking (each step waited for, as the official harness
times it) and pipelined (the steps enqueued back to back, one block at the end: what the trainer
loop, which never waits per step, can reach), images/s (blocking), peak device memory (XLA's static peak of the
compiled step: arguments + outputs + temporaries - donated aliases; and the allocator's peak where
the backend reports it), and model
FLOP utilisation (the compiled step's FLOP count from XLA's cost analysis / time / peak FLOP/s;
XLA counts a loop body once, so the slot-attention iterations beyond the first are not in the
count: a slight undercount, as the decoder and dVAE dominate the step)
for each grad mode and number of slot-attention iterations; then decode throughput of greedy
autoregressive reconstruction with the KV cache vs the official full-recompute algorithm.

Each (grad, T) row runs in a fresh subprocess by default (`--isolate`), so the allocator's peak
memory is that row's alone (JAX cannot reset a device's peak counter). `--json=PATH` also writes
the rows as JSON (what `side_by_side.py` reads).

  # the paper's CLEVR-Mirror setting (96x96, batch 50, 7 iterations) on a GPU:
  python benchmarks/train_step.py --config=configs/slate_clevr.py --iters=1,3,7,15
  # seconds on a CPU (tiny shapes), so the script cannot rot:
  python benchmarks/train_step.py --config=configs/default.py:tiny --iters=1,3 --steps=3
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
from flax import nnx

from fixed_slots import cli, configlib, host_memory
from fixed_slots.train import trainer
from fixed_slots.modules.decoding import generate_tokens, generate_tokens_full_recompute
from fixed_slots import sharding
from fixed_slots.train.train_step import build, model_from_params, split_params

# Dense bf16 peak FLOP/s used for utilisation (H100 SXM); CPU rows print "n/a".
PEAK_FLOPS = {"gpu": 989e12, "tpu": 197e12}


def peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def compiled_peak_bytes(memory) -> int:
    """XLA's static peak of a compiled call: inputs + outputs + temporaries, less the outputs
    written into donated input buffers."""
    return (memory.argument_size_in_bytes + memory.output_size_in_bytes
            + memory.temp_size_in_bytes - memory.alias_size_in_bytes)


def time_train_step(config, steps: int, warmup: int, donate: bool = True) -> dict[str, float]:
    mesh = sharding.make_mesh(config.train.num_devices)
    _, state, train_step = build(config, mesh, donate=donate)
    size = config.data.image_size
    rng = np.random.default_rng(0)
    batch = sharding.put_batch(
        {"image": rng.random((config.train.batch_size, size, size, 3), np.float32)}, mesh)
    key = jax.random.key(0)
    start = time.perf_counter()
    compiled = train_step.lower(state, batch, key).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    # As the trainer does once the step is compiled (after this harness's own analyses, which
    # the trainer does not run).
    host_memory.release_freed_memory()
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
    # `train_step` (jit's C++ fast path, which reuses the compilation above) as the trainer
    # calls it; the Compiled object's own __call__ is a slower Python path.
    for _ in range(max(warmup, 1)):
        state, metrics = train_step(state, batch, key)
        jax.block_until_ready(metrics)
    times = []  # blocking: each step waits for the previous one to finish (host + device)
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = train_step(state, batch, key)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    # pipelined: `steps` steps enqueued back to back, one block at the end, as the trainer runs
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = train_step(state, batch, key)
    jax.block_until_ready((state, metrics))
    pipelined_ms = 1e3 * (time.perf_counter() - start) / steps
    values = jax.device_get(metrics).compute()
    loss = float(values["loss"]) if "loss" in values else float("nan")
    if not np.isfinite(loss):
        raise SystemExit(f"non-finite loss {loss} (grad {config.grad})")
    ms = 1e3 * statistics.median(times)
    peak = PEAK_FLOPS.get(jax.default_backend())
    return {
        "grad": config.grad,
        "iters": config.slot_attention.num_iterations,
        "ms": ms,
        "min_ms": 1e3 * min(times),
        "pipelined_ms": pipelined_ms,
        "images_per_s": config.train.batch_size / (ms / 1e3),
        "compiled_mib": compiled_peak_bytes(memory) / 2**20,
        "peak_mib": (peak_bytes() or 0) / 2**20,
        # XLA counts one device's program; the step is that on every device of the mesh
        "gflop": flops * mesh.size / 1e9,
        "mfu": flops / (ms / 1e3) / peak if peak and flops else None,  # None: peak unknown
        "devices": mesh.size,
        "compile_s": compile_s,
        "loss": loss,
        # the process's peak resident memory (Linux: KiB); on a CPU the only allocator peak there
        # is, compilation included — comparable with official_slate.py's on the same machine
        "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def time_training_loop(config, steps: int) -> float:
    """ms/step of the real trainer loop (synthetic scenes at the config's shapes, the grain
    pipeline, device prefetch, metrics fetched every log step): the bare step plus whatever the
    host adds. Median of the progress line's windowed rate over the logged windows after the
    first (the first holds compilation)."""
    from fixed_slots.train.trainer import train

    config = trainer.training_only(config, steps, log_every=max(steps // 5, 1))
    config.data.name = "synthetic"
    with tempfile.TemporaryDirectory() as workdir:
        history = train(config, workdir)
    rates = [h["steps_per_second"] for h in history[1:]] or [history[-1]["steps_per_second"]]
    return 1e3 / statistics.median(rates)


def time_decode(config, batch: int, repeats: int, variants: list[str]) -> dict[str, float]:
    """images/s of greedy autoregressive reconstruction (slots -> all tokens) per algorithm."""
    from fixed_slots import models

    model = models.create(config, rngs=nnx.Rngs(0))
    graphdef, params = split_params(model)  # plain arrays across jit, as the trainer's state
    slots = jax.random.normal(jax.random.key(0), (batch, config.slot_attention.num_slots,
                                                  config.slot_attention.slot_size))
    algorithms = {"kv_cache": generate_tokens, "full_recompute": generate_tokens_full_recompute}

    def decoder(generate):
        @jax.jit
        def run(params, slots):
            m = model_from_params(graphdef, params)
            return generate(m.decoder, lambda ids, start: m.embed(ids, start), m.head,
                            m.slot_proj(slots), m.num_tokens, 0, token_id_offset=1)
        return run

    out = {}
    for name in variants:
        run = decoder(algorithms[name])
        jax.block_until_ready(run(params, slots))
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(run(params, slots))
            times.append(time.perf_counter() - start)
        out[name] = batch / statistics.median(times)
    return out


def _row_in_subprocess(args: argparse.Namespace, grad: str, iters: int) -> dict[str, float]:
    """One row in a fresh process: its allocator peak is its own."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "row.json")
        cmd = [sys.executable, os.path.abspath(__file__), f"--config={args.config}",
               f"--grads={grad}", f"--iters={iters}", f"--steps={args.steps}",
               f"--warmup={args.warmup}", "--decode_repeats=0", "--no-isolate", "--quiet",
               "--donate" if args.donate else "--no-donate",
               f"--json={path}", *(f"--set={x}" for x in args.set)]
        if args.cache_dir:
            cmd.append(f"--cache_dir={args.cache_dir}")
        if args.compute_dtype:
            cmd.append(f"--compute_dtype={args.compute_dtype}")
        subprocess.run(cmd, check=True)
        with open(path) as f:
            return json.load(f)["rows"][0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/slate_clevr.py")
    parser.add_argument("--grads", default="unroll,neumann1", help="'' times only decoding")
    parser.add_argument("--iters", default="1,3,7,15", help="slot-attention iterations T")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after compilation")
    parser.add_argument("--compute_dtype", default=None, help="override config.train.compute_dtype")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. --set=slate.attention_impl=cudnn (repeatable)")
    parser.add_argument("--decode_repeats", type=int, default=3, help="0 skips the decode table")
    parser.add_argument("--decode_batch", type=int, default=None,
                        help="images per decode batch (default: the config's batch size)")
    parser.add_argument("--decode_variants", default="kv_cache,full_recompute")
    parser.add_argument("--loop_steps", type=int, default=0,
                        help="also time the whole trainer loop for this many steps (the "
                             "config's grad and T) against the bare step")
    parser.add_argument("--donate", action=argparse.BooleanOptionalAction, default=True,
                        help="donate the train state to the step (--no-donate: before/after)")
    parser.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=True,
                        help="each train-step row in its own process (clean peak memory)")
    parser.add_argument("--cache_dir", default=None,
                        help="JAX's persistent compilation cache here, as main.py uses it: a "
                             "second run with the same directory times a warm start (its peak "
                             "memory without XLA's compilation)")
    parser.add_argument("--json", default=None, help="also write the figures here as JSON")
    parser.add_argument("--quiet", action="store_true", help="no table (with --json)")
    args = parser.parse_args(argv)
    if args.cache_dir:
        cli.use_compilation_cache(args.cache_dir)
    base = configlib.from_file(args.config, args.set)
    if args.compute_dtype:
        base.train.compute_dtype = args.compute_dtype
    sharding.split_cpu(base)  # a CPU host split into devices as main.py's trainer splits it
    trainer.check_config(base)  # a bad override fails here, not after minutes on the device
    say = (lambda *a, **k: None) if args.quiet else print
    device = jax.devices()[0]
    header = {
        "device": f"{device.device_kind} ({jax.default_backend()})", "jax": jax.__version__,
        "config": args.config, "overrides": args.set, "image_size": base.data.image_size,
        "batch_size": base.train.batch_size, "compute_dtype": base.train.compute_dtype,
        "attention_impl": base.get("slate", {}).get("attention_impl"),
        "date": time.strftime("%Y-%m-%d"), "steps": args.steps, "warmup": args.warmup,
        "donate": args.donate, "devices": base.train.num_devices or jax.device_count(),
    }
    say(f"# {header['device']}, jax {header['jax']}, config {args.config}"
        f"{''.join(' --set=' + x for x in args.set)}: "
        f"{base.data.image_size}x{base.data.image_size}, batch {base.train.batch_size}, "
        f"dtype {base.train.compute_dtype}, attention {header['attention_impl']}, "
        f"{header['devices']} device{'s' * (header['devices'] > 1)} (data-parallel; compiled "
        "MiB per device), "
        f"median of {args.steps} steps after {args.warmup} warm-up, {header['date']}"
        + ("" if args.donate else "; state NOT donated")
        + ("; each row in its own process" if args.isolate else ""))
    rows = []
    cells = [(g, int(t)) for g in args.grads.split(",") if g for t in args.iters.split(",")]
    if cells:
        say("| grad | T | ms/step | pipelined ms/step | images/s | compiled MiB | peak MiB "
            "| GFLOP/step | MFU |")
        say("|---|---|---|---|---|---|---|---|---|")
    for grad, t in cells:
        if args.isolate:
            r = _row_in_subprocess(args, grad, t)
        else:
            config = base.copy_and_resolve_references()
            config.grad = grad
            config.slot_attention.num_iterations = t
            r = time_train_step(config, args.steps, args.warmup, donate=args.donate)
        rows.append(r)
        say(f"| {grad} | {t} | {r['ms']:.1f} | {r['pipelined_ms']:.1f} | "
            f"{r['images_per_s']:.0f} | "
            f"{r['compiled_mib']:.1f} | {r['peak_mib']:.0f} | {r['gflop']:.1f} | "
            f"{'n/a' if r['mfu'] is None else format(r['mfu'], '.1%')} |", flush=True)
    loop = {}
    if args.loop_steps:
        bare = next((r for r in rows if (r["grad"], r["iters"]) == (
            base.grad, base.slot_attention.num_iterations)), None)
        if bare is None:
            bare = (_row_in_subprocess(args, base.grad, base.slot_attention.num_iterations)
                    if args.isolate else time_train_step(base, args.steps, args.warmup))
        loop = {"grad": base.grad, "iters": base.slot_attention.num_iterations,
                "loop_ms": time_training_loop(base, args.loop_steps), "bare_ms": bare["ms"]}
        say(f"\n| trainer loop, {loop['grad']} T={loop['iters']} ({args.loop_steps} steps, "
            f"synthetic data) | ms/step |\n|---|---|\n| bare compiled step | "
            f"{loop['bare_ms']:.1f} |\n| whole loop (data, prefetch, logging) | "
            f"{loop['loop_ms']:.1f} |\n| host overhead | "
            f"{loop['loop_ms'] / loop['bare_ms'] - 1:+.1%} |")
    decode = {}
    if args.decode_repeats > 0:
        batch = args.decode_batch or base.train.batch_size
        variants = args.decode_variants.split(",")
        decode = time_decode(base, batch, args.decode_repeats, variants)
        decode["batch"] = batch
        say(f"\n| decode ({batch} images, {(base.data.image_size // 4) ** 2} tokens each) "
            f"| images/s |\n|---|---|")
        if "kv_cache" in decode:
            say(f"| KV cache | {decode['kv_cache']:.1f} |")
        if "full_recompute" in decode:
            say(f"| full recompute (official algorithm) | {decode['full_recompute']:.1f} |")
        if len(variants) == 2:
            say(f"| speed-up | {decode['kv_cache'] / decode['full_recompute']:.1f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "rows": rows, "loop": loop, "decode": decode}, f,
                      indent=1)


if __name__ == "__main__":
    main()
