"""grain input pipeline: source -> per-example preprocessing -> per-host batches, resumable.

    it = make_loader(config, "train", global_batch_size=64, seed=0)
    batch = next(it)              # dict of NumPy arrays, leading axis = per-host batch
    state = it.get_state()        # bytes; it.set_state(state) on a fresh loader resumes exactly

Batch keys (B = global_batch_size // shard_count, S = config.data.image_size):
    image     float32 [B, S, S, 3] in [0, 1]   (SLATE: PIL resize, then ToTensor)
    mask      int32   [B, S, S]                 when the source has instance masks
    target    float32 [B, K, D]                 when the source has object properties
    shape, color, size, (material), num_objects int32; position, visible, (scale) float32;
    category, is_crowd int32 (coco)

Preprocessing follows the official SLATE loaders: crop (config.data.crop), resize to S x S with
PIL's default bicubic filter (masks: nearest neighbour), scale to [0, 1]. Crop modes:
    "center"  largest centred square (COCO; a no-op for square ShapeStacks/synthetic images)
    "none"    no crop: non-square images are squashed, as SLATE does for CLEVR-Mirror
    "clevr"   rows 29:221, cols 64:256 of a 320x480 CLEVR frame, scaled to the actual size
              (Locatello et al.'s slot-attention crop)
Object properties (`position` ...) are passed through unchanged by crops.

Sharding: `sampler.ProcessSliceSampler` gives host (JAX process) i rows [i*b, (i+1)*b) of every
global batch of one global stream, so the global batches do not depend on the number of hosts,
each epoch is split disjointly, and the iterator state is the same on every host.
"""
from __future__ import annotations

import json
from typing import Any, Iterator

import grain.python as grain
import jax
import numpy as np
from absl import flags

from fixed_slots.data import sources
from fixed_slots.data.sampler import ProcessSliceSampler
from fixed_slots.data.synthetic import TargetLayout, properties_to_target

CROP_MODES = ("center", "none", "clevr")
# Locatello et al. crop a 320x480 CLEVR frame to rows 29:221 and cols 64:256.
_CLEVR_CROP = (29 / 320, 221 / 320, 64 / 480, 256 / 480)


def _crop_box(height: int, width: int, crop: str) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) pixel bounds of the crop."""
    if crop == "none":
        return 0, height, 0, width
    if crop == "center":
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        return top, top + side, left, left + side
    if crop == "clevr":
        t, b, l, r = _CLEVR_CROP
        return round(t * height), round(b * height), round(l * width), round(r * width)
    raise ValueError(f"unknown crop {crop!r}; expected one of {CROP_MODES}")


def _resize(array: np.ndarray, size: int, *, nearest: bool) -> np.ndarray:
    """PIL resize of a uint8 [h, w] or [h, w, 3] array to [size, size, ...]."""
    import PIL.Image  # pylint: disable=g-import-not-at-top

    if array.shape[0] == size and array.shape[1] == size:
        return array
    # SLATE calls image.resize((s, s)) whose default filter is bicubic; ids need nearest.
    resample = PIL.Image.Resampling.NEAREST if nearest else PIL.Image.Resampling.BICUBIC
    return np.asarray(PIL.Image.fromarray(array).resize((size, size), resample=resample))


def preprocess_example(
    example: dict[str, Any],
    *,
    image_size: int,
    crop: str = "center",
    target_layout: TargetLayout | None = None,
) -> dict[str, np.ndarray]:
    """Crop, resize and convert one source record (see the module docstring)."""
    image = np.asarray(example["image"], np.uint8)  # [h, w, 3]
    top, bottom, left, right = _crop_box(image.shape[0], image.shape[1], crop)
    image = _resize(image[top:bottom, left:right], image_size, nearest=False)  # [S, S, 3]
    out = {"image": image.astype(np.float32) / 255.0}
    if "mask" in example:
        mask = np.asarray(example["mask"], np.uint8)[top:bottom, left:right]
        out["mask"] = _resize(mask, image_size, nearest=True).astype(np.int32)  # [S, S]
    for key, value in example.items():
        if key not in ("image", "mask"):
            out[key] = np.asarray(value)
    if target_layout is not None:
        out["target"] = properties_to_target(example, target_layout)  # [K, D]
    return out


class Preprocess(grain.MapTransform):
    """grain map transform around `preprocess_example` (picklable for worker processes)."""

    def __init__(self, image_size: int, crop: str, target_layout: TargetLayout | None):
        if crop not in CROP_MODES:
            raise ValueError(f"unknown config.data.crop {crop!r}; expected one of {CROP_MODES}")
        self.image_size = int(image_size)
        self.crop = crop
        self.target_layout = target_layout

    def map(self, element: dict[str, Any]) -> dict[str, np.ndarray]:
        return preprocess_example(
            element, image_size=self.image_size, crop=self.crop, target_layout=self.target_layout
        )


def ensure_absl_flags_parsed() -> None:
    """grain reads its absl flags; under pytest or a plain script nobody parsed them."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class DataIterator:
    """Iterator over batches with resumable state (wraps grain's DataLoader iterator)."""

    def __init__(self, loader: grain.DataLoader, batches_per_epoch: int):
        self._loader = loader
        self._iterator = iter(loader)
        self.batches_per_epoch = batches_per_epoch

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iterator)

    def get_state(self) -> bytes:
        """Serialised position in the stream (JSON bytes); small, store it with checkpoints."""
        return self._iterator.get_state()

    def set_state(self, state: bytes | str | dict[str, Any]) -> None:
        """Resume from `get_state()` output (of a loader built with the same arguments)."""
        if isinstance(state, dict):
            state = json.dumps(state)
        if isinstance(state, str):
            state = state.encode()
        self._iterator.set_state(state)

    @property
    def grain_iterator(self) -> grain.PyGrainDatasetIterator:
        """The underlying grain iterator (e.g. for orbax's grain checkpoint handler)."""
        return self._iterator


class KeepAtMostObjects(grain.FilterTransform):
    """Keeps examples with at most `limit` visible objects (CLEVR6: `max_n_objects=6`)."""

    def __init__(self, limit: int):
        self.limit = int(limit)

    def filter(self, element: dict[str, np.ndarray]) -> bool:
        if "visible" not in element:
            raise ValueError("config.data.max_visible_objects needs per-object 'visible' flags; "
                             "this dataset has none")
        return int(np.sum(element["visible"] > 0)) <= self.limit


def make_loader(
    config: Any,
    split: str,
    *,
    global_batch_size: int,
    shard_index: int | None = None,
    shard_count: int | None = None,
    seed: int,
    num_epochs: int | None = None,
    shuffle: bool | None = None,
) -> DataIterator:
    """Batches of `split` for this host; shuffled for "train" unless `shuffle` says otherwise.

    shard_index/shard_count default to jax.process_index()/jax.process_count(); each host gets
    global_batch_size // shard_count examples per batch. num_epochs=None repeats forever.
    Incomplete final batches (and the < shard_count leftover records) are dropped.
    """
    ensure_absl_flags_parsed()
    shard_index = jax.process_index() if shard_index is None else int(shard_index)
    shard_count = jax.process_count() if shard_count is None else int(shard_count)
    if global_batch_size % shard_count:
        raise ValueError(
            f"global_batch_size {global_batch_size} is not divisible by {shard_count} hosts"
        )
    per_host_batch = global_batch_size // shard_count
    data = config.data
    source = sources.get_source(data, split)
    if shuffle is None:
        shuffle = sources.canonical_split(split) == "train"
    sampler = ProcessSliceSampler(
        len(source),
        global_batch_size=global_batch_size,
        shard_index=shard_index,
        shard_count=shard_count,
        shuffle=bool(shuffle),
        num_epochs=num_epochs,
        seed=int(seed),
    )
    operations = [
        Preprocess(
            int(data.image_size), str(data.get("crop", "center")), sources.target_layout(source)
        ),
    ]
    if data.get("max_visible_objects") is not None:
        # Filtering makes batches_per_epoch an upper bound; the stream itself stays exact.
        operations.append(KeepAtMostObjects(data.max_visible_objects))
    operations.append(grain.Batch(per_host_batch, drop_remainder=True))
    loader = grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=operations,
        worker_count=int(data.get("num_workers", 0)),
        shard_options=grain.NoSharding(),  # the sampler picks this host's records
    )
    batches_per_epoch = len(source) // shard_count // per_host_batch
    if batches_per_epoch == 0:
        raise ValueError(
            f"split {split!r} has {len(source)} records: fewer than one batch of "
            f"{per_host_batch} per host over {shard_count} hosts"
        )
    return DataIterator(loader, batches_per_epoch)
