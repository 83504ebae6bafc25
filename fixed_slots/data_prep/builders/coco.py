"""COCO-2017 as a TFDS dataset: images, instance-id masks and per-instance categories.

Official layout:
    train2017/*.jpg, val2017/*.jpg
    annotations/instances_train2017.json, annotations/instances_val2017.json
Splits: train (train2017), validation (val2017). Features:
    image      the original JPEG (re-encoded only if it is not RGB/grayscale)
    image_id   COCO image id;  filename
    mask_png   PNG of uint8 [h, w] instance ids: 0 = background, id k = objects[k - 1]
    objects    sequence of {category_id, is_crowd, area, bbox (x, y, w, h)}
Instances are ordered by decreasing area and painted in that order, so where instances overlap
the smaller one wins (it would otherwise vanish under the larger). Crowd regions are kept with
`is_crowd = 1`. Polygons are rasterised in NumPy (pixel-centre rule) and RLE (uncompressed and
compressed) is decoded here: no pycocotools.
"""
from __future__ import annotations

import collections
import os
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds

from fixed_slots.data_prep.builders import (
    LocalBuilder,
    SourceLayoutError,
    encode_png,
    image_for_tfds,
    load_json,
    malformed_entry,
    non_empty,
    require_dir,
    require_file,
)

LAYOUT = (
    "COCO-2017 official layout: train2017/, val2017/ and "
    "annotations/instances_{train,val}2017.json"
)
_SPLITS = {"train": "train2017", "validation": "val2017"}
# Mask ids are uint8.
MAX_INSTANCES = 255


def decode_rle_string(counts: str) -> list[int]:
    """Run lengths from COCO's compressed RLE string (LEB128-like, deltas from 2 runs back)."""
    data = counts.encode("ascii")
    runs: list[int] = []
    p = 0
    while p < len(data):
        x, k, more = 0, 0, True
        while more:
            c = data[p] - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:  # sign bit of the last 5-bit group
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        runs.append(x)
    return runs


def rle_to_mask(rle: dict[str, Any], height: int, width: int) -> np.ndarray:
    """bool [h, w] from COCO RLE ({"size": [h, w], "counts": list or compressed str})."""
    size = rle.get("size", [height, width])
    if list(size) != [height, width]:
        raise ValueError(f"RLE size {size} differs from the image size {[height, width]}")
    counts = rle["counts"]
    runs = np.asarray(decode_rle_string(counts) if isinstance(counts, str) else counts, np.int64)
    values = np.zeros(runs.shape[0], np.bool_)
    values[1::2] = True  # runs alternate 0s and 1s, starting with 0s
    flat = np.repeat(values, runs)
    if flat.shape[0] != height * width:
        raise ValueError(f"RLE covers {flat.shape[0]} pixels, image has {height * width}")
    return flat.reshape(width, height).T  # column-major (Fortran) order


def polygon_to_mask(polygon: list[float], height: int, width: int) -> np.ndarray:
    """bool [h, w]: pixels whose centre lies inside one polygon [x0, y0, x1, y1, ...].

    COCO coordinates put pixel (r, c) at [c, c + 1) x [r, r + 1), so its centre is
    (c + 0.5, r + 0.5). Scanline even-odd rule, vectorised over rows x edges.
    """
    mask = np.zeros((height, width), np.bool_)
    points = np.asarray(polygon, np.float64).reshape(-1, 2)  # [P, 2] (x, y)
    if points.shape[0] < 3:  # no area
        return mask
    x0, y0 = points[:, 0], points[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)  # edge i joins point i and i + 1
    r_lo = max(0, int(np.floor(y0.min() - 0.5)))
    r_hi = min(height, int(np.ceil(y0.max() - 0.5)) + 1)
    if r_lo >= r_hi:
        return mask
    yc = np.arange(r_lo, r_hi, dtype=np.float64)[:, None] + 0.5  # [R, 1] row centres
    # Half-open rule: an edge counts for rows with centre in [min(y), max(y)).
    crosses = (y0 <= yc) != (y1 <= yc)  # [R, E]; horizontal edges never cross
    with np.errstate(divide="ignore", invalid="ignore"):
        xs = x0 + (yc - y0) * (x1 - x0) / (y1 - y0)  # [R, E] intersection x
    rows, edges = np.nonzero(crosses)
    # A crossing at x flips inside/outside for the pixels whose centre c + 0.5 > x.
    first = np.clip(np.floor(xs[rows, edges] - 0.5).astype(np.int64) + 1, 0, width)
    flips = np.zeros((r_hi - r_lo, width + 1), np.int64)  # [R, W + 1]
    np.add.at(flips, (rows, first), 1)
    mask[r_lo:r_hi] = (np.cumsum(flips[:, :width], axis=1) % 2).astype(np.bool_)
    return mask


def polygons_to_mask(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    """bool [h, w]: union of an annotation's polygons."""
    mask = np.zeros((height, width), np.bool_)
    for polygon in polygons:
        mask |= polygon_to_mask(polygon, height, width)
    return mask


def segmentation_to_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """bool [h, w] from any COCO `segmentation` (polygon list, RLE dict)."""
    if isinstance(segmentation, list):
        return polygons_to_mask(segmentation, height, width)
    if isinstance(segmentation, dict) and "counts" in segmentation:
        return rle_to_mask(segmentation, height, width)
    raise ValueError(f"unsupported segmentation of type {type(segmentation).__name__}")


def validate_source(source: str) -> dict[str, tuple[str, str]]:
    """Split name -> (image folder, annotation file)."""
    require_dir(source, "", LAYOUT)
    plan = {}
    for split, stem in _SPLITS.items():
        ann = require_file(source, os.path.join("annotations", f"instances_{stem}.json"), LAYOUT)
        plan[split] = (require_dir(source, stem, LAYOUT), ann)
    return plan


class Coco(LocalBuilder, skip_registration=True):
    """COCO-2017 images with instance-id masks."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "train2017/val2017 with instance masks as PNG ids."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = LAYOUT

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="COCO-2017 (Lin et al. 2014) images with instance masks.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                    "image_id": tfds.features.Scalar(dtype=np.int64),
                    "filename": tfds.features.Text(),
                    "mask_png": tfds.features.Tensor(shape=(), dtype=np.object_),
                    "objects": tfds.features.Sequence(
                        {
                            "category_id": tfds.features.Scalar(dtype=np.int32),
                            "is_crowd": tfds.features.Scalar(dtype=np.int32),
                            "area": tfds.features.Scalar(dtype=np.float32),
                            "bbox": tfds.features.Tensor(shape=(4,), dtype=np.float32),
                        }
                    ),
                }
            ),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        plan = validate_source(os.fspath(dl_manager.manual_dir))
        return {
            split: non_empty(split, self._generate_examples(*paths), paths[1], LAYOUT)
            for split, paths in plan.items()
        }

    def _generate_examples(self, image_dir: str, ann_path: str) -> Iterator[tuple[str, dict]]:
        data = load_json(ann_path, LAYOUT, ("images", "annotations"))
        by_image = collections.defaultdict(list)
        for i, ann in enumerate(data["annotations"]):
            with malformed_entry(f"{ann_path}: annotations[{i}]", LAYOUT):
                by_image[ann["image_id"]].append(ann)
        with malformed_entry(f"{ann_path}: an entry of 'images'", LAYOUT):
            images = sorted(data["images"], key=lambda im: im["id"])
        for info in images:
            with malformed_entry(f"{ann_path}: image {info.get('id')}", LAYOUT):
                example = self._example(image_dir, ann_path, info, by_image[info["id"]])
            yield info["file_name"], example

    def _example(
        self, image_dir: str, ann_path: str, info: dict[str, Any], anns: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """One image's features; KeyError/TypeError on a malformed entry (caller names it)."""
        height, width = int(info["height"]), int(info["width"])
        path = os.path.join(image_dir, info["file_name"])
        if not os.path.isfile(path):
            raise SourceLayoutError(
                f"{ann_path} lists {info['file_name']} but {path} does not exist ({LAYOUT})"
            )
        image, size = image_for_tfds(path, "jpeg")  # decoded and checked in full
        if size != (height, width):  # the masks are drawn at the annotated size
            raise SourceLayoutError(
                f"{path} is {size[1]}x{size[0]} but {ann_path} says {width}x{height}"
            )
        anns = sorted(anns, key=lambda a: (-float(a["area"]), a["id"]))[:MAX_INSTANCES]
        ids = np.zeros((height, width), np.uint8)  # [h, w]
        for k, ann in enumerate(anns):
            with malformed_entry(f"{ann_path}: annotation {ann.get('id')} of image "
                                 f"{info['id']}", LAYOUT):
                ids[segmentation_to_mask(ann["segmentation"], height, width)] = k + 1
        return {
            "image": image,
            "image_id": int(info["id"]),
            "filename": info["file_name"],
            "mask_png": encode_png(ids),
            "objects": {
                "category_id": np.asarray([a["category_id"] for a in anns], np.int32),
                "is_crowd": np.asarray([a.get("iscrowd", 0) for a in anns], np.int32),
                "area": np.asarray([a["area"] for a in anns], np.float32),
                "bbox": np.asarray([a["bbox"] for a in anns], np.float32).reshape(-1, 4),
            },
        }
