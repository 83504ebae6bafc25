"""CLEVR with object properties and (optional) instance masks: the `clevr_with_masks` dataset.

The usual source, DeepMind's multi-object-datasets `clevr_with_masks` TFRecords, needs
TensorFlow to read; this builder takes the official CLEVR v1.0 layout instead:
    images/{train,val}/CLEVR_<split>_NNNNNN.png
    scenes/CLEVR_{train,val}_scenes.json    per object: 3d_coords, pixel_coords, shape, color,
                                            size, material
    masks/{train,val}/<image stem>.png      optional: uint8 instance ids, 0 = background and
                                            id k = scene["objects"][k - 1]
Masks are all-or-nothing per split: if masks/<split>/ exists, every image needs its mask.
Splits: train, validation (CLEVR's val; its test has no scenes). Scenes with more than 10 objects
are skipped (none in CLEVR v1.0). Properties are padded to 10 objects:
    shape, color, size, material  int32 [10]  ids into fixed_slots.data.sources.CLEVR_*
    coords_3d, pixel_coords       float32 [10, 3]
    present                       float32 [10]  1 for real objects
    visible                       float32 [10]  present and (with masks) >= 4 mask pixels
    num_objects                   int32
`fixed_slots.data.sources` turns coords_3d into the `position` target (coords + 3) / 6, as in
Locatello et al.'s property prediction.
"""
from __future__ import annotations

import os
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from fixed_slots.data_prep.builders import (
    LocalBuilder,
    SourceLayoutError,
    encode_png,
    image_for_tfds,
    load_json,
    malformed_entry,
    non_empty,
    read_png_ids,
    require_dir,
    require_file,
)
from fixed_slots.data.sources import (
    CLEVR_COLORS,
    CLEVR_MATERIALS,
    CLEVR_MAX_OBJECTS,
    CLEVR_SHAPES,
    CLEVR_SIZES,
)

LAYOUT = (
    "CLEVR v1.0 official layout: images/{train,val}/*.png and "
    "scenes/CLEVR_{train,val}_scenes.json, optionally masks/{train,val}/<image stem>.png"
)
_SPLITS = {"train": "train", "validation": "val"}
MIN_VISIBLE_PIXELS = 4
_VOCABS = {
    "shape": CLEVR_SHAPES,
    "color": CLEVR_COLORS,
    "size": CLEVR_SIZES,
    "material": CLEVR_MATERIALS,
}


def validate_source(source: str) -> dict[str, tuple[str, str, str | None]]:
    """Split name -> (image folder, scenes file, mask folder or None)."""
    require_dir(source, "", LAYOUT)
    plan = {}
    for split, stem in _SPLITS.items():
        images = require_dir(source, os.path.join("images", stem), LAYOUT)
        scenes = require_file(source, os.path.join("scenes", f"CLEVR_{stem}_scenes.json"), LAYOUT)
        masks = os.path.join(source, "masks", stem)
        plan[split] = (images, scenes, masks if os.path.isdir(masks) else None)
    return plan


def _object_properties(scene: dict[str, Any], scenes_path: str) -> dict[str, np.ndarray]:
    """Padded property arrays of one scene."""
    n = CLEVR_MAX_OBJECTS
    out = {key: np.zeros((n,), np.int32) for key in _VOCABS}
    out["coords_3d"] = np.zeros((n, 3), np.float32)
    out["pixel_coords"] = np.zeros((n, 3), np.float32)
    out["present"] = np.zeros((n,), np.float32)
    for k, obj in enumerate(scene["objects"]):
        for key, vocab in _VOCABS.items():
            if obj.get(key) not in vocab:
                raise SourceLayoutError(
                    f"{scenes_path}: {scene.get('image_filename')} object {k} has {key}="
                    f"{obj.get(key)!r}, expected one of {vocab} ({LAYOUT})"
                )
            out[key][k] = vocab.index(obj[key])
        out["coords_3d"][k] = np.asarray(obj["3d_coords"], np.float32)[:3]
        out["pixel_coords"][k] = np.asarray(obj["pixel_coords"], np.float32)[:3]
        out["present"][k] = 1.0
    return out


class ClevrWithMasks(LocalBuilder, skip_registration=True):
    """CLEVR v1.0 images with object properties and optional instance masks."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "CLEVR v1.0 scenes, properties padded to 10, optional masks."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = LAYOUT

    def _info(self) -> tfds.core.DatasetInfo:
        n = CLEVR_MAX_OBJECTS
        ints = {key: tfds.features.Tensor(shape=(n,), dtype=np.int32) for key in _VOCABS}
        return tfds.core.DatasetInfo(
            builder=self,
            description="CLEVR v1.0 (Johnson et al. 2017) with properties and instance masks.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "filename": tfds.features.Text(),
                    "mask_png": tfds.features.Tensor(shape=(), dtype=np.object_),
                    "num_objects": tfds.features.Scalar(dtype=np.int32),
                    **ints,
                    "coords_3d": tfds.features.Tensor(shape=(n, 3), dtype=np.float32),
                    "pixel_coords": tfds.features.Tensor(shape=(n, 3), dtype=np.float32),
                    "present": tfds.features.Tensor(shape=(n,), dtype=np.float32),
                    "visible": tfds.features.Tensor(shape=(n,), dtype=np.float32),
                }
            ),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        plan = validate_source(os.fspath(dl_manager.manual_dir))
        return {
            split: non_empty(split, self._generate_examples(*paths), paths[1], LAYOUT)
            for split, paths in plan.items()
        }

    def _generate_examples(
        self, image_dir: str, scenes_path: str, mask_dir: str | None
    ) -> Iterator[tuple[str, dict]]:
        scenes = load_json(scenes_path, LAYOUT, ("scenes",))["scenes"]
        skipped = 0
        for i, scene in enumerate(scenes):
            with malformed_entry(f"{scenes_path}: scenes[{i}]", LAYOUT):
                example = self._example(image_dir, scenes_path, mask_dir, scene)
            if example is None:
                skipped += 1
            else:
                yield example["filename"], example
        if skipped:
            logging.info("%s: skipped %d scenes with > %d objects", scenes_path, skipped,
                         CLEVR_MAX_OBJECTS)

    def _example(
        self, image_dir: str, scenes_path: str, mask_dir: str | None, scene: dict[str, Any]
    ) -> dict[str, Any] | None:
        """One scene's features (None: more than 10 objects); KeyError/TypeError/ValueError on
        a malformed scene (the caller names it)."""
        num = len(scene["objects"])
        if num > CLEVR_MAX_OBJECTS:
            return None
        filename = scene["image_filename"]
        path = os.path.join(image_dir, filename)
        if not os.path.isfile(path):
            raise SourceLayoutError(
                f"{scenes_path} lists {filename} but {path} does not exist ({LAYOUT})"
            )
        image, size = image_for_tfds(path, "png")  # decoded and checked in full
        props = _object_properties(scene, scenes_path)
        visible = props["present"].copy()
        mask_png = b""
        if mask_dir is not None:
            mask_path = os.path.join(mask_dir, os.path.splitext(filename)[0] + ".png")
            if not os.path.isfile(mask_path):
                raise SourceLayoutError(
                    f"expected instance mask {mask_path} for {filename}: masks are "
                    f"all-or-nothing per split ({LAYOUT})"
                )
            ids = read_png_ids(mask_path)  # [h, w]
            if ids.shape != size:
                raise SourceLayoutError(
                    f"{mask_path} is {ids.shape[1]}x{ids.shape[0]}, its image "
                    f"{path} is {size[1]}x{size[0]}"
                )
            if int(ids.max()) > num:
                raise SourceLayoutError(
                    f"{mask_path} has instance id {int(ids.max())} but the scene has "
                    f"{num} objects (ids must be 0 = background, 1..{num})"
                )
            counts = np.bincount(ids.ravel(), minlength=CLEVR_MAX_OBJECTS + 1)[1:]
            visible *= (counts[:CLEVR_MAX_OBJECTS] >= MIN_VISIBLE_PIXELS).astype(np.float32)
            mask_png = encode_png(ids)
        return {
            "image": image,
            "filename": filename,
            "mask_png": mask_png,
            "num_objects": num,
            **props,
            "visible": visible,
        }
