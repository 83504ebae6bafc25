"""grain pipeline over the synthetic source: batches, resumable state, host sharding, workers."""
import hashlib

import ml_collections
import numpy as np
import PIL.Image
import pytest

from fixed_slots.data import pipeline, sources
from fixed_slots.data.synthetic import TARGET_DIM
from fixed_slots.errors import ConfigError, DataError
from helpers import load_config


def _config(**overrides):
    """The default experiment's config with a small synthetic data section."""
    config = load_config("default")
    config.data.update(dict(name="synthetic", data_dir="", image_size=24, seed=0, num_train=48,
                            num_eval=16, min_objects=2, max_objects=4, crop="center",
                            synthetic_style="classic", num_workers=0))
    config.data.update(overrides)
    return config


def _same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_batch_keys_shapes_and_dtypes():
    it = pipeline.make_loader(_config(), "train", global_batch_size=8, seed=0)
    batch = next(it)
    assert batch["image"].shape == (8, 24, 24, 3) and batch["image"].dtype == np.float32
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert batch["mask"].shape == (8, 24, 24) and batch["mask"].dtype == np.int32
    assert batch["target"].shape == (8, 4, TARGET_DIM) and batch["target"].dtype == np.float32
    assert batch["position"].shape == (8, 4, 2)
    for key in ("shape", "color", "size"):
        assert batch[key].shape == (8, 4) and batch[key].dtype == np.int32
    assert batch["visible"].dtype == np.float32 and batch["num_objects"].shape == (8,)
    assert it.batches_per_epoch == 48 // 8


def test_state_resumes_exactly():
    cfg = _config()
    it = pipeline.make_loader(cfg, "train", global_batch_size=4, seed=3)
    for _ in range(5):
        next(it)
    state = it.get_state()
    assert isinstance(state, bytes)
    expected = [next(it) for _ in range(3)]
    resumed = pipeline.make_loader(cfg, "train", global_batch_size=4, seed=3)
    resumed.set_state(state)
    _same(expected, [next(resumed) for _ in range(3)])
    # Also from the str form (e.g. after a JSON round trip in a checkpoint).
    again = pipeline.make_loader(cfg, "train", global_batch_size=4, seed=3)
    again.set_state(state.decode())
    _same(expected, [next(again) for _ in range(3)])


def _epoch_hashes(cfg, shard_index, shard_count):
    it = pipeline.make_loader(
        cfg, "train", global_batch_size=8, shard_index=shard_index, shard_count=shard_count,
        seed=1, num_epochs=1,
    )
    return [hashlib.sha1(img.tobytes()).hexdigest() for batch in it for img in batch["image"]]


def test_host_shards_are_disjoint():
    cfg = _config()
    shard0, shard1 = _epoch_hashes(cfg, 0, 2), _epoch_hashes(cfg, 1, 2)
    assert len(shard0) == len(shard1) == 24  # 48 records, per-host batch 4
    assert len(set(shard0)) == 24 and not set(shard0) & set(shard1)
    assert set(shard0) | set(shard1) == set(_epoch_hashes(cfg, 0, 1))


def test_eval_is_ordered_and_differs_from_train():
    cfg = _config()
    val = list(pipeline.make_loader(cfg, "validation", global_batch_size=8, seed=0, num_epochs=1))
    assert len(val) == 2
    again = list(pipeline.make_loader(cfg, "val", global_batch_size=8, seed=9, num_epochs=1))
    _same(val, again)  # no shuffling outside train: the seed does not matter
    train = next(pipeline.make_loader(cfg, "train", global_batch_size=8, seed=0, shuffle=False))
    assert not np.array_equal(train["image"], val[0]["image"])


def test_worker_processes_give_the_same_batches():
    """Spawned grain workers (absl flags handled) produce the in-process stream."""
    local = pipeline.make_loader(_config(), "train", global_batch_size=4, seed=2)
    remote = pipeline.make_loader(_config(num_workers=1), "train", global_batch_size=4, seed=2)
    _same([next(local) for _ in range(3)], [next(remote) for _ in range(3)])


def test_batch_size_must_split_over_hosts():
    with pytest.raises(ConfigError, match="batch size 6 must be a positive multiple of .* 4"):
        pipeline.make_loader(_config(), "train", global_batch_size=6, shard_count=4, seed=0)


def test_preprocess_crops_and_resizes():
    image = np.zeros((30, 60, 3), np.uint8)
    image[:, 15:45] = 255  # the centred square is white
    mask = np.zeros((30, 60), np.uint8)
    mask[:, 15:45] = 3
    mask[:, :15] = 1
    out = pipeline.preprocess_example({"image": image, "mask": mask}, image_size=10, crop="center")
    assert out["image"].shape == (10, 10, 3) and np.allclose(out["image"], 1.0)
    assert out["mask"].dtype == np.int32 and (out["mask"] == 3).all()
    squashed = pipeline.preprocess_example(
        {"image": image, "mask": mask}, image_size=10, crop="none"
    )
    assert set(np.unique(squashed["mask"])) == {0, 1, 3}  # nearest: no blended ids
    crop_box = pipeline._crop_box  # pylint: disable=protected-access
    assert crop_box(320, 480, "clevr") == (29, 221, 64, 256)
    with pytest.raises(ConfigError, match="config.data.crop='random'"):
        pipeline.Preprocess(10, "random", None)


def _official_slate_image(array, size):
    """The SLATE authors' image loader (`GlobDataset` in singhgautam/sysbinder, steve), step by
    step: Image.convert("RGB").resize((size, size)) with PIL's default filter, then
    torchvision's ToTensor (uint8 / 255, here kept channels-last)."""
    img = PIL.Image.fromarray(array).convert("RGB").resize((size, size))
    return np.asarray(img, np.float32) / 255.0


def test_crop_none_is_the_official_slate_loader_on_a_non_square_image():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (30, 52, 3), dtype=np.uint8)  # non-square, like COCO frames
    out = pipeline.preprocess_example({"image": image}, image_size=12, crop="none")
    expected = _official_slate_image(image, 12)  # squashed, not cropped
    assert out["image"].dtype == np.float32 and out["image"].shape == (12, 12, 3)
    np.testing.assert_array_equal(out["image"], expected)
    # The filter is bicubic (PIL's default for RGB), not bilinear or nearest.
    bilinear = np.asarray(
        PIL.Image.fromarray(image).resize((12, 12), PIL.Image.Resampling.BILINEAR), np.float32
    ) / 255.0
    assert not np.array_equal(out["image"], bilinear)
    # "center" is the official loader applied to the centred 30 x 30 square (cols 11:41).
    centre = pipeline.preprocess_example({"image": image}, image_size=12, crop="center")
    np.testing.assert_array_equal(centre["image"], _official_slate_image(image[:, 11:41], 12))
    assert not np.array_equal(centre["image"], out["image"])
    # A square image needs no resize and is the same under every crop: x / 255 exactly.
    square = image[:, :30]
    for crop in ("none", "center"):
        same = pipeline.preprocess_example({"image": square}, image_size=30, crop=crop)
        np.testing.assert_array_equal(same["image"], square.astype(np.float32) / 255.0)


def test_missing_tfds_dataset_says_how_to_build(tmp_path):
    cfg = _config(name="coco", data_dir=str(tmp_path))
    with pytest.raises(sources.DatasetNotBuiltError) as err:
        sources.get_source(cfg.data, "train")
    msg = str(err.value)
    assert str(tmp_path / "coco") in msg
    assert f"python -m fixed_slots.data_prep build coco --source=DIR --data_dir={tmp_path}" in msg
    assert isinstance(err.value, DataError) and isinstance(err.value, FileNotFoundError)
    with pytest.raises(ConfigError, match="config.data.name='mnist' is not a dataset"):
        sources.get_source(_config(name="mnist").data, "train")


def test_max_visible_objects_filters_scenes():
    config = _config(image_size=16, num_train=64, num_eval=8, min_objects=1, max_visible_objects=2)
    loader = pipeline.make_loader(config, "train", global_batch_size=4, shard_index=0,
                                  shard_count=1, seed=0)
    counts = [int(v.sum()) for _ in range(5) for v in (next(loader)["visible"] > 0)]
    assert max(counts) <= 2
    config.data.max_visible_objects = None  # the same stream unfiltered does hold larger scenes
    loader = pipeline.make_loader(config, "train", global_batch_size=4, shard_index=0,
                                  shard_count=1, seed=0)
    assert max(int(v.sum()) for _ in range(5) for v in (next(loader)["visible"] > 0)) > 2


def test_state_resumes_on_a_moved_dataset(tmp_path):
    """config.data.data_dir may change on resume: grain's saved state named it."""
    import json  # pylint: disable=import-outside-toplevel
    import os  # pylint: disable=import-outside-toplevel

    from fixed_slots.data_prep import cli  # pylint: disable=import-outside-toplevel

    src, old, new = tmp_path / "src", tmp_path / "old", tmp_path / "new"
    for i in range(10):
        os.makedirs(src, exist_ok=True)
        PIL.Image.fromarray(np.full((8, 8, 3), 20 * i, np.uint8)).save(src / f"{i}.png")
    assert cli.main(["build", "clevr_mirror", f"--source={src}", f"--data_dir={old}"]) == 0

    def loader(data_dir, split="train"):
        cfg = _config(name="clevr_mirror", data_dir=str(data_dir), image_size=8)
        return pipeline.make_loader(cfg, split, global_batch_size=2, seed=4)

    it = loader(old)
    next(it)
    state = it.get_state()
    assert str(old) not in state.decode()  # the state says what the data is, not where
    expected = [next(it) for _ in range(4)]
    os.rename(old, new)
    moved = loader(new)
    moved.set_state(state)
    _same(expected, [next(moved) for _ in range(4)])
    # A state saved before, which named the old data_dir, resumes too ...
    saved = json.loads(state)
    saved["data_source"] = f"TfdsSource(name='clevr_mirror', split='train', data_dir='{old}')"
    older = loader(new)
    older.set_state(json.dumps(saved).encode())
    _same(expected, [next(older) for _ in range(4)])
    # ... but not on another split or dataset.
    saved["data_source"] = f"TfdsSource(name='clevr_mirror', split='test', data_dir='{old}')"
    with pytest.raises(DataError, match="does not fit this data loader"):
        loader(new).set_state(json.dumps(saved).encode())
    with pytest.raises(DataError, match="does not fit this data loader"):
        loader(new).set_state(loader(new, "test").get_state())
