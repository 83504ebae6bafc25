"""Procedural multi-object scenes: the embedded default dataset (no download).

Every scene is a pure function of `(seed, index)`: a background (a muted uniform colour or a gentle
gradient) and `K` flat-coloured objects painted in depth order, so later objects occlude earlier
ones. The instance mask uses the same order: id `k` (1..K) is object `k - 1`, 0 is background.

Per-object properties are padded to `max_objects`:

    shape     int32   [max_objects]     index into SHAPES
    color     int32   [max_objects]     index into COLORS (the palette, RGB uint8)
    size      int32   [max_objects]     index into SIZES ("small", "large")
    scale     float32 [max_objects]     radius as a fraction of the image side
    position  float32 [max_objects, 2]  centre (y, x) in [0, 1]
    visible   float32 [max_objects]     1 if present and >= min_visible_pixels pixels show
    num_objects int32 []                K

Drawing is vectorised NumPy over each object's bounding window (signed distance functions, with
optional analytic anti-aliasing), about 0.3 ms per 64x64 scene on one core.

A `SceneStyle` says what is drawn (object sizes, how much objects may overlap, backgrounds, colour
jitter, rotation); `SCENE_STYLES` names the presets that `config.data.synthetic_style` chooses:

    classic   the original scenes: small and large objects, partial overlaps, muted uniform or
              gradient backgrounds
    large     objects 2.5-3.5x the classic radius (a fifth to a third of the image side), each of its
              own colour, on uniform backgrounds, overlapping little (~5% of the covered area): at
              48x48 an object spans 5-7 dVAE tokens (4x4 pixels each) across (the README's
              default run)
    crowded   many objects with heavy occlusion, rotated shapes and jittered colours (the CPU study
              of the paper's effects, configs/study_synthetic.py)

The properties keep their meaning in every style (the colour index names the palette entry before
jitter), so the set-prediction target is the same vector.

`properties_to_target` turns these properties into the set-prediction target of Locatello et al.
(2020): per object concat(position, one-hot shape, one-hot color, one-hot size, [material],
[visible]), zero rows for absent or fully hidden objects. `TargetLayout` names the slices so that
the set-prediction model and the AP metric can split the vector.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

SHAPES = ("circle", "square", "triangle", "diamond", "ellipse")
COLORS = ("red", "green", "blue", "yellow", "magenta", "cyan", "orange", "white")
SIZES = ("small", "large")

# RGB values of COLORS: saturated so that they stand out from the muted backgrounds.
PALETTE = np.array(
    [
        [220, 50, 47],
        [60, 180, 75],
        [40, 100, 230],
        [240, 210, 40],
        [200, 60, 200],
        [40, 200, 210],
        [245, 130, 30],
        [235, 235, 235],
    ],
    dtype=np.uint8,
)  # [len(COLORS), 3]
BACKGROUNDS = np.array(
    [[45, 45, 52], [70, 62, 55], [38, 55, 70], [60, 72, 58], [88, 88, 92]],
    dtype=np.uint8,
)  # [5, 3]

# The classic style's radius range (fraction of the image side) of each size class, and how far
# apart centres stay (a fraction of the sum of the radii): occlusion is partial, every object keeps a
# visible core in almost every scene. Other styles: SceneStyle below.
SCALE_RANGES = np.array([[0.08, 0.12], [0.15, 0.20]], dtype=np.float64)  # [len(SIZES), 2]
MIN_CENTRE_SEPARATION = 0.65
_POSITION_TRIES = 24


@dataclasses.dataclass(frozen=True)
class SceneStyle:
    """What the generator draws; see the module docstring for the presets.

    scale_ranges: radius range (fraction of the image side) of each size class in SIZES.
    min_centre_separation: centres of two objects stay at least this fraction of the sum of their
      radii apart when possible (about 1: objects barely touch; 0.3: heavy occlusion).
    background: "varied" (a muted uniform colour or a gentle gradient) or "uniform" (a muted
      uniform colour).
    color_jitter: each object's RGB is offset by a uniform draw in [-color_jitter, color_jitter]
      per channel (0-255 scale), clipped to [0, 255].
    rotate: shapes are rotated by a uniform angle (circles are unchanged).
    distinct_colors: no two objects of a scene share a palette colour (needs max_objects <=
      len(COLORS)); otherwise colours are drawn independently.
    """

    scale_ranges: tuple[tuple[float, float], ...] = ((0.08, 0.12), (0.15, 0.20))
    min_centre_separation: float = 0.65
    background: str = "varied"
    color_jitter: float = 0.0
    rotate: bool = False
    distinct_colors: bool = False

    def __post_init__(self):
        if len(self.scale_ranges) != len(SIZES) or any(
                not 0.0 < lo <= hi < 0.5 for lo, hi in self.scale_ranges):
            raise ValueError(f"scale_ranges must be {len(SIZES)} (lo, hi) pairs with "
                             f"0 < lo <= hi < 0.5, got {self.scale_ranges}")
        if self.min_centre_separation < 0:
            raise ValueError(f"min_centre_separation must be >= 0, got "
                             f"{self.min_centre_separation}")
        if self.background not in ("varied", "uniform"):
            raise ValueError(f"background must be 'varied' or 'uniform', got {self.background!r}")
        if not 0 <= self.color_jitter <= 255:
            raise ValueError(f"color_jitter must be in [0, 255], got {self.color_jitter}")


SCENE_STYLES = {
    "classic": SceneStyle(),
    "large": SceneStyle(scale_ranges=((0.20, 0.24), (0.26, 0.30)), min_centre_separation=0.95,
                        background="uniform", distinct_colors=True),
    "crowded": SceneStyle(scale_ranges=((0.10, 0.14), (0.16, 0.22)), min_centre_separation=0.35,
                          color_jitter=35.0, rotate=True),
}


def scene_style(style: "str | SceneStyle") -> SceneStyle:
    """A SceneStyle, or the preset of that name (ValueError naming the presets otherwise)."""
    if isinstance(style, SceneStyle):
        return style
    if style not in SCENE_STYLES:
        raise ValueError(f"unknown synthetic scene style {style!r}; expected one of "
                         f"{tuple(SCENE_STYLES)}")
    return SCENE_STYLES[style]


@dataclasses.dataclass(frozen=True)
class TargetLayout:
    """Layout of the per-object set-prediction target vector.

    Order: position | shape one-hot | color one-hot | size one-hot | material one-hot | visible.
    `num_materials = 0` drops the material block (the synthetic scenes have none).
    `position_scale` turns differences of the stored positions into the scene units that the
    set-prediction AP thresholds (1, 0.5, 0.25, 0.125) are in.
    """

    position_dims: int
    num_shapes: int
    num_colors: int
    num_sizes: int
    num_materials: int = 0
    position_scale: float = 1.0

    def _bounds(self) -> dict[str, slice]:
        widths = [
            ("position", self.position_dims),
            ("shape", self.num_shapes),
            ("color", self.num_colors),
            ("size", self.num_sizes),
            ("material", self.num_materials),
            ("visible", 1),
        ]
        out, start = {}, 0
        for name, width in widths:
            out[name] = slice(start, start + width)
            start += width
        return out

    @property
    def position(self) -> slice:
        return self._bounds()["position"]

    @property
    def shape(self) -> slice:
        return self._bounds()["shape"]

    @property
    def color(self) -> slice:
        return self._bounds()["color"]

    @property
    def size(self) -> slice:
        return self._bounds()["size"]

    @property
    def material(self) -> slice:
        return self._bounds()["material"]

    @property
    def visible(self) -> slice:
        return self._bounds()["visible"]

    @property
    def dim(self) -> int:
        return self._bounds()["visible"].stop

    @property
    def categorical(self) -> dict[str, slice]:
        """The one-hot blocks present in this layout, by property name."""
        bounds = self._bounds()
        return {
            name: bounds[name]
            for name in ("shape", "color", "size", "material")
            if bounds[name].stop > bounds[name].start
        }


# Synthetic scenes: 2 (y, x) + 5 shapes + 8 colours + 2 sizes + 1 visible = 18 floats.
# Positions (y, x) in [0, 1]: the image side spans 6 units, as CLEVR's [-3, 3] scene, so the AP
# thresholds are as strict as there.
SYNTHETIC_TARGET_LAYOUT = TargetLayout(
    position_dims=2, num_shapes=len(SHAPES), num_colors=len(COLORS), num_sizes=len(SIZES),
    position_scale=6.0,
)
TARGET_POSITION = SYNTHETIC_TARGET_LAYOUT.position  # slice(0, 2)
TARGET_SHAPE = SYNTHETIC_TARGET_LAYOUT.shape  # slice(2, 7)
TARGET_COLOR = SYNTHETIC_TARGET_LAYOUT.color  # slice(7, 15)
TARGET_SIZE = SYNTHETIC_TARGET_LAYOUT.size  # slice(15, 17)
TARGET_VISIBLE = SYNTHETIC_TARGET_LAYOUT.visible  # slice(17, 18)
TARGET_DIM = SYNTHETIC_TARGET_LAYOUT.dim  # 18


def properties_to_target(
    props: Mapping[str, Any], layout: TargetLayout = SYNTHETIC_TARGET_LAYOUT
) -> np.ndarray:
    """Per-object target vectors [..., K, layout.dim] from padded property arrays [..., K].

    Reads `position` [..., K, P], `shape`, `color`, `size` (and `material` when the layout has
    materials) as ints and `visible` as floats. Rows of invisible/padding objects are all zero.
    """
    visible = np.asarray(props["visible"], np.float32)  # [..., K]
    position = np.asarray(props["position"], np.float32)  # [..., K, P]
    if position.shape[-1] != layout.position_dims:
        raise ValueError(
            f"position has {position.shape[-1]} dims, layout expects {layout.position_dims}"
        )
    blocks = [position]
    for name, width in (
        ("shape", layout.num_shapes),
        ("color", layout.num_colors),
        ("size", layout.num_sizes),
        ("material", layout.num_materials),
    ):
        if width:
            idx = np.asarray(props[name], np.int64)  # [..., K]
            blocks.append(np.eye(width, dtype=np.float32)[np.clip(idx, 0, width - 1)])
    blocks.append(visible[..., None])
    target = np.concatenate(blocks, axis=-1)  # [..., K, D]
    return target * (visible[..., None] > 0)


def _signed_distance(shape: int, py: np.ndarray, px: np.ndarray, r: float,
                     angle: float = 0.0) -> np.ndarray:
    """Signed distance in pixels (negative inside) of a shape of radius r centred at 0.

    py: [h, 1] and px: [1, w] pixel-centre offsets, y pointing down. `angle` (radians) rotates
    the shape; rotation is a rigid motion, so distances stay exact where they were.
    """
    if angle and shape != 0:
        c, s = np.cos(angle), np.sin(angle)
        py, px = c * py - s * px, s * py + c * px  # [h, w] each: the frame rotated by -angle
    if shape == 0:  # circle
        return np.sqrt(py * py + px * px) - r
    if shape == 1:  # axis-aligned square, half side 0.85 r (area close to the circle's)
        # Max of the edge distances: exact inside and on the edges, slightly low off the corners.
        return np.maximum(np.abs(py), np.abs(px)) - 0.85 * r
    if shape == 2:  # equilateral triangle pointing up, centred on its centroid, side 2.2 r
        inradius = 1.1 * r / np.sqrt(3.0)
        # Edge normals (0, 1) and (+-sqrt(3)/2, -1/2) in (y down, x) coordinates.
        return np.maximum(py, 0.5 * np.sqrt(3.0) * np.abs(px) - 0.5 * py) - inradius
    if shape == 3:  # diamond (square rotated by 45 degrees), half diagonal 1.25 r
        return (np.abs(py) + np.abs(px) - 1.25 * r) / np.sqrt(2.0)
    if shape == 4:  # horizontal ellipse, semi-axes 1.3 r and 0.7 r
        ay, ax = 0.7 * r, 1.3 * r
        u, v = px / ax, py / ay
        # First-order distance h / |grad h| with h = u^2 + v^2 - 1: exact on the boundary.
        grad = 2.0 * np.sqrt((u / ax) ** 2 + (v / ay) ** 2)
        return (u * u + v * v - 1.0) / np.maximum(grad, 1e-6)
    raise ValueError(f"unknown shape index {shape}")


# How far (in radii) each shape extends from its centre: bounds the drawing window.
_EXTENT = 1.3


def _sample_positions(rng: np.random.Generator, scale: np.ndarray,
                      separation: float = MIN_CENTRE_SEPARATION) -> np.ndarray:
    """Centres (y, x) in [0, 1], kept `separation` x (sum of radii) apart when possible; [K, 2]."""
    k_total = scale.shape[0]
    lo = 0.8 * scale  # objects may be cut by the border a little, never mostly
    unit = rng.random((k_total, _POSITION_TRIES, 2))
    candidates = (lo[:, None, None] + unit * (1.0 - 2.0 * lo)[:, None, None]).tolist()
    radii = scale.tolist()
    chosen: list[list[float]] = []
    # Plain Python floats: K and the tries are small, numpy call overhead would dominate.
    for k in range(k_total):
        best, best_ratio = candidates[k][0], -1.0
        for cy, cx in candidates[k]:
            worst = min(
                (
                    ((cy - py) ** 2 + (cx - px) ** 2) ** 0.5
                    / max(separation * (radii[k] + radii[j]), 1e-12)
                    for j, (py, px) in enumerate(chosen)
                ),
                default=np.inf,
            )
            if worst >= 1.0:  # the first acceptable candidate
                best = [cy, cx]
                break
            if worst > best_ratio:  # else the least crowded one
                best, best_ratio = [cy, cx], worst
        chosen.append(best)
    return np.asarray(chosen, np.float64).reshape(k_total, 2)


def _background(rng: np.random.Generator, image_size: int, varied: bool = True) -> np.ndarray:
    """A muted uniform colour or (varied) a gentle linear gradient; float32 [H, W, 3]."""
    u = rng.random(5)  # one call: Generator calls cost microseconds each
    base = BACKGROUNDS[int(u[0] * len(BACKGROUNDS))].astype(np.float32)  # [3]
    # 0: uniform, 1: vertical, 2: horizontal, 3: diagonal gradient
    kind = int(u[1] * 4) if varied else 0
    delta = (u[2:] * 50.0 - 25.0).astype(np.float32)  # [3] in [-25, 25)
    # Darkest background + most negative delta stays above 0, brightest + 25 below 255.
    ramp = (np.arange(image_size, dtype=np.float32) + 0.5) / image_size  # [H]
    line = base + ramp[:, None] * delta  # [H, 3]
    if kind == 0:
        return np.tile(base, (image_size, image_size, 1))
    if kind == 1:
        return np.repeat(line[:, None, :], image_size, axis=1)
    if kind == 2:
        return np.repeat(line[None, :, :], image_size, axis=0)
    t = 0.5 * (ramp[:, None] + ramp[None, :])  # [H, W]
    return base + t[..., None] * delta


def generate_scene(
    index: int,
    *,
    seed: int,
    image_size: int = 64,
    min_objects: int = 3,
    max_objects: int = 6,
    antialias: bool = True,
    min_visible_pixels: int = 4,
    style: str | SceneStyle = "classic",
) -> dict[str, np.ndarray]:
    """One scene, a pure function of (seed, index, style); see the module docstring for the keys."""
    if not 1 <= min_objects <= max_objects:
        raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
    if max_objects > 255:
        raise ValueError("max_objects must fit the uint8 mask (<= 255)")
    look = scene_style(style)
    rng = np.random.default_rng([int(seed), int(index)])
    num = min_objects + int(rng.random() * (max_objects - min_objects + 1))
    # Uniform draws turned into categories: one Generator call instead of one per property.
    u = rng.random((4, num))
    shape = (u[0] * len(SHAPES)).astype(np.int64)  # [K]
    if look.distinct_colors:
        if num > len(COLORS):
            raise ValueError(f"distinct colours need at most {len(COLORS)} objects, got {num}")
        # The same uniform draws, each picking among the colours not taken yet.
        free = list(range(len(COLORS)))
        color = np.array([free.pop(int(v * (len(COLORS) - k))) for k, v in enumerate(u[1])],
                         np.int64)
    else:
        color = (u[1] * len(COLORS)).astype(np.int64)
    size = (u[2] * len(SIZES)).astype(np.int64)
    ranges = np.asarray(look.scale_ranges, np.float64)  # [len(SIZES), 2]
    lo, hi = ranges[size, 0], ranges[size, 1]
    scale = lo + u[3] * (hi - lo)  # [K]
    position = _sample_positions(rng, scale, look.min_centre_separation)  # [K, 2]

    image = _background(rng, image_size, look.background == "varied")  # [H, W, 3] float32
    rgb = PALETTE[color].astype(np.float32)  # [K, 3]
    angle = np.zeros(num)
    # Drawn after everything the classic style draws, so classic scenes stay what they were.
    if look.color_jitter:
        jitter = (rng.random((num, 3)) * 2.0 - 1.0) * look.color_jitter
        rgb = np.clip(rgb + jitter.astype(np.float32), 0.0, 255.0)
    if look.rotate:
        angle = rng.random(num) * 2.0 * np.pi
    mask = np.zeros((image_size, image_size), np.uint8)  # [H, W]
    centres = position * image_size  # pixels
    radii = scale * image_size
    for k in range(num):
        cy, cx, r = centres[k, 0], centres[k, 1], radii[k]
        reach = _EXTENT * r + 1.0
        y0, y1 = max(0, int(cy - reach)), min(image_size, int(np.ceil(cy + reach)) + 1)
        x0, x1 = max(0, int(cx - reach)), min(image_size, int(np.ceil(cx + reach)) + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        py = (np.arange(y0, y1, dtype=np.float32) + 0.5 - cy)[:, None]  # [h, 1]
        px = (np.arange(x0, x1, dtype=np.float32) + 0.5 - cx)[None, :]  # [1, w]
        dist = _signed_distance(int(shape[k]), py, px, float(r), float(angle[k]))  # [h, w]
        inside = dist <= 0.0
        if antialias:
            # Area coverage of a pixel by a straight edge at signed distance d: 0.5 - d, clipped.
            cover = np.minimum(np.maximum(0.5 - dist, 0.0), 1.0)
        else:
            cover = inside.astype(np.float32)
        window = image[y0:y1, x0:x1]  # view: painted in place
        window += cover[..., None] * (rgb[k] - window)
        mask[y0:y1, x0:x1][inside] = k + 1

    counts = np.bincount(mask.ravel(), minlength=num + 1)[1:]  # [K]

    def padded(x: np.ndarray, dtype: Any) -> np.ndarray:
        out = np.zeros((max_objects,) + x.shape[1:], dtype)  # np.pad is 10x slower here
        out[:num] = x
        return out

    return {
        "image": (image + 0.5).astype(np.uint8),  # [H, W, 3]; values already in [0, 255]
        "mask": mask,  # [H, W]
        "shape": padded(shape, np.int32),  # [max_objects]
        "color": padded(color, np.int32),
        "size": padded(size, np.int32),
        "scale": padded(scale, np.float32),
        "position": padded(position, np.float32),  # [max_objects, 2]
        "visible": padded(counts >= min_visible_pixels, np.float32),
        "num_objects": np.int32(num),
    }


def generate_batch(indices: Sequence[int], **kwargs: Any) -> dict[str, np.ndarray]:
    """Scenes for several indices stacked on a leading batch axis; kwargs as generate_scene."""
    scenes = [generate_scene(int(i), **kwargs) for i in indices]
    return {key: np.stack([s[key] for s in scenes]) for key in scenes[0]}


class SyntheticScenes:
    """Random-access source (grain `RandomAccessDataSource` protocol) of synthetic scenes.

    Record `i` is `generate_scene(index_offset + i, seed=seed, ...)`: splits of the same seed use
    disjoint index ranges (see `fixed_slots.data.sources`).
    """

    def __init__(
        self,
        num_examples: int,
        *,
        seed: int,
        image_size: int = 64,
        min_objects: int = 3,
        max_objects: int = 6,
        index_offset: int = 0,
        antialias: bool = True,
        style: str = "classic",
    ):
        if num_examples <= 0:
            raise ValueError(f"num_examples must be positive, got {num_examples}")
        look = scene_style(style)  # an unknown name fails here, not in a loader worker
        if look.distinct_colors and max_objects > len(COLORS):
            raise ValueError(f"scene style {style!r} gives every object its own colour: "
                             f"max_objects={max_objects} exceeds the {len(COLORS)} colours")
        self._num_examples = int(num_examples)
        self._index_offset = int(index_offset)
        self._kwargs = dict(
            seed=int(seed),
            image_size=int(image_size),
            min_objects=int(min_objects),
            max_objects=int(max_objects),
            antialias=bool(antialias),
        )
        if style != "classic":  # keeps repr (stored in iterator checkpoints) of classic sources
            self._kwargs["style"] = str(style)

    def __len__(self) -> int:
        return self._num_examples

    def __getitem__(self, record_key: int) -> dict[str, np.ndarray]:
        key = int(record_key)
        if not 0 <= key < self._num_examples:
            raise IndexError(f"record {key} out of range [0, {self._num_examples})")
        return generate_scene(self._index_offset + key, **self._kwargs)

    def __repr__(self) -> str:
        # grain stores repr(source) in iterator checkpoints and checks it on restore.
        args = ", ".join(f"{k}={v}" for k, v in self._kwargs.items())
        return (
            f"SyntheticScenes(num_examples={self._num_examples}, "
            f"index_offset={self._index_offset}, {args})"
        )
