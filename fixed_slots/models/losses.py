"""Losses and per-image errors the models compute inside their jitted functions.

- `mse_per_image`: the reconstruction error the SLATE and implicit-slot-attention papers report.
- The set-prediction loss of Locatello et al. (google-research `slot_attention/utils.py::
  hungarian_huber_loss`): Keras `Huber` (delta 1, mean over features) between every target and
  prediction, the optimal assignment by the Hungarian algorithm (scipy on the host through
  `jax.pure_callback`), matched costs summed per image.
"""
from __future__ import annotations

from typing import Union

import jax
import jax.numpy as jnp
import numpy as np

Array = Union[np.ndarray, jax.Array]


def mse_per_image(x: Array, y: Array, reduction: str = "sum_per_image") -> jax.Array:
    """Squared reconstruction error per image, for images with values in [0, 1].

    Args:
      x, y: [B, H, W, C] images (any trailing dims after B), values in [0, 1].
      reduction:
        "sum_per_image": sum over all pixels and channels of (x - y)^2, i.e. [B] values in
          [0, H*W*C]. Its mean over images is the "MSE" the SLATE and implicit-slot-attention
          papers report (the official SLATE code computes `((x - y)**2).sum() / B`).
        "mean_per_pixel": mean over all pixels and channels, i.e. "sum_per_image" / (H*W*C),
          [B] values in [0, 1].
    Returns:
      [B] float32.
    """
    x = jnp.asarray(x, jnp.float32)
    y = jnp.asarray(y, jnp.float32)
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: {x.shape} vs {y.shape}")
    sq = jnp.square(x - y).reshape(x.shape[0], -1)
    if reduction == "sum_per_image":
        return jnp.sum(sq, axis=-1)
    if reduction == "mean_per_pixel":
        return jnp.mean(sq, axis=-1)
    raise ValueError(f"reduction must be 'sum_per_image' or 'mean_per_pixel', got {reduction!r}")


def hungarian_matching(cost: Array) -> tuple[np.ndarray, np.ndarray]:
    """Minimum-cost assignment per example, on host with scipy.

    Args:
      cost: [B, S, O] cost of assigning row s to column o.
    Returns:
      (rows, cols), each [B, min(S, O)] int32: row `rows[b, k]` is matched to column
      `cols[b, k]`; rows are sorted ascending (scipy's convention).
    """
    import scipy.optimize  # imported here: ~0.1 s of every start otherwise

    cost = np.asarray(cost)
    if cost.ndim != 3:
        raise ValueError(f"cost must be [B, S, O], got {cost.shape}")
    k = min(cost.shape[1], cost.shape[2])
    rows = np.zeros((cost.shape[0], k), np.int32)
    cols = np.zeros((cost.shape[0], k), np.int32)
    for b in range(cost.shape[0]):
        rows[b], cols[b] = scipy.optimize.linear_sum_assignment(cost[b])
    return rows, cols


def _hungarian_host(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """pure_callback body: cost [..., S, O] with any leading (vmapped) dims."""
    cost = np.asarray(cost)
    lead = cost.shape[:-2]
    rows, cols = hungarian_matching(cost.reshape((-1,) + cost.shape[-2:]).astype(np.float64))
    k = rows.shape[-1]
    return rows.reshape(lead + (k,)), cols.reshape(lead + (k,))


def hungarian_matching_jax(cost: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`hungarian_matching` usable inside jit: cost [B,S,O] -> (rows, cols) [B, min(S,O)] int32.

    The assignment runs on host through `jax.pure_callback`; it carries no gradient (the cost is
    passed through `stop_gradient`), gradients flow through the cost entries one gathers with it.
    """
    cost = jax.lax.stop_gradient(cost)
    k = min(cost.shape[-2], cost.shape[-1])
    out_shape = jax.ShapeDtypeStruct(cost.shape[:-2] + (k,), jnp.int32)
    return jax.pure_callback(_hungarian_host, (out_shape, out_shape), cost,
                             vmap_method="expand_dims")


def pairwise_huber_cost(pred: jax.Array, target: jax.Array, delta: float = 1.0) -> jax.Array:
    """Keras `Huber` between every target and prediction, averaged over features.

    pred [B, S, D], target [B, O, D] -> cost [B, O, S] (rows = targets, as in the reference).
    """
    error = pred[:, None, :, :] - target[:, :, None, :]  # [B, O, S, D]
    abs_error = jnp.abs(error)
    quadratic = 0.5 * jnp.square(error)
    linear = delta * abs_error - 0.5 * delta**2
    return jnp.mean(jnp.where(abs_error <= delta, quadratic, linear), axis=-1)


def hungarian_huber_per_image(pred: jax.Array, target: jax.Array, delta: float = 1.0
                              ) -> jax.Array:
    """Hungarian-matched Huber cost per image [B] (jit- and grad-compatible).

    Args:
      pred: [B, S, D] predictions.
      target: [B, O, D] targets (padding objects included, as in the reference).
    """
    cost = pairwise_huber_cost(pred, target, delta)  # [B, O, S]
    rows, cols = hungarian_matching_jax(cost)  # [B, K] each
    matched = cost[jnp.arange(cost.shape[0])[:, None], rows, cols]  # [B, K]
    return jnp.sum(matched, axis=1)


def hungarian_huber_loss(pred: jax.Array, target: jax.Array, delta: float = 1.0) -> jax.Array:
    """The set predictor's loss: `hungarian_huber_per_image` averaged over the batch, a scalar."""
    return jnp.mean(hungarian_huber_per_image(pred, target, delta))
