"""The FID variant of InceptionV3 in Flax NNX, its weight loader/converter, and `compute_fid`.

This reproduces pytorch-fid's `fid_inception_v3` (the port of the TensorFlow FID graph,
`inception-2015-12-05`): torchvision's Inception3 with the `FIDInceptionA/C/E_1/E_2` patches.
The TF-FID quirks that matter for comparable numbers:
- the 3x3 average pools in the A, C and E blocks exclude the zero padding from the average
  (`count_include_pad=False`);
- the last block (Mixed_7c, `FIDInceptionE_2`) max-pools in its pool branch;
- inputs in [0, 1] are resized to 299x299 with bilinear interpolation (half-pixel centres, no
  antialiasing: `F.interpolate(..., mode="bilinear", align_corners=False)`), then mapped to [-1, 1];
- BatchNorm in inference mode with eps 1e-3; features are the 2048-d global average pool.

Layout is NHWC throughout. Weights come from pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`
(a PyTorch state_dict), converted once to `.npz` keyed by the PyTorch names:

    python -m fixed_slots.eval.inception convert --src=pt_inception-2015-12-05-6726825d.pth \
        --dst=fid_inception.npz

The converter uses torch when it is installed and otherwise `fixed_slots.eval.torch_pickle`, a
small reader of the torch serialization formats, so torch is not a dependency.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
from typing import Any, Callable, Iterable, Optional, Sequence, Union

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from fixed_slots.eval import metrics
from fixed_slots.eval.torch_pickle import read_torch_state_dict

FID_INCEPTION_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
FID_RESOLUTION = 299
FEATURE_DIM = 2048
# Keys of the standard state_dict that the feature extractor does not use: the 1008-way
# classifier and BatchNorm's step counters.
_UNUSED_KEY_SUFFIXES = (".num_batches_tracked",)
_UNUSED_KEYS = ("fc.weight", "fc.bias")

_HIGHEST = jax.lax.Precision.HIGHEST
IntPair = Union[int, tuple[int, int]]


def _pair(v: IntPair) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


# ----------------------------------------------------------------------------------------------
# Architecture
# ----------------------------------------------------------------------------------------------


def _host_lecun_normal(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    """LeCun-normal kernel init drawn with NumPy from the (concrete) JAX key.

    jax.random initialisers compile one XLA program per kernel shape, ~30 s for this network's
    94 convolutions on a small CPU; the weights are normally overwritten by the loader anyway.
    """
    try:
        seed = np.asarray(jax.random.key_data(key)).ravel()
    except jax.errors.TracerArrayConversionError:
        # Traced construction (e.g. under jit/eval_shape): use the regular initialiser.
        return nnx.initializers.lecun_normal()(key, shape, dtype)
    fan_in = int(np.prod(shape[:-1]))  # HWIO
    values = np.random.default_rng(seed.astype(np.uint64)).standard_normal(shape) / np.sqrt(fan_in)
    return jnp.asarray(values, dtype)


class BasicConv2d(nnx.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3, inference) -> ReLU, as torchvision's BasicConv2d."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntPair,
                 stride: IntPair = 1, padding: IntPair = 0, *, rngs: nnx.Rngs):
        kh, kw = _pair(kernel_size)
        ph, pw = _pair(padding)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = (kh, kw)
        self.conv = nnx.Conv(in_channels, out_channels, (kh, kw), strides=_pair(stride),
                             padding=((ph, ph), (pw, pw)), use_bias=False, precision=_HIGHEST,
                             kernel_init=_host_lecun_normal, rngs=rngs)
        self.bn = nnx.BatchNorm(out_channels, epsilon=1e-3, use_running_average=True, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.bn(self.conv(x)))


def _avg_pool_3x3_exclude_pad(x: jax.Array) -> jax.Array:
    # TF's average pool divides by the number of valid (non-padding) inputs.
    return nnx.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                        count_include_pad=False)


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    return nnx.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class FIDInceptionA(nnx.Module):
    """InceptionA with the padding-excluding average pool. [N,H,W,C] -> [N,H,W,224+pool]."""

    def __init__(self, in_channels: int, pool_features: int, *, rngs: nnx.Rngs):
        self.branch1x1 = BasicConv2d(in_channels, 64, 1, rngs=rngs)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, 1, rngs=rngs)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, rngs=rngs)
        self.branch_pool = BasicConv2d(in_channels, pool_features, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_3x3_exclude_pad(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nnx.Module):
    """Grid reduction 35 -> 17 (Mixed_6a). [N,H,W,C] -> [N,(H-3)//2+1,..,384+96+C]."""

    def __init__(self, in_channels: int, *, rngs: nnx.Rngs):
        self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = _max_pool_3x3_s2(x)
        return jnp.concatenate([b3, bd, bp], axis=-1)


class FIDInceptionC(nnx.Module):
    """InceptionC (factorised 7x7) with the padding-excluding average pool. -> [N,H,W,768]."""

    def __init__(self, in_channels: int, channels_7x7: int, *, rngs: nnx.Rngs):
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, 1, rngs=rngs)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, 1, rngs=rngs)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1, rngs=rngs)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch_pool = BasicConv2d(in_channels, 192, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        bd = self.branch7x7dbl_3(self.branch7x7dbl_2(bd))
        bd = self.branch7x7dbl_5(self.branch7x7dbl_4(bd))
        bp = self.branch_pool(_avg_pool_3x3_exclude_pad(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nnx.Module):
    """Grid reduction 17 -> 8 (Mixed_7a). -> [N,(H-3)//2+1,..,320+192+C]."""

    def __init__(self, in_channels: int, *, rngs: nnx.Rngs):
        self.branch3x3_1 = BasicConv2d(in_channels, 192, 1, rngs=rngs)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, rngs=rngs)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1, rngs=rngs)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_1(x)
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(b7)))
        bp = _max_pool_3x3_s2(x)
        return jnp.concatenate([b3, b7, bp], axis=-1)


class FIDInceptionE(nnx.Module):
    """InceptionE (expanded filter bank) -> [N,H,W,2048].

    `pool="avg"` is FIDInceptionE_1 (Mixed_7b, padding-excluding average pool); `pool="max"` is
    FIDInceptionE_2 (Mixed_7c), whose pool branch max-pools in the TF FID graph.
    """

    def __init__(self, in_channels: int, pool: str, *, rngs: nnx.Rngs):
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, 1, rngs=rngs)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, 1, rngs=rngs)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
        self.branch_pool = BasicConv2d(in_channels, 192, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=-1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = jnp.concatenate([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], axis=-1)
        if self.pool == "avg":
            pooled = _avg_pool_3x3_exclude_pad(x)
        else:
            # Max pool padded with -inf, as torch's F.max_pool2d(padding=1).
            pooled = nnx.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        bp = self.branch_pool(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def _bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] interpolation weights of torch's bilinear resize (align_corners=False)."""
    scale = in_size / out_size
    src = (np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5
    src = np.maximum(src, 0.0)  # torch clamps negative source coordinates to 0
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = np.clip(src - i0, 0.0, 1.0)
    m = np.zeros((out_size, in_size), np.float64)
    np.add.at(m, (np.arange(out_size), i0), 1.0 - w1)
    np.add.at(m, (np.arange(out_size), i1), w1)
    return m.astype(np.float32)


def resize_bilinear(x: jax.Array, height: int, width: int) -> jax.Array:
    """[N,H,W,C] -> [N,height,width,C] as torch's `F.interpolate(bilinear, align_corners=False)`.

    jax.image.resize antialiases when downsampling; torch (and hence pytorch-fid) does not.
    """
    n, h, w, c = x.shape
    if (h, w) == (height, width):
        return x
    rh = jnp.asarray(_bilinear_matrix(h, height))  # [height, h]
    rw = jnp.asarray(_bilinear_matrix(w, width))  # [width, w]
    x = jnp.einsum("oh,nhwc->nowc", rh, x, precision=_HIGHEST)
    return jnp.einsum("pw,nowc->nopc", rw, x, precision=_HIGHEST)


class FIDInceptionV3(nnx.Module):
    """pytorch-fid's FID InceptionV3 up to the 2048-d pool3 features.

    Call with images [N, H, W, 3] in [0, 1] -> [N, 2048]. With `resize_input=False` the network
    runs at the input resolution (fully convolutional; at least 75x75).
    """

    def __init__(self, resize_input: bool = True, normalize_input: bool = True, *,
                 rngs: Optional[nnx.Rngs] = None):
        rngs = nnx.Rngs(0) if rngs is None else rngs
        self.resize_input = resize_input
        self.normalize_input = normalize_input
        # Attribute names are the torchvision/pytorch-fid module names: the state_dict keys
        # map one to one onto this tree.
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, rngs=rngs)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, rngs=rngs)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, rngs=rngs)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, rngs=rngs)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, rngs=rngs)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32, rngs=rngs)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64, rngs=rngs)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64, rngs=rngs)
        self.Mixed_6a = InceptionB(288, rngs=rngs)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128, rngs=rngs)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160, rngs=rngs)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160, rngs=rngs)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192, rngs=rngs)
        self.Mixed_7a = InceptionD(768, rngs=rngs)
        self.Mixed_7b = FIDInceptionE(1280, pool="avg", rngs=rngs)
        self.Mixed_7c = FIDInceptionE(2048, pool="max", rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.asarray(x, jnp.float32)
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected images [N, H, W, 3], got {x.shape}")
        if self.resize_input:
            x = resize_bilinear(x, FID_RESOLUTION, FID_RESOLUTION)
        if self.normalize_input:
            x = 2 * x - 1  # [0, 1] -> [-1, 1]
        x = self.Conv2d_1a_3x3(x)  # [N,149,149,32] at 299
        x = self.Conv2d_2a_3x3(x)  # [N,147,147,32]
        x = self.Conv2d_2b_3x3(x)  # [N,147,147,64]
        x = _max_pool_3x3_s2(x)  # [N,73,73,64]
        x = self.Conv2d_3b_1x1(x)  # [N,73,73,80]
        x = self.Conv2d_4a_3x3(x)  # [N,71,71,192]
        x = _max_pool_3x3_s2(x)  # [N,35,35,192]
        x = self.Mixed_5b(x)  # [N,35,35,256]
        x = self.Mixed_5c(x)  # [N,35,35,288]
        x = self.Mixed_5d(x)  # [N,35,35,288]
        x = self.Mixed_6a(x)  # [N,17,17,768]
        x = self.Mixed_6b(x)
        x = self.Mixed_6c(x)
        x = self.Mixed_6d(x)
        x = self.Mixed_6e(x)  # [N,17,17,768]
        x = self.Mixed_7a(x)  # [N,8,8,1280]
        x = self.Mixed_7b(x)  # [N,8,8,2048]
        x = self.Mixed_7c(x)  # [N,8,8,2048]
        return jnp.mean(x, axis=(1, 2))  # adaptive average pool -> [N,2048]


# ----------------------------------------------------------------------------------------------
# State-dict names <-> NNX variables
# ----------------------------------------------------------------------------------------------


def named_conv_blocks(model: FIDInceptionV3) -> dict[str, BasicConv2d]:
    """PyTorch module name (e.g. "Mixed_5b.branch1x1") -> BasicConv2d, in definition order."""
    blocks = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, BasicConv2d):
            blocks[".".join(str(p) for p in path)] = node
    return blocks


def torch_state_dict_shapes(model: FIDInceptionV3) -> dict[str, tuple[int, ...]]:
    """The state_dict entries the feature extractor needs (name -> PyTorch shape).

    Derived from the architecture: each BasicConv2d contributes `conv.weight` [O, I, kh, kw] and
    `bn.{weight,bias,running_mean,running_var}` [O]. `fc.*` and `*.num_batches_tracked` may also
    be present in a checkpoint and are ignored.
    """
    shapes = {}
    for name, block in named_conv_blocks(model).items():
        kh, kw = block.kernel_size
        shapes[f"{name}.conv.weight"] = (block.out_channels, block.in_channels, kh, kw)
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.bn.{leaf}"] = (block.out_channels,)
    return shapes


def _is_unused_key(key: str) -> bool:
    return key in _UNUSED_KEYS or key.endswith(_UNUSED_KEY_SUFFIXES)


def load_state_dict_into(model: FIDInceptionV3, state_dict: dict[str, np.ndarray]) -> None:
    """Copies a PyTorch-named state_dict into the model (conv OIHW -> HWIO; BN stats)."""
    expected = torch_state_dict_shapes(model)
    missing = sorted(k for k in expected if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in expected and not _is_unused_key(k))
    if missing or unexpected:
        raise ValueError(
            "state_dict does not match the FID Inception architecture: "
            f"{len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}).")
    for key, shape in expected.items():
        got = tuple(np.shape(state_dict[key]))
        if got != shape:
            raise ValueError(f"{key}: expected shape {shape}, got {got}")
    for name, block in named_conv_blocks(model).items():
        w = np.asarray(state_dict[f"{name}.conv.weight"], np.float32)
        block.conv.kernel.set_value(jnp.asarray(w.transpose(2, 3, 1, 0)))  # OIHW -> HWIO
        block.bn.scale.set_value(jnp.asarray(state_dict[f"{name}.bn.weight"], jnp.float32))
        block.bn.bias.set_value(jnp.asarray(state_dict[f"{name}.bn.bias"], jnp.float32))
        block.bn.mean.set_value(jnp.asarray(state_dict[f"{name}.bn.running_mean"],
                                            jnp.float32))
        block.bn.var.set_value(jnp.asarray(state_dict[f"{name}.bn.running_var"], jnp.float32))


def _missing_weights_error(path: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"FID Inception weights not found at {path!r}. Download pytorch-fid's "
        f"{FID_INCEPTION_FILENAME} (release 'fid_weights' of mseitzer/pytorch-fid) and convert it "
        f"with: python -m fixed_slots.eval.inception convert --src={FID_INCEPTION_FILENAME} "
        f"--dst=fid_inception.npz")


def load_fid_inception_weights(model: FIDInceptionV3, path: str) -> FIDInceptionV3:
    """Loads converted weights (`.npz` keyed by PyTorch names, or the `.pth` itself) in place."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise _missing_weights_error(path)
    if path.endswith(".npz"):
        with np.load(path) as f:
            state_dict = {k: f[k] for k in f.files}
    else:
        state_dict = read_torch_state_dict(path)
    load_state_dict_into(model, state_dict)
    return model


def convert_torch_weights(src: str, dst: str, use_torch: Optional[bool] = None) -> int:
    """Writes the state_dict at `src` to an `.npz` at `dst` keyed by the PyTorch names.

    The input is read (every tensor view checked against its storage) and matched against the
    FID Inception architecture (names and shapes) before anything is written; `dst` appears
    whole or not at all (written beside it, then renamed), and an existing `dst` is replaced only
    by a good conversion.
    """
    if not os.path.isfile(src):
        raise _missing_weights_error(src)
    if not os.fspath(dst).endswith(".npz"):
        raise ValueError(f"--dst={dst!r} must end in .npz (what load_fid_inception_weights reads)")
    state_dict = read_torch_state_dict(src, use_torch=use_torch)
    try:
        load_state_dict_into(nnx.eval_shape(lambda: FIDInceptionV3()), state_dict)
    except ValueError as e:
        raise ValueError(f"{src}: {e}; nothing written to {dst}") from None
    directory = os.path.dirname(os.path.abspath(dst))
    os.makedirs(directory, exist_ok=True)
    partial = os.path.join(directory, f".{os.path.basename(dst)}.partial-{os.getpid()}")
    try:
        with open(partial, "wb") as f:
            np.savez(f, **state_dict)
        os.replace(partial, dst)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return len(state_dict)


# ----------------------------------------------------------------------------------------------
# FID
# ----------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=0)
def _features(graphdef: nnx.GraphDef, state: nnx.State, images: jax.Array) -> jax.Array:
    # Module-level so that repeated calls with the same architecture reuse one compilation.
    return nnx.merge(graphdef, state)(images)


def _feature_fn(model: FIDInceptionV3) -> Callable[[jax.Array], jax.Array]:
    graphdef, state = nnx.split(model)
    return lambda images: _features(graphdef, state, images)


def _as_unit_float(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 255.0
    return images.astype(np.float32)


def inception_activations(model: FIDInceptionV3, images: np.ndarray,
                          batch_size: int = 50) -> np.ndarray:
    """images [N, H, W, 3] (uint8, or float in [0, 1]) -> pool3 features [N, 2048] float64.

    Every image is used (the last batch is padded to `batch_size` so one compilation serves all).
    """
    images = np.asarray(images)
    fn = _feature_fn(model)
    n = images.shape[0]
    out = np.empty((n, FEATURE_DIM), np.float64)
    for start in range(0, n, batch_size):
        batch = _as_unit_float(images[start:start + batch_size])
        valid = batch.shape[0]
        if valid < batch_size and n > batch_size:
            pad = np.zeros((batch_size - valid,) + batch.shape[1:], batch.dtype)
            batch = np.concatenate([batch, pad], axis=0)
        out[start:start + valid] = np.asarray(fn(jnp.asarray(batch)))[:valid]
    return out


def compute_fid(real_images: np.ndarray, fake_images: np.ndarray, weights_path: str,
                batch_size: int = 50, model: Optional[FIDInceptionV3] = None) -> float:
    """FID between two image sets [N, H, W, 3] (uint8 or [0, 1] floats), pytorch-fid compatible.

    `weights_path` is the converted `.npz` (or the original `.pth`); a missing file raises
    FileNotFoundError with conversion instructions. Pass `model` to reuse loaded weights.
    """
    if model is None:
        model = load_fid_inception_weights(FIDInceptionV3(), weights_path)
    mu1, sigma1 = metrics.activation_statistics(inception_activations(model, real_images,
                                                                      batch_size))
    mu2, sigma2 = metrics.activation_statistics(inception_activations(model, fake_images,
                                                                      batch_size))
    return metrics.frechet_distance(mu1, sigma1, mu2, sigma2)


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def main(argv: Optional[Iterable[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fixed_slots.eval.inception",
                                     description="FID Inception weight tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="convert a PyTorch state_dict (.pth) to .npz")
    conv.add_argument("--src", required=True, help=f"path to {FID_INCEPTION_FILENAME}")
    conv.add_argument("--dst", required=True, help="output .npz path")
    conv.add_argument("--no-torch", action="store_true",
                      help="use the built-in reader even if torch is installed")
    args = parser.parse_args(None if argv is None else list(argv))
    if args.command == "convert":
        try:
            count = convert_torch_weights(args.src, args.dst,
                                          use_torch=False if args.no_torch else None)
        except (ValueError, OSError) as e:  # a bad or missing input, an unwritable output
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"wrote {count} arrays to {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
