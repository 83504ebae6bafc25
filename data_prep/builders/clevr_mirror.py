"""CLEVR-Mirror (SLATE authors' image folder) as a TFDS dataset: features `image`, `filename`.

The SLATE authors distribute CLEVR-Mirror as a folder of PNG images; their loader (`GlobDataset`
in singhgautam/sysbinder and steve) globs `*.png`, sorts the paths and splits them 70/15/15 into
train/val/test by position. We do the same, unless the folder already has `train/`, `val/` (or
`validation/`) and `test/` subfolders, which are then used as the splits.
"""
from __future__ import annotations

import glob
import os
from typing import Any, Iterator

import tensorflow_datasets as tfds

from data_prep.builders import LocalBuilder, SourceLayoutError, image_for_tfds, require_dir

LAYOUT = (
    "CLEVR-Mirror layout: a folder of *.png images (split 70/15/15 in sorted order, as the SLATE "
    "authors' GlobDataset does), or train/, val/ and test/ subfolders of *.png images"
)
_SUBFOLDERS = {"train": ("train",), "validation": ("val", "validation"), "test": ("test",)}


def _pngs(folder: str) -> list[str]:
    return sorted(glob.glob(os.path.join(folder, "**", "*.png"), recursive=True))


def validate_source(source: str) -> dict[str, list[str]]:
    """Split name -> sorted image paths."""
    require_dir(source, "", LAYOUT)
    found = {}
    for split, names in _SUBFOLDERS.items():
        folders = [os.path.join(source, n) for n in names if os.path.isdir(os.path.join(source, n))]
        found[split] = folders[0] if folders else None
    if any(found.values()) and not all(found.values()):
        # Globbing the whole tree would silently mix the present split folders into all splits.
        absent = [f"{_SUBFOLDERS[s][0]}/" for s, folder in found.items() if folder is None]
        raise SourceLayoutError(
            f"{source} has split folders but no {' or '.join(absent)}: give all three "
            f"(train/, val/, test/) or none ({LAYOUT})"
        )
    if all(found.values()):
        splits = {split: _pngs(folder) for split, folder in found.items()}
        empty = [found[s] for s, paths in splits.items() if not paths]
        if empty:
            raise SourceLayoutError(f"expected *.png images in {empty[0]} ({LAYOUT})")
        return splits
    paths = _pngs(source)
    if not paths:
        raise SourceLayoutError(f"expected *.png images under {source}, found none ({LAYOUT})")
    n = len(paths)
    splits = {
        "train": paths[: int(n * 0.7)],
        "validation": paths[int(n * 0.7) : int(n * 0.85)],
        "test": paths[int(n * 0.85) :],
    }
    empty = [split for split, split_paths in splits.items() if not split_paths]
    if empty:
        raise SourceLayoutError(
            f"the 70/15/15 split of the {n} images under {source} leaves {empty[0]!r} empty: "
            f"give at least 4 images ({LAYOUT})"
        )
    return splits


class ClevrMirror(LocalBuilder, skip_registration=True):
    """CLEVR-Mirror images (Singh et al., ICLR 2022)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Images from the SLATE authors' CLEVR-Mirror folder."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = LAYOUT

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="CLEVR-Mirror: CLEVR scenes with a mirror (SLATE, Singh et al. 2022).",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "filename": tfds.features.Text(),
                }
            ),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        source = os.fspath(dl_manager.manual_dir)
        splits = validate_source(source)
        return {name: self._generate_examples(source, paths) for name, paths in splits.items()}

    def _generate_examples(self, source: str, paths: list[str]) -> Iterator[tuple[str, dict]]:
        for path in paths:
            rel = os.path.relpath(path, source)
            image, _ = image_for_tfds(path, "png")  # decoded and checked: names a bad file
            yield rel, {"image": image, "filename": rel}
