"""grain input pipeline: source -> per-example preprocessing -> per-host batches, resumable.

    it = make_loader(config, "train", global_batch_size=64, seed=0)
    batch = next(it)              # dict of NumPy arrays, leading axis = per-host batch
    state = it.get_state()        # bytes; it.set_state(state) on a fresh loader resumes exactly

Batch keys (B = global_batch_size // shard_count, S = config.data.image_size):
    image     float32 [B, S, S, 3] in [0, 1]   (PIL resize, then /255 as torchvision's ToTensor)
    mask      int32   [B, S, S]                 when the source has instance masks
    target    float32 [B, K, D]                 when the source has object properties
    shape, color, size, (material), num_objects int32; position, visible, (scale) float32;
    category, is_crowd int32 (coco)

Preprocessing: crop (config.data.crop), resize to S x S with PIL's bicubic filter (masks: nearest
neighbour), scale to [0, 1]. What the official code does, read from the SLATE authors' released
loaders: singhgautam/slate ships only a 3D Shapes loader (64x64 HDF5 images, no resize, /255);
their image-folder loader (`GlobDataset` in singhgautam/sysbinder and steve, the CLEVR-Mirror
style folders) does `Image.open(p).convert("RGB").resize((S, S))` then `ToTensor()`: no crop,
PIL's default filter (bicubic for RGB images since Pillow 7), values in [0, 1], no
normalisation. No released SLATE code loads ShapeStacks or COCO. Crop modes:
    "none"    the official behaviour: no crop, a non-square image is squashed to S x S
              (CLEVR-Mirror; ShapeStacks' 224x224 renders and the synthetic scenes are square,
              so any mode gives the same pixels there)
    "center"  largest centred square, then resize: keeps the aspect ratio; our choice for COCO,
              which no official SLATE loader covers
    "clevr"   rows 29:221, cols 64:256 of a 320x480 CLEVR frame, scaled to the actual size
              (Locatello et al.'s slot-attention crop)
Object properties (`position` ...) are passed through unchanged by crops.

Sharding: `sampler.ProcessSliceSampler` gives host (JAX process) i rows [i*b, (i+1)*b) of every
global batch of one global stream, so the global batches do not depend on the number of hosts,
each epoch is split disjointly, and the iterator state is the same on every host.

Worker processes (config.data.num_workers > 0) each batch their own slice of the records, so
the batches depend on the worker count: a saved state resumes only with the same value (grain
refuses another; `set_state` says so as a DataError), as with the same dataset, split and seed.
Where the dataset lies does not matter: a state resumes on the same build moved elsewhere
(config.data.data_dir or $TFDS_DATA_DIR changed).
"""
from __future__ import annotations

import json
import re
from typing import Any, Iterator

import grain.python as grain
import jax
import numpy as np
from absl import flags

from fixed_slots import configlib
from fixed_slots.data import sources
from fixed_slots.data.sampler import ProcessSliceSampler
from fixed_slots.data.synthetic import SCENE_STYLES, TargetLayout, properties_to_target
from fixed_slots.errors import ConfigError, DataError

CROP_MODES = ("center", "none", "clevr")
# Datasets whose records carry per-object `visible` flags (config.data.max_visible_objects).
_DATASETS_WITH_VISIBLE = ("synthetic", "clevr_with_masks")
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
    raise ConfigError(f"config.data.crop={crop!r} is not a crop mode; expected one of {CROP_MODES}")


def _resize(array: np.ndarray, size: int, *, nearest: bool) -> np.ndarray:
    """PIL resize of a uint8 [h, w] or [h, w, 3] array to [size, size, ...]."""
    import PIL.Image  # pylint: disable=g-import-not-at-top

    if array.shape[0] == size and array.shape[1] == size:
        return array
    # The official loader calls image.resize((s, s)): PIL's default for RGB is bicubic.
    # Instance ids need nearest neighbour (no blended ids).
    resample = PIL.Image.Resampling.NEAREST if nearest else PIL.Image.Resampling.BICUBIC
    return np.asarray(PIL.Image.fromarray(array).resize((size, size), resample=resample))


def preprocess_example(
    example: dict[str, Any],
    *,
    image_size: int,
    crop: str,
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


def check_preprocess_options(image_size: int, crop: str) -> None:
    """ConfigError naming config.data.crop / image_size when they cannot be used."""
    if crop not in CROP_MODES:
        raise ConfigError(
            f"config.data.crop={crop!r} is not a crop mode; expected one of {CROP_MODES}"
        )
    if int(image_size) < 1:
        raise ConfigError(f"config.data.image_size={image_size} must be a positive integer")


CHOICES = {"data.name": sources.DATASETS, "data.crop": CROP_MODES,
           "data.synthetic_style": tuple(SCENE_STYLES)}
RANGES = {
    "data.image_size": configlib.POSITIVE_INT,
    "data.seed": configlib.SEED,
    "data.num_train": configlib.POSITIVE_INT,
    "data.num_eval": configlib.POSITIVE_INT,
    "data.min_objects": configlib.POSITIVE_INT,
    "data.max_objects": (lambda v: configlib.is_int(v) and 1 <= v <= 255,
                         "an integer in [1, 255] (ids in a uint8 mask)"),
    "data.num_workers": (lambda v: configlib.is_int(v) and v >= 0,
                         "an integer >= 0 (0: in-process)"),
    "data.max_visible_objects": configlib.OPTIONAL_POSITIVE_INT,
}


def check_config(config: Any) -> None:
    """The config.data section (ConfigError naming the key), before any data is opened."""
    configlib.check_choices(config, CHOICES)
    configlib.check_ranges(config, RANGES)
    data = config.data
    if data.min_objects > data.max_objects:
        raise configlib.bad_value("data.min_objects", data.min_objects,
                                  f"at most data.max_objects={data.max_objects}")
    if data.max_visible_objects is not None and data.name not in _DATASETS_WITH_VISIBLE:
        raise ConfigError(
            f"config.data.max_visible_objects needs per-object 'visible' flags, which "
            f"dataset {data.name!r} has not (only {_DATASETS_WITH_VISIBLE})"
        )


class Preprocess(grain.MapTransform):
    """grain map transform around `preprocess_example` (picklable for worker processes).

    With `max_mask_id` set, a mask holding a larger instance id raises a ConfigError: ARI/FG-ARI
    count the ids 0..config.data.max_objects and would silently drop the other objects' pixels.
    """

    def __init__(self, image_size: int, crop: str, target_layout: TargetLayout | None,
                 max_mask_id: int | None = None, where: str = "this dataset"):
        check_preprocess_options(image_size, crop)
        self.image_size = int(image_size)
        self.crop = crop
        self.target_layout = target_layout
        self.max_mask_id = None if max_mask_id is None else int(max_mask_id)
        self.where = where

    def map(self, element: dict[str, Any]) -> dict[str, np.ndarray]:
        out = preprocess_example(
            element, image_size=self.image_size, crop=self.crop, target_layout=self.target_layout
        )
        if self.max_mask_id is not None and "mask" in out:
            top = int(out["mask"].max())
            if top > self.max_mask_id:
                raise ConfigError(
                    f"{self.where} has masks with instance id {top} but "
                    f"config.data.max_objects={self.max_mask_id}: ARI/FG-ARI count ids "
                    f"0..max_objects only; set --config.data.max_objects={top} or more (or "
                    f"--config.eval.segmentation_metrics=False)"
                )
        return out


def ensure_absl_flags_parsed() -> None:
    """grain reads its absl flags; under pytest or a plain script nobody parsed them."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


# repr(TfdsSource) before it stopped naming the data's location (states saved by older runs).
_LOCATED_SOURCE = re.compile(r"TfdsSource\(name=('[^']*'), split=('[^']*'), data_dir=.*\)", re.S)


def _relocated(state: bytes, source: Any) -> bytes:
    """`state` with an older TfdsSource repr (which named data_dir) of `source`'s own dataset and
    split replaced by `repr(source)`, so that grain accepts it; any other state unchanged."""
    try:
        decoded = json.loads(state.decode())
        stored = decoded["data_source"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return state  # grain's own check reports it
    match = _LOCATED_SOURCE.fullmatch(stored) if isinstance(stored, str) else None
    same = match is not None and (match.group(1), match.group(2)) == (
        repr(getattr(source, "name", None)), repr(getattr(source, "split", None)))
    if not same:
        return state
    decoded["data_source"] = repr(source)
    return json.dumps(decoded, indent=4).encode()


class DataIterator:
    """Iterator over batches with resumable state (wraps grain's DataLoader iterator)."""

    def __init__(self, loader: grain.DataLoader, batches_per_epoch: int, source: Any = None):
        self._loader = loader
        self._iterator = iter(loader)
        self.batches_per_epoch = batches_per_epoch
        self._source = source

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
        if self._source is not None:
            state = _relocated(state, self._source)
        try:
            self._iterator.set_state(state)
        except (ValueError, KeyError, TypeError) as e:
            # grain compares the stored sampler, source and worker count with this loader's.
            # Worker processes each batch their own records, so config.data.num_workers is part
            # of the data order too.
            detail = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
            raise DataError(
                "the saved data-iterator state does not fit this data loader: the dataset, "
                "split, seed, number of hosts or config.data.num_workers changed since it was "
                f"saved\n({type(e).__name__}: {detail[:400]})"
            ) from e


class KeepAtMostObjects(grain.FilterTransform):
    """Keeps examples with at most `limit` visible objects (CLEVR6: `max_n_objects=6`).

    A limit that rejects every record would make grain loop forever with one log warning;
    after `max_consecutive_rejects` rejections in a row this raises a DataError instead.
    """

    def __init__(self, limit: int, *, where: str = "this dataset",
                 max_consecutive_rejects: int = 1000):
        self.limit = int(limit)
        self.where = where
        self.max_consecutive_rejects = int(max_consecutive_rejects)
        self._rejected = 0  # per process: each grain worker holds its own copy

    def filter(self, element: dict[str, np.ndarray]) -> bool:
        if "visible" not in element:  # make_loader checks this up front for known datasets
            raise ConfigError("config.data.max_visible_objects needs per-object 'visible' flags; "
                              f"{self.where} has none")
        keep = int(np.sum(element["visible"] > 0)) <= self.limit
        self._rejected = 0 if keep else self._rejected + 1
        if self._rejected >= self.max_consecutive_rejects:
            raise DataError(
                f"config.data.max_visible_objects={self.limit} rejected the last "
                f"{self._rejected} records of {self.where} in a row: it keeps (almost) nothing; "
                f"raise it or leave it unset"
            )
        return keep


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
    if global_batch_size < 1 or global_batch_size % shard_count:
        raise ConfigError(
            f"batch size {global_batch_size} must be a positive multiple of the number of hosts "
            f"(JAX processes), {shard_count}"
        )
    per_host_batch = global_batch_size // shard_count
    check_config(config)  # config mistakes before any data is opened
    data = config.data
    num_workers = int(data.num_workers)
    max_visible = data.max_visible_objects
    image_size, crop = int(data.image_size), str(data.crop)
    source = sources.get_source(data, split)
    # Checked before the loader (and its worker processes) is built.
    batches_per_epoch = len(source) // shard_count // per_host_batch
    if batches_per_epoch == 0:
        raise DataError(
            f"dataset {data.name!r} split {sources.canonical_split(split)!r} has {len(source)} "
            f"records: fewer than one batch of {global_batch_size}; use a smaller batch size "
            f"or more data"
        )
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
    where = f"dataset {data.name!r} split {sources.canonical_split(split)!r}"
    # The models score ARI/FG-ARI with ids 0..data.max_objects when eval.segmentation_metrics.
    max_mask_id = data.max_objects if config.eval.segmentation_metrics else None
    operations = [Preprocess(image_size, crop, sources.target_layout(data), max_mask_id, where)]
    if max_visible is not None:
        # Filtering makes batches_per_epoch an upper bound; the stream itself stays exact.
        operations.append(KeepAtMostObjects(max_visible, where=where))
    operations.append(grain.Batch(per_host_batch, drop_remainder=True))
    loader = grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=operations,
        worker_count=num_workers,
        shard_options=grain.NoSharding(),  # the sampler picks this host's records
    )
    return DataIterator(loader, batches_per_epoch, source)
