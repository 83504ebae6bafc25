"""ShapeStacks (Groth et al., ECCV 2018) as a TFDS dataset: `image`, `scenario`, `filename`.

Official archive layout:
    recordings/<scenario>/rgb-w=..-f=..-l=..-c=..-cam_N-mono-0.png   224x224 RGB renders
    splits/<split_name>/{train,eval,test}.txt                         scenario names, one a line
As the official ShapeStacks input pipeline does, a scenario contributes its `rgb-*-mono-0.png`
images (one per camera). SLATE pools all ShapeStacks variants and keeps the original
train/eval/test split: `eval` becomes our `validation`. The split folder defaults to `default`
(or the only folder under splits/); choose another with `--split_name`.
"""
from __future__ import annotations

import os
from typing import Any, Iterator

import tensorflow_datasets as tfds

from fixed_slots.data_prep.builders import (
    LocalBuilder,
    SourceLayoutError,
    image_for_tfds,
    require_dir,
    require_file,
)

LAYOUT = (
    "ShapeStacks official layout: recordings/<scenario>/rgb-*-mono-0.png and "
    "splits/<split_name>/{train,eval,test}.txt listing scenario names"
)
_SPLIT_FILES = {"train": "train.txt", "validation": "eval.txt", "test": "test.txt"}


def _pick_split_name(source: str, split_name: str | None) -> str:
    splits_dir = require_dir(source, "splits", LAYOUT)
    if split_name:
        require_dir(source, os.path.join("splits", split_name), LAYOUT)
        return split_name
    names = sorted(n for n in os.listdir(splits_dir) if os.path.isdir(os.path.join(splits_dir, n)))
    if "default" in names:
        return "default"
    if len(names) == 1:
        return names[0]
    raise SourceLayoutError(
        f"{splits_dir} holds {len(names)} split folders {names}, none named 'default': "
        f"pick one with --split_name ({LAYOUT})"
    )


def validate_source(source: str, split_name: str | None = None) -> dict[str, list[tuple[str, str]]]:
    """Split name -> [(scenario, image path)], checking every listed scenario exists."""
    require_dir(source, "", LAYOUT)
    recordings = require_dir(source, "recordings", LAYOUT)
    split_name = _pick_split_name(source, split_name)
    plan = {}
    for split, filename in _SPLIT_FILES.items():
        list_file = require_file(source, os.path.join("splits", split_name, filename), LAYOUT)
        with open(list_file) as f:
            scenarios = [line.strip() for line in f if line.strip()]
        items = []
        for scenario in scenarios:
            folder = os.path.join(recordings, scenario)
            if not os.path.isdir(folder):
                raise SourceLayoutError(
                    f"{list_file} lists scenario {scenario!r} but {folder} does not exist "
                    f"({LAYOUT})"
                )
            images = sorted(
                n for n in os.listdir(folder) if n.startswith("rgb-") and n.endswith("-mono-0.png")
            )
            if not images:
                raise SourceLayoutError(f"expected rgb-*-mono-0.png images in {folder} ({LAYOUT})")
            items.extend((scenario, os.path.join(folder, n)) for n in images)
        if not items:
            raise SourceLayoutError(f"{list_file} lists no scenarios ({LAYOUT})")
        plan[split] = items
    return plan


class Shapestacks(LocalBuilder, skip_registration=True):
    """ShapeStacks RGB renders with the official scenario splits."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "RGB renders (mono-0) of the official splits."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = LAYOUT

    def __init__(self, *, split_name: str | None = None, **kwargs: Any):
        self._split_name = split_name
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="ShapeStacks: simulated block towers (Groth et al., ECCV 2018).",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "scenario": tfds.features.Text(),
                    "filename": tfds.features.Text(),
                }
            ),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        plan = validate_source(os.fspath(dl_manager.manual_dir), self._split_name)
        return {split: self._generate_examples(items) for split, items in plan.items()}

    def _generate_examples(self, items: list[tuple[str, str]]) -> Iterator[tuple[str, dict]]:
        for scenario, path in items:
            name = os.path.basename(path)
            image, _ = image_for_tfds(path, "png")  # decoded and checked: names a bad file
            yield f"{scenario}/{name}", {
                "image": image,
                "scenario": scenario,
                "filename": name,
            }
