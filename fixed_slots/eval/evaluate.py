"""`evaluate(config, workdir)`: metrics and pictures for the latest checkpoint in workdir.

Writes `workdir/eval/metrics.json` and PNG grids under `workdir/eval/`. Every model provides
`evaluate_batch(batch, key) -> EvalBatch` (jittable): per-example metrics that are averaged here,
and arrays for host-side metrics (FID on generated images, set-prediction AP). Nothing is made up:
FID without Inception weights is skipped with a message, and recorded as skipped.

Only the params are read from the checkpoint (`fixed_slots.trained.restore_params`).
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from fixed_slots import configlib, log, visualize
from fixed_slots.data.pipeline import make_loader
from fixed_slots.errors import ConfigError
from fixed_slots.eval.metrics import PropertyLayout, average_precisions
from fixed_slots.models import set_prediction
from fixed_slots.models.protocol import SetPredictions
from fixed_slots import sharding
from fixed_slots.trained import restore_params


def ap_layout(config: ml_collections.ConfigDict) -> PropertyLayout:
    """How AP reads the set predictor's target vectors under this config (in scene units)."""
    layout, position_scale = set_prediction.LAYOUTS[set_prediction.layout_name(config)]
    return PropertyLayout.from_target_layout(layout, position_scale)


class MissingInceptionWeightsError(ConfigError, FileNotFoundError):
    """config.eval.inception_weights names a file that does not exist."""


def _check_inception_weights(config: ml_collections.ConfigDict) -> None:
    path = config.eval.inception_weights
    if path and not os.path.exists(path):
        raise MissingInceptionWeightsError(
            f"config.eval.inception_weights={path!r} does not exist")


def _fid(config, real: np.ndarray, generated: np.ndarray) -> float | str:
    path = config.eval.inception_weights
    if not path:
        if jax.process_index() == 0:
            log.info("FID not computed: no Inception weights given. Convert the standard FID "
                     "weights (pt_inception-2015-12-05-6726825d.pth) with `python -m fixed_slots."
                     "eval.inception convert --src=... --dst=fid_inception.npz` and pass "
                     "--config.eval.inception_weights=fid_inception.npz")
        return "skipped: no --config.eval.inception_weights"
    _check_inception_weights(config)
    from fixed_slots.eval.inception import compute_fid

    return compute_fid(real, generated, path, batch_size=config.eval.batch_size)


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Evaluates the latest checkpoint; returns (and writes) the metrics dict.

    In a multi-process job each process reads its rows of every global batch (the batches one
    process would read), the model runs on the global arrays, and process 0 writes the files.
    """
    sharding.maybe_initialize_distributed(config)  # before validate, which counts devices
    configlib.validate(config)
    _check_inception_weights(config)  # before any work
    graphdef, params, step = restore_params(config, workdir)
    out_dir = os.path.join(workdir, "eval")
    primary = jax.process_index() == 0
    if primary:
        os.makedirs(out_dir, exist_ok=True)

    def eval_fn(params, batch, key):
        return nnx.merge(graphdef, params).evaluate_batch(batch, key)

    def pictures_fn(params, batch, key):
        return nnx.merge(graphdef, params).evaluation_pictures(batch, key)

    loader = make_loader(config, "validation", global_batch_size=config.eval.batch_size,
                         seed=config.seed, num_epochs=1, shuffle=False)
    batches = enumerate(loader)
    if jax.process_count() > 1:
        mesh = sharding.make_mesh()
        params = sharding.replicate(params, mesh)
        repl, rows = sharding.replicated(mesh), sharding.batch_sharding(mesh)
        # Replicated results: every process can read them.
        eval_batch = jax.jit(eval_fn, in_shardings=(repl, rows, repl), out_shardings=repl)
        pictures = jax.jit(pictures_fn, out_shardings=repl)
        batches = ((i, sharding.put_batch(b, mesh)) for i, b in sharding.in_lockstep(batches))
    else:
        eval_batch, pictures = jax.jit(eval_fn), jax.jit(pictures_fn)
    key = jax.random.key(config.seed + 1)
    sums: dict[str, float] = {}
    count = 0
    generated: list[np.ndarray] = []
    set_predictions: list[SetPredictions] = []
    real_images: list[np.ndarray] = []
    for index, batch in batches:
        if config.eval.num_batches and index >= config.eval.num_batches:
            break
        batch_key = jax.random.fold_in(key, index)
        result = jax.device_get(eval_batch(params, batch, batch_key))
        for name, values in result.per_example.items():
            sums[name] = sums.get(name, 0.0) + float(np.sum(values))
        count += len(batch["image"])
        if result.generated is not None:
            generated.append(np.asarray(result.generated))
        if result.set_predictions is not None:
            set_predictions.append(result.set_predictions)
        real_images.append(sharding.to_host(batch["image"]))
        if index == 0:
            grids = jax.device_get(pictures(params, {k: v[: config.eval.num_images]
                                                     for k, v in batch.items()}, batch_key))
            for name, grid in visualize.model_grids(grids).items() if primary else ():
                visualize.save_png(os.path.join(out_dir, f"{name}.png"), grid)
    if count == 0:
        raise ValueError("the evaluation split produced no batch (is it smaller than "
                         f"config.eval.batch_size={config.eval.batch_size}?)")
    metrics: dict[str, Any] = {name: total / count for name, total in sums.items()}
    if generated:
        metrics["fid"] = _fid(config, np.concatenate(real_images), np.concatenate(generated))
    if set_predictions:
        p = SetPredictions(*(np.concatenate(parts) for parts in zip(*set_predictions)))
        metrics.update(average_precisions(p.prediction, p.prediction_prob, p.target,
                                          p.target_visible, ap_layout(config)))
    metrics.update({"step": int(step), "num_images": count,
                    "mse_scale": "sum over pixels and channels per image, images in [0, 1], "
                                 "averaged over images"})
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
    if primary:
        with open(os.path.join(out_dir, "metrics.json"), "w") as f:
            json.dump(clean, f, indent=2, sort_keys=True)
    if primary:
        log.info("%s", summary_line(clean, out_dir))
    return clean


def summary_line(metrics: dict[str, Any], out_dir: str) -> str:
    """The console line of an evaluation: every number, FG-ARI next to its token ceiling."""
    shown = []
    for name, value in metrics.items():
        if name in ("step", "num_images", "mse_scale", "fg_ari_token_ceiling"):
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            text = f"{name} {value:.4g}"
            if name == "fg_ari" and "fg_ari_token_ceiling" in metrics:
                # What perfect slots score at token resolution (SLATE's masks are token-sized).
                text += f" (token-resolution ceiling {metrics['fg_ari_token_ceiling']:.4g})"
            shown.append(text)
        elif value is None:
            shown.append(f"{name} n/a")
        else:
            shown.append(f"{name} {value}")
    return (f"Evaluation at step {metrics['step']} on {metrics['num_images']} images: "
            f"{', '.join(shown)}. Metrics and pictures in {out_dir}")
