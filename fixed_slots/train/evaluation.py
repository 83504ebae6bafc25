"""A run's evaluation, where a user looks: TensorBoard (`eval/*` scalars at the step), the
console (a progress line with ETA, then one summary line) and, for the full evaluation at the end
of a run or of `--mode=eval`, `WORKDIR/eval/` (metrics.json, per_image.json, picture grids).

Used by the trainer (on a cadence and at the end) and by `fixed_slots.trained.evaluate`.
Parameters that are not all finite are never evaluated: the error says which step holds them.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from fixed_slots import log
from fixed_slots.errors import UserError
from fixed_slots.eval.evaluator import INFO_KEYS, Evaluator, save_evaluation, summary_line
from fixed_slots.train.console import EvaluationProgress

EVAL_DIR = "eval"

class NonFiniteParamsError(UserError, FloatingPointError):
    """A checkpoint's parameters are not all finite; nothing is evaluated on them."""


def check_params_finite(params: Any, step: int, where: str) -> None:
    """Raises NonFiniteParamsError naming the step when any parameter is inf or NaN."""
    leaves = jax.tree.leaves(jax.device_get(params))
    bad = sum(int(np.size(x) - np.count_nonzero(np.isfinite(x))) for x in leaves)
    if bad:
        total = sum(int(np.size(x)) for x in leaves)
        raise NonFiniteParamsError(
            f"the parameters at step {step} in {where} are not finite ({bad} of {total} "
            f"values are inf or NaN): nothing was evaluated")


def tensorboard_scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """`eval/<name>` for every number of an evaluation (info keys and skipped FID left out)."""
    return {f"{EVAL_DIR}/{name}": float(value) for name, value in metrics.items()
            if name not in INFO_KEYS and isinstance(value, (int, float))
            and not isinstance(value, bool)}


def descriptions(model_class: type) -> dict[str, str]:
    """TensorBoard descriptions of the eval/ scalars, from the model's `metric_descriptions`."""
    out = {}
    for name, text in model_class.metric_descriptions.items():
        out[f"{EVAL_DIR}/{name}"] = text
        out[f"{EVAL_DIR}/{name}_std"] = (f"Standard deviation over the held-out images of "
                                         f"{name} (its standard error is this / sqrt(images)).")
    return out


def evaluate_and_record(evaluator: Evaluator, params: Any, step: int, workdir: str, writer: Any,
                        *, full: bool, primary: bool) -> dict[str, Any]:
    """Evaluates `params` at `step`; writes the eval/ scalars and (full) WORKDIR/eval/.

    Returns the metrics (as written to metrics.json when full).
    """
    what = ("Evaluating" if full else f"Evaluating at step {step} (no decoding)")
    progress = EvaluationProgress(what, quiet=not primary)
    result = evaluator.run(params, full=full, pictures=full, on_batch=progress)
    metrics = dict(result.metrics, step=int(step))
    if not primary:
        return metrics
    writer.write_scalars(step, tensorboard_scalars(result.metrics))
    if full:
        out_dir = os.path.join(workdir, EVAL_DIR)
        metrics = save_evaluation(out_dir, result, step)
        writer.write_images(step, {f"{EVAL_DIR}/{name}": grid
                                   for name, grid in result.pictures.items()})
        log.info("%s", summary_line(metrics, out_dir))
    else:
        shown = ", ".join(f"{name} {value:.4g}" for name, value in result.metrics.items()
                          if name not in INFO_KEYS and not name.endswith("_std")
                          and isinstance(value, float))
        log.info("Evaluation at step %d on %d images: %s (TensorBoard: eval/)", step,
                 result.metrics["num_images"], shown)
    writer.flush()
    return metrics
