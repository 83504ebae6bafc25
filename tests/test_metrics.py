"""Scores against references: ARI/FG-ARI (models.segmentation), AP and the Frechet distance
(eval.metrics), the Hungarian Huber loss and per-image MSE (models.losses)."""
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from fixed_slots.eval import metrics
from fixed_slots.models import losses, segmentation

# ----------------------------------------------------------------------------------------------
# ARI
# ----------------------------------------------------------------------------------------------


def _sk_ari(true_ids, pred_ids, ignore_background=False):
    out = []
    for t, p in zip(true_ids, pred_ids):
        t, p = np.ravel(t), np.ravel(p)
        if ignore_background:
            keep = t != 0
            t, p = t[keep], p[keep]
        out.append(adjusted_rand_score(t, p))
    return np.array(out)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_ari_matches_sklearn_on_random_segmentations(seed):
    rng = np.random.default_rng(seed)
    true_ids = rng.integers(0, 5, (4, 8, 8))
    # Mix of random predictions and noisy copies so scores span (-0.1, 1].
    pred_ids = rng.integers(0, 6, (4, 8, 8))
    pred_ids[1] = (true_ids[1] + 2) % 5
    noisy = rng.random((8, 8)) < 0.2
    pred_ids[2] = np.where(noisy, rng.integers(0, 6, (8, 8)), true_ids[2])
    got = np.asarray(segmentation.adjusted_rand_index(true_ids, pred_ids, 5, 6))
    np.testing.assert_allclose(got, _sk_ari(true_ids, pred_ids), atol=1e-5)
    fg = np.asarray(segmentation.adjusted_rand_index(true_ids, pred_ids, 5, 6,
                                                     ignore_background=True))
    np.testing.assert_allclose(fg, _sk_ari(true_ids, pred_ids, True), atol=1e-5)


def test_ari_degenerate_cases_match_sklearn():
    n = 6
    cases = [
        (np.zeros(n), np.zeros(n)),  # one cluster on both sides
        (np.arange(n), np.arange(n)[::-1]),  # all singletons on both sides
        (np.zeros(n), np.arange(n)),  # one cluster vs singletons
        (np.arange(n), np.zeros(n)),
        (np.array([0, 0, 1, 1, 2, 2]), np.array([3, 3, 0, 0, 5, 5])),  # permuted labels
        (np.array([0, 0, 0, 0, 0, 1]), np.array([0, 0, 0, 0, 0, 0])),
    ]
    true_ids = np.stack([c[0] for c in cases]).astype(np.int32)
    pred_ids = np.stack([c[1] for c in cases]).astype(np.int32)
    got = np.asarray(segmentation.adjusted_rand_index(true_ids, pred_ids, n, n))
    want = _sk_ari(true_ids, pred_ids)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert got[0] == 1.0 and got[1] == 1.0 and got[4] == 1.0


def test_fg_ari_degenerate_cases():
    # Only background: no pixel left -> 1.0 (sklearn on empty input also returns 1.0).
    # One foreground pixel -> 1.0. Background predicted differently does not matter.
    true_ids = np.array([[0, 0, 0, 0], [0, 0, 0, 3], [0, 1, 1, 2]])
    pred_ids = np.array([[0, 1, 2, 3], [1, 1, 1, 1], [3, 0, 0, 1]])
    got = np.asarray(segmentation.adjusted_rand_index(true_ids, pred_ids, 4, 4,
                                                      ignore_background=True))
    np.testing.assert_allclose(got, [1.0, 1.0, 1.0])
    np.testing.assert_allclose(got, _sk_ari(true_ids, pred_ids, True))


def test_token_resolution_ceiling_is_fg_ari_of_the_majority_token_map():
    """Objects aligned to the 4x4 token grid: ceiling 1. Discs: the FG-ARI (sklearn) of the
    mask whose every 4x4 block takes its most common object id (background pixels do not count
    in FG-ARI), written here with plain loops."""
    aligned = np.zeros((1, 16, 16), np.int32)
    aligned[0, 4:12, 0:8], aligned[0, 0:4, 8:16] = 1, 2
    np.testing.assert_allclose(segmentation.token_resolution_ceiling(aligned, 4, 3), [1.0])
    yy, xx = np.mgrid[:16, :16]
    disc = np.zeros((2, 16, 16), np.int32)
    disc[0][(yy - 6.3) ** 2 + (xx - 7.1) ** 2 < 20] = 1
    disc[0][(yy - 12.5) ** 2 + (xx - 12.2) ** 2 < 9] = 2
    disc[1][(yy - 9.4) ** 2 + (xx - 5.6) ** 2 < 30] = 2
    best = np.zeros_like(disc)
    for b, i, j in itertools.product(range(2), range(4), range(4)):
        block = disc[b, 4 * i:4 * i + 4, 4 * j:4 * j + 4]
        objects = np.bincount(block.ravel(), minlength=3)[1:]
        best[b, 4 * i:4 * i + 4, 4 * j:4 * j + 4] = 1 + objects.argmax() if objects.any() else 0
    expected = _sk_ari(disc, best, ignore_background=True)
    got = segmentation.token_resolution_ceiling(disc, 4, 3)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert got[0] < 0.99 and got[1] == 1.0  # two objects lose boundary pixels; one cannot


def test_ari_probabilities_jit_and_padding_mask():
    rng = np.random.default_rng(7)
    true_ids = rng.integers(0, 4, (3, 32))
    probs = rng.random((3, 32, 5)).astype(np.float32)
    ids = probs.argmax(-1)
    fn = jax.jit(segmentation.adjusted_rand_index, static_argnums=(2, 3, 4))
    np.testing.assert_allclose(fn(true_ids, probs, 4, 5, False),
                               _sk_ari(true_ids, ids), atol=1e-5)
    mask = rng.random((3, 32)) < 0.6
    got = segmentation.adjusted_rand_index(true_ids, ids, 4, 5, padding_mask=mask)
    want = [adjusted_rand_score(t[m], p[m]) for t, p, m in zip(true_ids, ids, mask)]
    np.testing.assert_allclose(got, want, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Average precision
# ----------------------------------------------------------------------------------------------

LAYOUT = metrics.PropertyLayout(position_dims=2, categorical_groups=(("shape", 2), ("color", 3)))


def _objects(positions, shapes, colors):
    """Builds property vectors [N, 2 + 2 + 3] for LAYOUT."""
    positions = np.asarray(positions, np.float64)
    return np.concatenate([positions, np.eye(2)[shapes], np.eye(3)[colors]], axis=-1)


def _scene():
    target = _objects([[0, 0], [1, 0], [0, 1], [1, 1]], [0, 1, 0, 1], [0, 1, 2, 0])[None]
    return target, np.ones((1, 4), bool)


def test_ap_perfect_predictions_is_one():
    target, visible = _scene()
    pred = target[:, ::-1].copy()  # order of the slots does not matter
    prob = np.array([[0.9, 0.8, 0.7, 0.6]])
    for threshold in metrics.AP_THRESHOLDS + (-1, None):
        assert metrics.average_precision(pred, prob, target, visible, threshold, LAYOUT) == 1.0


def test_ap_one_wrong_colour_known_values():
    target, visible = _scene()
    pred = target.copy()
    pred[0, 1, 4:] = np.eye(3)[2]  # object 1 predicted with the wrong colour
    # Ranked TP, FP, TP, TP: recall .25,.25,.5,.75, precision 1,.5,.667,.75 -> AP = .625.
    prob = np.array([[0.9, 0.8, 0.7, 0.6]])
    assert metrics.average_precision(pred, prob, target, visible, None, LAYOUT) == 0.625
    # Ranked TP, TP, TP, FP -> AP = .75.
    prob = np.array([[0.9, 0.1, 0.7, 0.6]])
    assert metrics.average_precision(pred, prob, target, visible, None, LAYOUT) == 0.75


def test_ap_threshold_and_duplicates():
    target, visible = _scene()
    pred = target.copy()
    pred[0, :, :2] += np.array([0.375, 0.5])  # every prediction exactly 0.625 away
    prob = np.array([[0.9, 0.8, 0.7, 0.6]])
    ap = {t: metrics.average_precision(pred, prob, target, visible, t, LAYOUT)
          for t in (math.inf, 1.0, 0.625, 0.5, 0.25)}
    assert ap == {math.inf: 1.0, 1.0: 1.0, 0.625: 0.0, 0.5: 0.0, 0.25: 0.0}  # strict "<"
    # The position scale turns stored units into threshold units (CLEVR: x6).
    scaled = metrics.PropertyLayout(2, LAYOUT.categorical_groups, position_scale=0.5)
    assert metrics.average_precision(pred, prob, target, visible, 0.5, scaled) == 1.0
    assert metrics.average_precision(pred, prob, target, visible, 0.25, scaled) == 0.0

    # A duplicate of object 0 with higher confidence takes it; the original becomes an FP.
    pred = np.concatenate([target, target[:, :1]], axis=1)
    prob = np.array([[0.5, 0.8, 0.7, 0.6, 0.9]])
    # Ranked TP(o0), TP, TP, TP, FP: AP = 1.
    assert metrics.average_precision(pred, prob, target, visible, None, LAYOUT) == 1.0
    prob = np.array([[0.95, 0.8, 0.7, 0.6, 0.9]])
    # Ranked TP, FP, TP, TP, TP: precision 1,.5,.667,.75,.8 -> envelope .8 after recall .25.
    got = metrics.average_precision(pred, prob, target, visible, None, LAYOUT)
    assert got == pytest.approx(0.25 + 0.75 * 0.8, abs=1e-7)
    prob = np.array([[0.6, 0.95, 0.7, 0.5, 0.9]])
    # Ranked TP(o1), TP(dup->o0), TP(o2), FP(o0 again), TP(o3): envelope .8 at recall 1.
    want = 0.75 * 1.0 + 0.25 * 0.8
    got = metrics.average_precision(pred, prob, target, visible, None, LAYOUT)
    assert got == pytest.approx(want, abs=1e-7)


def test_ap_ignores_invisible_targets_in_recall():
    target, visible = _scene()
    visible = np.array([[True, True, True, False]])
    pred = target.copy()
    prob = np.array([[0.9, 0.8, 0.7, 0.6]])
    # The prediction of the invisible object is a (last-ranked) FP; recall reaches 1 first.
    got = metrics.average_precision(pred, prob, target, visible, None, LAYOUT)
    assert got == pytest.approx(1.0, abs=1e-7)
    prob = np.array([[0.9, 0.8, 0.7, 0.95]])
    # FP first: precision 0,.5,.667,.75 at recall 0,1/3,2/3,1 -> envelope .75 everywhere.
    got = metrics.average_precision(pred, prob, target, visible, None, LAYOUT)
    assert got == pytest.approx(0.75, abs=1e-7)
    assert math.isnan(metrics.average_precision(pred, prob, target, np.zeros_like(visible), None,
                                                LAYOUT))


def _reference_ap(pred, prob, target, visible, threshold, layout):
    """A direct loop-by-loop transcription of the reference algorithm (slot_attention utils)."""
    batch, num_pred, _ = pred.shape
    if threshold is None or threshold == math.inf:
        threshold = -1

    def unpack(x):
        coords = x[:layout.position_dims]
        attrs, start = [], layout.position_dims
        for _, size in layout.categorical_groups:
            attrs.append(int(np.argmax(x[start:start + size])))
            start += size
        return coords, attrs

    flat_pred = pred.reshape(batch * num_pred, -1)
    flat_prob = prob.reshape(-1)
    sort_idx = np.argsort(flat_prob)[::-1]
    tp = np.zeros(len(sort_idx))
    fp = np.zeros(len(sort_idx))
    detected = set()
    for det, unsorted in enumerate(sort_idx):
        image = int(unsorted // num_pred)
        p_coords, p_attrs = unpack(flat_pred[unsorted])
        best_distance, best_id = 10000, None
        for obj in range(target.shape[1]):
            t_coords, t_attrs = unpack(target[image, obj])
            if visible[image, obj] and p_attrs == t_attrs:
                distance = np.linalg.norm((t_coords - p_coords) * layout.position_scale)
                if distance < best_distance:
                    best_distance, best_id = distance, obj
        if (best_distance < threshold or threshold == -1) and best_id is not None \
                and (image, best_id) not in detected:
            tp[det] = 1
            detected.add((image, best_id))
        else:
            fp[det] = 1
    acc_tp, acc_fp = np.cumsum(tp), np.cumsum(fp)
    recall = (acc_tp / np.sum(visible)).astype(np.float32).tolist()
    precision = (acc_tp / (acc_fp + acc_tp)).astype(np.float32).tolist()
    recall = [0] + recall + [1]
    precision = [0] + precision + [0]
    for i in range(len(precision) - 1, 0, -1):
        precision[i - 1] = max(precision[i - 1], precision[i])
    return sum(precision[i + 1] * (recall[i + 1] - recall[i])
               for i in range(len(recall) - 1) if recall[i + 1] != recall[i])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ap_matches_independent_reimplementation(seed):
    rng = np.random.default_rng(seed)
    batch, num_obj, num_slots = 6, 5, 6
    layout = metrics.PropertyLayout(3, (("size", 2), ("shape", 3), ("color", 4)),
                                    position_scale=6.0)
    positions = rng.random((batch, num_obj, 3))
    target = np.concatenate([positions] + [
        np.eye(n)[rng.integers(0, n, (batch, num_obj))] for _, n in layout.categorical_groups],
        axis=-1)
    visible = rng.random((batch, num_obj)) < 0.8
    # Predictions: noisy, permuted copies of the targets plus some random slots.
    pred = np.concatenate([target, target[:, :1]], axis=1)[:, rng.permutation(num_slots)]
    pred = pred + rng.normal(0, 0.3, pred.shape) * np.r_[np.full(3, 0.1), np.ones(9)]
    pred[:, :2] = rng.random((batch, 2, pred.shape[-1]))
    prob = rng.random((batch, num_slots))
    for threshold in metrics.AP_THRESHOLDS + (-1, None, 0.3):
        got = metrics.average_precision(pred, prob, target, visible, threshold, layout)
        want = _reference_ap(pred, prob, target, visible, threshold, layout)
        assert got == pytest.approx(want, abs=1e-9), threshold
    aps = metrics.average_precisions(pred, prob, target, visible, layout)
    assert list(aps) == ["ap_inf", "ap_1", "ap_0.5", "ap_0.25", "ap_0.125"]
    assert aps["ap_inf"] >= aps["ap_1"] >= aps["ap_0.5"] >= aps["ap_0.25"] >= aps["ap_0.125"]


def test_layout_from_clevr_targets():
    from fixed_slots.data.sources import CLEVR_TARGET_LAYOUT

    layout = metrics.PropertyLayout.from_target_layout(CLEVR_TARGET_LAYOUT, 6.0)
    assert layout.dim == 18  # + the real-object flag = 19 entries per object
    assert [n for n, _ in layout.categorical_groups] == ["shape", "color", "size", "material"]
    assert layout.position_scale == 6.0
    pos, ids = layout.split(np.eye(19)[[3, 5, 17]])
    assert pos.shape == (3, 3) and ids.shape == (3, 4)
    np.testing.assert_array_equal(ids[1], [2, 0, 0, 0])  # entry 5 = shape index 2


# ----------------------------------------------------------------------------------------------
# Hungarian matching
# ----------------------------------------------------------------------------------------------


def _brute_force_min(cost):
    s, o = cost.shape
    if s <= o:
        return min(sum(cost[i, p[i]] for i in range(s))
                   for p in itertools.permutations(range(o), s))
    return _brute_force_min(cost.T)


def test_hungarian_matching_is_optimal():
    rng = np.random.default_rng(0)
    for shape in [(3, 4, 4), (2, 3, 5), (2, 5, 3)]:
        cost = rng.random(shape)
        rows, cols = losses.hungarian_matching(cost)
        assert rows.shape == cols.shape == (shape[0], min(shape[1:]))
        for b in range(shape[0]):
            assert len(set(cols[b])) == cols.shape[1]
            assert cost[b, rows[b], cols[b]].sum() == pytest.approx(_brute_force_min(cost[b]))


def _huber(x, delta=1.0):
    ax = np.abs(x)
    return np.where(ax <= delta, 0.5 * x**2, delta * ax - 0.5 * delta**2)


def test_hungarian_huber_loss_value_jit_grad():
    rng = np.random.default_rng(1)
    pred = rng.normal(size=(3, 4, 5)).astype(np.float32) * 1.5
    target = rng.normal(size=(3, 4, 5)).astype(np.float32)
    want = np.mean([
        min(sum(_huber(target[b, i] - pred[b, p[i]]).mean() for i in range(4))
            for p in itertools.permutations(range(4)))
        for b in range(3)])
    loss_fn = jax.jit(losses.hungarian_huber_loss)
    assert float(loss_fn(pred, target)) == pytest.approx(want, rel=1e-5)

    loss, grad = jax.jit(jax.value_and_grad(losses.hungarian_huber_loss))(pred, target)
    assert np.isfinite(np.asarray(grad)).all() and float(loss) == pytest.approx(want, rel=1e-5)
    # The gradient is that of the matched Huber costs with the matching held fixed.
    cost = np.asarray(losses.pairwise_huber_cost(jnp.asarray(pred), jnp.asarray(target)))
    rows, cols = losses.hungarian_matching(cost)

    def fixed(p):
        c = losses.pairwise_huber_cost(p, jnp.asarray(target))
        return jnp.mean(jnp.sum(c[jnp.arange(3)[:, None], rows, cols], axis=1))

    np.testing.assert_allclose(grad, jax.grad(fixed)(jnp.asarray(pred)), atol=1e-6)
    # Works under vmap too (extra leading axis).
    batched = jax.vmap(losses.hungarian_huber_loss)(jnp.stack([pred, pred]),
                                                      jnp.stack([target, target]))
    np.testing.assert_allclose(batched, [want, want], rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# MSE
# ----------------------------------------------------------------------------------------------


def test_mse_per_image_scales():
    rng = np.random.default_rng(0)
    x = rng.random((3, 4, 5, 3)).astype(np.float32)
    y = rng.random((3, 4, 5, 3)).astype(np.float32)
    total = losses.mse_per_image(x, y)
    mean = losses.mse_per_image(x, y, reduction="mean_per_pixel")
    assert total.shape == mean.shape == (3,)
    np.testing.assert_allclose(total, ((x - y) ** 2).sum(axis=(1, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(total, mean * 4 * 5 * 3, rtol=1e-6)
    ones = losses.mse_per_image(np.zeros((2, 4, 4, 3)), np.ones((2, 4, 4, 3)))
    np.testing.assert_allclose(ones, [48.0, 48.0])
    with pytest.raises(ValueError):
        losses.mse_per_image(x, y, reduction="mean")


# ----------------------------------------------------------------------------------------------
# Frechet distance
# ----------------------------------------------------------------------------------------------


def _reference_fd(mu1, s1, mu2, s2):
    """Independent float64 formula: Tr sqrt(S1 S2) = sum sqrt(eig(S1^1/2 S2 S1^1/2))."""
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = root1 @ s2 @ root1
    tr_sqrt = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def test_frechet_distance_matches_reference():
    rng = np.random.default_rng(0)
    d = 16
    a = rng.normal(size=(200, d))
    b = rng.normal(size=(150, d)) @ rng.normal(size=(d, d)) * 0.5 + 0.3
    mu1, s1 = metrics.activation_statistics(a)
    mu2, s2 = metrics.activation_statistics(b)
    assert mu1.shape == (d,) and s1.shape == (d, d) and s1.dtype == np.float64
    np.testing.assert_allclose(s1, (a - a.mean(0)).T @ (a - a.mean(0)) / (len(a) - 1))
    got = metrics.frechet_distance(mu1, s1, mu2, s2)
    assert isinstance(got, float)
    assert got == pytest.approx(_reference_fd(mu1, s1, mu2, s2), rel=1e-9)
    assert abs(metrics.frechet_distance(mu1, s1, mu1, s1)) < 1e-9
    # Closed form for diagonal covariances.
    va, vb = rng.random(d) + 0.1, rng.random(d) + 0.1
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(va) - np.sqrt(vb)) ** 2)
    got = metrics.frechet_distance(mu1, np.diag(va), mu2, np.diag(vb))
    assert got == pytest.approx(want, rel=1e-9)


def test_frechet_distance_rank_deficient():
    # Fewer samples than dimensions: singular covariances, as with small FID evaluations.
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(5, 12)), rng.normal(size=(6, 12)) + 0.2
    mu1, s1 = metrics.activation_statistics(a)
    mu2, s2 = metrics.activation_statistics(b)
    got = metrics.frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(got)
    assert got == pytest.approx(_reference_fd(mu1, s1, mu2, s2), rel=1e-6, abs=1e-6)
    with pytest.raises(ValueError):
        metrics.frechet_distance(mu1, s1, mu2[:3], s2)
