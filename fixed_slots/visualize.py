"""Host-side NumPy image grids for logging and figures (SLATE Fig. 4, slot deletion Fig. 9).

Images are [..., H, W, C] with C in {1, 3}, either floats in [0, 1] or uint8. Grids come back as
uint8 [H', W', 3], ready for `save_png` or a metric writer's `write_images` (add a batch axis).
"""
from __future__ import annotations

import colorsys
import os
from typing import Optional

import numpy as np
from PIL import Image

# Colour of the separators between tiles (SLATE's grids use a dark grey pad of 0.2).
PAD_VALUE = 0.2

# Distinct colours for segment ids 1..20 (matplotlib's tab20, reordered so neighbouring ids are
# far apart); id 0 is the background and drawn black. Ids beyond the table get golden-ratio hues.
_PALETTE = np.array([
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
    (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213),
    (196, 156, 148), (247, 182, 210), (199, 199, 199), (219, 219, 141), (158, 218, 229),
], np.uint8)


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


def segmentation_to_rgb(ids: np.ndarray) -> np.ndarray:
    """Integer ids [..., H, W] -> uint8 colours [..., H, W, 3]; id 0 (background) is black."""
    ids = np.asarray(ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"ids must be integers, got {ids.dtype}")
    if ids.size and ids.min() < 0:
        raise ValueError("ids must be non-negative")
    num = int(ids.max()) + 1 if ids.size else 1
    table = np.zeros((max(num, 1), 3), np.uint8)
    for i in range(1, num):
        if i - 1 < len(_PALETTE):
            table[i] = _PALETTE[i - 1]
        else:
            # Golden-ratio hue steps keep further ids distinct from each other.
            hue = ((i - 1 - len(_PALETTE)) * 0.618033988749895) % 1.0
            table[i] = np.round(np.array(colorsys.hsv_to_rgb(hue, 0.75, 0.95)) * 255)
    return table[ids]


def slate_grid(images: np.ndarray, dvae_recon: np.ndarray, slot_recon: np.ndarray,
               attn_masks: np.ndarray, max_examples: Optional[int] = 8,
               pad: int = 2) -> np.ndarray:
    """SLATE's Fig. 4 layout: one row per example.

    Columns: input | dVAE reconstruction | reconstruction from slots | one overlay per slot.

    Args:
      images, dvae_recon, slot_recon: [B, H, W, C] in [0, 1] (or uint8).
      attn_masks: [B, S, h, w] per-slot attention (h, w equal to or dividing H, W).
      max_examples: show at most this many rows (None = all).
    Returns:
      uint8 [R*H + (R-1)*pad, (3+S)*W + (2+S)*pad, 3], R = min(B, max_examples).
    """
    images, dvae_recon, slot_recon = (_as_rgb(x) for x in (images, dvae_recon, slot_recon))
    if not images.shape == dvae_recon.shape == slot_recon.shape:
        raise ValueError(f"image shapes differ: {images.shape}, {dvae_recon.shape}, "
                         f"{slot_recon.shape}")
    attn_masks = np.asarray(attn_masks)
    if attn_masks.ndim != 4 or attn_masks.shape[0] != images.shape[0]:
        raise ValueError(f"attn_masks must be [B, S, h, w], got {attn_masks.shape}")
    rows = images.shape[0] if max_examples is None else min(images.shape[0], max_examples)
    overlays = mask_overlay(images[:rows], attn_masks[:rows])  # [R, S, H, W, 3]
    columns = np.stack([images[:rows], dvae_recon[:rows], slot_recon[:rows]], axis=1)
    return make_grid(np.concatenate([columns, overlays], axis=1), pad=pad)


def slot_deletion_grid(images_with_slot_removed: np.ndarray,
                       original: Optional[np.ndarray] = None,
                       max_examples: Optional[int] = 8, pad: int = 2) -> np.ndarray:
    """Fig. 9 layout: row b shows image b decoded with slot s removed, for each s.

    Args:
      images_with_slot_removed: [B, S, H, W, C] decodings without slot s.
      original: optional [B, H, W, C] full decodings (or inputs), shown as the first column.
    Returns:
      uint8 [R*H + (R-1)*pad, K*W + (K-1)*pad, 3] with K = S (+1 with `original`).
    """
    removed = _as_rgb(images_with_slot_removed)
    if removed.ndim != 5:
        raise ValueError(f"expected [B, S, H, W, C], got {removed.shape}")
    rows = removed.shape[0] if max_examples is None else min(removed.shape[0], max_examples)
    tiles = removed[:rows]
    if original is not None:
        original = _as_rgb(original)
        if original.shape != removed.shape[:1] + removed.shape[2:]:
            raise ValueError(f"original {original.shape} does not match {removed.shape}")
        tiles = np.concatenate([original[:rows, None], tiles], axis=1)
    return make_grid(tiles, pad=pad)


_SLATE_KEYS = ("image", "dvae_recon", "slot_recon", "masks")


def _generic_rows(arrays: dict[str, np.ndarray], max_examples: Optional[int]) -> np.ndarray:
    """image | other [B,H,W,C] arrays | mask overlays | per-slot [B,S,H,W,C] arrays, per row."""
    image = _as_rgb(arrays["image"])
    b, h, w = image.shape[:3]
    rows = b if max_examples is None else min(b, max_examples)
    columns = [image[:rows, None]]
    for name, value in arrays.items():
        value = np.asarray(value)
        if name in ("image", "masks", "slot_deletion") or value.shape[:1] != (b,):
            continue
        if value.ndim == 4 and value.shape[1:3] == (h, w) and value.shape[-1] in (1, 3):
            columns.append(_as_rgb(value[:rows])[:, None])
        elif value.ndim == 5 and value.shape[2:4] == (h, w) and value.shape[-1] in (1, 3):
            columns.append(_as_rgb(value[:rows]))
    if "masks" in arrays:
        columns.append(mask_overlay(image[:rows], np.asarray(arrays["masks"])[:rows]))
    return make_grid(np.concatenate(columns, axis=1))


def model_grids(arrays: dict[str, np.ndarray],
                   max_examples: Optional[int] = 8) -> dict[str, np.ndarray]:
    """Grids for a model's `visualize` / `evaluation_pictures` arrays: name -> uint8 [H', W', 3].

    SLATE's arrays (image, dvae_recon, slot_recon, masks [B,S,H,W]) give "slate" (Fig. 4); any
    other set with an "image" gives "reconstruction" (image, the other images of the same size,
    mask overlays, per-slot images); "slot_deletion" [B,S,H,W,C] gives Fig. 9's grid, next to
    the slot reconstruction (or the input) when present.
    """
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    grids = {}
    if all(k in arrays for k in _SLATE_KEYS):
        grids["slate"] = slate_grid(*(arrays[k] for k in _SLATE_KEYS), max_examples=max_examples)
    elif "image" in arrays:
        grids["reconstruction"] = _generic_rows(arrays, max_examples)
    if "slot_deletion" in arrays:
        original = arrays.get("slot_recon", arrays.get("image"))
        grids["slot_deletion"] = slot_deletion_grid(arrays["slot_deletion"], original=original,
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

