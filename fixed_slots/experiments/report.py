"""Compares the runs of a sweep: plots (PNG) of training curves and a markdown table.

  python -m fixed_slots.experiments.report --sweep_dir=W [--out=W/report]
      [--tags=loss,grad_norm,jacobian_spectral_norm] [--runs=vanilla_T7,implicit_T7]
      [--versus=slot_attention.num_iterations]

Reads W/<run>/seed_<s>/ event files, eval/metrics.json, command.txt and failed.txt (written by
the sweep runner). Curves: the mean over seeds (thick) and every seed (thin). The table gives
mean ± standard deviation over the seeds that finished (sample std, n-1) of the final training
values (mean of the last 10% of logged points), of the largest value during training for the
norms (`max ...` columns), and of every evaluation metric; runs that failed (e.g. a non-finite
loss) are counted and named in the `failed` column, never averaged in. `--versus=KEY` also plots
the final metrics against a config key the runs vary (e.g. the number of iterations, Fig. 6),
one line per setting of the other keys.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import shlex
import sys
from typing import Any

import numpy as np

from fixed_slots.experiments.events import read_scalars

DEFAULT_TAGS = ("loss", "grad_norm", "jacobian_spectral_norm", "slot_residual")
# Tags whose largest value during training is reported too (the paper's growth of the norms).
MAX_TAGS = ("grad_norm", "jacobian_spectral_norm")
VERSUS_METRICS = ("loss", "mse_slot_recon", "fg_ari")
_NON_FINITE = re.compile(r"non-finite loss or gradient at step (\d+)")


def _config_flags(seed_dir: str) -> dict[str, str]:
    """{config key: value} from the run's command.txt (--config.k=v flags), {} without one."""
    path = os.path.join(seed_dir, "command.txt")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        words = shlex.split(f.read())
    flags = {}
    for word in words:
        if word.startswith("--config.") and "=" in word:
            key, value = word[len("--config."):].split("=", 1)
            flags[key] = value
    return flags


def _failure(seed_dir: str) -> str | None:
    """Why the run failed ("non-finite loss at step N" or the recorded line), None if it did not."""
    path = os.path.join(seed_dir, "failed.txt")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        text = f.readline().strip()
    match = _NON_FINITE.search(text)
    return f"non-finite loss at step {match.group(1)}" if match else text


def collect(sweep_dir: str, names: tuple[str, ...] = ()) -> dict[str, list[dict]]:
    """run name -> [{"seed", "scalars", "metrics", "flags", "failed"}] for every seed directory.

    `names`: keep only these runs, in this order (every run, sorted, when empty)."""
    runs: dict[str, list[dict]] = {}
    for seed_dir in sorted(glob.glob(os.path.join(sweep_dir, "*", "seed_*"))):
        name = os.path.basename(os.path.dirname(seed_dir))
        if names and name not in names:
            continue
        metrics_path = os.path.join(seed_dir, "eval", "metrics.json")
        metrics = {}
        if os.path.exists(metrics_path):
            with open(metrics_path) as f:
                metrics = json.load(f)
        runs.setdefault(name, []).append({
            "seed": int(seed_dir.rsplit("_", 1)[1]),
            "scalars": read_scalars(seed_dir),
            "metrics": metrics,
            "flags": _config_flags(seed_dir),
            "failed": _failure(seed_dir),
        })
    if not runs:
        raise FileNotFoundError(f"no runs (<run>/seed_<s>/ folders) under {sweep_dir}"
                                + (f" named {list(names)}" if names else ""))
    if names:
        missing = [n for n in names if n not in runs]
        if missing:
            raise FileNotFoundError(f"no runs named {missing} under {sweep_dir}; "
                                    f"found {sorted(runs)}")
        runs = {n: runs[n] for n in names}
    return runs


def _final(points: list[tuple[int, float]]) -> float:
    values = [v for _, v in points]
    tail = max(1, len(values) // 10)
    return float(np.mean(values[-tail:]))


def _max(points: list[tuple[int, float]]) -> float:
    return float(max(v for _, v in points))


def _mean_std(values: list[Any]) -> str:
    values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not values:
        return "—"
    mean = float(np.mean(values))
    if len(values) == 1:
        return f"{mean:.4g}"
    return f"{mean:.4g} ± {float(np.std(values, ddof=1)):.2g}"


def _failed_cell(seeds: list[dict]) -> str:
    failed = [s for s in seeds if s["failed"]]
    if not failed:
        return "0"
    reasons = "; ".join(f"seed {s['seed']}: {s['failed']}" for s in failed)
    return f"{len(failed)}/{len(seeds)} ({reasons})"


def table(runs: dict[str, list[dict]], tags: tuple[str, ...]) -> str:
    metric_names = sorted({k for seeds in runs.values() for s in seeds
                           for k, v in s["metrics"].items()
                           if isinstance(v, (int, float)) and k not in ("step", "num_images")})
    train_tags = [t for t in tags if any(t in s["scalars"] for seeds in runs.values()
                                         for s in seeds)]
    max_tags = [t for t in train_tags if t in MAX_TAGS]
    any_failed = any(s["failed"] for seeds in runs.values() for s in seeds)
    header = ["run", "seeds", *(["failed"] if any_failed else []),
              *[f"final {t}" for t in train_tags], *[f"max {t}" for t in max_tags],
              *metric_names]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, seeds in runs.items():
        done = [s for s in seeds if not s["failed"]]
        cells = [name, str(len(seeds))] + ([_failed_cell(seeds)] if any_failed else [])
        cells += [_mean_std([_final(s["scalars"][t]) for s in done if t in s["scalars"]])
                  for t in train_tags]
        cells += [_mean_std([_max(s["scalars"][t]) for s in done if t in s["scalars"]])
                  for t in max_tags]
        cells += [_mean_std([s["metrics"].get(m) for s in done]) for m in metric_names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(runs: dict[str, list[dict]], tag: str, path: str) -> bool:
    """Training curves of `tag`: each run's mean over seeds on the steps every seed logged
    (thick), and each seed alone (thin), so a seed that stopped early stays visible."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = False
    for index, (name, seeds) in enumerate(runs.items()):
        curves = [s["scalars"][tag] for s in seeds if tag in s["scalars"]]
        if not curves:
            continue
        color = f"C{index % 10}"
        failed = sum(1 for s in seeds if s["failed"] and tag in s["scalars"])
        label = f"{name} (n={len(curves)}" + (f", {failed} failed)" if failed else ")")
        for curve in curves if len(curves) > 1 else ():
            ax.plot([st for st, _ in curve], [v for _, v in curve], color=color, alpha=0.3,
                    linewidth=0.8)
        steps = sorted(set.intersection(*[{st for st, _ in c} for c in curves]))
        if steps:
            values = np.array([[dict(c)[st] for st in steps] for c in curves])  # [seeds, steps]
            ax.plot(steps, values.mean(0), color=color, linewidth=2, label=label)
        drawn = True
    if drawn:
        ax.set_xlabel("step")
        ax.set_ylabel(tag)
        if tag in ("loss", "grad_norm", "jacobian_spectral_norm"):
            ax.set_yscale("log")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    plt.close(fig)
    return drawn


def _value(seed: dict, metric: str) -> float | None:
    if seed["failed"]:
        return None
    if metric in seed["metrics"] and isinstance(seed["metrics"][metric], (int, float)):
        return float(seed["metrics"][metric])
    if metric in seed["scalars"]:
        return _final(seed["scalars"][metric])
    return None


def plot_versus(runs: dict[str, list[dict]], key: str, metric: str, path: str) -> bool:
    """Final `metric` (an eval metric, else the final training value) against config `key`:
    one line per setting of the other config flags (seed excluded), mean ± std over seeds."""
    groups: dict[str, dict[float, list[float]]] = {}
    for seeds in runs.values():
        for s in seeds:
            if key not in s["flags"]:
                continue
            try:
                x = float(s["flags"][key])
            except ValueError:
                continue
            others = ", ".join(f"{k}={v}" for k, v in sorted(s["flags"].items())
                               if k not in (key, "seed"))
            value = _value(s, metric)
            groups.setdefault(others or "runs", {}).setdefault(x, [])
            if value is not None and math.isfinite(value):
                groups[others or "runs"][x].append(value)
    groups = {g: points for g, points in groups.items() if len(points) > 1}
    if not groups:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in groups.items():
        xs = sorted(x for x, v in points.items() if v)
        means = [np.mean(points[x]) for x in xs]
        stds = [np.std(points[x], ddof=1) if len(points[x]) > 1 else 0.0 for x in xs]
        ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=label)
    ax.set_xlabel(key)
    ax.set_ylabel(metric)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_report(sweep_dir: str, out_dir: str, tags: tuple[str, ...] = DEFAULT_TAGS,
                 names: tuple[str, ...] = (), versus: str | None = None) -> str:
    runs = collect(sweep_dir, names)
    os.makedirs(out_dir, exist_ok=True)
    parts = [f"# Sweep report: {os.path.abspath(sweep_dir)}", "",
             "Mean ± sample std over the seeds that finished; final training values average the "
             "last 10% of logged points, `max` is the largest logged value. Reconstruction MSE: "
             "sum over pixels and channels per image, images in [0, 1], averaged over images.",
             "", table(runs, tags), ""]
    for tag in tags:
        filename = f"{tag.replace('/', '_')}.png"
        if plot(runs, tag, os.path.join(out_dir, filename)):
            parts += [f"![{tag}]({filename})", ""]
    if versus:
        for metric in VERSUS_METRICS:
            filename = f"{metric}_vs_{versus.replace('.', '_')}.png"
            if plot_versus(runs, versus, metric, os.path.join(out_dir, filename)):
                parts += [f"![{metric} vs {versus}]({filename})", ""]
    report = "\n".join(parts)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(report)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Plots and a table comparing a sweep's runs.")
    parser.add_argument("--sweep_dir", required=True)
    parser.add_argument("--out", default=None, help="default: <sweep_dir>/report")
    parser.add_argument("--tags", default=",".join(DEFAULT_TAGS))
    parser.add_argument("--runs", default="",
                        help="comma-separated run names to compare, in this order (default: all)")
    parser.add_argument("--versus", default=None,
                        help="config key to plot final metrics against (e.g. "
                             "slot_attention.num_iterations)")
    args = parser.parse_args(argv)
    out = args.out or os.path.join(args.sweep_dir, "report")
    names = tuple(n for n in args.runs.split(",") if n)
    try:
        text = write_report(args.sweep_dir, out, tuple(args.tags.split(",")), names, args.versus)
    except FileNotFoundError as e:
        parser.error(str(e))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
