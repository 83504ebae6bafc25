"""Compares the runs of a sweep: plots (PNG) of training curves and markdown tables.

  python -m fixed_slots.experiments.report --sweep_dir=W [--out=W/report]
      [--tags=loss,grad_norm,jacobian_spectral_norm] [--runs=vanilla_T7,implicit_T7]
      [--versus=slot_attention.num_iterations] [--paired=IN-vanilla,IN-vanilla_T8]
      [--main_metric=fg_ari] [--baselines=W/baselines.json]

Reads W/<run>/seed_<s>/ event files, eval/metrics.json, eval/per_image.json, command.txt and
failed.txt (written by the sweep runner and the evaluation), and W/baselines.json (written by
`python -m fixed_slots.experiments.baselines --out=W`). Curves: the mean over seeds (thick) and
every seed (thin). The table gives mean ± standard deviation over the seeds that finished (sample
std, n-1) of the final training values (mean of the last 10% of logged points), of the largest
value during training for the norms (`max ...` columns), and of every evaluation metric; runs
that failed (e.g. a non-finite loss) are counted and named in the `failed` column, never averaged
in. `--versus=KEY` also plots the final metrics against a config key the runs vary (e.g. the
number of iterations, Fig. 6), one line per setting of the other keys.

Statistics:
- the per-seed table: every evaluation metric of every seed, ± the evaluation's own standard
  error over images (from per_image.json), and the final training values;
- the `eval SE` columns: each run's standard error over images of a metric, averaged over seeds
  (the evaluation's noise floor, to read the seed spread against);
- `--paired=A-B,...`: arms paired by seed (A and B trained with the same seed), the difference
  A - B per seed, its mean, standard error over seeds, the number of seeds where A is better,
  a one-sided exact sign-flip permutation test over seeds (H1: A better; all 2^n sign flips of
  the differences) and a one-sided paired t-test (scipy); and the evaluation's standard error of
  one seed's difference (per-image differences on the same images). The first pair on
  `--main_metric` is the main comparison: the report says whether it is decided (exact
  sign-flip p < 0.05) and, if not, the smallest p its number of seeds can reach (2^-n);
  the other rows are secondary (no correction for multiple comparisons).
- baselines.json: the trivial baselines' FG-ARI / ARI (± SE over images) next to the runs, a
  check that they were scored on the same scenes (image count and the token-resolution
  ceiling, a fingerprint of the masks), and which runs beat the best input-independent layout
  and the best baseline.
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

DEFAULT_TAGS = ("loss", "grad_norm", "slot_attention_grad_norm", "jacobian_spectral_norm",
                "slot_residual")
# Tags whose largest value during training is reported too (the paper's growth of the norms).
MAX_TAGS = ("grad_norm", "slot_attention_grad_norm", "jacobian_spectral_norm")
VERSUS_METRICS = ("loss", "mse_slot_recon", "fg_ari")
_NON_FINITE = re.compile(r"non-finite loss or gradient at step (\d+)")
# Metrics whose evaluation noise (standard error over images) the table shows.
EVAL_SE_METRICS = ("fg_ari", "ari", "mse_slot_recon")
# Paired comparisons: metric -> +1 if higher is better, -1 if lower is better. Evaluation
# metrics first; the others are final training values (the last 10% of logged points).
DIRECTIONS = {"fg_ari": 1, "ari": 1, "mse_slot_recon": -1, "mse_dvae_recon": -1, "loss": -1,
              "cross_entropy": -1}
ALPHA = 0.05


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
    """run name -> [{"seed", "scalars", "metrics", "per_image", "flags", "failed"}] for every seed
    directory (per_image: {metric: [value per evaluation image]}, {} for older runs).

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
        per_image_path = os.path.join(seed_dir, "eval", "per_image.json")
        per_image = {}
        if os.path.exists(per_image_path):
            with open(per_image_path) as f:
                per_image = json.load(f)
        runs.setdefault(name, []).append({
            "seed": int(seed_dir.rsplit("_", 1)[1]),
            "scalars": read_scalars(seed_dir),
            "metrics": metrics,
            "per_image": per_image,
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
    se_metrics = [m for m in EVAL_SE_METRICS if any(m in s["per_image"] for seeds in
                                                    runs.values() for s in seeds)]
    header = ["run", "seeds", *(["failed"] if any_failed else []),
              *[f"final {t}" for t in train_tags], *[f"max {t}" for t in max_tags],
              *metric_names, *[f"{m} eval SE" for m in se_metrics]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, seeds in runs.items():
        done = [s for s in seeds if not s["failed"]]
        cells = [name, str(len(seeds))] + ([_failed_cell(seeds)] if any_failed else [])
        cells += [_mean_std([_final(s["scalars"][t]) for s in done if t in s["scalars"]])
                  for t in train_tags]
        cells += [_mean_std([_max(s["scalars"][t]) for s in done if t in s["scalars"]])
                  for t in max_tags]
        cells += [_mean_std([s["metrics"].get(m) for s in done]) for m in metric_names]
        cells += [_fmt(_mean([image_se(s, m) for s in done])) for m in se_metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value: float | None, digits: int = 4) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.{digits}g}"


def _mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(values)) if values else None


def standard_error(values) -> float | None:
    """Sample std (n-1) / sqrt(n); None for fewer than 2 values."""
    values = np.asarray(values, np.float64)
    values = values[np.isfinite(values)]
    if len(values) < 2:
        return None
    return float(np.std(values, ddof=1) / math.sqrt(len(values)))


def image_se(seed: dict, metric: str) -> float | None:
    """A run's standard error over evaluation images of `metric` (None without per-image data)."""
    values = seed["per_image"].get(metric)
    return standard_error(values) if values else None


def per_seed_table(runs: dict[str, list[dict]], tags: tuple[str, ...]) -> str:
    """One row per seed: its final training values and every evaluation metric, the latter
    ± the evaluation's standard error over images where per-image values were saved."""
    metric_names = sorted({k for seeds in runs.values() for s in seeds
                           for k, v in s["metrics"].items()
                           if isinstance(v, (int, float)) and k not in ("step", "num_images")})
    train_tags = [t for t in tags if any(t in s["scalars"] for seeds in runs.values()
                                         for s in seeds)]
    header = ["run", "seed", "status", *[f"final {t}" for t in train_tags], *metric_names]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, seeds in runs.items():
        for s in sorted(seeds, key=lambda s: s["seed"]):
            status = f"failed: {s['failed']}" if s["failed"] else (
                "done" if s["metrics"] else "not evaluated")
            cells = [name, str(s["seed"]), status]
            cells += [_fmt(_final(s["scalars"][t])) if t in s["scalars"] and not s["failed"]
                      else "—" for t in train_tags]
            for m in metric_names:
                value = s["metrics"].get(m) if not s["failed"] else None
                if not isinstance(value, (int, float)) or not math.isfinite(value):
                    cells.append("—")
                    continue
                se = image_se(s, m)
                cells.append(f"{value:.4g}" + (f" ± {se:.2g}" if se is not None else ""))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sign_flip_p(differences, direction: int = 1) -> float:
    """One-sided exact sign-flip permutation p-value of mean(direction * d) > 0 over seeds:
    the fraction of the 2^n sign assignments whose mean is at least the observed one
    (ties count; the smallest attainable p is 2^-n)."""
    d = direction * np.asarray(differences, np.float64)
    n = len(d)
    if n == 0:
        return float("nan")
    if n > 20:
        raise ValueError(f"exact sign-flip test over {n} seeds: at most 20 (2^n assignments)")
    signs = 1 - 2 * ((np.arange(2 ** n)[:, None] >> np.arange(n)[None, :]) & 1)  # [2^n, n]
    means = (signs * d[None, :]).mean(axis=1)
    observed = d.mean()
    return float(np.mean(means >= observed - 1e-12 * max(1.0, abs(observed))))


def paired_t_p(differences, direction: int = 1) -> float | None:
    """One-sided paired t-test p-value (H1: mean(direction * d) > 0); None without scipy or
    with fewer than 2 seeds or zero variance."""
    d = direction * np.asarray(differences, np.float64)
    if len(d) < 2 or np.allclose(d, d[0], rtol=1e-9, atol=0.0):
        return None  # identical differences: no variance to test against
    try:
        from scipy import stats
    except ImportError:
        return None
    return float(stats.ttest_1samp(d, 0.0, alternative="greater").pvalue)


def _seed_value(seed: dict, metric: str) -> float | None:
    value = _value(seed, metric)
    return value if value is not None and math.isfinite(value) else None


def paired_comparison(runs: dict[str, list[dict]], a: str, b: str, metric: str) -> dict | None:
    """A - B per seed on `metric` over the seeds both finished; None if no seed pairs."""
    direction = DIRECTIONS.get(metric, 1)
    by_seed_b = {s["seed"]: s for s in runs[b]}
    seeds, diffs, eval_ses = [], [], []
    for sa in sorted(runs[a], key=lambda s: s["seed"]):
        sb = by_seed_b.get(sa["seed"])
        if sb is None:
            continue
        va, vb = _seed_value(sa, metric), _seed_value(sb, metric)
        if va is None or vb is None:
            continue
        seeds.append(sa["seed"])
        diffs.append(va - vb)
        ia, ib = sa["per_image"].get(metric), sb["per_image"].get(metric)
        if ia and ib and len(ia) == len(ib):  # the same images in the same order
            eval_ses.append(standard_error(np.subtract(ia, ib)))
    if not seeds:
        return None
    d = np.asarray(diffs)
    return {"a": a, "b": b, "metric": metric, "direction": direction, "seeds": seeds,
            "differences": diffs, "mean": float(d.mean()), "se": standard_error(d),
            "better": int(np.sum(direction * d > 0)), "p_sign_flip": sign_flip_p(d, direction),
            "p_t": paired_t_p(d, direction), "eval_se": _mean(eval_ses)}


def _pair_metrics(runs: dict[str, list[dict]], a: str, b: str) -> list[str]:
    present = set()
    for name in (a, b):
        for s in runs[name]:
            present |= {k for k, v in s["metrics"].items() if isinstance(v, (int, float))}
            present |= set(s["scalars"])
    return [m for m in DIRECTIONS if m in present]


def _p(p: float | None) -> str:
    return "—" if p is None or not math.isfinite(p) else f"{p:.3g}"


def paired_table(comparisons: list[dict]) -> str:
    header = ["A - B", "metric", "better", "seeds", "A - B per seed", "mean ± SE (seeds)",
              "eval SE of one seed's difference", "A better at", "p sign-flip", "p paired t"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for c in comparisons:
        per_seed = ", ".join(f"{s}: {d:+.3g}" for s, d in zip(c["seeds"], c["differences"]))
        se = f" ± {c['se']:.2g}" if c["se"] is not None else ""
        lines.append("| " + " | ".join([
            f"{c['a']} - {c['b']}", c["metric"], "higher" if c["direction"] > 0 else "lower",
            str(len(c["seeds"])), per_seed, f"{c['mean']:+.4g}{se}", _fmt(c["eval_se"], 2),
            f"{c['better']}/{len(c['seeds'])}", _p(c["p_sign_flip"]), _p(c["p_t"])]) + " |")
    return "\n".join(lines)


def verdict(c: dict | None, a: str, b: str, metric: str) -> str:
    """The sentence saying whether the main comparison is decided at ALPHA."""
    if c is None:
        return (f"**Main comparison {a} - {b} on {metric}: no seed finished in both arms; "
                f"not decided.**")
    n = len(c["seeds"])
    word = "higher" if c["direction"] > 0 else "lower"
    se = f" (SE {c['se']:.2g} over seeds)" if c["se"] is not None else ""
    text = (f"**Main comparison {a} - {b} on {metric}** over {n} paired seeds: mean "
            f"{c['mean']:+.4g}{se}, {a} {word} at {c['better']}/{n} seeds; one-sided exact "
            f"sign-flip p = {_p(c['p_sign_flip'])}, paired t p = {_p(c['p_t'])}: ")
    if c["p_sign_flip"] < ALPHA:
        return text + f"**decided** ({a} {word} than {b}, p < {ALPHA})."
    floor = 2.0 ** -n
    reason = (f"{n} seeds cannot reach p < {ALPHA} (the smallest exact p is 2^-{n} = "
              f"{floor:.3g}); run more seeds" if floor >= ALPHA else f"p >= {ALPHA}")
    return text + f"**not decided** ({reason})."


def load_baselines(path: str) -> dict | None:
    if not path or not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def baseline_section(runs: dict[str, list[dict]], result: dict) -> list[str]:
    """Runs and the trivial baselines on the same scenes, FG-ARI and ARI side by side."""
    rows = ["| segmentation | FG-ARI | ARI | spread |", "|---|---|---|---|"]
    run_means = {}
    warnings = []
    ceiling = result["baselines"].get("token_ceiling", {}).get("fg_ari")
    for name, seeds in runs.items():
        done = [s for s in seeds if not s["failed"] and s["metrics"]]
        if not done:
            continue
        for s in done:
            n = s["metrics"].get("num_images")
            c = s["metrics"].get("fg_ari_token_ceiling")
            if n is not None and n != result["num_images"]:
                warnings.append(f"{name} seed {s['seed']} was evaluated on {n} images, the "
                                f"baselines on {result['num_images']}")
            elif c is not None and ceiling is not None and abs(c - ceiling) > 1e-4:
                warnings.append(f"{name} seed {s['seed']}: token ceiling {c:.4f} != the "
                                f"baselines' {ceiling:.4f} (other scenes or masks)")
        fg = [s["metrics"].get("fg_ari") for s in done]
        run_means[name] = _mean(fg)
        ari = [s["metrics"].get("ari") for s in done]
        eval_se = _fmt(_mean([image_se(s, "fg_ari") for s in done]), 2)
        rows.append(f"| {name} (model, {len(done)} seeds) | {_mean_std(fg)} | {_mean_std(ari)} | "
                    f"± std over seeds; FG-ARI eval SE {eval_se} |")
    for name, entry in result["baselines"].items():
        cells = [f"{entry[m]:.4g} ± {entry[m + '_se']:.2g}" if m in entry else "—"
                 for m in ("fg_ari", "ari")]
        kind = ("upper bound" if entry.get("upper_bound") else
                "input-independent" if entry.get("input_independent") else "per image")
        rows.append(f"| {name} ({kind}: {entry['description']}) | {cells[0]} | {cells[1]} | "
                    f"± SE over images |")
    out = [f"## Models next to trivial baselines ({result['num_images']} evaluation images, "
           f"{result['num_slots']} slots)", "", "\n".join(rows), ""]
    for w in warnings:
        out += [f"WARNING: {w}: the baselines are not on the same scenes.", ""]

    def best(independent: bool):
        cands = [(e["fg_ari"], n) for n, e in result["baselines"].items()
                 if "fg_ari" in e and not e.get("upper_bound")
                 and (e.get("input_independent") or not independent)]
        return max(cands) if cands else None

    for label, b in (("the best input-independent baseline", best(True)),
                     ("the best baseline", best(False))):
        if b is None:
            continue
        above = [n for n, v in run_means.items() if v is not None and v > b[0]]
        out += [f"Runs whose mean FG-ARI is above {label} ({b[1]}, {b[0]:.3f}): "
                f"{', '.join(above) if above else 'none'}.", ""]
    return out


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
        if tag in ("loss", *MAX_TAGS):
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


def parse_pairs(text: str) -> list[tuple[str, str]]:
    """"IN-vanilla,IN-vanilla_T8" -> [("IN", "vanilla"), ("IN", "vanilla_T8")] (A minus B)."""
    pairs = []
    for item in (t for t in text.split(",") if t):
        a, sep, b = item.partition("-")
        if not sep or not a or not b or "-" in b:
            raise ValueError(f"--paired expects A-B pairs (run names without '-'), got {item!r}")
        pairs.append((a, b))
    return pairs


def paired_section(runs: dict[str, list[dict]], pairs: list[tuple[str, str]],
                   main_metric: str) -> list[str]:
    missing = sorted({n for pair in pairs for n in pair if n not in runs})
    if missing:
        raise FileNotFoundError(f"--paired names runs {missing} that the sweep has not; "
                                f"found {sorted(runs)}")
    comparisons = [c for a, b in pairs for m in _pair_metrics(runs, a, b)
                   if (c := paired_comparison(runs, a, b, m)) is not None]
    a, b = pairs[0]
    main = next((c for c in comparisons if (c["a"], c["b"], c["metric"]) == (a, b, main_metric)),
                None)
    return ["## Paired by seed", "",
            "A - B at each seed both arms finished; `better`: the direction that counts as A "
            "better; SE over seeds; `eval SE of one seed's difference`: the standard error over "
            "images of the per-image differences (the same images), averaged over seeds; "
            "p-values one-sided (H1: A better): the exact sign-flip permutation test over seeds "
            "and the paired t-test. The first pair on the main metric is the pre-specified main "
            "comparison; the other rows are secondary (not corrected for multiple comparisons).",
            "", paired_table(comparisons), "", verdict(main, a, b, main_metric), ""]


def write_report(sweep_dir: str, out_dir: str, tags: tuple[str, ...] = DEFAULT_TAGS,
                 names: tuple[str, ...] = (), versus: str | None = None,
                 pairs: list[tuple[str, str]] = (), main_metric: str = "fg_ari",
                 baselines: str | None = None) -> str:
    """The report (markdown, also written to out_dir/report.md with its plots). `baselines`:
    a baselines.json (default: sweep_dir/baselines.json, skipped when absent)."""
    runs = collect(sweep_dir, names)
    baseline_result = load_baselines(baselines or os.path.join(sweep_dir, "baselines.json"))
    if baselines and baseline_result is None:
        raise FileNotFoundError(f"--baselines={baselines} does not exist")
    os.makedirs(out_dir, exist_ok=True)
    parts = [f"# Sweep report: {os.path.abspath(sweep_dir)}", "",
             "Mean ± sample std over the seeds that finished; final training values average the "
             "last 10% of logged points, `max` is the largest logged value; `eval SE`: the "
             "standard error over evaluation images of a run's metric, averaged over seeds "
             "(the evaluation's own noise). Reconstruction MSE: sum over pixels and channels "
             "per image, images in [0, 1], averaged over images.",
             "", table(runs, tags), ""]
    if pairs:
        parts += paired_section(runs, list(pairs), main_metric)
    if baseline_result is not None:
        parts += baseline_section(runs, baseline_result)
    parts += ["## Per seed", "", "Every evaluation metric ± its standard error over the "
              "evaluation images (where eval/per_image.json exists).", "",
              per_seed_table(runs, tags), ""]
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
    parser.add_argument("--paired", default="",
                        help="comma-separated A-B pairs of runs compared seed by seed (A minus "
                             "B); the first is the main comparison")
    parser.add_argument("--main_metric", default="fg_ari",
                        help="metric of the main comparison (default fg_ari)")
    parser.add_argument("--baselines", default=None,
                        help="baselines.json (default: <sweep_dir>/baselines.json if present)")
    args = parser.parse_args(argv)
    out = args.out or os.path.join(args.sweep_dir, "report")
    names = tuple(n for n in args.runs.split(",") if n)
    try:
        pairs = parse_pairs(args.paired)
        text = write_report(args.sweep_dir, out, tuple(args.tags.split(",")), names, args.versus,
                            pairs, args.main_metric, args.baselines)
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
