"""bf16 mixed precision vs float32: the same short training run twice, loss curves side by side.

Both runs start from the same seed, data order and parameters; only `train.compute_dtype`
differs (bf16 compute; params, optimiser state and the slot-attention fixed point stay float32).
Prints the logged losses of both runs, their relative difference, each run's training speed, and
a summary line; --noise_floor adds a float32 run with another seed, the yardstick for "unchanged"
(two equally valid float32 runs differ by this much); --plot writes the curves as a PNG, --json
every figure.

  # minutes on a CPU (the README's default run, shortened):
  python benchmarks/mixed_precision.py --config=configs/default.py --steps=1000 --log_every=50 \\
      --noise_floor
  # the paper's setting on a GPU (random-scene stand-in; pass --data_dir for CLEVR-Mirror):
  python benchmarks/mixed_precision.py --config=configs/slate_clevr.py --steps=2000 \\
      --synthetic
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import jax

from fixed_slots import configlib
from fixed_slots.train import trainer
from fixed_slots.train.trainer import train

RESEEDED = "float32_seed+1"


def short_run_config(base, dtype: str, steps: int, log_every: int, synthetic: bool):
    config = trainer.training_only(base, steps, log_every)
    config.train.compute_dtype = dtype
    if synthetic:
        config.data.name = "synthetic"
    return config


def compare(histories: dict[str, list[dict]], keys: list[str]) -> list[dict]:
    """One row per logged step: every run's values of `keys`, and the relative difference of each
    other run's loss from float32's."""
    rows = []
    for logs in zip(*histories.values()):
        row = {"step": logs[0]["step"]}
        for name, log in zip(histories, logs):
            row.update({f"{name}/{k}": log[k] for k in keys})
        for name in list(histories)[1:]:
            row[f"{name}/loss_rel_diff"] = ((row[f"{name}/loss"] - row["float32/loss"])
                                            / abs(row["float32/loss"]))
        rows.append(row)
    return rows


def max_second_half(rows: list[dict], name: str) -> float:
    return max(abs(r[f"{name}/loss_rel_diff"]) for r in rows[len(rows) // 2:])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/default.py")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. --set=slate.attention_impl=cudnn (repeatable)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--log_every", type=int, default=100)
    p.add_argument("--synthetic", action="store_true",
                   help="train on the embedded synthetic scenes at the config's image size")
    p.add_argument("--workdir", default=None, help="keep both runs here (default: a temp dir)")
    p.add_argument("--noise_floor", action="store_true",
                   help="also run float32 with seed+1: the difference two valid runs show")
    p.add_argument("--plot", default=None, help="write the loss curves to this PNG")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    base = configlib.from_file(a.config, a.set)
    runs = {"float32": ("float32", 0), "bfloat16": ("bfloat16", 0)}
    if a.noise_floor:  # float32 again with another seed: how far two equally valid runs differ
        runs[RESEEDED] = ("float32", 1)
    histories, speed = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (dtype, seed_offset) in runs.items():
            workdir = os.path.join(a.workdir or tmp, name)
            config = short_run_config(base, dtype, a.steps, a.log_every, a.synthetic)
            config.seed = base.seed + seed_offset
            start = time.perf_counter()
            histories[name] = train(config, workdir)
            wall = time.perf_counter() - start
            # steps/s of the logged windows after the first (the first holds compilation)
            rates = [h["steps_per_second"] for h in histories[name][1:]]
            speed[name] = {"wall_s": wall, "steps_per_s": statistics.median(rates) if rates
                           else a.steps / wall}
    logged = histories["float32"][0]
    keys = ["loss"] + [k for k in ("dvae_mse", "cross_entropy", "mse") if k in logged]
    rows = compare(histories, keys)
    device = jax.devices()[0]
    print(f"# {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
          f"{a.config}{''.join(' --set=' + x for x in a.set)}"
          f"{' (synthetic data)' if a.synthetic else ''}, {a.steps} steps, seed {base.seed}, "
          f"{time.strftime('%Y-%m-%d')}")
    others = list(histories)[1:]
    cols = [f"{name} {k}" for k in keys for name in histories]
    print("| step | " + " | ".join(cols) + " | "
          + " | ".join(f"{name} loss rel. diff" for name in others) + " |")
    print("|---" * (len(cols) + len(others) + 1) + "|")
    for r in rows:
        vals = " | ".join(f"{r[f'{name}/{k}']:.2f}" for k in keys for name in histories)
        diffs = " | ".join(f"{r[f'{name}/loss_rel_diff']:+.2%}" for name in others)
        print(f"| {r['step']} | {vals} | {diffs} |")
    summary = {name: max_second_half(rows, name) for name in others}
    print("\nmax |loss rel. diff from float32| over the second half: "
          + "; ".join(f"{name} {v:.2%}" for name, v in summary.items())
          + f". steps/s float32 {speed['float32']['steps_per_s']:.2f}, bfloat16 "
          f"{speed['bfloat16']['steps_per_s']:.2f} "
          f"({speed['bfloat16']['steps_per_s'] / speed['float32']['steps_per_s']:.2f}x)")
    if a.plot:
        _plot(rows, a.plot)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "speed": speed, "max_second_half": summary}, f, indent=1)


def _plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    steps = [r["step"] for r in rows]
    for name in [k.split("/")[0] for k in rows[0] if k.endswith("/loss")]:
        ax.plot(steps, [r[f"{name}/loss"] for r in rows], label=name,
                linestyle="--" if name == RESEEDED else "-")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
