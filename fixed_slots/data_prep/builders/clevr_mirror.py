"""CLEVR-Mirror as a TFDS dataset: `image`, `filename`, and with masks `mask_png`, `num_objects`.

Two source layouts, each either as one folder (split 70/15/15 in sorted order, as the SLATE
authors' loader `GlobDataset` in singhgautam/sysbinder and steve does) or as `train/`, `val/` (or
`validation/`) and `test/` subfolders, each holding the same layout (used as the splits):

    the authors' image folder    *.png anywhere below the folder (no images/ folder in it)
    the generator's layout       images/<stem>.png              the rendered scenes
                                 scenes/<stem>.json             optional: the scene record
                                 masks/<stem>_mask.png          optional (needs scenes/):
                                                                instance ids, 8-bit grey

The generator's layout is what singhgautam/clevr-dataset-gen (branch basic_numobj_3_to_6_mirror)
writes; only the *.png files directly in images/ are images (never a mask). Mask ids: 0 =
background (floor, sky), k = the k-th object of the scene JSON's `objects` (1-based), and the
mirror (the JSON's `mask_mirror_value`, 255 by default; reflections are mirror). Stored masks
(`mask_png`, as the other builders) have the mirror as background 0, because it is not an object
for ARI/FG-ARI; `num_objects` is the scene's object count (-1 without scenes/). Masks and scenes
are all-or-nothing: with masks/ every image needs its mask (and its scene), and every mask its
image. A mask whose size differs from its image or holding an id that is neither background,
mirror nor one of the scene's objects fails the build naming the file, before anything is written.

Each file is read once: folders are walked by their real identity (a symlink loop such as
`ln -s . SRC/loop` is followed once), a file reached through several names counts once, and a
file in two split folders is refused.
"""
from __future__ import annotations

import os
from typing import Any, Iterator, NamedTuple

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
    read_png_ids,
    require_dir,
)

LAYOUT = (
    "CLEVR-Mirror layout: images/*.png with optional scenes/<stem>.json and "
    "masks/<stem>_mask.png (the authors' generator), or a folder of *.png images; either split "
    "70/15/15 in sorted order, or as train/, val/ and test/ subfolders of that layout"
)
_SUBFOLDERS = {"train": ("train",), "validation": ("val", "validation"), "test": ("test",)}
DEFAULT_MIRROR_ID = 255


class Entry(NamedTuple):
    """One scene of the source: its image; its mask and scene record where the layout has them."""

    image: str
    mask: str | None
    scene: str | None


def _identity(path: str) -> tuple[int, int]:
    st = os.stat(path)  # follows symlinks: the file itself
    return st.st_dev, st.st_ino


def _walk_pngs(folder: str) -> list[str]:
    """Every *.png below `folder` once, sorted: directories are entered once by their real
    identity (symlink loops end), a file reached by two paths is kept under the first."""
    seen_dirs: set[tuple[int, int]] = set()
    seen_files: set[tuple[int, int]] = set()
    found, repeats = [], 0
    for top, dirs, files in os.walk(folder, followlinks=True):
        dirs.sort()  # a deterministic walk: the path a file is kept under does not vary
        ident = _identity(top)
        if ident in seen_dirs:
            dirs[:] = []
            continue
        seen_dirs.add(ident)
        for name in sorted(files):
            path = os.path.join(top, name)
            if not name.endswith(".png") or not os.path.isfile(path):
                continue
            ident = _identity(path)
            if ident in seen_files:
                repeats += 1
            else:
                seen_files.add(ident)
                found.append(path)
    if repeats:
        logging.info("%s: %d *.png paths name files found under another path (symlinks); "
                     "each file is read once", folder, repeats)
    return sorted(found)


def _pngs_in(folder: str) -> list[str]:
    """The *.png files directly in `folder`, sorted, each file once (symlinked names dropped)."""
    seen, found = set(), []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.endswith(".png") and os.path.isfile(path):
            ident = _identity(path)
            if ident not in seen:
                seen.add(ident)
                found.append(path)
    return found


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def _mask_stem(name: str) -> str:
    stem = os.path.splitext(name)[0]
    return stem[: -len("_mask")] if stem.endswith("_mask") else stem


def _generator_layout(root: str) -> list[Entry]:
    """Entries of an images/ [scenes/] [masks/] folder; layout errors name the file."""
    images = _pngs_in(os.path.join(root, "images"))
    if not images:
        raise SourceLayoutError(f"expected *.png images in {os.path.join(root, 'images')} "
                                f"({LAYOUT})")
    scenes_dir, masks_dir = os.path.join(root, "scenes"), os.path.join(root, "masks")
    has_scenes, has_masks = os.path.isdir(scenes_dir), os.path.isdir(masks_dir)
    if has_masks and not has_scenes:
        raise SourceLayoutError(
            f"{masks_dir} needs {scenes_dir}: mask ids are checked against the scenes' objects "
            f"({LAYOUT})")
    masks: dict[str, str] = {}
    if has_masks:
        for path in _pngs_in(masks_dir):
            stem = _mask_stem(os.path.basename(path))
            if stem in masks:
                raise SourceLayoutError(f"{masks[stem]} and {path} are both masks of {stem}.png")
            masks[stem] = path
    entries = []
    for image in images:
        stem = _stem(image)
        scene = os.path.join(scenes_dir, stem + ".json") if has_scenes else None
        if scene is not None and not os.path.isfile(scene):
            raise SourceLayoutError(f"expected the scene record {scene} of {image}: scenes are "
                                    f"all-or-nothing ({LAYOUT})")
        mask = masks.pop(stem, None)
        if has_masks and mask is None:
            raise SourceLayoutError(
                f"expected the mask {os.path.join(masks_dir, stem + '_mask.png')} of {image}: "
                f"masks are all-or-nothing ({LAYOUT})")
        entries.append(Entry(image, mask, scene))
    if masks:
        orphan = sorted(masks.values())
        raise SourceLayoutError(
            f"{orphan[0]} is a mask without an image {os.path.join(root, 'images', '')}"
            f"{_mask_stem(os.path.basename(orphan[0]))}.png ({len(orphan)} such masks)")
    return entries


def _folder_entries(root: str) -> list[Entry]:
    """Entries of one folder in either layout (the whole source, or one split folder)."""
    if os.path.isdir(os.path.join(root, "images")):
        return _generator_layout(root)
    for other in ("masks", "scenes"):
        if os.path.isdir(os.path.join(root, other)):
            # Globbing would take the masks for images.
            raise SourceLayoutError(f"{root} has {other}/ but no images/ ({LAYOUT})")
    paths = _walk_pngs(root)
    if not paths:
        raise SourceLayoutError(f"expected *.png images under {root}, found none ({LAYOUT})")
    return [Entry(p, None, None) for p in paths]


def _split_folders(source: str) -> dict[str, str | None]:
    found = {}
    for split, names in _SUBFOLDERS.items():
        folders = [os.path.join(source, n) for n in names if os.path.isdir(os.path.join(source, n))]
        found[split] = folders[0] if folders else None
    return found


def _plan(source: str) -> dict[str, list[Entry]]:
    """Split name -> entries, from the layout alone (no file decoded)."""
    require_dir(source, "", LAYOUT)
    found = _split_folders(source)
    if any(found.values()) and not all(found.values()):
        # Globbing the whole tree would silently mix the present split folders into all splits.
        absent = [f"{_SUBFOLDERS[s][0]}/" for s, folder in found.items() if folder is None]
        raise SourceLayoutError(
            f"{source} has split folders but no {' or '.join(absent)}: give all three "
            f"(train/, val/, test/) or none ({LAYOUT})"
        )
    if all(found.values()):
        if os.path.isdir(os.path.join(source, "images")):
            raise SourceLayoutError(f"{source} has both images/ and split folders: keep one "
                                    f"({LAYOUT})")
        splits = {split: _folder_entries(folder) for split, folder in found.items()}
        owner: dict[tuple[int, int], tuple[str, str]] = {}
        for split, entries in splits.items():
            for entry in entries:
                ident = _identity(entry.image)
                if ident in owner and owner[ident][0] != split:
                    raise SourceLayoutError(
                        f"{entry.image} and {owner[ident][1]} are the same file, in the "
                        f"{split!r} and {owner[ident][0]!r} split folders: a file belongs to "
                        f"one split")
                owner[ident] = (split, entry.image)
        return splits
    entries = _folder_entries(source)
    n = len(entries)
    splits = {
        "train": entries[: int(n * 0.7)],
        "validation": entries[int(n * 0.7) : int(n * 0.85)],
        "test": entries[int(n * 0.85) :],
    }
    empty = [split for split, split_entries in splits.items() if not split_entries]
    if empty:
        raise SourceLayoutError(
            f"the 70/15/15 split of the {n} images under {source} leaves {empty[0]!r} empty: "
            f"give at least 4 images ({LAYOUT})"
        )
    return splits


def read_scene(path: str) -> tuple[int, int]:
    """(number of objects, mirror id) of a scene record; errors name the file."""
    scene = load_json(path, LAYOUT, ("objects",))
    with malformed_entry(f"{path}: objects", LAYOUT):
        num = len(scene["objects"])
        mirror = int(scene.get("mask_mirror_value", DEFAULT_MIRROR_ID))
    if not 0 < mirror <= 255 or mirror <= num:
        raise SourceLayoutError(f"{path}: mask_mirror_value={mirror} must lie in {num + 1}..255, "
                                f"above the {num} object ids")
    return num, mirror


def object_ids(entry: Entry, image_size: tuple[int, int] | None) -> tuple[np.ndarray, int]:
    """(uint8 [h, w] ids: 0 background and mirror, 1..k objects; k) of an entry with a mask.

    Raises SourceLayoutError naming the mask when its size is not the image's or an id is
    neither background, mirror nor one of the scene's objects.
    """
    import PIL.Image  # pylint: disable=g-import-not-at-top

    num, mirror = read_scene(entry.scene)
    ids = read_png_ids(entry.mask)  # [h, w], decoded in full
    if image_size is None:
        with PIL.Image.open(entry.image) as img:  # the header only
            image_size = (img.height, img.width)
    if ids.shape != tuple(image_size):
        raise SourceLayoutError(
            f"{entry.mask} is {ids.shape[1]}x{ids.shape[0]}, its image {entry.image} is "
            f"{image_size[1]}x{image_size[0]}")
    values = np.unique(ids)
    bad = values[(values > num) & (values != mirror)]
    if bad.size:
        raise SourceLayoutError(
            f"{entry.mask} has instance id {int(bad[0])} but its scene {entry.scene} has {num} "
            f"objects (ids must be 0 = background, 1..{num}, {mirror} = mirror)")
    return np.where(ids == mirror, 0, ids).astype(np.uint8), num


def validate_source(source: str) -> dict[str, list[Entry]]:
    """Split name -> entries; checks every scene record and mask (not the images' pixels, which
    the build decodes), so that a bad one fails before anything is written."""
    splits = _plan(source)
    for entries in splits.values():
        for entry in entries:
            if entry.mask is not None:
                object_ids(entry, None)
            elif entry.scene is not None:
                read_scene(entry.scene)
    return splits


class ClevrMirror(LocalBuilder, skip_registration=True):
    """CLEVR-Mirror images (Singh et al., ICLR 2022), with instance masks if the source has them."""

    VERSION = tfds.core.Version("2.0.0")
    RELEASE_NOTES = {
        "1.0.0": "Images from the SLATE authors' CLEVR-Mirror folder.",
        "2.0.0": "The generator's layout (images/, scenes/, masks/): instance masks (mirror as "
                 "background) and object counts; images/ only, never masks, as images.",
    }
    MANUAL_DOWNLOAD_INSTRUCTIONS = LAYOUT

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="CLEVR-Mirror: CLEVR scenes with a mirror (SLATE, Singh et al. 2022).",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "filename": tfds.features.Text(),
                    # PNG of uint8 [h, w] ids, 0 = background (and mirror), k = objects[k - 1];
                    # b"" without masks/.
                    "mask_png": tfds.features.Tensor(shape=(), dtype=np.object_),
                    "num_objects": tfds.features.Scalar(dtype=np.int32),  # -1: no scenes/
                }
            ),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        source = os.fspath(dl_manager.manual_dir)
        splits = validate_source(source)
        return {name: self._generate_examples(source, entries) for name, entries in splits.items()}

    def _generate_examples(self, source: str, entries: list[Entry]) -> Iterator[tuple[str, dict]]:
        for entry in entries:
            rel = os.path.relpath(entry.image, source)
            image, size = image_for_tfds(entry.image, "png")  # decoded, checked: names a bad file
            mask_png, num = b"", -1
            if entry.mask is not None:
                ids, num = object_ids(entry, size)
                mask_png = encode_png(ids)
            elif entry.scene is not None:
                num, _ = read_scene(entry.scene)
            yield rel, {"image": image, "filename": rel, "mask_png": mask_png,
                        "num_objects": num}
