"""Trivial segmentation baselines, scored on the evaluation's scenes with the evaluation's metric.

  python -m fixed_slots.experiments.baselines --config=FILE[:variant] [--set=k=v ...] --out=DIR

The scenes are the ones `fixed_slots.eval.evaluator` scores a model on: the validation split
through `make_loader(config, "validation", batch config.eval.batch_size, unshuffled)`, the first
`config.eval.num_batches` batches (0: all). Each baseline turns an image into one id per pixel
among `config.slot_attention.num_slots` slots, as one-hot masks [B, S, H, W], and is scored by
`fixed_slots.models.segmentation.segmentation_metrics` with the model's number of mask ids
(`config.data.max_objects + 1`): the same function, argmax and ids as a model's FG-ARI / ARI.

Baselines (S = num_slots; "token resolution": the grid the model's masks live on, SLATE's
dVAE tokens of 4x4 pixels, pixels for the other models; shapes made there, then repeated):
  one_slot         every pixel in one slot (FG-ARI 1 only for a scene with one object)
  stripes_v / _h   S vertical / horizontal stripes of equal width at token resolution
  grid_RxC         R x C blocks (2x2: the quadrants; and the near-square grid with the most
                   cells <= S), input-independent like the stripes
  kmeans_rgb       k-means (k = S) on each image's pixel colours, at pixel resolution
  kmeans_rgb_xy    k-means on (r, g, b, y, x), position scaled to [0, 1] like the colours
  kmeans_rgb_token k-means on the mean colour of each token, at token resolution (what a
                   model whose masks are token-sized could do by colour alone)
  token_ceiling    not a baseline: each token to the object covering most of it (the upper
                   bound of token-sized masks, `token_resolution_ceiling`; also the scenes'
                   fingerprint: every evaluated run reports the same `fg_ari_token_ceiling`)
k-means is NumPy's: k-means++ seeding from a seed fixed per image, 10 restarts (the lowest
inertia kept), Lloyd iterations until the labels or the centres stop moving (scikit-learn's
tolerance, at most 100 iterations): deterministic.

Writes DIR/baselines.json: per baseline its FG-ARI and ARI (mean over images), their standard
error over images (sample std / sqrt(n)), the per-image values (in evaluation order, so they
pair with a run's eval/per_image.json) and whether it is input-independent; plus the config,
the number of images and mask ids. `fixed_slots.experiments.report` puts them next to a sweep's
runs when DIR is the sweep's workdir.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Callable, NamedTuple

import jax
import numpy as np

from fixed_slots import configlib
from fixed_slots.models.segmentation import segmentation_metrics, token_resolution_ceiling

# Pixels per mask cell side: SLATE's masks are its dVAE's token grid (4x downsampling); the
# autoencoders' alpha masks are per pixel.
MASK_FACTOR = {"slate": 4}
KMEANS_RESTARTS = 10  # as scikit-learn's classic n_init=10
KMEANS_MAX_ITER = 100
KMEANS_TOL = 1e-4  # centre shift, relative to the data's variance (scikit-learn's tol)


def mask_factor(config) -> int:
    return MASK_FACTOR.get(config.model.name, 1)


def num_mask_ids(config) -> int:
    """What the models use: ids 0 (background) .. config.data.max_objects."""
    return int(config.data.max_objects) + 1


# ---- input-independent layouts: [g, g] cell ids at token resolution ----

def stripes(grid: int, k: int, vertical: bool = True) -> np.ndarray:
    """k stripes of (near) equal width over a grid x grid layout: [grid, grid] ids in [0, k)."""
    band = (np.arange(grid) * k) // grid  # [grid], 0..k-1
    return np.broadcast_to(band[None, :] if vertical else band[:, None], (grid, grid)).copy()


def blocks(grid: int, rows: int, cols: int) -> np.ndarray:
    """rows x cols blocks: [grid, grid] ids in [0, rows * cols), row-major."""
    r = (np.arange(grid) * rows) // grid
    c = (np.arange(grid) * cols) // grid
    return r[:, None] * cols + c[None, :]


def near_square_grid(k: int) -> tuple[int, int]:
    """(rows, cols) of the 2-D grid (2 <= rows <= cols) with the most cells <= k, then the
    squarest: 4 -> 2x2, 6 and 7 -> 2x3, 9 -> 3x3, 10 -> 2x5; (1, k) below 4 (the stripes)."""
    if k < 4:
        return (1, k)
    best = (2, k // 2)
    for rows in range(2, int(math.isqrt(k)) + 1):
        cols = k // rows
        if rows * cols > best[0] * best[1] or (
                rows * cols == best[0] * best[1] and cols - rows < best[1] - best[0]):
            best = (rows, cols)
    return best


def upsample(ids: np.ndarray, factor: int) -> np.ndarray:
    """[..., g, g] -> [..., g * factor, g * factor] by repetition (as SLATE's masks)."""
    return np.repeat(np.repeat(ids, factor, axis=-2), factor, axis=-1)


# ---- k-means ----

def kmeans(points: np.ndarray, k: int, seed: int, restarts: int = KMEANS_RESTARTS,
           max_iter: int = KMEANS_MAX_ITER) -> np.ndarray:
    """Labels [N] in [0, k) of k-means on points [N, D] (float64): k-means++ seeding, Lloyd
    iterations, the restart with the lowest inertia; deterministic in `seed`."""
    points = np.asarray(points, np.float64)
    n = len(points)
    norms = np.sum(points ** 2, axis=1)
    tol = KMEANS_TOL * float(np.mean(np.var(points, axis=0)))
    rng = np.random.default_rng(seed)
    best_labels, best_inertia = None, np.inf
    for _ in range(restarts):
        centers = [points[rng.integers(n)]]
        d2 = np.sum((points - centers[0]) ** 2, axis=1)
        for _ in range(1, k):
            total = d2.sum()
            # Fewer distinct points than k: any point (the duplicate centre stays empty).
            index = rng.integers(n) if total <= 0 else rng.choice(n, p=d2 / total)
            centers.append(points[index])
            d2 = np.minimum(d2, np.sum((points - points[index]) ** 2, axis=1))
        centers = np.stack(centers)
        labels = None
        for _ in range(max_iter):
            # Squared distances [N, k] as |x|^2 - 2 x.c + |c|^2 (one matrix product).
            dist = norms[:, None] - 2.0 * points @ centers.T + np.sum(centers ** 2, axis=1)
            new = np.argmin(dist, axis=1)
            if labels is not None and np.array_equal(new, labels):
                break
            labels = new
            counts = np.bincount(labels, minlength=k)
            sums = np.stack([np.bincount(labels, weights=points[:, d], minlength=k)
                             for d in range(points.shape[1])], axis=1)
            filled = counts > 0  # an empty cluster keeps its centre
            previous = centers.copy()
            centers[filled] = sums[filled] / counts[filled, None]
            if np.sum((centers - previous) ** 2) <= tol:  # scikit-learn's stopping rule
                break
        inertia = float(np.sum((points - centers[labels]) ** 2))
        if inertia < best_inertia:
            best_labels, best_inertia = labels, inertia
    return best_labels


def token_means(images: np.ndarray, factor: int) -> np.ndarray:
    """[B, H, W, C] -> [B, H/f, W/f, C] mean over each f x f token."""
    b, h, w, c = images.shape
    return images.reshape(b, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))


def _kmeans_ids(features: np.ndarray, k: int, seeds: np.ndarray) -> np.ndarray:
    """features [B, h, w, D] -> ids [B, h, w], one k-means per image."""
    b, h, w, d = features.shape
    return np.stack([kmeans(f.reshape(-1, d), k, int(s)).reshape(h, w)
                     for f, s in zip(features, seeds)])


def _positions(h: int, w: int) -> np.ndarray:
    y, x = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    return np.stack([y, x], axis=-1)  # [h, w, 2]


# ---- the baselines: name -> (description, fn(images [B,H,W,3], image indices [B]) -> ids) ----

class Baseline(NamedTuple):
    description: str
    fn: Callable[[np.ndarray, np.ndarray], np.ndarray]  # (images, image indices) -> ids
    input_independent: bool  # a fixed layout, the same for every image


def baselines(num_slots: int, factor: int, image_size: int) -> dict[str, Baseline]:
    grid = image_size // factor
    k = num_slots

    def fixed(layout: np.ndarray):
        pixels = upsample(layout, factor)
        return lambda images, index: np.broadcast_to(pixels, images.shape[:3])

    out: dict[str, Baseline] = {
        "one_slot": Baseline("every pixel in one slot",
                             fixed(np.zeros((grid, grid), np.int64)), True),
        "stripes_v": Baseline(f"{k} vertical stripes", fixed(stripes(grid, k, vertical=True)),
                              True),
        "stripes_h": Baseline(f"{k} horizontal stripes",
                              fixed(stripes(grid, k, vertical=False)), True),
    }
    grids = [(2, 2)] if k >= 4 else []
    square = near_square_grid(k)
    if square not in grids and square[0] > 1:
        grids.append(square)
    for rows, cols in grids:
        out[f"grid_{rows}x{cols}"] = Baseline(
            f"{rows}x{cols} blocks" + (" (quadrants)" if (rows, cols) == (2, 2) else ""),
            fixed(blocks(grid, rows, cols)), True)
    out["kmeans_rgb"] = Baseline(f"k-means (k={k}) on pixel colours",
                                 lambda images, index: _kmeans_ids(images, k, index), False)

    def rgb_xy(images, index):
        b, h, w, _ = images.shape
        pos = np.broadcast_to(_positions(h, w), (b, h, w, 2))
        return _kmeans_ids(np.concatenate([images, pos], axis=-1), k, index)

    out["kmeans_rgb_xy"] = Baseline(f"k-means (k={k}) on pixel colour and position", rgb_xy,
                                    False)
    if factor > 1:
        out["kmeans_rgb_token"] = Baseline(
            f"k-means (k={k}) on token mean colours ({factor}x{factor} pixels)",
            lambda images, index: upsample(_kmeans_ids(token_means(images, factor), k, index),
                                           factor), False)
    return out


def score_ids(true_mask: np.ndarray, ids: np.ndarray, num_slots: int, mask_ids: int
              ) -> dict[str, np.ndarray]:
    """FG-ARI and ARI [B] of per-pixel slot ids [B, H, W] through the models' own metric."""
    ids = np.asarray(ids, np.int64)
    if ids.min() < 0 or ids.max() >= num_slots:
        raise ValueError(f"slot ids must be in [0, {num_slots}), got {ids.min()}..{ids.max()}")
    masks = np.moveaxis(np.eye(num_slots, dtype=np.float32)[ids], -1, 1)  # [B, S, H, W]
    result = segmentation_metrics(np.asarray(true_mask, np.int32), masks, mask_ids)
    return {name: np.asarray(jax.device_get(v), np.float64) for name, v in result.items()}


def evaluation_batches(config):
    """The batches evaluate() scores: validation, unshuffled, first eval.num_batches."""
    from fixed_slots.data.pipeline import make_loader

    loader = make_loader(config, "validation", global_batch_size=config.eval.batch_size,
                         shard_index=0, shard_count=1, seed=config.seed, num_epochs=1,
                         shuffle=False)
    for index, batch in enumerate(loader):
        if config.eval.num_batches and index >= config.eval.num_batches:
            break
        yield batch


def _summary(values: np.ndarray) -> dict[str, float]:
    n = len(values)
    se = float(np.std(values, ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return {"mean": float(np.mean(values)), "se": se}


def run_baselines(config, batches=None) -> dict:
    """Scores every baseline on `batches` (default: the evaluation's) -> the baselines.json dict."""
    mask_ids, k = num_mask_ids(config), int(config.slot_attention.num_slots)
    factor = mask_factor(config)
    size = int(config.data.image_size)
    if size % factor:
        raise ValueError(f"image size {size} is not a multiple of the mask factor {factor}")
    table = baselines(k, factor, size)
    per_image: dict[str, dict[str, list[float]]] = {name: {"fg_ari": [], "ari": []}
                                                     for name in [*table, "token_ceiling"]}
    count = 0
    for batch in evaluation_batches(config) if batches is None else batches:
        if "mask" not in batch:
            raise ValueError(f"the evaluation data ({config.data.name!r}) has no instance masks")
        images = np.asarray(batch["image"], np.float64)
        true = np.asarray(batch["mask"])
        if true.max() >= mask_ids:
            raise ValueError(
                f"a mask has id {int(true.max())} but config.data.max_objects="
                f"{config.data.max_objects} gives ids 0..{mask_ids - 1}: the evaluation would "
                f"drop those pixels; set config.data.max_objects >= {int(true.max())}")
        index = np.arange(count, count + len(images))
        for name, baseline in table.items():
            ids = baseline.fn(images, index)
            for metric, values in score_ids(true, ids, k, mask_ids).items():
                per_image[name][metric].extend(values.tolist())
        ceiling = np.asarray(token_resolution_ceiling(true, factor, mask_ids), np.float64)
        per_image["token_ceiling"]["fg_ari"].extend(ceiling.tolist())
        count += len(images)
    if count == 0:
        raise ValueError("the evaluation split produced no batch")
    out = {}
    for name, values in per_image.items():
        if name in table:
            entry = {"description": table[name].description,
                     "input_independent": table[name].input_independent}
        else:
            entry = {"description": "upper bound: each token to the object covering most of it",
                     "input_independent": False, "upper_bound": True}
        for metric, v in values.items():
            if v:
                s = _summary(np.asarray(v))
                entry[metric], entry[f"{metric}_se"] = s["mean"], s["se"]
        entry["per_image"] = {m: v for m, v in values.items() if v}
        out[name] = entry
    return {"num_images": count, "num_slots": k, "num_mask_ids": mask_ids,
            "mask_factor": factor, "image_size": size, "data": config.data.name,
            "baselines": out}


def markdown(result: dict) -> str:
    lines = [f"Trivial baselines on {result['num_images']} evaluation images of "
             f"{result['data']} ({result['image_size']}x{result['image_size']}, "
             f"{result['num_slots']} slots); ± the standard error over images.", "",
             "| baseline | FG-ARI | ARI | what |", "|---|---|---|---|"]
    for name, b in result["baselines"].items():
        cells = [f"{b[m] + 0.0:.3f} ± {b[m + '_se']:.3f}".replace("-0.000 ", "0.000 ")
                 if m in b else "—" for m in ("fg_ari", "ari")]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {b['description']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="config file[:variant], as main.py's")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override (repeatable), e.g. data.data_dir=/work/data/tfds")
    parser.add_argument("--out", required=True, help="folder for baselines.json")
    args = parser.parse_args(argv)
    try:
        config = configlib.from_file(args.config, args.set)
    except ValueError as e:
        parser.error(str(e))
    result = run_baselines(config)
    result.update(config_file=args.config, overrides=args.set)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "baselines.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(markdown(result))
    print(f"written: {os.path.join(args.out, 'baselines.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
