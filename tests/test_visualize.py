"""fixed_slots.visualize: titled grids (layout, titles drawn), shapes, dtypes, PNG output."""
import numpy as np
from PIL import Image
import pytest

from fixed_slots import visualize
from fixed_slots.models.protocol import Pictures


def _batch(rng, b=3, h=8, w=12, c=3):
    return rng.random((b, h, w, c)).astype(np.float32)


def test_mask_overlay_formula_and_upsampling():
    rng = np.random.default_rng(0)
    image = rng.random((8, 12, 3)).astype(np.float32)
    masks = rng.random((4, 2, 3)).astype(np.float32)  # token-grid attention, 4x smaller
    out = visualize.mask_overlay(image, masks)
    assert out.shape == (4, 8, 12, 3) and out.dtype == np.float32
    up = np.repeat(np.repeat(masks, 4, axis=1), 4, axis=2)[..., None]
    np.testing.assert_allclose(out, image * up + (1 - up), atol=1e-6)
    assert out.min() >= 0 and out.max() <= 1
    # Full mask shows the image, empty mask is white; batched inputs broadcast.
    on_off = np.stack([np.ones((8, 12)), np.zeros((8, 12))])[None]  # [1, 2, H, W]
    full = visualize.mask_overlay(image[None], on_off)
    np.testing.assert_allclose(full[0, 0], image, atol=1e-6)
    np.testing.assert_allclose(full[0, 1], 1.0)
    with pytest.raises(ValueError):
        visualize.mask_overlay(image, np.ones((2, 5, 5)))


def _legend_height(grid):
    return visualize.legend_strip(visualize.MASK_LEGEND, grid.shape[1]).shape[0]


def _strip_height(grid, rows, tile, pad=2, legend=True):
    """The title strip's height: what is left of the grid's height after the tiles (and the
    mask legend under them)."""
    return (grid.shape[0] - (rows * tile + (rows - 1) * pad)
            - (_legend_height(grid) if legend else 0))


def test_titles_are_drawn_and_differ():
    strip = visualize.title_strip(["input", "slot 1 mask", "slot 2 mask"], tile_width=64)
    assert strip.dtype == np.uint8 and strip.shape[1] == 3 * 64 + 2 * 2
    background = visualize.to_uint8(np.float32(visualize.PAD_VALUE))
    columns = [strip[:, c * 66:c * 66 + 64] for c in range(3)]
    for column in columns:  # every title put ink in its own column
        assert (column != background).any()
    assert (strip[:, 64:66] == background).all()  # nothing drawn over the separators
    assert not np.array_equal(columns[0], columns[1])
    assert not np.array_equal(columns[1], columns[2])  # "slot 1" vs "slot 2" tell apart
    blank = visualize.title_strip(["", ""], tile_width=64)
    assert (blank == background).all()
    # A title too long for one line wraps onto more lines (a taller strip); a word wider than
    # the tile is cut at its column, never drawn past it.
    tall = visualize.title_strip(["reconstruction from slots", "input"], tile_width=80)
    assert tall.shape[0] > strip.shape[0]
    narrow = visualize.title_strip(["reconstruction", "input"], tile_width=20)
    assert (narrow[:, 20:22] == background).all()


def test_tiles_grow_until_titles_fit():
    assert visualize.tile_scale(["input"], 96) == 1
    assert visualize.tile_scale(["input"], 32) == 2  # at least MIN_TILE = 64 pixels
    word = visualize._text_width("reconstruction")
    k = visualize.tile_scale(["reconstruction from slots"], 16)
    assert 16 * k >= word and 16 * (k - 1) < max(64, word + 4)
    with pytest.raises(ValueError, match="2 titles for 3 columns"):
        visualize.titled_grid(np.zeros((1, 3, 8, 8, 3)), ["a", "b"])


def test_slots_grid_layout_for_slate():
    rng = np.random.default_rng(1)
    b, s, h, w, pad = 3, 5, 8, 12, 2
    images, dvae, slots = _batch(rng), _batch(rng), _batch(rng)
    attn = rng.random((b, s, 2, 3)).astype(np.float32)
    pictures = Pictures(image=images, masks=attn, recon=slots, dvae_recon=dvae)
    grid = visualize.slots_grid(pictures, min_tile=0)
    k = visualize.tile_scale(["dVAE reconstruction"], w, 0)  # the widest word sets the scale
    H, W = k * h, k * w
    assert grid.dtype == np.uint8
    top = _strip_height(grid, b, H)
    legend = _legend_height(grid)
    assert top > 0 and grid.shape == (top + b * H + (b - 1) * pad + legend,
                                      (3 + s) * W + (2 + s) * pad, 3)
    # Under the tiles, the legend of the masks.
    np.testing.assert_array_equal(grid[-legend:], visualize.legend_strip(visualize.MASK_LEGEND,
                                                                         grid.shape[1]))
    titles = ["input", "dVAE reconstruction", "reconstruction from slots"] + [
        f"slot {i} mask" for i in range(1, s + 1)]
    np.testing.assert_array_equal(grid[:top], visualize.title_strip(titles, W, pad))

    def tile(r, c):
        y, x = top + r * (H + pad), c * (W + pad)
        return grid[y:y + H, x:x + W]

    def up(x):
        return np.repeat(np.repeat(visualize.to_uint8(x), k, 0), k, 1)

    # Row 1: input | dVAE recon | slot recon | overlays.
    np.testing.assert_array_equal(tile(1, 0), up(images[1]))
    np.testing.assert_array_equal(tile(1, 1), up(dvae[1]))
    np.testing.assert_array_equal(tile(1, 2), up(slots[1]))
    np.testing.assert_array_equal(tile(1, 4), up(visualize.mask_overlay(images[1], attn[1])[1]))
    # Separators carry the pad colour.
    background = visualize.to_uint8(np.float32(visualize.PAD_VALUE))
    assert (grid[top + H:top + H + pad] == background).all()
    # max_examples limits rows; uint8 and single-channel inputs are accepted.
    small = visualize.slots_grid(pictures._replace(image=visualize.to_uint8(images),
                                                   dvae_recon=dvae[..., :1]),
                                 max_examples=1, min_tile=0)
    assert small.shape == (top + H + legend, grid.shape[1], 3)
    with pytest.raises(ValueError, match="masks must be"):
        visualize.slots_grid(pictures._replace(masks=attn[0]))


def test_slots_grid_with_per_slot_images_and_without_recon():
    rng = np.random.default_rng(5)
    b, s, h, w, pad = 2, 3, 8, 8, 2
    ae = Pictures(image=_batch(rng, b, h, w), masks=rng.random((b, s, h, w)),
                  recon=_batch(rng, b, h, w), per_slot=rng.random((b, s, h, w, 3)))
    grid = visualize.slots_grid(ae)
    k = visualize.tile_scale(["reconstruction from slots"], w)
    top = _strip_height(grid, b, k * h)
    assert grid.shape == (top + b * k * h + pad + _legend_height(grid),
                          (2 + 2 * s) * (k * w + pad) - pad, 3)
    titles = (["input", "reconstruction from slots"] + [f"slot {i} mask" for i in (1, 2, 3)]
              + [f"slot {i}" for i in (1, 2, 3)])
    np.testing.assert_array_equal(grid[:top], visualize.title_strip(titles, k * w, pad))
    x = (2 + s) * (k * w + pad)  # first per-slot column
    np.testing.assert_array_equal(grid[top:top + k * h, x:x + k * w], np.repeat(np.repeat(
        visualize.to_uint8(ae.per_slot[0, 0]), k, 0), k, 1))
    # The set predictor's pictures: input and masks only.
    sp = visualize.slots_grid(Pictures(image=ae.image, masks=ae.masks))
    k = visualize.tile_scale(["input"], w)
    assert sp.shape[1] == (1 + s) * (k * w + pad) - pad


def test_slot_deletion_grid():
    rng = np.random.default_rng(2)
    b, s, h, w, pad = 2, 4, 6, 7, 2
    removed = rng.random((b, s, h, w, 3)).astype(np.float32)
    grid = visualize.slot_deletion_grid(removed)
    k = visualize.tile_scale(["without"], w)
    top = _strip_height(grid, b, k * h, legend=False)  # no masks here, no legend
    assert grid.dtype == np.uint8 and grid.shape == (top + b * k * h + pad,
                                                     s * k * w + (s - 1) * pad, 3)
    np.testing.assert_array_equal(grid[:top], visualize.title_strip(
        [f"without slot {i}" for i in range(1, s + 1)], k * w, pad))
    original = rng.random((b, h, w, 3)).astype(np.float32)
    grid = visualize.slot_deletion_grid(removed, original=original, original_title="input")
    assert grid.shape[1] == (s + 1) * k * w + s * pad
    np.testing.assert_array_equal(grid[:top], visualize.title_strip(
        ["input"] + [f"without slot {i}" for i in range(1, s + 1)], k * w, pad))

    def up(x):
        return np.repeat(np.repeat(visualize.to_uint8(x), k, 0), k, 1)

    np.testing.assert_array_equal(grid[top:top + k * h, :k * w], up(original[0]))
    y, x = top + k * h + pad, k * w + pad
    np.testing.assert_array_equal(grid[y:y + k * h, x:x + k * w], up(removed[1, 0]))


def test_to_uint8_and_save_png(tmp_path):
    x = np.array([[-0.5, 0.0, 0.5, 1.0, 2.0]], np.float32)
    np.testing.assert_array_equal(visualize.to_uint8(x), [[0, 0, 128, 255, 255]])
    rng = np.random.default_rng(3)
    img = (rng.random((5, 6, 3)) * 255).astype(np.uint8)
    path = tmp_path / "sub" / "grid.png"
    visualize.save_png(str(path), img)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), img)
    visualize.save_png(str(tmp_path / "gray.png"), rng.random((5, 6, 1)))
    assert np.asarray(Image.open(tmp_path / "gray.png")).shape == (5, 6)
    with pytest.raises(ValueError):
        visualize.save_png(str(tmp_path / "bad.png"), np.zeros((2, 5, 6, 3)))


def test_model_grids_names_and_titles():
    rng = np.random.default_rng(4)
    b, s, h, w = 2, 3, 8, 8
    slate = Pictures(image=_batch(rng, b, h, w), masks=rng.random((b, s, h, w)),
                     recon=_batch(rng, b, h, w), dvae_recon=_batch(rng, b, h, w))
    grids = visualize.model_grids(slate)
    assert set(grids) == {"slate"}
    np.testing.assert_array_equal(grids["slate"], visualize.slots_grid(slate))
    deletion = rng.random((b, s, h, w, 3))
    grids = visualize.model_grids(slate._replace(slot_deletion=deletion))
    assert set(grids) == {"slate", "slot_deletion"}
    # Fig. 9 starts from the reconstruction from slots.
    np.testing.assert_array_equal(grids["slot_deletion"], visualize.slot_deletion_grid(
        deletion, slate.recon, "reconstruction from slots"))
    # Models without a dVAE give "reconstruction"; without a reconstruction, deletion starts
    # from the input.
    other = Pictures(image=slate.image, masks=slate.masks,
                     slot_deletion=rng.random((b, s, h, w, 3)))
    grids = visualize.model_grids(other)
    assert set(grids) == {"reconstruction", "slot_deletion"}
    np.testing.assert_array_equal(grids["slot_deletion"], visualize.slot_deletion_grid(
        other.slot_deletion, other.image, "input"))


def test_text_stays_readable_when_tensorboard_shrinks_a_wide_grid():
    """TensorBoard shows an image about DISPLAY_WIDTH pixels wide: the font grows with the
    grid's width so that the titles stay >= BASE_FONT pixels there."""
    assert visualize.font_size_for(400) == visualize.BASE_FONT
    assert visualize.font_size_for(2 * visualize.DISPLAY_WIDTH) == 2 * visualize.BASE_FONT
    narrow = visualize.title_strip(["input", "slot 1 mask"], tile_width=64)
    wide = visualize.title_strip(["input"] + [f"slot {k} mask" for k in range(1, 10)],
                                 tile_width=96)
    assert wide.shape[1] > 2 * visualize.DISPLAY_WIDTH
    # Taller text lines on the wide strip: its font is larger.
    assert wide.shape[0] > narrow.shape[0]
    rows = np.nonzero((wide > 200).any(axis=(1, 2)))[0]
    ink_height = rows.max() - rows.min() + 1
    assert ink_height * visualize.DISPLAY_WIDTH / wide.shape[1] >= 6  # still legible shrunk
