"""Evaluation metrics over model outputs: set-prediction AP and the Frechet distance (FID).

Conventions follow the reference implementations the papers were evaluated with:
- AP as in google-research `slot_attention/utils.py::average_precision_clevr` (Locatello et al.).
- Frechet distance as in pytorch-fid / TTUR `calculate_frechet_distance`.

The scores the models compute themselves inside jit (ARI / FG-ARI, the Hungarian Huber loss, the
per-image MSE) live with the models: `fixed_slots.models.segmentation`, `fixed_slots.models.losses`.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import TYPE_CHECKING, Optional, Sequence, Union

import jax
import numpy as np

if TYPE_CHECKING:
    from fixed_slots.data.synthetic import TargetLayout

Array = Union[np.ndarray, jax.Array]


# ----------------------------------------------------------------------------------------------
# Set prediction: average precision
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PropertyLayout:
    """Layout of an object's property vector: positions first, then one-hot groups.

    Attributes:
      position_dims: number of leading coordinate entries.
      categorical_groups: ((name, size), ...) one-hot groups following the coordinates, in order;
        the discrete value of a group is its argmax.
      position_scale: multiplies coordinate differences before the Euclidean norm, so that the
        thresholds are in the dataset's original units (CLEVR stores [-3, 3] rescaled to [0, 1],
        hence 6.0 there, as in the reference code).
    Entries after `dim` (e.g. CLEVR's trailing "real object" flag) are ignored.
    """

    position_dims: int
    categorical_groups: tuple[tuple[str, int], ...]
    position_scale: float = 1.0

    @classmethod
    def from_target_layout(cls, layout: "TargetLayout", position_scale: float = 1.0
                           ) -> "PropertyLayout":
        """The AP's reading of a dataset's target vectors: positions, then its one-hot groups."""
        groups = tuple((name, s.stop - s.start) for name, s in layout.categorical.items())
        return cls(position_dims=layout.position_dims, categorical_groups=groups,
                   position_scale=position_scale)

    @property
    def dim(self) -> int:
        return self.position_dims + sum(size for _, size in self.categorical_groups)

    def split(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[..., D] -> (positions [..., position_dims], discrete ids [..., num_groups] int)."""
        x = np.asarray(x)
        if x.shape[-1] < self.dim:
            raise ValueError(
                f"property vectors have {x.shape[-1]} entries, the layout needs {self.dim}")
        positions = x[..., :self.position_dims]
        ids, start = [], self.position_dims
        for _, size in self.categorical_groups:
            ids.append(np.argmax(x[..., start:start + size], axis=-1))
            start += size
        discrete = np.stack(ids, axis=-1) if ids else np.zeros(x.shape[:-1] + (0,), np.int64)
        return positions, discrete


# Distance thresholds reported by Locatello et al. (inf = only the discrete properties count).
AP_THRESHOLDS = (math.inf, 1.0, 0.5, 0.25, 0.125)

# The reference initialises the best distance with this constant: matches farther away never count.
_REFERENCE_MAX_DISTANCE = 10000.0


def compute_average_precision(precision: np.ndarray, recall: np.ndarray) -> float:
    """Area under the interpolated precision/recall curve (the reference's VOC-style AP)."""
    recall = [0.0] + [float(r) for r in recall] + [1.0]
    precision = [0.0] + [float(p) for p in precision] + [0.0]
    # Precision envelope: running max from the right.
    for i in range(len(precision) - 1, 0, -1):
        precision[i - 1] = max(precision[i - 1], precision[i])
    average_precision = 0.0
    for i in range(len(recall) - 1):
        if recall[i + 1] != recall[i]:
            average_precision += precision[i + 1] * (recall[i + 1] - recall[i])
    return average_precision


def average_precision(pred: Array, pred_prob: Array, target: Array, target_visible: Array,
                      distance_threshold: Optional[float], layout: PropertyLayout) -> float:
    """Set-prediction average precision (Locatello et al. 2020, `average_precision_clevr`).

    All B*S predictions are ranked by confidence (highest first). Each prediction looks, in its
    own image, for the closest visible ground-truth object whose discrete properties (argmax per
    group) all equal its own. It is a true positive if that object exists, lies strictly within
    `distance_threshold`, and was not claimed by a higher-ranked prediction; otherwise a false
    positive (as in the reference, a prediction whose closest match is already claimed does not
    fall back to a farther one). Recall is normalised by the number of visible objects.

    Args:
      pred: [B, S, D] predicted property vectors (layout order).
      pred_prob: [B, S] confidence of each prediction.
      target: [B, O, D] ground-truth property vectors.
      target_visible: [B, O] whether each target slot holds a real object.
      distance_threshold: None, -1 or inf for no distance criterion, else a distance in the
        layout's (scaled) units.
      layout: how to read property vectors.

    Returns:
      AP as a Python float; nan if there is no visible ground-truth object.
    """
    pred = np.asarray(pred, np.float64)
    pred_prob = np.asarray(pred_prob, np.float64)
    target = np.asarray(target, np.float64)
    visible = np.asarray(target_visible).astype(bool)
    batch, num_pred = pred.shape[:2]
    if pred_prob.shape != (batch, num_pred):
        raise ValueError(f"pred_prob {pred_prob.shape} != {(batch, num_pred)}")
    if visible.shape != target.shape[:2] or target.shape[0] != batch:
        raise ValueError(f"target {target.shape} / target_visible {visible.shape} mismatch")
    num_visible = int(visible.sum())
    if num_visible == 0:
        return float("nan")
    no_threshold = distance_threshold is None or distance_threshold == -1 or (
        math.isinf(distance_threshold) and distance_threshold > 0)

    # The best match of a prediction does not depend on the ranking: compute it for all at once.
    pred_pos, pred_ids = layout.split(pred)  # [B,S,P], [B,S,G]
    tgt_pos, tgt_ids = layout.split(target)  # [B,O,P], [B,O,G]
    same = np.all(pred_ids[:, :, None, :] == tgt_ids[:, None, :, :], axis=-1)  # [B,S,O]
    candidate = same & visible[:, None, :]
    diff = (tgt_pos[:, None, :, :] - pred_pos[:, :, None, :]) * layout.position_scale
    distance = np.linalg.norm(diff, axis=-1)  # [B,S,O]
    # Strict "<" against the running best (initialised to 10000) in the reference: ties go to the
    # first object, and NaN or >= 10000 distances never match.
    candidate &= distance < _REFERENCE_MAX_DISTANCE
    masked = np.where(candidate, distance, np.inf)
    best_id = np.argmin(masked, axis=-1)  # [B,S]
    has_match = np.any(candidate, axis=-1)  # [B,S]
    best_distance = np.take_along_axis(masked, best_id[..., None], axis=-1)[..., 0]
    within = has_match & (True if no_threshold else best_distance < distance_threshold)

    # Rank by confidence, highest first. The reference reverses np.argsort's ascending order; a
    # stable sort reproduces it exactly for small arrays (numpy's default is insertion sort there).
    flat_conf = pred_prob.reshape(-1)
    order = np.argsort(flat_conf, kind="stable")[::-1]
    within_flat = within.reshape(-1)
    best_flat = best_id.reshape(-1)
    true_positives = np.zeros(order.shape[0])
    false_positives = np.zeros(order.shape[0])
    claimed = set()
    for rank, flat_idx in enumerate(order):
        image = int(flat_idx) // num_pred
        key = (image, int(best_flat[flat_idx]))
        if within_flat[flat_idx] and key not in claimed:
            true_positives[rank] = 1
            claimed.add(key)
        else:
            false_positives[rank] = 1
    accumulated_tp = np.cumsum(true_positives)
    accumulated_fp = np.cumsum(false_positives)
    recall = accumulated_tp / num_visible
    precision = accumulated_tp / (accumulated_fp + accumulated_tp)
    # The reference rounds the curves to float32 before integrating.
    return compute_average_precision(precision.astype(np.float32), recall.astype(np.float32))


def average_precisions(pred: Array, pred_prob: Array, target: Array, target_visible: Array,
                       layout: PropertyLayout,
                       thresholds: Sequence[float] = AP_THRESHOLDS) -> dict[str, float]:
    """AP at each threshold, keyed "ap_inf", "ap_1", "ap_0.5", ... (the paper's table columns)."""
    out = {}
    for threshold in thresholds:
        name = "inf" if math.isinf(threshold) or threshold == -1 else f"{threshold:g}"
        out[f"ap_{name}"] = average_precision(pred, pred_prob, target, target_visible, threshold,
                                              layout)
    return out


# ----------------------------------------------------------------------------------------------
# Frechet distance
# ----------------------------------------------------------------------------------------------


def activation_statistics(acts: Array) -> tuple[np.ndarray, np.ndarray]:
    """acts [N, D] -> (mean [D], covariance [D, D]) in float64, unbiased (N - 1), as pytorch-fid."""
    acts = np.asarray(acts, np.float64)
    if acts.ndim != 2 or acts.shape[0] < 2:
        raise ValueError(f"need activations [N >= 2, D], got {acts.shape}")
    return np.mean(acts, axis=0), np.cov(acts, rowvar=False)


def frechet_distance(mu1: Array, sigma1: Array, mu2: Array, sigma2: Array,
                     eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), float64 on host.

    d^2 = ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)), computed exactly as
    pytorch-fid / TTUR: if the matrix square root is not finite, eps is added to both diagonals
    and it is recomputed; a complex result is accepted only if the imaginary part of its diagonal
    is within 1e-3 of zero, and then its real part is used.
    """
    import scipy.linalg  # imported here: ~0.15 s of every start otherwise, for the FID only

    mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape:
        raise ValueError(f"mean vectors have different lengths: {mu1.shape} vs {mu2.shape}")
    if sigma1.shape != sigma2.shape:
        raise ValueError(f"covariances have different shapes: {sigma1.shape} vs {sigma2.shape}")

    diff = mu1 - mu2
    # The product might be almost singular.
    covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        logging.warning("fid calculation produces singular product; adding %s to diagonal of "
                        "cov estimates", eps)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))

    # Numerical error might give a slight imaginary component.
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            m = np.max(np.abs(covmean.imag))
            raise ValueError(f"Imaginary component {m}")
        covmean = covmean.real

    tr_covmean = np.trace(covmean)
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)
