"""Random-access data sources: the embedded synthetic scenes and the datasets that
`fixed_slots.data_prep` builds.

`get_source(config.data, split)` returns an object with `__len__` and `__getitem__` (grain's
`RandomAccessDataSource` protocol) whose records are dicts of NumPy arrays in one schema:

    image        uint8   [h, w, 3]      every dataset (original resolution; the pipeline resizes)
    mask         uint8   [h, w]         instance ids, 0 = background (synthetic, coco, the clevr
                                        datasets built with masks; clevr_mirror: mirror = 0)
    position     float32 [K, P]         synthetic: (y, x) in [0, 1]; clevr: (3d_coords + 3) / 6
    shape, color, size   int32 [K]      synthetic and clevr_with_masks (+ material for clevr)
    visible      float32 [K]            1 for objects present and visible
    num_objects  int32   []             (clevr_mirror: when built with scenes/)
    category, is_crowd   int32 [COCO_MAX_INSTANCES]   coco (category 0 = padding)

Config keys read from `config.data` (an ml_collections ConfigDict):
    name          "synthetic" | "clevr_mirror" | "shapestacks" | "coco" | "clevr_with_masks"
    data_dir      root that `python -m fixed_slots.data_prep build NAME --data_dir=DIR` wrote
                  to (TFDS datasets); None or "" means TFDS's convention: $TFDS_DATA_DIR, else
                  ~/tensorflow_datasets (also `fixed_slots.data_prep build`'s default)
    image_size    int, side of the square images the pipeline produces
    seed          synthetic scene seed
    num_train     synthetic only: number of training scenes
    num_eval      synthetic only: number of validation (and of test) scenes
    min_objects, max_objects   synthetic only: objects per scene (properties padded to max_objects)
    synthetic_style   synthetic only, optional: a preset of synthetic.SCENE_STYLES ("classic" if absent)
    crop          "center" | "none" | "clevr" (used by the pipeline, see pipeline.py)
    num_workers   grain worker processes (0 = in-process; used by the pipeline)
    shuffle_buffer  unused (grain shuffles by index)

The TFDS datasets are read with `tfds.builder_from_directory(...).as_data_source(split)`, which is
what `tfds.data_source(name, split=..., data_dir=...)` does once it has found the builder. We
locate the directory ourselves because `tfds.data_source("coco")` resolves to TFDS's own built-in
COCO builder (a different layout and a TensorFlow import), and because a missing dataset then gets
an error that says how to build it. Reading is array_record + NumPy + PIL (images are decoded
here, not by TFDS): no TensorFlow, no OpenCV.

Failures are `fixed_slots.errors.DataError`s that name what to fix: a dataset not built (the
directory looked in and the exact `fixed_slots.data_prep build` command), unreadable metadata
(the file and the rebuild command), a missing split, and a record that cannot be decoded or has
the wrong shape (dataset, split, record index). They are raised where the record is read, in
grain worker processes too, and grain re-raises them unchanged in the training process.
"""
from __future__ import annotations

import io
import json
import os
from typing import Any, Protocol

import numpy as np

from fixed_slots.data.synthetic import (
    SCENE_STYLES,
    SYNTHETIC_TARGET_LAYOUT,
    SyntheticScenes,
    TargetLayout,
)
from fixed_slots.errors import ConfigError, DataError

DATASETS = ("synthetic", "clevr_mirror", "shapestacks", "coco", "clevr_with_masks")
SPLIT_ALIASES = {
    "train": "train",
    "validation": "validation",
    "val": "validation",
    "eval": "validation",
    "test": "test",
}

# CLEVR vocabularies, in the order of TFDS's `clevr` ClassLabels; fixed_slots.data_prep maps names
# to these ids.
CLEVR_SHAPES = ("cube", "sphere", "cylinder")
CLEVR_COLORS = ("gray", "blue", "brown", "yellow", "red", "green", "purple", "cyan")
CLEVR_SIZES = ("small", "large")
CLEVR_MATERIALS = ("rubber", "metal")
CLEVR_MAX_OBJECTS = 10
# Locatello et al. (2020) property prediction: 3d coords in [-3, 3] mapped to [0, 1].
CLEVR_COORD_RANGE = 3.0
# 3 coords + 3 shapes + 8 colours + 2 sizes + 2 materials + 1 visible = 19 floats.
CLEVR_TARGET_LAYOUT = TargetLayout(
    position_dims=3,
    num_shapes=len(CLEVR_SHAPES),
    num_colors=len(CLEVR_COLORS),
    num_sizes=len(CLEVR_SIZES),
    num_materials=len(CLEVR_MATERIALS),
    position_scale=2.0 * CLEVR_COORD_RANGE,
)
# Datasets with per-object properties -> the layout of their set-prediction target vectors.
TARGET_LAYOUTS = {"synthetic": SYNTHETIC_TARGET_LAYOUT, "clevr_with_masks": CLEVR_TARGET_LAYOUT}
# COCO-2017 has at most 93 annotations per image; masks store ids in uint8.
COCO_MAX_INSTANCES = 100


class RandomAccessDataSource(Protocol):
    """grain's random-access protocol (what `grain.python.DataLoader` needs)."""

    def __len__(self) -> int: ...

    def __getitem__(self, record_key: int) -> Any: ...


class DatasetNotBuiltError(DataError, FileNotFoundError):
    """A TFDS dataset directory is missing: the message says where we looked and how to build it."""


class CorruptRecordError(DataError):
    """A record of a built dataset cannot be decoded or has the wrong shape (names it)."""


def canonical_split(split: str) -> str:
    """"train" | "validation" | "test" for a split name or alias ("val", "eval")."""
    try:
        return SPLIT_ALIASES[split]
    except KeyError:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_ALIASES)}")


def default_data_dir() -> str:
    """TFDS's default root: $TFDS_DATA_DIR, else ~/tensorflow_datasets (expanded)."""
    return os.path.expanduser(os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets")


def resolve_data_dir(data_dir: str | None) -> str:
    """The absolute dataset root for config.data.data_dir (None or "" -> `default_data_dir()`)."""
    return os.path.abspath(os.path.expanduser(str(data_dir) if data_dir else default_data_dir()))


def build_command(name: str, data_dir: str, *, overwrite: bool = False) -> str:
    """The exact command that builds dataset `name` into `data_dir`."""
    flag = " --overwrite" if overwrite else ""
    return f"python -m fixed_slots.data_prep build {name} --source=DIR --data_dir={data_dir}{flag}"


def _build_hint(name: str, data_dir: str, *, overwrite: bool = False) -> str:
    return (
        f"build it with: {build_command(name, data_dir, overwrite=overwrite)}  (DIR: your copy "
        f"of the official files; `python -m fixed_slots.data_prep list` shows the layouts)"
    )


def _where(data_dir: str | None) -> str:
    """Why this root was searched (the message tells an unset data_dir from a given one)."""
    if data_dir:
        return f"config.data.data_dir={data_dir}"
    if os.environ.get("TFDS_DATA_DIR"):
        return "config.data.data_dir is unset, so $TFDS_DATA_DIR is used"
    return ("config.data.data_dir and $TFDS_DATA_DIR are unset, so TFDS's default "
            "~/tensorflow_datasets is used; --config.data.data_dir=DIR reads elsewhere")


def find_builder_dir(name: str, data_dir: str | None) -> str:
    """The newest `data_dir/name/<version>` holding a built dataset, or a clear error.

    `data_dir` None or "" means `default_data_dir()`. Errors name the directory looked in and
    the `fixed_slots.data_prep build` command that creates it (two lines).
    """
    resolved = resolve_data_dir(data_dir)
    root = os.path.join(resolved, name)
    if not os.path.isdir(root):
        problem = "is not a directory" if os.path.exists(root) else "does not exist"
        raise DatasetNotBuiltError(
            f"dataset {name!r} is not built: {root} {problem} ({_where(data_dir)}).\n"
            + _build_hint(name, resolved)
        )
    versions = []
    for entry in os.listdir(root):
        parts = entry.split(".")
        done = os.path.isfile(os.path.join(root, entry, "dataset_info.json"))
        if done and len(parts) == 3 and all(p.isdigit() for p in parts):
            versions.append(tuple(int(p) for p in parts))
    if not versions:
        raise DatasetNotBuiltError(
            f"dataset {name!r} is not built: {root} holds no finished build (no "
            f"<version>/dataset_info.json; an interrupted build leaves none).\n"
            + _build_hint(name, resolved)
        )
    return os.path.join(root, ".".join(str(v) for v in max(versions)))


def _check_json(path: str, name: str, rebuild: str) -> None:
    """DataError naming `path` when it is missing or not JSON (TFDS's errors name neither)."""
    try:
        with open(path, "rb") as f:
            json.load(f)
    except FileNotFoundError:
        raise DataError(f"dataset {name!r}: {path} is missing\nrebuild it with: {rebuild}")
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise DataError(
            f"dataset {name!r}: {path} is not valid JSON ({_first_line(e)})\n"
            f"rebuild it with: {rebuild}"
        ) from e


def _decode_rgb(data: bytes) -> np.ndarray:
    """uint8 [h, w, 3] from encoded image bytes (builders store RGB or grayscale PNG/JPEG)."""
    import PIL.Image  # pylint: disable=g-import-not-at-top

    with PIL.Image.open(io.BytesIO(data)) as img:
        return np.asarray(img if img.mode == "RGB" else img.convert("RGB"), dtype=np.uint8)


def _decode_png(data: bytes) -> np.ndarray:
    import PIL.Image  # pylint: disable=g-import-not-at-top

    with PIL.Image.open(io.BytesIO(data)) as img:
        return np.asarray(img, dtype=np.uint8)


def _padded(values: Any, length: int, dtype: Any) -> np.ndarray:
    values = np.asarray(values, dtype).reshape(-1)[:length]
    out = np.zeros((length,), dtype)
    out[: values.shape[0]] = values
    return out


class TfdsSource:
    """One split of a dataset built by `fixed_slots.data_prep`, records in the common schema."""

    def __init__(self, name: str, split: str, data_dir: str | None):
        import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

        if name not in DATASETS[1:]:
            raise ConfigError(f"config.data.name={name!r} is not a dataset; expected one of "
                              f"{DATASETS}")
        self.name = name
        self.split = canonical_split(split)
        self.data_dir = "" if data_dir is None else str(data_dir)  # as configured (messages)
        self.builder_dir = find_builder_dir(name, self.data_dir)
        self.version = os.path.basename(self.builder_dir)
        rebuild = build_command(name, resolve_data_dir(self.data_dir), overwrite=True)
        for filename in ("dataset_info.json", "features.json"):
            _check_json(os.path.join(self.builder_dir, filename), name, rebuild)
        try:
            builder = tfds.builder_from_directory(self.builder_dir)
            available = sorted(builder.info.splits.keys())
        except Exception as e:  # pylint: disable=broad-except
            # Whatever TFDS raises on a damaged dataset_info.json / features.json (JSON,
            # protobuf or key errors): the files are the user's, so name them, no traceback.
            raise DataError(
                f"dataset {name!r}: cannot read its metadata in {self.builder_dir} "
                f"(dataset_info.json, features.json): {type(e).__name__}: {_first_line(e)}\n"
                f"rebuild it with: {rebuild}"
            ) from e
        if self.split not in available:
            raise DataError(
                f"dataset {name!r} at {self.builder_dir} has no split {self.split!r}; "
                f"available: {available}"
            )
        missing = [os.fspath(p) for p in builder.info.splits[self.split].filepaths
                   if not os.path.isfile(os.fspath(p))]
        if missing:
            raise DataError(
                f"dataset {name!r} split {self.split!r}: record file {missing[0]} is missing "
                f"({len(missing)} missing)\nrebuild it with: {rebuild}"
            )
        try:
            # Images come back as their encoded bytes and are decoded here with PIL: a bad one
            # is then named by the record's own `filename`, the decoding does not depend on
            # whether OpenCV is installed (TFDS prefers it), and no "install OpenCV" warning.
            self._source = builder.as_data_source(
                split=self.split, decoders={"image": tfds.decode.SkipDecoding()}
            )
            self._length = len(self._source)
        except Exception as e:  # pylint: disable=broad-except
            raise DataError(
                f"dataset {name!r} split {self.split!r}: cannot open its record files in "
                f"{self.builder_dir}: {type(e).__name__}: {_first_line(e)}\n"
                f"rebuild it with: {rebuild}"
            ) from e

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, record_key: int) -> dict[str, np.ndarray]:
        index = int(record_key)
        if not 0 <= index < self._length:
            raise IndexError(f"record {index} out of range for {self!r} ({self._length} records)")
        try:
            raw = self._source[index]  # reads the record; all features but the image decoded
        except Exception as e:  # pylint: disable=broad-except
            raise self._corrupt(index, f"cannot be read: {type(e).__name__}: {_first_line(e)}") \
                from e
        raw = dict(raw, image=self._decode_image(raw, index))
        record = getattr(self, f"_convert_{self.name}")(raw, index)
        self._check_shapes(record, index)
        return record

    def __repr__(self) -> str:
        # grain stores repr(source) in iterator checkpoints and refuses a restore where it differs:
        # what the records are (dataset, split, build version, count), not where they lie, so a
        # dataset moved (config.data.data_dir, $TFDS_DATA_DIR) resumes. `pipeline.DataIterator`
        # accepts the older form, which named data_dir, for the same dataset and split.
        return (f"TfdsSource(name={self.name!r}, split={self.split!r}, version={self.version!r}, "
                f"num_records={self._length})")

    def _corrupt(self, index: int, problem: str) -> CorruptRecordError:
        return CorruptRecordError(
            f"dataset {self.name!r} split {self.split!r} record {index} (of {self._length}, "
            f"in {self.builder_dir}) {problem}\nrebuild the dataset with: "
            + build_command(self.name, resolve_data_dir(self.data_dir), overwrite=True)
        )

    def _decode_image(self, raw: dict[str, Any], index: int) -> np.ndarray:
        """uint8 [h, w, 3] from the record's encoded image (grayscale repeated, as TFDS does)."""
        try:
            return _decode_rgb(raw["image"])
        except Exception as e:  # pylint: disable=broad-except
            filename = raw.get("filename", b"")
            if isinstance(filename, bytes):
                filename = filename.decode("utf-8", "replace")
            source = f" (from {filename})" if filename else ""
            raise self._corrupt(
                index, f"has an undecodable image{source}: {type(e).__name__}: {_first_line(e)}"
            ) from e

    def _decode_mask(self, data: bytes, index: int) -> np.ndarray:
        try:
            return _decode_png(data)  # [h, w]
        except Exception as e:  # pylint: disable=broad-except
            raise self._corrupt(
                index, f"has an undecodable mask: {type(e).__name__}: {_first_line(e)}"
            ) from e

    def _check_shapes(self, record: dict[str, np.ndarray], index: int) -> None:
        image = record["image"]
        if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
            raise self._corrupt(index, f"has an image of shape {image.shape}, expected [h, w, 3]")
        if "mask" in record and record["mask"].shape != image.shape[:2]:
            raise self._corrupt(
                index, f"has a mask of shape {record['mask'].shape} for an image of shape "
                f"{image.shape}: they must match"
            )

    @staticmethod
    def _image(raw: dict[str, Any]) -> np.ndarray:
        return np.asarray(raw["image"], np.uint8)  # [h, w, 3]

    def _convert_clevr_mirror(self, raw: dict[str, Any], index: int) -> dict[str, np.ndarray]:
        out = {"image": self._image(raw)}
        # Builds of 1.0.0 have neither; masks are all-or-nothing per build (batches stay uniform).
        if raw.get("mask_png"):
            out["mask"] = self._decode_mask(raw["mask_png"], index)  # 0 = floor, sky and mirror
        if int(raw.get("num_objects", -1)) >= 0:
            out["num_objects"] = np.int32(raw["num_objects"])
        return out

    def _convert_shapestacks(self, raw: dict[str, Any], index: int) -> dict[str, np.ndarray]:
        return {"image": self._image(raw)}

    def _convert_coco(self, raw: dict[str, Any], index: int) -> dict[str, np.ndarray]:
        objects = raw["objects"]
        return {
            "image": self._image(raw),
            "mask": self._decode_mask(raw["mask_png"], index),  # [h, w], id k <-> objects[k-1]
            "category": _padded(objects["category_id"], COCO_MAX_INSTANCES, np.int32),
            "is_crowd": _padded(objects["is_crowd"], COCO_MAX_INSTANCES, np.int32),
            "num_objects": np.int32(min(len(objects["category_id"]), COCO_MAX_INSTANCES)),
        }

    def _convert_clevr_with_masks(self, raw: dict[str, Any], index: int) -> dict[str, np.ndarray]:
        coords = np.asarray(raw["coords_3d"], np.float32)  # [10, 3]
        present = np.asarray(raw["present"], np.float32)  # [10]
        position = (coords + CLEVR_COORD_RANGE) / (2.0 * CLEVR_COORD_RANGE) * present[:, None]
        out = {
            "image": self._image(raw),
            "position": position.astype(np.float32),
            "shape": np.asarray(raw["shape"], np.int32),
            "color": np.asarray(raw["color"], np.int32),
            "size": np.asarray(raw["size"], np.int32),
            "material": np.asarray(raw["material"], np.int32),
            "visible": np.asarray(raw["visible"], np.float32),
            "num_objects": np.int32(raw["num_objects"]),
        }
        # Masks are all-or-nothing per split (checked when building), so batches stay uniform.
        if raw["mask_png"]:
            out["mask"] = self._decode_mask(raw["mask_png"], index)
        return out


def get_source(config_data: Any, split: str) -> RandomAccessDataSource:
    """The data source for `config.data` (see the module docstring for the keys) and a split."""
    name = config_data.name
    split = canonical_split(split)
    if name == "synthetic":
        num_train, num_eval = int(config_data.num_train), int(config_data.num_eval)
        for key, value in (("num_train", num_train), ("num_eval", num_eval)):
            if value < 1:
                raise ConfigError(f"config.data.{key}={value} must be >= 1 (synthetic scenes)")
        low, high = int(config_data.min_objects), int(config_data.max_objects)
        if not 1 <= low <= high <= 255:  # else the scene generator fails in a worker, later
            raise ConfigError(
                f"config.data.min_objects={low}, max_objects={high}: synthetic scenes need "
                f"1 <= min_objects <= max_objects <= 255 (ids in a uint8 mask)"
            )
        style = str(config_data.get("synthetic_style", "classic"))  # older configs lack it
        if style not in SCENE_STYLES:
            raise ConfigError(f"config.data.synthetic_style={style!r} is not a scene style; "
                              f"expected one of {tuple(SCENE_STYLES)}")
        # Disjoint index ranges of one seed: train [0, n), validation next, then test.
        length, offset = {
            "train": (num_train, 0),
            "validation": (num_eval, num_train),
            "test": (num_eval, num_train + num_eval),
        }[split]
        return SyntheticScenes(
            length,
            seed=int(config_data.seed),
            image_size=int(config_data.image_size),
            min_objects=int(config_data.min_objects),
            max_objects=int(config_data.max_objects),
            index_offset=offset,
            style=style,
        )
    if name in DATASETS:
        return TfdsSource(name, split, config_data.get("data_dir"))
    raise ConfigError(f"config.data.name={name!r} is not a dataset; expected one of {DATASETS}")


def _first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, shortened: messages stay one or two lines."""
    text = (str(error).strip().splitlines() or [""])[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def target_layout(config_data: Any) -> TargetLayout | None:
    """The layout of the set-prediction targets of `config.data`'s dataset (the pipeline builds
    batch["target"] in it), None when the dataset has no per-object properties."""
    return TARGET_LAYOUTS.get(config_data.name)
