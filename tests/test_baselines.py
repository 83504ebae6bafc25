"""Trivial segmentation baselines: scored as sklearn scores them, right where answers are known."""
import json

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from fixed_slots.experiments import baselines
from helpers import load_config


def _sklearn(true, ids):
    """(FG-ARI, ARI) per image as sklearn computes them."""
    fg, ari = [], []
    for t, p in zip(true.reshape(len(true), -1), ids.reshape(len(ids), -1)):
        ari.append(adjusted_rand_score(t, p))
        fg.append(adjusted_rand_score(t[t > 0], p[t > 0]))
    return np.array(fg), np.array(ari)


def _scenes(n=3, size=8, objects=3, seed=0):
    rng = np.random.default_rng(seed)
    true = rng.integers(0, objects + 1, (n, size, size))
    images = rng.random((n, size, size, 3))
    # Give each object a colour of its own (plus noise), so k-means has something to find.
    palette = rng.random((objects + 1, 3))
    images = 0.8 * palette[true] + 0.2 * images
    return images, true


@pytest.mark.parametrize("num_slots,factor", [(4, 2), (3, 1), (7, 2)])
def test_every_baseline_scores_as_sklearn_on_the_same_masks(num_slots, factor):
    images, true = _scenes()
    table = baselines.baselines(num_slots, factor, image_size=8)
    for name, (_, fn, _) in table.items():
        ids = np.asarray(fn(images, np.arange(len(images))))
        assert ids.shape == true.shape and 0 <= ids.min() and ids.max() < num_slots, name
        scores = baselines.score_ids(true, ids, num_slots, mask_ids=4)
        fg, ari = _sklearn(true, ids)
        np.testing.assert_allclose(scores["fg_ari"], fg, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(scores["ari"], ari, atol=1e-5, err_msg=name)


def _quadrant_scene(size=8):
    half = size // 2
    true = np.zeros((size, size), np.int64)
    true[:half, :half], true[:half, half:], true[half:, :half], true[half:, half:] = 1, 2, 3, 4
    return true


def test_known_answers_quadrants_stripes_colours_and_one_slot():
    size, factor = 8, 2
    table = baselines.baselines(4, factor, image_size=size)
    assert {"one_slot", "stripes_v", "stripes_h", "grid_2x2", "kmeans_rgb", "kmeans_rgb_xy",
            "kmeans_rgb_token"} == set(table)
    assert {n for n, b in table.items() if b.input_independent} == {
        "one_slot", "stripes_v", "stripes_h", "grid_2x2"}
    quadrants = _quadrant_scene(size)[None]
    palette = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]], np.float64)
    images = palette[quadrants]
    index = np.arange(1)

    def fg(name, true, imgs=images):
        return float(baselines.score_ids(true, table[name][1](imgs, index), 4, 5)["fg_ari"][0])

    # Objects exactly the quadrants: the 2x2 split and colour k-means are perfect.
    for name in ("grid_2x2", "kmeans_rgb", "kmeans_rgb_xy", "kmeans_rgb_token"):
        assert fg(name, quadrants) == pytest.approx(1.0), name
    assert fg("one_slot", quadrants) == pytest.approx(0.0)  # all four objects in one slot
    # Objects exactly 4 vertical stripes of 2 pixels: only the vertical stripes are perfect.
    columns = np.broadcast_to(1 + np.arange(size) // 2, (size, size))[None]
    assert fg("stripes_v", columns, palette[columns]) == pytest.approx(1.0)
    # Horizontal stripes cut every object evenly: at chance (-0.05 for this 4x4 table).
    assert fg("stripes_h", columns, palette[columns]) == pytest.approx(-0.05, abs=1e-6)
    assert fg("grid_2x2", columns, palette[columns]) < 0.5


def test_layouts_and_grids():
    np.testing.assert_array_equal(baselines.stripes(4, 2)[0], [0, 0, 1, 1])
    np.testing.assert_array_equal(baselines.stripes(4, 2)[:, 0], [0, 0, 0, 0])
    np.testing.assert_array_equal(baselines.blocks(4, 2, 2),
                                  [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]])
    assert [baselines.near_square_grid(k) for k in (1, 3, 4, 6, 7, 9, 10)] == [
        (1, 1), (1, 3), (2, 2), (2, 3), (2, 3), (3, 3), (2, 5)]
    assert baselines.upsample(np.array([[0, 1]]), 2).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1]]
    # 7 slots: stripes use every slot, the grid 6 of them.
    table = baselines.baselines(7, 4, image_size=64)
    assert "grid_2x3" in table and "grid_2x2" in table
    ids = table["stripes_v"][1](np.zeros((1, 64, 64, 3)), np.arange(1))
    assert sorted(np.unique(ids)) == list(range(7))


def test_kmeans_finds_separated_clusters_and_is_deterministic():
    rng = np.random.default_rng(0)
    centres = np.array([[0, 0], [5, 5], [0, 5]], np.float64)
    truth = np.repeat(np.arange(3), 50)
    points = centres[truth] + 0.1 * rng.standard_normal((150, 2))
    labels = baselines.kmeans(points, 3, seed=1)
    assert adjusted_rand_score(truth, labels) == 1.0
    np.testing.assert_array_equal(labels, baselines.kmeans(points, 3, seed=1))
    # On structureless data the result is a Lloyd fixed point: each point nearest the mean of
    # its own cluster (seeding alone, without the updates, is not).
    points = rng.random((300, 2))
    labels = baselines.kmeans(points, 5, seed=0)
    means = np.stack([points[labels == j].mean(0) for j in range(5)])
    nearest = np.argmin(((points[:, None] - means[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(nearest, labels)
    # Fewer distinct points than clusters: no crash, every point labelled.
    assert len(baselines.kmeans(np.zeros((10, 3)), 4, seed=0)) == 10


def test_run_baselines_on_the_evaluation_scenes_writes_json(tmp_path):
    config_arg = "configs/default.py:tiny"
    config = load_config("default:tiny")
    out = tmp_path / "b"
    assert baselines.main([f"--config={config_arg}", "--set=eval.num_batches=2",
                           f"--out={out}"]) == 0
    result = json.loads((out / "baselines.json").read_text())
    n = 2 * config.eval.batch_size
    assert result["num_images"] == n and result["num_slots"] == config.slot_attention.num_slots
    quadrant = result["baselines"]["stripes_v"]
    assert len(quadrant["per_image"]["fg_ari"]) == n
    values = np.array(quadrant["per_image"]["fg_ari"])
    assert quadrant["fg_ari"] == pytest.approx(values.mean())
    assert quadrant["fg_ari_se"] == pytest.approx(values.std(ddof=1) / np.sqrt(n))
    assert result["baselines"]["token_ceiling"]["fg_ari"] <= 1.0
    # The same images as the evaluation scores: its loader, unshuffled, first num_batches.
    from fixed_slots.data.pipeline import make_loader

    config.eval.num_batches = 2
    loader = make_loader(config, "validation", global_batch_size=config.eval.batch_size,
                         seed=config.seed, num_epochs=1, shuffle=False)
    first = next(iter(loader))
    again = next(iter(baselines.evaluation_batches(config)))
    np.testing.assert_array_equal(first["mask"], again["mask"])


def test_masks_beyond_max_objects_are_refused():
    config = load_config("default:tiny")
    config.data.max_objects = 1  # the scenes have 2 objects: ids 0..2
    with pytest.raises(ValueError, match="max_objects"):
        baselines.run_baselines(config)
