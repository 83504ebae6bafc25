"""data_prep builders on fake trees in the official layouts, read back through sources + grain."""
import json
import os
import pathlib
import shutil
import sys

import ml_collections
import numpy as np
import PIL.Image
import pytest

from fixed_slots.data_prep import cli
from fixed_slots.data_prep.builders import SourceLayoutError
from fixed_slots.data_prep.builders.coco import decode_rle_string, polygons_to_mask, rle_to_mask
from fixed_slots.data import pipeline, sources
from helpers import load_config


def _config(name, data_dir, image_size=16, crop="center"):
    """The default experiment's config reading dataset `name` from `data_dir`."""
    config = load_config("default")
    config.data.update(dict(name=name, data_dir=str(data_dir), image_size=image_size, seed=0,
                            crop=crop, num_workers=0, max_objects=10))
    config.eval.segmentation_metrics = False
    return config


def _save_png(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    PIL.Image.fromarray(np.asarray(array, np.uint8)).save(path)


def _colour_image(h, w, value, channels=3):
    return np.full((h, w, channels), value, np.uint8)


def _build(name, source, data_dir, *extra):
    argv = ["build", name, f"--source={source}", f"--data_dir={data_dir}", *extra]
    assert cli.main(argv) == 0


# ---------------------------------------------------------------------------- clevr_mirror


def test_clevr_mirror_glob_split_and_pipeline(tmp_path):
    src, out = tmp_path / "clevr_mirror_src", tmp_path / "tfds"
    for i in range(10):  # RGBA like the CLEVR renders: converted to RGB
        _save_png(str(src / f"CLEVR_{i:03d}.png"), _colour_image(24, 32, 10 * i, channels=4))
    _build("clevr_mirror", src, out)
    cfg = _config("clevr_mirror", out, crop="none")
    lengths = {s: len(sources.get_source(cfg.data, s)) for s in ("train", "validation", "test")}
    assert lengths == {"train": 7, "validation": 1, "test": 2}  # SLATE's sorted 70/15/15
    record = sources.get_source(cfg.data, "test")[0]
    assert record["image"].shape == (24, 32, 3) and record["image"].dtype == np.uint8
    assert int(record["image"][0, 0, 0]) in (80, 90)  # the last two files, sorted order
    batch = next(pipeline.make_loader(cfg, "train", global_batch_size=7, seed=0))
    assert set(batch) == {"image"} and batch["image"].shape == (7, 16, 16, 3)
    values = sorted(np.round(batch["image"][:, 0, 0, 0] * 255).astype(int).tolist())
    assert values == [0, 10, 20, 30, 40, 50, 60]


def test_clevr_mirror_subfolders(tmp_path):
    src, out = tmp_path / "src", tmp_path / "tfds"
    for split, n in (("train", 3), ("val", 2), ("test", 1)):
        for i in range(n):
            _save_png(str(src / split / f"{i}.png"), _colour_image(8, 8, 5))
    _build("clevr_mirror", src, out)
    cfg = _config("clevr_mirror", out)
    assert [len(sources.get_source(cfg.data, s)) for s in ("train", "val", "test")] == [3, 2, 1]


def _shared_clevr_mirror():
    """The CLEVR-Mirror scenes rendered with the authors' generator (../shared/data/clevr_mirror
    of the checkout, or $CLEVR_MIRROR_DIR), or None."""
    if os.environ.get("CLEVR_MIRROR_DIR"):
        return pathlib.Path(os.environ["CLEVR_MIRROR_DIR"])
    for parent in pathlib.Path(__file__).resolve().parents[1:4]:  # a checkout or a worktree
        candidate = parent / "shared" / "data" / "clevr_mirror"
        if (candidate / "images").is_dir():
            return candidate
    return None


def _mirror_generator_tree(root, objects_per_scene=(3, 4, 5, 6), size=(8, 10)):
    """The generator's layout, tiny: images/X.png (RGBA), masks/X_mask.png, scenes/X.json, with
    object k painted as id k in row k and a mirror (255) in the last row."""
    h, w = size
    for i, num in enumerate(objects_per_scene):
        stem = f"CLEVR_new_{i:010d}"
        rgba = _colour_image(h, w, 20 * i, channels=4)
        rgba[..., 1], rgba[..., 3] = 7, 255
        _save_png(str(root / "images" / f"{stem}.png"), rgba)
        ids = np.zeros((h, w), np.uint8)
        for k in range(1, num + 1):
            ids[k, :] = k
        ids[-1, :] = 255
        _save_png(str(root / "masks" / f"{stem}_mask.png"), ids)
        scene = {"image_filename": f"{stem}.png", "mask_filename": f"{stem}_mask.png",
                 "mask_mirror_value": 255, "objects": [{"shape": "cube"}] * num}
        (root / "scenes").mkdir(parents=True, exist_ok=True)
        (root / "scenes" / f"{stem}.json").write_text(json.dumps(scene))


def test_clevr_mirror_from_the_authors_generator(tmp_path):
    """A handful of the rendered scenes: images from images/ only, masks against the JSON."""
    shared = _shared_clevr_mirror()
    if shared is None:
        pytest.skip("no rendered CLEVR-Mirror scenes: ../shared/data/clevr_mirror is absent "
                    "(set CLEVR_MIRROR_DIR to a copy)")
    src, out = tmp_path / "src", tmp_path / "tfds"
    stems = sorted(p[: -len(".png")] for p in os.listdir(shared / "images"))[::301][:10]
    for folder, suffix in (("images", ".png"), ("masks", "_mask.png"), ("scenes", ".json")):
        (src / folder).mkdir(parents=True)
        for stem in stems:
            shutil.copy(shared / folder / f"{stem}{suffix}", src / folder / f"{stem}{suffix}")
    _build("clevr_mirror", src, out)
    cfg = _config("clevr_mirror", out, crop="none")
    seen, done = {}, set()
    for split, expected in (("train", stems[:7]), ("validation", stems[7:8]), ("test", stems[8:])):
        source = sources.get_source(cfg.data, split)
        for i in range(len(source)):
            name = source._source[i]["filename"]  # pylint: disable=protected-access
            seen[name.decode() if isinstance(name, bytes) else name] = source[i]
        names = sorted(n for n in seen if n not in done)
        assert names == [f"images/{stem}.png" for stem in expected]  # sorted 70/15/15, no masks
        done.update(names)
    assert len(seen) == 10
    for stem in stems:
        record = seen[f"images/{stem}.png"]
        scene = json.loads((shared / "scenes" / f"{stem}.json").read_text())
        raw = np.asarray(PIL.Image.open(shared / "masks" / f"{stem}_mask.png"))
        rgba = np.asarray(PIL.Image.open(shared / "images" / f"{stem}.png"))
        assert rgba.shape[2] == 4 and (rgba[..., 3] == 255).all()
        np.testing.assert_array_equal(record["image"], rgba[..., :3])  # RGBA -> RGB exactly
        num = len(scene["objects"])
        assert int(record["num_objects"]) == num and 3 <= num <= 6
        assert record["mask"].dtype == np.uint8 and record["mask"].shape == raw.shape
        np.testing.assert_array_equal(record["mask"], np.where(raw == 255, 0, raw))  # mirror: 0
        assert set(np.unique(record["mask"]).tolist()) == set(range(num + 1))  # ids 0..k
    batch = next(pipeline.make_loader(cfg, "train", global_batch_size=7, seed=0))
    assert set(batch) == {"image", "mask", "num_objects"}
    assert batch["mask"].shape == (7, 16, 16) and int(batch["mask"].max()) <= 6


def test_clevr_mirror_generator_layout_and_split_folders(tmp_path):
    src, out = tmp_path / "src", tmp_path / "tfds"
    _mirror_generator_tree(src)
    _build("clevr_mirror", src, out)
    cfg = _config("clevr_mirror", out, crop="none")
    lengths = {s: len(sources.get_source(cfg.data, s)) for s in ("train", "validation", "test")}
    assert lengths == {"train": 2, "validation": 1, "test": 1}  # int(0.7 * 4), int(0.85 * 4)
    record = sources.get_source(cfg.data, "test")[0]  # the last scene: 6 objects
    assert int(record["num_objects"]) == 6 and record["image"][0, 0].tolist() == [60, 7, 60]
    expected = np.zeros((8, 10), np.uint8)
    for k in range(1, 7):
        expected[k] = k
    np.testing.assert_array_equal(record["mask"], expected)  # the mirror row is background
    # Split folders, each in the generator's layout.
    src2, out2 = tmp_path / "src2", tmp_path / "tfds2"
    for split, counts in (("train", (3, 4, 5)), ("val", (6,)), ("test", (3, 3))):
        _mirror_generator_tree(src2 / split, counts)
    _build("clevr_mirror", src2, out2)
    cfg2 = _config("clevr_mirror", out2)
    assert [len(sources.get_source(cfg2.data, s)) for s in ("train", "val", "test")] == [3, 1, 2]
    assert int(sources.get_source(cfg2.data, "val")[0]["num_objects"]) == 6


# ---------------------------------------------------------------------------- shapestacks


def _shapestacks_tree(root):
    for s, scenario in enumerate(("env_a-h=2", "env_b-h=3", "env_c-h=4")):
        folder = root / "recordings" / scenario
        for cam in (1, 2):
            _save_png(str(folder / f"rgb-w=0-f=0-l=0-c=original-cam_{cam}-mono-0.png"),
                      _colour_image(28, 28, 40 * s + cam))
        # Not RGB renders of frame 0: ignored, as by the official input pipeline.
        for other in ("rgb-w=0-f=0-l=0-c=original-cam_1-mono-1.png",
                      "iseg-w=0-f=0-l=0-c=original-cam_1-mono-0.png"):
            _save_png(str(folder / other), _colour_image(28, 28, 7))
    splits = root / "splits" / "default"
    splits.mkdir(parents=True)
    (splits / "train.txt").write_text("env_a-h=2\nenv_b-h=3\n")
    (splits / "eval.txt").write_text("env_c-h=4\n")
    (splits / "test.txt").write_text("env_c-h=4\n")


def test_shapestacks_official_splits(tmp_path):
    src, out = tmp_path / "shapestacks", tmp_path / "tfds"
    _shapestacks_tree(src)
    _build("shapestacks", src, out)
    cfg = _config("shapestacks", out, image_size=14)
    lengths = [len(sources.get_source(cfg.data, s)) for s in ("train", "validation", "test")]
    assert lengths == [4, 2, 2]
    val = list(pipeline.make_loader(cfg, "validation", global_batch_size=2, seed=0, num_epochs=1))
    assert len(val) == 1 and val[0]["image"].shape == (2, 14, 14, 3)
    values = sorted(np.round(val[0]["image"][:, 0, 0, 0] * 255).astype(int).tolist())
    assert values == [81, 82]  # env_c's two cameras


def test_shapestacks_missing_scenario_is_named(tmp_path):
    src = tmp_path / "shapestacks"
    _shapestacks_tree(src)
    (src / "splits" / "default" / "eval.txt").write_text("env_missing\n")
    with pytest.raises(SourceLayoutError, match="env_missing"):
        cli.build("shapestacks", str(src), str(tmp_path / "tfds"))


# ---------------------------------------------------------------------------- coco


def _encode_rle_string(runs):
    """COCO's compressed RLE encoder (reference for the decoder under test)."""
    chars = []
    for i, x in enumerate(runs):
        if i > 2:
            x -= runs[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            chars.append(chr(c + 48))
    return "".join(chars)


def _runs(mask):
    flat = mask.T.ravel().astype(np.int8)  # column-major
    change = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    return np.diff(np.concatenate([[0], change])).tolist()


def test_rle_and_polygon_decoding():
    rng = np.random.default_rng(0)
    mask = rng.random((13, 17)) < 0.3
    runs = _runs(mask)
    assert sum(runs) == mask.size
    np.testing.assert_array_equal(rle_to_mask({"size": [13, 17], "counts": runs}, 13, 17), mask)
    encoded = _encode_rle_string(runs)
    assert decode_rle_string(encoded) == runs
    np.testing.assert_array_equal(rle_to_mask({"size": [13, 17], "counts": encoded}, 13, 17), mask)
    square = polygons_to_mask([[2, 3, 10, 3, 10, 8, 2, 8]], 12, 14)  # pixel-edge coordinates
    expected = np.zeros((12, 14), bool)
    expected[3:8, 2:10] = True
    np.testing.assert_array_equal(square, expected)


def _jpeg(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    PIL.Image.fromarray(array).save(path, format="JPEG", quality=95)


def _coco_tree(root):
    """train: 3 images (one grayscale) + 1 empty, val: 2; polygons, plain and compressed RLE."""
    cats = [{"id": 1, "name": "a"}, {"id": 18, "name": "b"}, {"id": 90, "name": "c"}]
    for split, n in (("train2017", 3), ("val2017", 2)):
        images, anns = [], []
        for i in range(n):
            image_id = 100 * (split == "val2017") + i + 1
            h, w = 20, 30 + 4 * i
            name = f"{image_id:012d}.jpg"
            if i == 1:
                _jpeg(str(root / split / name), np.full((h, w), 120, np.uint8))  # grayscale
            else:
                _jpeg(str(root / split / name), _colour_image(h, w, 60 + i))
            images.append({"id": image_id, "file_name": name, "height": h, "width": w})
            # A large box (polygon), a small box inside it (uncompressed RLE, crowd), and a
            # compressed-RLE box elsewhere: the smaller must win where they overlap.
            small = np.zeros((h, w), bool)
            small[4:8, 4:9] = True
            third = np.zeros((h, w), bool)
            third[14:18, 20:26] = True
            anns += [
                {"id": 10 * image_id + 1, "image_id": image_id, "category_id": 1,
                 "segmentation": [[2, 2, 14, 2, 14, 12, 2, 12]], "area": 120.0,
                 "bbox": [2, 2, 12, 10], "iscrowd": 0},
                {"id": 10 * image_id + 2, "image_id": image_id, "category_id": 18,
                 "segmentation": {"size": [h, w], "counts": _runs(small)}, "area": 20.0,
                 "bbox": [4, 4, 5, 4], "iscrowd": 1},
                {"id": 10 * image_id + 3, "image_id": image_id, "category_id": 90,
                 "segmentation": {"size": [h, w], "counts": _encode_rle_string(_runs(third))},
                 "area": 24.0, "bbox": [20, 14, 6, 4], "iscrowd": 0},
            ]
        if split == "train2017":  # an image without annotations
            _jpeg(str(root / split / "000000000099.jpg"), _colour_image(16, 16, 200))
            images.append({"id": 99, "file_name": "000000000099.jpg", "height": 16, "width": 16})
        ann_dir = root / "annotations"
        ann_dir.mkdir(parents=True, exist_ok=True)
        (ann_dir / f"instances_{split}.json").write_text(
            json.dumps({"images": images, "annotations": anns, "categories": cats})
        )


def test_coco_masks_and_categories(tmp_path):
    src, out = tmp_path / "coco", tmp_path / "tfds"
    _coco_tree(src)
    _build("coco", src, out)
    cfg = _config("coco", out, image_size=20)
    train = sources.get_source(cfg.data, "train")
    assert len(train) == 4 and len(sources.get_source(cfg.data, "validation")) == 2
    with pytest.raises(ValueError, match="no split 'test'"):
        sources.get_source(cfg.data, "test")
    records = [train[i] for i in range(4)]
    empty = [rec for rec in records if rec["num_objects"] == 0]
    assert len(empty) == 1 and not empty[0]["mask"].any() and not empty[0]["category"].any()
    for rec in records:
        if rec["num_objects"] == 0:
            continue
        h, w = rec["mask"].shape
        assert rec["image"].shape == (h, w, 3) and h == 20
        # Ordered by area: polygon (120) -> id 1, compressed RLE (24) -> 2, crowd RLE (20) -> 3.
        assert rec["num_objects"] == 3
        np.testing.assert_array_equal(rec["category"][:4], [1, 90, 18, 0])
        np.testing.assert_array_equal(rec["is_crowd"][:4], [0, 0, 1, 0])
        assert rec["category"].shape == (sources.COCO_MAX_INSTANCES,)
        expected = np.zeros((h, w), np.uint8)
        expected[2:12, 2:14] = 1
        expected[14:18, 20:26] = 2
        expected[4:8, 4:9] = 3  # the smaller instance stays visible on top
        np.testing.assert_array_equal(rec["mask"], expected)
    batch = next(pipeline.make_loader(cfg, "train", global_batch_size=4, seed=0))
    assert batch["image"].shape == (4, 20, 20, 3) and batch["mask"].shape == (4, 20, 20)
    assert batch["mask"].dtype == np.int32 and set(np.unique(batch["mask"])) <= {0, 1, 2, 3}
    assert "tensorflow" not in sys.modules  # built and read back without TensorFlow


def test_coco_missing_and_malformed_files(tmp_path, capsys):
    src = tmp_path / "coco"
    _coco_tree(src)
    os.remove(src / "annotations" / "instances_train2017.json")
    code = cli.main(["build", "coco", f"--source={src}", f"--data_dir={tmp_path / 'tfds'}"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"expected annotations/instances_train2017.json under {src}" in err
    assert "COCO-2017 official layout" in err
    (src / "annotations" / "instances_train2017.json").write_text("{not json")
    with pytest.raises(SourceLayoutError, match="instances_train2017.json is not valid JSON"):
        cli.build("coco", str(src), str(tmp_path / "tfds2"))
    with pytest.raises(SourceLayoutError, match="does not exist"):
        cli.build("coco", str(tmp_path / "nowhere"), str(tmp_path / "tfds3"))


# ---------------------------------------------------------------------------- clevr_with_masks


def _clevr_tree(root, with_val_masks=False):
    h, w = 32, 48
    for split, n in (("train", 3), ("val", 2)):
        scenes = []
        for i in range(n):
            name = f"CLEVR_{split}_{i:06d}.png"
            _save_png(str(root / "images" / split / name), _colour_image(h, w, 50 + i, channels=4))
            objects = [
                {"shape": "sphere", "color": "red", "size": "large", "material": "metal",
                 "3d_coords": [-3.0, 0.0, 0.7], "pixel_coords": [10, 12, 9.5], "rotation": 0.0},
                {"shape": "cylinder", "color": "cyan", "size": "small", "material": "rubber",
                 "3d_coords": [1.5, 3.0, 0.35], "pixel_coords": [30, 20, 8.0], "rotation": 0.0},
            ]
            scenes.append({"image_index": i, "image_filename": name, "objects": objects})
            if split == "train" or with_val_masks:
                ids = np.zeros((h, w), np.uint8)
                ids[4:16, 4:16] = 1
                if i != 0:  # in the first image the cylinder is hidden
                    ids[20:28, 30:40] = 2
                _save_png(str(root / "masks" / split / name), ids)
        scene_dir = root / "scenes"
        scene_dir.mkdir(parents=True, exist_ok=True)
        (scene_dir / f"CLEVR_{split}_scenes.json").write_text(json.dumps({"scenes": scenes}))


def test_clevr_with_masks_properties_and_target(tmp_path):
    src, out = tmp_path / "clevr", tmp_path / "tfds"
    _clevr_tree(src)
    _build("clevr_with_masks", src, out, "--max_examples=3")
    cfg = _config("clevr_with_masks", out, image_size=12, crop="clevr")
    train = sources.get_source(cfg.data, "train")
    val = sources.get_source(cfg.data, "validation")
    assert len(train) == 3 and len(val) == 2
    by_name = {}
    for i in range(3):
        rec = train[i]
        by_name[int(rec["image"][0, 0, 0])] = rec
    first = by_name[50]
    assert first["mask"].shape == (32, 48)
    np.testing.assert_allclose(first["position"][:3], [[0.0, 0.5, 0.7 / 6 + 0.5],
                                                       [0.75, 1.0, 0.35 / 6 + 0.5], [0, 0, 0]],
                               atol=1e-6)
    assert first["shape"][:2].tolist() == [sources.CLEVR_SHAPES.index("sphere"),
                                           sources.CLEVR_SHAPES.index("cylinder")]
    assert first["material"][:2].tolist() == [1, 0]
    np.testing.assert_array_equal(first["visible"][:3], [1, 0, 0])  # hidden cylinder
    np.testing.assert_array_equal(by_name[51]["visible"][:3], [1, 1, 0])
    assert "mask" not in val[0]  # no masks/val/ folder: the split has none
    np.testing.assert_array_equal(val[0]["visible"][:3], [1, 1, 0])
    batch = next(pipeline.make_loader(cfg, "train", global_batch_size=3, seed=0))
    assert batch["image"].shape == (3, 12, 12, 3) and batch["mask"].shape == (3, 12, 12)
    layout = sources.CLEVR_TARGET_LAYOUT
    assert batch["target"].shape == (3, 10, layout.dim) and layout.dim == 19
    assert batch["target"][..., layout.visible].sum() == 5  # 1 + 2 + 2 visible objects
    val_batch = next(pipeline.make_loader(cfg, "validation", global_batch_size=2, seed=0))
    assert "mask" not in val_batch and val_batch["target"].shape == (2, 10, 19)


def test_clevr_missing_mask_and_bad_vocab(tmp_path):
    src = tmp_path / "clevr"
    _clevr_tree(src)
    os.remove(src / "masks" / "train" / "CLEVR_train_000001.png")
    with pytest.raises(SourceLayoutError, match="CLEVR_train_000001.png"):
        cli.build("clevr_with_masks", str(src), str(tmp_path / "tfds"))
    src2 = tmp_path / "clevr2"
    _clevr_tree(src2)
    os.remove(src2 / "scenes" / "CLEVR_val_scenes.json")
    with pytest.raises(SourceLayoutError, match="expected scenes/CLEVR_val_scenes.json under"):
        cli.build("clevr_with_masks", str(src2), str(tmp_path / "tfds2"))


def test_rebuild_needs_overwrite(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "tfds"
    for i in range(4):
        _save_png(str(src / f"{i}.png"), _colour_image(8, 8, i))
    _build("clevr_mirror", src, out, "--max_examples=1")
    cfg = _config("clevr_mirror", out)
    assert len(sources.get_source(cfg.data, "train")) == 1
    _build("clevr_mirror", src, out)
    assert "pass --overwrite" in capsys.readouterr().out
    _build("clevr_mirror", src, out, "--overwrite")
    assert len(sources.get_source(cfg.data, "train")) == 2
