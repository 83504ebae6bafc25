"""Host-side NumPy picture grids with titled columns (SLATE Fig. 4, slot deletion Fig. 9).

Used by the trainer (TensorBoard images) and by evaluation (PNGs), so it sits above both: it reads
a model's `Pictures` (fixed_slots.models.protocol) and imports nothing from train/ or eval/.

Images are [..., H, W, C] with C in {1, 3}, either floats in [0, 1] or uint8. Grids come back as
uint8 [H', W', 3], ready for `save_png` or a metric writer's `write_images` (add a batch axis).
The titled grids have a strip of column titles on top ("input", "dVAE reconstruction",
"reconstruction from slots", "slot k mask", "slot k", "without slot k"; slots counted from 1),
drawn with PIL's default font; small tiles are enlarged (pixel repetition) until the titles fit.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from fixed_slots.models.protocol import Pictures

# Colour of the separators between tiles (SLATE's grids use a dark grey pad of 0.2).
PAD_VALUE = 0.2



def to_float(images: np.ndarray) -> np.ndarray:
    """uint8 in [0, 255] or floats -> float32 in [0, 1] (floats are clipped)."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 255.0
    return np.clip(images.astype(np.float32), 0.0, 1.0)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Floats in [0, 1] (clipped) or uint8 -> uint8 in [0, 255], rounding to nearest."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    return np.round(np.clip(images.astype(np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


def _as_rgb(images: np.ndarray) -> np.ndarray:
    """[..., H, W, 1 or 3] float -> [..., H, W, 3] float in [0, 1]."""
    images = to_float(images)
    if images.shape[-1] == 1:
        return np.repeat(images, 3, axis=-1)
    if images.shape[-1] != 3:
        raise ValueError(f"images must have 1 or 3 channels, got shape {images.shape}")
    return images


def _upsample_masks(masks: np.ndarray, height: int, width: int) -> np.ndarray:
    """[..., h, w] -> [..., height, width] by pixel repetition (SLATE's repeat_interleave)."""
    h, w = masks.shape[-2:]
    if (h, w) == (height, width):
        return masks
    if height % h or width % w:
        raise ValueError(f"mask size {(h, w)} does not divide image size {(height, width)}")
    return np.repeat(np.repeat(masks, height // h, axis=-2), width // w, axis=-1)


def make_grid(tiles: np.ndarray, pad: int = 2, pad_value: float = PAD_VALUE) -> np.ndarray:
    """Tiles [R, C, H, W, 3] -> uint8 [R*H + (R-1)*pad, C*W + (C-1)*pad, 3] with separators."""
    tiles = _as_rgb(tiles)
    if tiles.ndim != 5:
        raise ValueError(f"tiles must be [rows, cols, H, W, 3], got {tiles.shape}")
    rows, cols, h, w, _ = tiles.shape
    grid = np.full((rows * h + (rows - 1) * pad, cols * w + (cols - 1) * pad, 3), pad_value,
                   np.float32)
    for r in range(rows):
        for c in range(cols):
            y, x = r * (h + pad), c * (w + pad)
            grid[y:y + h, x:x + w] = tiles[r, c]
    return to_uint8(grid)


def mask_overlay(image: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Each mask shown as the image on a white background: image * m + (1 - m).

    Args:
      image: [..., H, W, C] image (C in {1, 3}), floats in [0, 1] or uint8.
      masks: [..., S, h, w] soft masks in [0, 1]; h, w may divide H, W (e.g. token-grid attention).
    Returns:
      [..., S, H, W, 3] float32 in [0, 1] (as SLATE visualises slot attention).
    """
    image = _as_rgb(image)
    height, width = image.shape[-3:-1]
    masks = np.clip(np.asarray(masks, np.float32), 0.0, 1.0)
    masks = _upsample_masks(masks, height, width)[..., None]  # [..., S, H, W, 1]
    image = image[..., None, :, :, :]  # [..., 1, H, W, 3]
    return image * masks + (1.0 - masks)


# Tiles are enlarged to at least this many pixels across so that short titles fit.
MIN_TILE = 64
_TEXT_RGB = (255, 255, 255)
_TITLE_MARGIN = 2  # pixels above, below and beside the title lines
# TensorBoard shows an image card about this many pixels wide (it shrinks wider images to fit):
# text is drawn large enough to stay readable (>= BASE_FONT pixels) at that width.
DISPLAY_WIDTH = 480
BASE_FONT = 11
# Under every grid of slot masks: what a mask tile shows.
MASK_LEGEND = ("slot k mask: the input seen through slot k's attention (white where the "
               "attention goes to other slots)")


@functools.lru_cache(maxsize=None)
def _font(size: int = BASE_FONT) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable font
    except TypeError:
        return ImageFont.load_default()


def font_size_for(width: int) -> int:
    """The font size at which text on an image `width` pixels wide stays >= BASE_FONT pixels
    when TensorBoard shows the image DISPLAY_WIDTH pixels wide."""
    return max(BASE_FONT, int(math.ceil(BASE_FONT * width / DISPLAY_WIDTH)))


def _text_width(text: str, size: int = BASE_FONT) -> int:
    return int(math.ceil(_font(size).getlength(text)))


def _line_height(size: int = BASE_FONT) -> int:
    ascent, descent = _font(size).getmetrics()
    return ascent + descent


def _wrap(text: str, width: int, size: int = BASE_FONT) -> list[str]:
    """Greedy word wrap to `width` pixels (a word wider than that gets a line of its own)."""
    lines: list[str] = []
    for word in text.split():
        if lines and _text_width(f"{lines[-1]} {word}", size) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def tile_scale(titles: Sequence[str], width: int, min_tile: int = MIN_TILE) -> int:
    """Integer enlargement of `width`-pixel tiles so that they are >= min_tile pixels across and
    every word of every title fits in one tile."""
    widest = max((_text_width(w) for t in titles for w in t.split()), default=0)
    return max(1, math.ceil(max(min_tile, widest + 2 * _TITLE_MARGIN) / width))


def _title_font_size(titles: Sequence[str], tile_width: int, width: int) -> int:
    """`font_size_for(width)`, reduced until every word of every title fits its tile."""
    size = font_size_for(width)
    inner = tile_width - 2 * _TITLE_MARGIN
    while size > BASE_FONT and any(_text_width(w, size) > inner
                                   for t in titles for w in t.split()):
        size -= 1
    return size


def title_strip(titles: Sequence[str], tile_width: int, pad: int = 2,
                pad_value: float = PAD_VALUE) -> np.ndarray:
    """Column titles for a grid of len(titles) columns of `tile_width` pixels and `pad` pixels
    between them: uint8 [h, C*tile_width + (C-1)*pad, 3], each title wrapped to its column and
    centred, light text on the separator colour (`tile_scale` makes every word fit), in a font
    that stays readable when TensorBoard shrinks the grid (`font_size_for`). h fits the
    longest wrapped title."""
    width = len(titles) * tile_width + (len(titles) - 1) * pad
    size = _title_font_size(titles, tile_width, width)
    inner = tile_width - 2 * _TITLE_MARGIN
    wrapped = [_wrap(t, inner, size) for t in titles]
    line = _line_height(size)
    height = max(len(w) for w in wrapped) * line + 2 * _TITLE_MARGIN
    background = (int(round(pad_value * 255)),) * 3
    strip = Image.new("RGB", (width, height), background)
    for c, lines in enumerate(wrapped):
        # Drawn on the column's own image: a word wider than the tile is cut, never spills.
        column = Image.new("RGB", (tile_width, height), background)
        draw = ImageDraw.Draw(column)
        for i, text in enumerate(lines):
            draw.text((tile_width / 2, _TITLE_MARGIN + i * line), text, font=_font(size),
                      fill=_TEXT_RGB, anchor="ma")
        strip.paste(column, (c * (tile_width + pad), 0))
    return np.asarray(strip, np.uint8)


def legend_strip(text: str, width: int, pad_value: float = PAD_VALUE) -> np.ndarray:
    """`text` wrapped to `width` pixels, left-aligned, light on the separator colour:
    uint8 [h, width, 3], in the same readable size as the titles of a grid that wide."""
    size = font_size_for(width)
    lines = _wrap(text, width - 2 * _TITLE_MARGIN, size)
    line = _line_height(size)
    background = (int(round(pad_value * 255)),) * 3
    strip = Image.new("RGB", (width, len(lines) * line + 2 * _TITLE_MARGIN), background)
    draw = ImageDraw.Draw(strip)
    for i, text_line in enumerate(lines):
        draw.text((_TITLE_MARGIN, _TITLE_MARGIN + i * line), text_line, font=_font(size),
                  fill=_TEXT_RGB)
    return np.asarray(strip, np.uint8)


def titled_grid(tiles: np.ndarray, titles: Sequence[str], pad: int = 2,
                min_tile: int = MIN_TILE, legend: str | None = None) -> np.ndarray:
    """Tiles [R, C, H, W, 3] under a strip of C column titles -> uint8 [T + k*R*H + (R-1)*pad
    (+ the legend's strip), k*C*W + (C-1)*pad, 3], the tiles enlarged
    k = `tile_scale(titles, W, min_tile)` times; `legend` is a line of text under the grid."""
    tiles = _as_rgb(tiles)
    if tiles.ndim != 5:
        raise ValueError(f"tiles must be [rows, cols, H, W, 3], got {tiles.shape}")
    if len(titles) != tiles.shape[1]:
        raise ValueError(f"{len(titles)} titles for {tiles.shape[1]} columns")
    k = tile_scale(titles, tiles.shape[3], min_tile)
    tiles = np.repeat(np.repeat(tiles, k, axis=2), k, axis=3)
    grid = make_grid(tiles, pad=pad)
    parts = [title_strip(titles, tiles.shape[3], pad), grid]
    if legend:
        parts.append(legend_strip(legend, grid.shape[1]))
    return np.concatenate(parts, axis=0)


def _rows(n: int, max_examples: Optional[int]) -> int:
    return n if max_examples is None else min(n, max_examples)


def slots_grid(pictures: Pictures, max_examples: Optional[int] = 8, pad: int = 2,
               min_tile: int = MIN_TILE) -> np.ndarray:
    """SLATE's Fig. 4 layout (and the other models' version of it), one row per example.

    Columns: input | dVAE reconstruction | reconstruction from slots | slot k mask (the input
    seen through slot k's mask, for each k) | slot k (what slot k draws alone), each present
    when the model gives it. Returns a `titled_grid`.
    """
    image = _as_rgb(pictures.image)
    rows = _rows(image.shape[0], max_examples)
    masks = np.asarray(pictures.masks)
    if masks.ndim != 4 or masks.shape[0] != image.shape[0]:
        raise ValueError(f"masks must be [B, S, h, w] for images {image.shape}, "
                         f"got {masks.shape}")
    num_slots = masks.shape[1]
    columns, titles = [image[:rows, None]], ["input"]
    for value, title in ((pictures.dvae_recon, "dVAE reconstruction"),
                         (pictures.recon, "reconstruction from slots")):
        if value is not None:
            value = _as_rgb(value)
            if value.shape != image.shape:
                raise ValueError(f"{title}: shape {value.shape} differs from the input's "
                                 f"{image.shape}")
            columns.append(value[:rows, None])
            titles.append(title)
    columns.append(mask_overlay(image[:rows], masks[:rows]))
    titles += [f"slot {k + 1} mask" for k in range(num_slots)]
    if pictures.per_slot is not None:
        per_slot = _as_rgb(pictures.per_slot)
        if per_slot.shape[:2] != masks.shape[:2] or per_slot.shape[2:] != image.shape[1:]:
            raise ValueError(f"per_slot must be [B, S, H, W, C] = {masks.shape[:2]} + "
                             f"{image.shape[1:]}, got {per_slot.shape}")
        columns.append(per_slot[:rows])
        titles += [f"slot {k + 1}" for k in range(num_slots)]
    return titled_grid(np.concatenate(columns, axis=1), titles, pad=pad, min_tile=min_tile,
                       legend=MASK_LEGEND)


def slot_deletion_grid(images_with_slot_removed: np.ndarray,
                       original: Optional[np.ndarray] = None,
                       original_title: str = "reconstruction from slots",
                       max_examples: Optional[int] = 8, pad: int = 2,
                       min_tile: int = MIN_TILE) -> np.ndarray:
    """Fig. 9 layout: row b shows image b decoded with slot k removed, for each k.

    Args:
      images_with_slot_removed: [B, S, H, W, C] decodings without slot k ("without slot k").
      original: optional [B, H, W, C] full decodings (or inputs), shown as the first column
        under `original_title`.
    Returns:
      a `titled_grid` of S (+1 with `original`) columns.
    """
    removed = _as_rgb(images_with_slot_removed)
    if removed.ndim != 5:
        raise ValueError(f"expected [B, S, H, W, C], got {removed.shape}")
    rows = _rows(removed.shape[0], max_examples)
    tiles = removed[:rows]
    titles = [f"without slot {k + 1}" for k in range(removed.shape[1])]
    if original is not None:
        original = _as_rgb(original)
        if original.shape != removed.shape[:1] + removed.shape[2:]:
            raise ValueError(f"original {original.shape} does not match {removed.shape}")
        tiles = np.concatenate([original[:rows, None], tiles], axis=1)
        titles = [original_title] + titles
    return titled_grid(tiles, titles, pad=pad, min_tile=min_tile)


def model_grids(pictures: Pictures, max_examples: Optional[int] = 8) -> dict[str, np.ndarray]:
    """Grids for a model's `visualize` / `evaluation_pictures`: name -> uint8 [H', W', 3].

    "slate" (Fig. 4; named "reconstruction" for models without a dVAE) from `slots_grid`, and
    with `slot_deletion` Fig. 9's grid next to the reconstruction from slots (or the input).
    """
    pictures = Pictures(*(None if v is None else np.asarray(v) for v in pictures))
    name = "slate" if pictures.dvae_recon is not None else "reconstruction"
    grids = {name: slots_grid(pictures, max_examples=max_examples)}
    if pictures.slot_deletion is not None:
        if pictures.recon is not None:
            original, title = pictures.recon, "reconstruction from slots"
        else:
            original, title = pictures.image, "input"
        grids["slot_deletion"] = slot_deletion_grid(pictures.slot_deletion, original, title,
                                                    max_examples=max_examples)
    return grids


def save_png(path: str, array: np.ndarray) -> None:
    """Writes [H, W], [H, W, 1] or [H, W, 3] (uint8, or floats in [0, 1]) as a PNG."""
    array = to_uint8(array)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(f"cannot save an image of shape {array.shape}")
    directory = os.path.dirname(os.fspath(path))
    if directory:
        os.makedirs(directory, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")

