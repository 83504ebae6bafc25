"""ARI and FG-ARI as the evaluation computes them, against sklearn, per image.

The model's `evaluate_batch` (jitted, as `fixed_slots.eval.evaluator` runs it) on synthetic scenes
with their true masks; its slot attention returns an attention map this test chooses (the real
slots are kept), so the predicted segmentation is known: each pixel goes to the slot with the
largest attention of its token. The reference is `sklearn.metrics.adjusted_rand_score` of the
true ids against that segmentation, on every pixel (ARI) and on the foreground pixels (FG-ARI).
"""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from sklearn.metrics import adjusted_rand_score

from fixed_slots import models
from fixed_slots.modules.slot_attention import SlotAttention
from tests.helpers import load_config, synthetic_scenes


def _chosen_attention(true_mask: np.ndarray, factor: int, num_slots: int, seed: int = 0):
    """[B, S, tokens] attention (softmax over slots): each token leans to the slot of the id
    covering most of it (ids mapped to slots by a random permutation per image), with noise
    large enough that some tokens go elsewhere."""
    rng = np.random.default_rng(seed)
    b, h, w = true_mask.shape
    num_ids = int(true_mask.max()) + 1
    counts = np.stack([(true_mask == i).reshape(b, h // factor, factor, w // factor, factor)
                       .sum(axis=(2, 4)) for i in range(num_ids)], -1)  # [B, gh, gw, ids]
    majority = counts.argmax(-1).reshape(b, -1)  # [B, tokens]
    slot_of_id = np.stack([rng.permutation(num_slots)[:num_ids] for _ in range(b)])
    slot = np.take_along_axis(slot_of_id, majority, axis=1)  # [B, tokens]
    logits = 2.0 * np.eye(num_slots)[slot] + rng.normal(size=slot.shape + (num_slots,))
    attention = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    return attention.transpose(0, 2, 1).astype(np.float32)  # [B, S, tokens]


def _sklearn_scores(true_mask: np.ndarray, attention: np.ndarray, factor: int, pick=np.argmax):
    b, s, _ = attention.shape
    grid = true_mask.shape[1] // factor
    pixels = np.repeat(np.repeat(attention.reshape(b, s, grid, grid), factor, 2), factor, 3)
    pred = pick(pixels, axis=1)  # [B, H, W]
    ari = [adjusted_rand_score(t.ravel(), p.ravel()) for t, p in zip(true_mask, pred)]
    fg_ari = [adjusted_rand_score(t[t > 0], p[t > 0]) for t, p in zip(true_mask, pred)]
    return np.array(ari), np.array(fg_ari)


def test_slate_evaluation_ari_and_fg_ari_match_sklearn_per_image(monkeypatch):
    config = load_config("default:tiny")
    config.data.image_size = 32  # 8x8 tokens of 4x4 pixels
    config.data.min_objects, config.data.max_objects = 2, 3
    config.slot_attention.num_slots = 4
    images, raw = synthetic_scenes(config, n=6)
    true_mask = raw["mask"].astype(np.int32)
    factor = 4
    attention = _chosen_attention(true_mask, factor, config.slot_attention.num_slots)

    ari_ref, fg_ari_ref = _sklearn_scores(true_mask, attention, factor)
    # The chosen masks make a test of the numbers: scores spread between chance and perfect,
    # and a wrong slot assignment (argmin) would change them.
    assert fg_ari_ref.min() < 0.9 and fg_ari_ref.max() > 0.3 and np.ptp(ari_ref) > 0.1
    wrong_ari, wrong_fg_ari = _sklearn_scores(true_mask, attention, factor, pick=np.argmin)
    assert np.abs(wrong_fg_ari - fg_ari_ref).max() > 0.2

    real_call = SlotAttention.__call__

    def known_attention(self, inputs, key, **kwargs):
        slots, attn, info = real_call(self, inputs, key, **kwargs)
        assert attn.shape == attention.shape, (attn.shape, attention.shape)
        return slots, jnp.asarray(attention, attn.dtype), info

    monkeypatch.setattr(SlotAttention, "__call__", known_attention)
    graphdef, params = models.split_params(models.create(config, rngs=nnx.Rngs(0)))
    evaluate_batch = jax.jit(lambda p, batch, key: nnx.merge(graphdef, p).evaluate_batch(
        batch, key))  # as fixed_slots.eval.evaluator calls it
    result = jax.device_get(evaluate_batch(
        params, {"image": images, "mask": jnp.asarray(raw["mask"])}, jax.random.key(0)))
    np.testing.assert_allclose(result.per_example["ari"], ari_ref, rtol=0, atol=1e-5)
    np.testing.assert_allclose(result.per_example["fg_ari"], fg_ari_ref, rtol=0, atol=1e-5)
