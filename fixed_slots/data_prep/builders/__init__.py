"""TFDS builders (array_record) for the datasets of the paper, from the user's local copies.

Each module defines a `tfds.core.GeneratorBasedBuilder` that reads the dataset's official layout
from `dl_manager.manual_dir` (the CLI's `--source`) and a `validate_source(source)` that checks the
layout before anything is written, so a wrong path fails fast with a message naming the missing
file and the layout it expected. Nothing is downloaded.

The builders skip TFDS's name registry (`skip_registration=True`): TFDS ships its own `coco` and
`clevr` builders, and ours are looked up through `BUILDERS` instead.

Images are yielded as encoded bytes (kept as-is when already RGB) or PIL images, never NumPy
arrays: TFDS encodes NumPy images with TensorFlow. Instance masks are stored as PNG bytes in a
string feature `mask_png` (b"" when a split has none) and decoded by `fixed_slots.data.sources`.

Every image and mask is decoded in full while building (PNG chunk checksums verified too), so a
truncated or corrupt file fails the build with a `BadImageError` naming it, instead of passing
into the dataset and failing training much later.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import struct
from typing import Any, Iterable, Iterator

import numpy as np
import tensorflow_datasets as tfds

from fixed_slots.errors import DataError

# name -> (module, class): imported on demand so that `--help` stays fast.
BUILDERS = {
    "clevr_mirror": ("fixed_slots.data_prep.builders.clevr_mirror", "ClevrMirror"),
    "shapestacks": ("fixed_slots.data_prep.builders.shapestacks", "Shapestacks"),
    "coco": ("fixed_slots.data_prep.builders.coco", "Coco"),
    "clevr_with_masks": ("fixed_slots.data_prep.builders.clevr", "ClevrWithMasks"),
}


class SourceLayoutError(DataError, FileNotFoundError):
    """The --source directory does not match the dataset's expected layout (names the file)."""


class BadImageError(SourceLayoutError):
    """An image or mask file in --source cannot be decoded (truncated, corrupt, not an image)."""


class LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of our builders: read from `dl_manager.manual_dir`, download nothing."""

    # TFDS looks for a download-checksums file next to a packaged builder's code, through the
    # `importlib_resources` backport that Python >= 3.9 installs lack. We download nothing, so
    # there is no checksums file: skip the lookup.
    code_path = None


def non_empty(split: str, examples: Iterable[Any], where: str, layout: str) -> Iterator[Any]:
    """Yields `examples`; a SourceLayoutError naming `where` if there are none (TFDS would
    fail later with "No examples were yielded" and a traceback)."""
    count = 0
    for example in examples:
        count += 1
        yield example
    if not count:
        raise SourceLayoutError(f"split {split!r} would be empty: {where} gives no examples "
                                f"({layout})")


def builder_module(name: str) -> Any:
    """The module of builder `name` (has `validate_source`, `LAYOUT` and the builder class)."""
    if name not in BUILDERS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(BUILDERS)}")
    return importlib.import_module(BUILDERS[name][0])


def builder_class(name: str) -> type:
    """The `tfds.core.GeneratorBasedBuilder` subclass for dataset `name`."""
    return getattr(builder_module(name), BUILDERS[name][1])


def require_dir(source: str, relative: str, layout: str) -> str:
    """`source/relative` if it is a directory, else a SourceLayoutError naming it."""
    path = os.path.join(source, relative) if relative else source
    if not os.path.isdir(path):
        where = f"expected directory {relative}/ under {source}" if relative else (
            f"source directory {source} does not exist"
        )
        raise SourceLayoutError(f"{where} ({layout})")
    return path


def require_file(source: str, relative: str, layout: str) -> str:
    """`source/relative` if it is a file, else a SourceLayoutError naming it."""
    path = os.path.join(source, relative)
    if not os.path.isfile(path):
        raise SourceLayoutError(f"expected {relative} under {source} ({layout})")
    return path


def load_json(path: str, layout: str, required_keys: Iterable[str] = ()) -> Any:
    """Parse a JSON file; malformed JSON or missing top-level keys name the file."""
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SourceLayoutError(f"{path} is not valid JSON ({e}); expected {layout}") from e
    missing = [k for k in required_keys if not isinstance(data, dict) or k not in data]
    if missing:
        raise SourceLayoutError(f"{path} lacks the key(s) {missing}; expected {layout}")
    return data


@contextlib.contextmanager
def malformed_entry(where: str, layout: str) -> Iterator[None]:
    """Turns a KeyError/TypeError/ValueError/IndexError raised while reading one entry of an
    annotation file into a SourceLayoutError naming `where` (file and entry)."""
    try:
        yield
    except DataError:
        raise  # already names its file
    except KeyError as e:
        raise SourceLayoutError(f"{where} lacks the key {e} ({layout})") from e
    except (TypeError, ValueError, IndexError) as e:
        raise SourceLayoutError(f"{where} is malformed: {type(e).__name__}: {e} ({layout})") from e


def _decode_errors() -> tuple[type[BaseException], ...]:
    """What PIL raises on damaged files: OSError (truncated, broken stream, unidentified),
    SyntaxError (bad PNG checksum), and a few others from its parsers."""
    import PIL.Image  # pylint: disable=g-import-not-at-top

    return (OSError, SyntaxError, ValueError, EOFError, struct.error,
            PIL.Image.DecompressionBombError)


def decode_image_file(path: str) -> tuple[bytes, Any]:
    """(file bytes, fully decoded PIL image) of `path`, or a BadImageError naming it.

    `Image.load()` decodes every pixel (catching truncated or broken data); for PNG, `verify()`
    also checks every chunk's CRC and the end marker, which decoding alone does not.
    """
    import PIL.Image  # pylint: disable=g-import-not-at-top

    if not os.path.isfile(path):
        raise SourceLayoutError(f"missing image file {path}")
    with open(path, "rb") as f:
        data = f.read()
    try:
        with PIL.Image.open(io.BytesIO(data)) as probe:
            if probe.format == "PNG":
                probe.verify()
        img = PIL.Image.open(io.BytesIO(data))
        img.load()
    except _decode_errors() as e:
        if isinstance(e, PIL.UnidentifiedImageError):  # its message names a BytesIO object
            reason = "not a readable image: empty, cut short in its header, or another format"
        else:
            reason = f"{type(e).__name__}: {e}"
        raise BadImageError(
            f"{path} cannot be decoded ({reason}); replace or remove the file and build again"
        ) from e
    if img.width < 1 or img.height < 1:
        raise BadImageError(f"{path} has no pixels ({img.width}x{img.height})")
    return data, img


def image_for_tfds(path: str, encoding: str) -> tuple[Any, tuple[int, int]]:
    """(payload, (height, width)) of the image at `path`, decoded and checked in full.

    The payload is the file's bytes when it already is an RGB or grayscale `encoding` image
    (grayscale is expanded to 3 channels when read back), else an RGB PIL image for TFDS to
    encode. Raises BadImageError naming the file when it cannot be decoded.
    """
    data, img = decode_image_file(path)
    size = (img.height, img.width)
    if img.format == encoding.upper() and img.mode in ("RGB", "L"):
        return data, size
    return to_rgb(img, path), size


def to_rgb(img: Any, path: str) -> Any:
    """An 8-bit RGB PIL image of `img`: alpha dropped (as the authors' `convert("RGB")`), 16-bit
    gray scaled to 8 bits by its high byte (what PIL does for 16-bit colour PNGs; PIL's own
    `convert` would clip every value above 255 to white), other modes refused naming `path`."""
    import PIL.Image  # pylint: disable=g-import-not-at-top

    if img.mode.startswith("I;16"):  # 16-bit gray: I;16, I;16B, I;16L, I;16N
        wide = np.asarray(img).astype(np.uint16)
        return PIL.Image.fromarray((wide >> 8).astype(np.uint8)).convert("RGB")  # L
    if img.mode in ("I", "F"):  # 32-bit integer or float pixels: no known range to scale from
        raise BadImageError(
            f"{path} has {'32-bit integer' if img.mode == 'I' else 'floating-point'} pixels "
            f"(PIL mode {img.mode}); convert it to 8-bit (or 16-bit) RGB or gray and build again"
        )
    return img.convert("RGB")  # RGBA, LA, palette, CMYK, 1-bit, ...; 16-bit colour is 8-bit here


def read_png_ids(path: str) -> np.ndarray:
    """A uint8 [h, w] instance-id PNG ('L' or 'P' mode; RGB(A) must be gray); errors name it."""
    _, img = decode_image_file(path)
    arr = np.asarray(img)
    if arr.ndim == 3:
        if not (arr[..., :3] == arr[..., :1]).all():
            raise SourceLayoutError(f"{path}: expected a single-channel uint8 instance-id PNG")
        arr = arr[..., 0]
    if arr.dtype != np.uint8 and (arr.min() < 0 or arr.max() > 255):
        raise SourceLayoutError(
            f"{path}: instance ids must lie in 0..255, found {arr.min()}..{arr.max()}"
        )
    return arr.astype(np.uint8)


def encode_png(ids: np.ndarray) -> bytes:
    """PNG bytes of a uint8 [h, w] array (lossless; ids compress to a few hundred bytes)."""
    import PIL.Image  # pylint: disable=g-import-not-at-top

    buf = io.BytesIO()
    PIL.Image.fromarray(np.asarray(ids, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()
