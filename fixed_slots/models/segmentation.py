"""Segmentation scores the models compute inside their jitted functions: ARI and FG-ARI.

ARI as in SAVi's `lib/metrics.py` (and multi_object_datasets' segmentation_metrics), with the
degenerate cases resolved exactly as `sklearn.metrics.adjusted_rand_score`.
"""
from __future__ import annotations

from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

Array = Union[np.ndarray, jax.Array]


def _flatten_segmentation(true_ids: Array, pred: Array) -> tuple[jax.Array, jax.Array, bool]:
    """Returns (true [B,N], pred [B,N] ids or [B,N,K] probs, pred_is_probs)."""
    true_ids = jnp.asarray(true_ids)
    pred = jnp.asarray(pred)
    batch = true_ids.shape[0]
    if not jnp.issubdtype(true_ids.dtype, jnp.integer):
        raise ValueError(f"true_ids must be integer-valued, got {true_ids.dtype}.")
    if pred.ndim == true_ids.ndim + 1:
        # Soft assignments [B, ..., K]: the reference ARI takes the argmax per pixel.
        if pred.shape[:-1] != true_ids.shape:
            raise ValueError(f"pred probs {pred.shape} do not match true_ids {true_ids.shape}.")
        return true_ids.reshape(batch, -1), pred.reshape(batch, -1, pred.shape[-1]), True
    if pred.shape != true_ids.shape:
        raise ValueError(f"pred_ids {pred.shape} do not match true_ids {true_ids.shape}.")
    if not jnp.issubdtype(pred.dtype, jnp.integer):
        raise ValueError(
            f"pred_ids must be integer-valued (or probabilities with a trailing K axis), "
            f"got {pred.dtype} with shape {pred.shape}.")
    return true_ids.reshape(batch, -1), pred.reshape(batch, -1), False


def adjusted_rand_index(true_ids: Array, pred_ids: Array, num_true: int, num_pred: int,
                        ignore_background: bool = False,
                        padding_mask: Optional[Array] = None) -> jax.Array:
    """Adjusted Rand index per example (jit-able; `num_true`, `num_pred` must be static).

    Args:
      true_ids: [B, N] (or [B, H, W], any trailing dims) integer ids in [0, num_true).
      pred_ids: [B, N] integer ids in [0, num_pred), or [B, N, K] soft assignments (K == num_pred),
        which are reduced by argmax as in the reference implementation.
      num_true: number of possible true ids (incl. background 0).
      num_pred: number of possible predicted ids (e.g. number of slots).
      ignore_background: drop pixels whose true id is 0 (FG-ARI).
      padding_mask: optional [B, N] 0/1 mask of pixels to use.

    Returns:
      [B] float32 ARI. Identical partitions (incl. "everything in one cluster" on both sides,
      one pixel, or no pixels left after masking) give exactly 1.0, as in sklearn.
    """
    true_ids, pred, is_probs = _flatten_segmentation(true_ids, pred_ids)
    if is_probs:
        pred = jnp.argmax(pred, axis=-1)
    true_oh = jax.nn.one_hot(true_ids, num_true, dtype=jnp.float32)  # [B, N, C]
    pred_oh = jax.nn.one_hot(pred, num_pred, dtype=jnp.float32)  # [B, N, K]
    if padding_mask is not None:
        valid = jnp.asarray(padding_mask, jnp.float32).reshape(true_ids.shape)  # [B, N]
        true_oh = true_oh * valid[..., None]
    if ignore_background:
        true_oh = true_oh[..., 1:]  # Pixels of id 0 fall out of the contingency table.

    # Contingency table: integer counts, exact in float32 up to 2^24 pixels per image.
    nij = jnp.einsum("bnc,bnk->bck", true_oh, pred_oh, precision=jax.lax.Precision.HIGHEST)
    a = jnp.sum(nij, axis=-1)  # [B, C] row sums
    b = jnp.sum(nij, axis=-2)  # [B, K] column sums
    num_points = jnp.sum(a, axis=-1)  # [B]

    rindex = jnp.sum(nij * (nij - 1), axis=(1, 2))
    aindex = jnp.sum(a * (a - 1), axis=1)
    bindex = jnp.sum(b * (b - 1), axis=1)
    expected_rindex = aindex * bindex / jnp.clip(num_points * (num_points - 1), 1)
    max_rindex = (aindex + bindex) / 2
    denominator = max_rindex - expected_rindex
    ari = (rindex - expected_rindex) / jnp.where(denominator == 0, 1.0, denominator)
    # denominator == 0 happens only when both partitions are all-singletons, both are a single
    # cluster, or there are < 2 points: all cases where sklearn returns 1.0 (fn == fp == 0).
    return jnp.where(denominator == 0, 1.0, ari)


def segmentation_metrics(true_mask: jax.Array, masks: jax.Array, num_mask_ids: int
                         ) -> dict[str, jax.Array]:
    """ARI and FG-ARI [B] of argmax-over-slots of masks [B, S, H, W] vs true ids [B, H, W]."""
    masks = jax.lax.stop_gradient(masks)
    pred = jnp.argmax(masks, axis=1)  # [B, H, W] slot owning each pixel
    true = true_mask.astype(jnp.int32)
    s = masks.shape[1]
    return {"ari": adjusted_rand_index(true, pred, num_mask_ids, s),
            "fg_ari": adjusted_rand_index(true, pred, num_mask_ids, s, ignore_background=True)}


def token_resolution_ceiling(true_mask: jax.Array, factor: int, num_mask_ids: int
                             ) -> jax.Array:
    """FG-ARI [B] of the best segmentation made of `factor` x `factor`-pixel tokens.

    Each token is given the object most of its foreground pixels belong to (FG-ARI ignores
    background pixels, so background in a token costs nothing) and upsampled by repetition, as
    `SLATE`'s attention masks are: what a model whose slots follow the objects perfectly at token
    resolution scores, up to ties. With objects a few tokens wide it is well below 1, so a
    model's FG-ARI is read against it.
    """
    true = true_mask.astype(jnp.int32)  # [B, H, W]
    b, h, w = true.shape
    counts = jax.nn.one_hot(true, num_mask_ids, dtype=jnp.float32).reshape(
        b, h // factor, factor, w // factor, factor, num_mask_ids).sum(axis=(2, 4))
    counts = counts.at[..., 0].set(0.0)  # a token without objects stays 0 (ignored anyway)
    majority = jnp.argmax(counts, axis=-1)  # [B, H/factor, W/factor]
    best = jnp.repeat(jnp.repeat(majority, factor, axis=1), factor, axis=2)
    return adjusted_rand_index(true, best, num_mask_ids, num_mask_ids, ignore_background=True)
