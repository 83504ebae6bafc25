"""The evaluation loop: a model's `evaluate_batch` over the held-out split, summed with its clu
collection, plus the host-side metrics (FID on generated images, set-prediction AP).

    evaluator = Evaluator(config, graphdef, mesh)
    result = evaluator.run(params, full=True)       # Evaluation: metrics, per-image values, pictures
    save_evaluation(out_dir, result)                 # metrics.json, per_image.json, PNG grids

The trainer runs it on a cadence (`full=False`: no autoregressive decoding, no FID) and at the
end of a run (`full=True`); `fixed_slots.trained.evaluate` runs it on a workdir's checkpoint.
The held-out set is fixed: the first `config.eval.num_batches` batches of the validation split
in order, the same key for every evaluation, so evaluations at different steps compare the same
images. Nothing is made up: FID without Inception weights is skipped with a message, and
recorded as skipped.

In a multi-process job each process reads its rows of every global batch, the model runs on
the global arrays, and the results are replicated (every process holds them; the caller writes
files on process 0).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from flax import nnx

from fixed_slots import configlib, log, models, sharding, visualize
from fixed_slots.data import pipeline
from fixed_slots.errors import ConfigError, DataError
from fixed_slots.eval.metrics import PropertyLayout, average_precisions
from fixed_slots.models import aggregation, set_prediction
from fixed_slots.models.protocol import SetPredictions

RANGES = {
    "eval.num_batches": configlib.NON_NEGATIVE_INT,
    "eval.batch_size": configlib.POSITIVE_INT,
    "eval.num_images": configlib.POSITIVE_INT,
}
# Keys of metrics.json that are not per-image averages.
INFO_KEYS = ("step", "num_images", "full", "mse_scale")


class MissingInceptionWeightsError(ConfigError, FileNotFoundError):
    """config.eval.inception_weights names a file that does not exist."""


def check_config(config: ml_collections.ConfigDict) -> None:
    """What an evaluation reads: the model's and the data's sections, and config.eval."""
    configlib.check_finite(config)
    models.check_config(config)
    pipeline.check_config(config)
    configlib.check_ranges(config, RANGES)
    if jax.process_count() > 1 and config.eval.batch_size % jax.device_count():
        raise configlib.bad_value(
            "eval.batch_size", config.eval.batch_size,
            f"a multiple of the {jax.device_count()} devices of this multi-process job")
    path = config.eval.inception_weights
    if path and not os.path.exists(path):
        raise MissingInceptionWeightsError(
            f"config.eval.inception_weights={path!r} does not exist")


def ap_layout(config: ml_collections.ConfigDict) -> PropertyLayout:
    """How AP reads the set predictor's target vectors under this config (in scene units)."""
    layout = set_prediction.data_layout(config)
    return PropertyLayout.from_target_layout(layout, layout.position_scale)


@dataclasses.dataclass
class Evaluation:
    """One evaluation's results (host values)."""
    metrics: dict[str, Any]  # per-image means (and `<name>_std`), FID, AP, num_images, full
    per_image: dict[str, np.ndarray]  # name -> [num_images] the values the means average
    pictures: dict[str, np.ndarray]  # name -> [H, W, 3] titled grids of the first batch


def _fid(config: ml_collections.ConfigDict, real: np.ndarray, generated: np.ndarray
         ) -> float | str:
    path = config.eval.inception_weights
    if not path:
        if jax.process_index() == 0:
            log.info("FID not computed: no Inception weights given. Convert the standard FID "
                     "weights (pt_inception-2015-12-05-6726825d.pth) with `python -m fixed_slots."
                     "eval.inception convert --src=... --dst=fid_inception.npz` and pass "
                     "--config.eval.inception_weights=fid_inception.npz")
        return "skipped: no --config.eval.inception_weights"
    from fixed_slots.eval.inception import compute_fid

    return compute_fid(real, generated, path, batch_size=config.eval.batch_size)


class Evaluator:
    """Jitted evaluation of a model split as (graphdef, params) on the held-out batches."""

    def __init__(self, config: ml_collections.ConfigDict, graphdef: nnx.GraphDef,
                 mesh: jax.sharding.Mesh | None = None):
        self.config = config
        self.mesh = mesh if mesh is not None or jax.process_count() == 1 else sharding.make_mesh()
        # One process: a batch that does not split over the mesh's devices runs replicated
        # (every device computes all of it, the same numbers); several processes must split it.
        split_rows = self.mesh is not None and config.eval.batch_size % self.mesh.size == 0
        self.model_class = models.get(config.model.name)

        def eval_fn(params, batch, key, full):
            return nnx.merge(graphdef, params).evaluate_batch(batch, key, full=full)

        def pictures_fn(params, batch, key):
            return nnx.merge(graphdef, params).evaluation_pictures(batch, key)

        if self.mesh is not None:
            repl = sharding.replicated(self.mesh)
            rows = sharding.batch_sharding(self.mesh) if split_rows else repl
            # Replicated results: every process can read them.
            self._eval = jax.jit(eval_fn, static_argnames="full",
                                 in_shardings=(repl, rows, repl), out_shardings=repl)
            self._pictures = jax.jit(pictures_fn, out_shardings=repl)
        else:
            self._eval = jax.jit(eval_fn, static_argnames="full")
            self._pictures = jax.jit(pictures_fn)
        self._merge = jax.jit(lambda a, b: a.merge(b))

    def num_batches(self) -> int:
        """Batches one evaluation reads (config.eval.num_batches, or the whole split if 0)."""
        loader = self._loader()
        total = loader.batches_per_epoch
        limit = self.config.eval.num_batches
        return min(total, limit) if limit else total

    def _loader(self):
        config = self.config
        return pipeline.make_loader(config, "validation", global_batch_size=config.eval.batch_size,
                                    seed=config.seed, num_epochs=1, shuffle=False)

    def run(self, params: Any, *, full: bool = True, pictures: bool = True,
            on_batch: Callable[[int, int], None] | None = None) -> Evaluation:
        """Evaluates `params` (a pure-dict params tree, on the evaluator's mesh if it has one).

        `full=False` leaves out the model's costly parts (SLATE's autoregressive decoding) and
        FID. `on_batch(done, total)` is called after each batch (a progress display).
        """
        config = self.config
        if self.mesh is not None:
            params = sharding.replicate(params, self.mesh)
        total = self.num_batches()
        batches = enumerate(self._loader())
        if jax.process_count() > 1:
            batches = ((i, sharding.put_batch(b, self.mesh))
                       for i, b in sharding.in_lockstep(batches))
        # The same key at every evaluation: the slot noise is part of the fixed held-out set.
        key = jax.random.key(config.seed + 1)
        collection, collection_cls = None, None
        per_image: dict[str, list[np.ndarray]] = {}
        generated, real, set_predictions = [], [], []
        grids: dict[str, np.ndarray] = {}
        for index, batch in batches:
            if index >= total:
                break
            batch_key = jax.random.fold_in(key, index)
            result = self._eval(params, batch, batch_key, full)
            if collection_cls is None:
                collection_cls = aggregation.restrict(self.model_class.eval_metrics,
                                                      result.per_example)
            step_values = collection_cls.single_from_model_output(**result.per_example)
            collection = step_values if collection is None else self._merge(collection,
                                                                            step_values)
            host = jax.device_get(result)
            for name, values in host.per_example.items():
                per_image.setdefault(name, []).append(np.asarray(values, np.float64))
            if full and host.generated is not None:
                generated.append(np.asarray(host.generated))
                real.append(sharding.to_host(batch["image"]))
            if host.set_predictions is not None:
                set_predictions.append(host.set_predictions)
            if pictures and index == 0:
                small = {k: v[: config.eval.num_images] for k, v in batch.items()}
                grids = visualize.model_grids(
                    jax.device_get(self._pictures(params, small, batch_key)))
            if on_batch is not None:
                on_batch(index + 1, total)
        if collection is None:
            raise DataError("the evaluation split produced no batch (is it smaller than "
                            f"config.eval.batch_size={config.eval.batch_size}?)")
        metrics: dict[str, Any] = aggregation.to_host(collection.compute())
        values = {name: np.concatenate(parts) for name, parts in per_image.items()}
        if generated:
            metrics["fid"] = _fid(config, np.concatenate(real), np.concatenate(generated))
        if set_predictions:
            p = SetPredictions(*(np.concatenate(parts) for parts in zip(*set_predictions)))
            metrics.update(average_precisions(p.prediction, p.prediction_prob, p.target,
                                              p.target_visible, ap_layout(config)))
        metrics["num_images"] = int(next(iter(values.values())).shape[0])
        metrics["full"] = bool(full)
        return Evaluation(metrics, values, grids)


def _json_value(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


def save_evaluation(out_dir: str, evaluation: Evaluation, step: int) -> dict[str, Any]:
    """Writes metrics.json (NaN as null), per_image.json and the picture grids; returns the
    metrics as written."""
    os.makedirs(out_dir, exist_ok=True)
    metrics = {name: _json_value(value) for name, value in evaluation.metrics.items()}
    metrics.update(step=int(step), mse_scale="sum over pixels and channels per image, images "
                                            "in [0, 1], averaged over images")
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2, sort_keys=True)
    with open(os.path.join(out_dir, "per_image.json"), "w") as f:
        json.dump({name: [_json_value(float(v)) for v in values]
                   for name, values in evaluation.per_image.items()}, f)
    for name, grid in evaluation.pictures.items():
        visualize.save_png(os.path.join(out_dir, f"{name}.png"), grid)
    return metrics


def summary_line(metrics: dict[str, Any], out_dir: str) -> str:
    """The console line of an evaluation: every number, FG-ARI next to its token ceiling."""
    shown = []
    for name, value in metrics.items():
        if name in INFO_KEYS or name.endswith("_std") or name == "fg_ari_token_ceiling":
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
