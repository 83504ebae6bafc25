"""Host cost of one train-step call: pytree flatten/unflatten of the state and the time to enqueue.

The jitted step runs asynchronously: a call returns once the computation is enqueued, so the
host's per-call work is hidden behind the device only while it is shorter than the step. This
script measures that work at a config's model size (synthetic images, so no dataset), for the
state as it crossed jit before the step took plain arrays and as it does now:

  nnx_state      params as an `nnx.State` (one `nnx.Variable` node per parameter, rebuilt in
                 Python on every call) and the per-leaf optimizer (an Adam moment pair per leaf);
  pure_per_leaf  params as a plain nested dict, still the per-leaf optimizer;
  pure           params as a plain nested dict and the optimizer over one flat buffer per
                 parameter group (what `fixed_slots.train.train_step.build` makes);
  flat_params    a what-if, trivial step only: params too as one buffer per group (the state
                 would be ~10 buffers; the model would unravel them inside the step). Not what
                 the trainer runs; it prices the remaining per-buffer cost.

Columns: state leaves; `jax.tree.flatten` and `jax.tree.unflatten` of the state (median us);
per-call time of a trivial jitted step over the same state (donated, state in -> state out, no
real device work: pure host + dispatch cost; --calls in 5 windows, the median window's mean);
and, with --busy_steps, the time to enqueue each real train step while the device is still
running the previous ones (median over the calls after the first: the device is busy, so this
is the host's own cost). In parentheses: the calling thread's CPU time per call
(`time.thread_time`), the host work on the critical path whatever else the machine runs. With
--busy_steps it also prices the trainer loop's per-step metric accumulation.

  python benchmarks/dispatch.py --config=configs/slate_clevr.py --batch=4 --busy_steps=4
  python benchmarks/dispatch.py --config=configs/default.py:tiny --busy_steps=2     # seconds
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fixed_slots import configlib, models
from fixed_slots.train import trainer
from fixed_slots import sharding
from fixed_slots.train.optim import FlatGroups, group_names, make_optimizer, param_labels
from fixed_slots.train.train_step import TrainState, make_train_step, pure_params

VARIANTS = ("nnx_state", "pure_per_leaf", "pure", "flat_params")


def make_state(config, variant: str, mesh):
    """(graphdef, replicated state, optimizer) with params and optimizer as the variant says."""
    if variant not in VARIANTS:
        raise SystemExit(f"unknown variant {variant!r}: expected one of {VARIANTS}")
    model = models.create(config, rngs=nnx.Rngs(config.seed))
    graphdef, params = nnx.split(model, nnx.Param)
    if variant != "nnx_state":
        params = pure_params(params)
    labels = param_labels(params, model.learning_rate_group)
    tx = make_optimizer(config.optim, labels, flat=variant in ("pure", "flat_params"))
    if variant == "flat_params":
        params = FlatGroups(labels, group_names(config.optim)).ravel(params)
        tx = make_optimizer(config.optim, {g: g for g in params}, flat=False)
    # TrainState.create would make params pure: build the nnx_state variant by hand.
    state = TrainState(params, tx.init(params), jnp.zeros((), jnp.int32),
                       jnp.full((), -1, jnp.int32), jnp.ones((), jnp.float32))
    return graphdef, sharding.replicate(state, mesh), tx


def median_us(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


def jitted(fn, mesh):
    repl, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    return jax.jit(fn, in_shardings=(repl, data, repl), out_shardings=(repl, repl),
                   donate_argnums=(0,))


def trivial_step(state: TrainState, batch, key):
    """Same signature and state as the train step, no real work: what the host pays per call."""
    del batch, key
    return state.replace(step=state.step + 1), {"loss": jnp.zeros((), jnp.float32)}


def measure(config, variant: str, mesh, batch, calls: int, busy_steps: int, repeats: int
            ) -> dict[str, float]:
    graphdef, state, tx = make_state(config, variant, mesh)
    leaves, treedef = jax.tree.flatten(state)
    row = {"variant": variant, "leaves": len(leaves),
           "params_leaves": len(jax.tree.leaves(state.params)),
           "flatten_us": median_us(lambda: jax.tree.flatten(state), repeats),
           "unflatten_us": median_us(lambda: jax.tree.unflatten(treedef, leaves), repeats)}
    key = jax.random.key(0)

    trivial = jitted(trivial_step, mesh)
    for _ in range(3):  # compile and warm the C++ fast path
        state, metrics = trivial(state, batch, key)
    jax.block_until_ready(state)
    # Windows of calls, the median window reported: other jobs on a shared machine steal whole
    # windows, not single calls. The calling thread's CPU time is the host's own work per call.
    windows, cpu = [], 0.0
    per_window = max(calls // 5, 1)
    for _ in range(5):
        start, start_cpu = time.perf_counter(), time.thread_time()
        for _ in range(per_window):
            state, metrics = trivial(state, batch, key)
        jax.block_until_ready((state, metrics))
        windows.append((time.perf_counter() - start) / per_window)
        cpu += (time.thread_time() - start_cpu) / per_window / 5
    row["trivial_call_us"] = 1e6 * statistics.median(windows)
    row["trivial_thread_cpu_us"] = 1e6 * cpu

    row["busy_enqueue_us"] = row["busy_thread_cpu_us"] = row["step_ms"] = None
    if busy_steps and variant != "flat_params":
        step = jitted(make_train_step(graphdef, tx, decay=config.optim.decay), mesh)
        state, metrics = step(state, batch, key)  # compile
        jax.block_until_ready((state, metrics))
        enqueue, enqueue_cpu = [], []
        start = time.perf_counter()
        for _ in range(busy_steps):
            t, t_cpu = time.perf_counter(), time.thread_time()
            state, metrics = step(state, batch, key)
            enqueue.append(time.perf_counter() - t)
            enqueue_cpu.append(time.thread_time() - t_cpu)
        jax.block_until_ready((state, metrics))
        total = time.perf_counter() - start
        # The first call may wait for nothing; the later ones are enqueued behind a busy device.
        row["busy_enqueue_us"] = 1e6 * statistics.median(enqueue[1:] or enqueue)
        row["busy_thread_cpu_us"] = 1e6 * statistics.median(enqueue_cpu[1:] or enqueue_cpu)
        row["step_ms"] = 1e3 * total / busy_steps
        if not np.isfinite(float(metrics.compute()["loss"])):
            raise SystemExit(f"non-finite loss in variant {variant}")
        row.update(accumulate_us(metrics, repeats))
    return row


def accumulate_us(metrics: dict, repeats: int) -> dict[str, float]:
    """Host cost of summing one step's metrics into a running total, as the trainer loop does
    every step: one eager jnp.add per metric vs one jitted call for the whole dict."""
    eager = lambda acc: jax.tree.map(jnp.add, acc, metrics)
    fused = jax.jit(lambda acc, m: jax.tree.map(jnp.add, acc, m))
    jax.block_until_ready((eager(metrics), fused(metrics, metrics)))
    return {"metrics": len(metrics),
            "accumulate_eager_us": median_us(lambda: eager(metrics), repeats),
            "accumulate_jit_us": median_us(lambda: fused(metrics, metrics), repeats)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/slate_clevr.py")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override (repeatable)")
    parser.add_argument("--batch", type=int, default=None,
                        help="images per step (default: the config's; the host cost does not "
                             "depend on it, a small batch keeps the busy steps short on a CPU)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--calls", type=int, default=200, help="trivial-step calls timed")
    parser.add_argument("--repeats", type=int, default=200, help="flatten/unflatten repeats")
    parser.add_argument("--busy_steps", type=int, default=0,
                        help="real train steps enqueued back to back (0: skip; compiles the "
                             "real step once per variant)")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    config = configlib.from_file(args.config, args.set)
    if args.batch:
        config.train.batch_size = args.batch
    config.train.num_devices = 1
    trainer.check_config(config)
    mesh = sharding.make_mesh(1)
    size = config.data.image_size
    batch = sharding.put_batch({"image": np.random.default_rng(0).random(
        (config.train.batch_size, size, size, 3), np.float32)}, mesh)
    device = jax.devices()[0]
    header = {"device": f"{device.device_kind} ({jax.default_backend()})", "jax": jax.__version__,
              "config": args.config, "overrides": args.set, "batch": config.train.batch_size,
              "image_size": size, "date": time.strftime("%Y-%m-%d")}
    print(f"# {header['device']}, jax {header['jax']}, {args.config}"
          f"{''.join(' --set=' + x for x in args.set)}, batch {header['batch']} "
          f"at {size}x{size}, {header['date']}")
    print("| state | leaves (params) | flatten us | unflatten us | trivial step us/call "
          "(thread CPU) | enqueue us, device busy (thread CPU) | ms/step (pipelined) |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for variant in args.variants.split(","):
        r = measure(config, variant, mesh, batch, args.calls, args.busy_steps, args.repeats)
        rows.append(r)
        busy = ("n/a" if r["busy_enqueue_us"] is None else
                f"{r['busy_enqueue_us']:.0f} ({r['busy_thread_cpu_us']:.0f})")
        ms = "n/a" if r["step_ms"] is None else f"{r['step_ms']:.1f}"
        print(f"| {variant} | {r['leaves']} ({r['params_leaves']}) | {r['flatten_us']:.0f} | "
              f"{r['unflatten_us']:.0f} | {r['trivial_call_us']:.0f} "
              f"({r['trivial_thread_cpu_us']:.0f}) | {busy} | {ms} |",
              flush=True)
    for r in rows:
        if "accumulate_eager_us" in r:
            print(f"\n{r['variant']}: summing the step's {r['metrics']} metrics into the running "
                  f"total (the trainer loop, every step): eager jnp.add per metric "
                  f"{r['accumulate_eager_us']:.0f} us, one jitted call "
                  f"{r['accumulate_jit_us']:.0f} us")
    out = {"header": header, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
