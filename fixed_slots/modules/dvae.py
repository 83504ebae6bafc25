"""The discrete VAE of SLATE (Singh et al., ICLR 2022), as the official code builds it.

Layer for layer the same as `dvae.py`/`utils.py` of singhgautam/slate, in NHWC:
- `Conv2dBlock`: conv without bias (Kaiming-uniform, ReLU gain) -> GroupNorm(1 group, learned
  scale and shift, eps 1e-5) -> ReLU.
- encoder: 4x4/stride-4 block to `hidden`, six 1x1 blocks, 1x1 conv (Xavier, zero bias) to
  `vocab_size` logits, log-softmax over the vocabulary.
- decoder: 1x1 block, 3x3 block (pad 1), two 1x1 blocks, 1x1 block to 4*hidden, pixel shuffle x2,
  the same again, then a 1x1 conv (Xavier, zero bias) to the image channels. No output squashing
  (the official code clamps to [0, 1] only for display).

Also the relaxation and schedule helpers of the official code: `gumbel_softmax`, `gumbel_max`,
`cosine_anneal` (Gumbel temperature; the learning-rate warmup is in train/optim.py).
"""
from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from fixed_slots.modules.dtypes import at_least_float32
from fixed_slots.modules.norms import group_norm

# torch.nn.init.kaiming_uniform_(w, nonlinearity='relu'): U(-b, b), b = sqrt(6 / fan_in).
kaiming_uniform = jax.nn.initializers.variance_scaling(2.0, "fan_in", "uniform")
# torch.nn.init.xavier_uniform_(w): U(-b, b), b = sqrt(6 / (fan_in + fan_out)).
xavier_uniform = jax.nn.initializers.xavier_uniform()

Dtype = Any


class Conv2d(nnx.Conv):
    """`nnx.Conv` whose 1x1, stride-1, unpadded case runs as a matmul over the channels.

    The same parameters (kernel [1, 1, C_in, C_out], bias) and the same function, to float32
    rounding. Why: XLA's CPU backend runs a pointwise convolution's weight gradient as a
    convolution over transposed copies, a dot over the last axis as one GEMM each way; the
    dVAE, mostly 1x1 blocks, trains 12% faster so (BENCHMARKS.md, the CPU step). Its gradient
    is `pointwise_matmul`'s own (reverse mode only: `jax.jvp` through a pointwise Conv2d raises).
    """

    def _is_pointwise(self) -> bool:
        def unit(value) -> bool:
            return value is None or value == 1 or tuple(value) == (1,) * len(self.kernel_size)
        return (tuple(self.kernel_size) == (1, 1) and unit(self.strides)
                and unit(self.kernel_dilation) and unit(self.input_dilation)
                and self.feature_group_count == 1 and self.mask is None
                and self.padding in (((0, 0), (0, 0)), "VALID", 0)
                and getattr(self, "preferred_element_type", None) is None)

    def __call__(self, inputs: jax.Array, **kwargs) -> jax.Array:
        if kwargs or not self._is_pointwise():
            return super().__call__(inputs, **kwargs)
        kernel = self.kernel[...][0, 0]  # [C_in, C_out]
        bias = self.bias[...] if self.bias is not None else None
        # nnx.Conv's promotion: everything to `dtype` when given, else to the common type.
        dtype = self.dtype or jnp.result_type(inputs, kernel, *([] if bias is None else [bias]))
        inputs, kernel = inputs.astype(dtype), kernel.astype(dtype)
        # [..., H, W, C_in] x [C_in, C_out] -> [..., H, W, C_out]
        y = pointwise_matmul(inputs, kernel, self.precision)  # [..., H, W, C_out]
        return y if bias is None else y + bias.astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _pointwise(x: jax.Array, w: jax.Array, precision: Any) -> jax.Array:
    # [..., C_in] x [C_in, C_out] -> [..., C_out]
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)


def _pointwise_fwd(x, w, precision):
    return _pointwise(x, w, precision), (x, w)


def _pointwise_bwd(precision, residuals, dy):
    x, w = residuals
    # The barrier keeps XLA from fusing the cotangent's producer (GroupNorm's backward in a
    # Conv2dBlock) into the transposed copy the weight gradient's GEMM wants: that fusion wrote
    # its [C_out, N] output with a stride of C_out floats per read, 15 ms of every default CPU
    # step on its own (BENCHMARKS.md); materialised first, the copy is a plain transpose.
    dy = jax.lax.optimization_barrier(dy)
    dx = jax.lax.dot_general(dy, w, (((dy.ndim - 1,), (1,)), ((), ())), precision=precision)
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])  # [N, C_in], [N, C_out]
    dw = jax.lax.dot_general(x2, dy2, (((0,), (0,)), ((), ())), precision=precision)
    return dx, dw


_pointwise.defvjp(_pointwise_fwd, _pointwise_bwd)


def pointwise_matmul(x: jax.Array, w: jax.Array, precision: Any = None) -> jax.Array:
    """x @ w over the last axis ([..., C_in] x [C_in, C_out] -> [..., C_out]), the gradient
    written out: dx = dy w^T, dw = x^T dy over every leading position, dy materialised first."""
    return _pointwise(x, w, precision)


def conv2d(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int = 1,
    padding: int = 0,
    *,
    use_bias: bool = True,
    weight_init: str = "xavier",
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    rngs: nnx.Rngs,
) -> Conv2d:
    """The official `conv2d` helper: explicit integer padding, Xavier or Kaiming init, zero bias."""
    init = kaiming_uniform if weight_init == "kaiming" else xavier_uniform
    return Conv2d(
        in_channels,
        out_channels,
        kernel_size=(kernel_size, kernel_size),
        strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        use_bias=use_bias,
        kernel_init=init,
        bias_init=jax.nn.initializers.zeros,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


class Conv2dBlock(nnx.Module):
    """conv (no bias, Kaiming-uniform) -> GroupNorm with one group -> ReLU."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        *,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.conv = conv2d(
            in_channels, out_channels, kernel_size, stride, padding,
            use_bias=False, weight_init="kaiming", dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # F.group_norm(x, 1, weight, bias): statistics over (H, W, C) per image, eps 1e-5.
        self.norm = group_norm(out_channels, 1, epsilon=1e-5, dtype=dtype,
                               param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        # [B, H, W, C_in] -> [B, H', W', C_out]
        return jax.nn.relu(self.norm(self.conv(x)))


def pixel_shuffle(x: jax.Array, factor: int) -> jax.Array:
    """NHWC version of torch.nn.PixelShuffle: channel c*r*r + i*r + j goes to pixel (i, j) of c."""
    b, h, w, c = x.shape
    r = factor
    out_c = c // (r * r)
    x = x.reshape(b, h, w, out_c, r, r)  # [B, H, W, C, r_i, r_j]
    x = x.transpose(0, 1, 4, 2, 5, 3)  # [B, H, r_i, W, r_j, C]
    return x.reshape(b, h * r, w * r, out_c)


class PixelShuffle(nnx.Module):
    """Parameter-free module wrapper of `pixel_shuffle` (for use inside nnx.Sequential)."""

    def __init__(self, factor: int):
        self.factor = factor

    def __call__(self, x: jax.Array) -> jax.Array:
        # [B, H, W, C*r*r] -> [B, H*r, W*r, C]
        return pixel_shuffle(x, self.factor)


class DVAE(nnx.Module):
    """SLATE's discrete VAE: images [B, H, W, C] <-> token grids [B, H/4, W/4, vocab]."""

    def __init__(
        self,
        vocab_size: int,
        img_channels: int = 3,
        hidden: int = 64,
        *,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.vocab_size = vocab_size
        self.img_channels = img_channels
        self.hidden = hidden
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        h = hidden
        self.encoder = nnx.Sequential(
            Conv2dBlock(img_channels, h, 4, 4, **kw),
            *[Conv2dBlock(h, h, 1, 1, **kw) for _ in range(6)],
            conv2d(h, vocab_size, 1, **kw),
        )
        self.decoder = nnx.Sequential(
            Conv2dBlock(vocab_size, h, 1, **kw),
            Conv2dBlock(h, h, 3, 1, 1, **kw),
            Conv2dBlock(h, h, 1, 1, **kw),
            Conv2dBlock(h, h, 1, 1, **kw),
            Conv2dBlock(h, h * 2 * 2, 1, **kw),
            PixelShuffle(2),
            Conv2dBlock(h, h, 3, 1, 1, **kw),
            Conv2dBlock(h, h, 1, 1, **kw),
            Conv2dBlock(h, h, 1, 1, **kw),
            Conv2dBlock(h, h * 2 * 2, 1, **kw),
            PixelShuffle(2),
            conv2d(h, img_channels, 1, **kw),
        )

    def encode(self, image: jax.Array) -> jax.Array:
        """Image [B, H, W, C] in [0, 1] -> token log-probabilities [B, H/4, W/4, vocab]."""
        logits = self.encoder(image)  # [B, H/4, W/4, vocab]
        # Normalise in float32: the log-probabilities feed the Gumbel sampler and argmax.
        return jax.nn.log_softmax(at_least_float32(logits), axis=-1)

    def decode(self, z: jax.Array) -> jax.Array:
        """(Relaxed) one-hot grid [B, h, w, vocab] -> image [B, 4h, 4w, C] (not clamped)."""
        return self.decoder(z)

    def __call__(self, image: jax.Array, key: jax.Array, tau: float | jax.Array,
                 hard: bool = False) -> tuple[jax.Array, jax.Array]:
        """Encode, sample with Gumbel-softmax, decode: returns (recon [B,H,W,C], log_probs)."""
        log_probs = self.encode(image)  # [B, h, w, vocab]
        z = gumbel_softmax(key, log_probs, tau, hard, axis=-1)
        return self.decode(z.astype(image.dtype)), log_probs


def _gumbel_noise(key: jax.Array, shape: tuple[int, ...], dtype: Dtype) -> jax.Array:
    # The official sampler: -log(Exp(1) + tiny), tiny guards log(0). Drawn in float32 whatever
    # the logits' dtype, so a float64 model sees the same noise as the float32 one.
    eps = jnp.finfo(jnp.float32).tiny
    return (-jnp.log(jax.random.exponential(key, shape, jnp.float32) + eps)).astype(dtype)


def argmax(x: jax.Array, axis: int = -1) -> jax.Array:
    """`jnp.argmax(x, axis)` (the first maximum; the first NaN where there is one), as two plain
    reductions: XLA's CPU backend runs argmax's (value, index) reduction as a scalar loop, 3.6x
    slower on the dVAE's [16, 12, 12, 64] tokens (BENCHMARKS.md)."""
    axis = axis % x.ndim
    top = jnp.max(x, axis=axis, keepdims=True)  # NaN wherever a NaN is
    index = jax.lax.broadcasted_iota(jnp.int32, x.shape, axis)
    hit = (x == top) | jnp.isnan(x)
    return jnp.min(jnp.where(hit, index, x.shape[axis]), axis=axis)


def gumbel_max(key: jax.Array, logits: jax.Array, axis: int = -1) -> jax.Array:
    """Sample a categorical index with the Gumbel-max trick (integer array, `axis` removed)."""
    return argmax(logits + _gumbel_noise(key, logits.shape, logits.dtype), axis=axis)


def gumbel_softmax(key: jax.Array, logits: jax.Array, tau: float | jax.Array = 1.0,
                   hard: bool = False, axis: int = -1) -> jax.Array:
    """Gumbel-softmax sample along `axis`; `hard` gives one-hots with straight-through gradient."""
    gumbels = (logits + _gumbel_noise(key, logits.shape, logits.dtype)) / tau
    y_soft = jax.nn.softmax(gumbels, axis=axis)
    if not hard:
        return y_soft
    index = argmax(y_soft, axis=axis)
    y_hard = jax.nn.one_hot(index, logits.shape[axis], dtype=y_soft.dtype, axis=axis)
    # Forward value is the one-hot, gradient is that of the soft sample.
    return y_hard - jax.lax.stop_gradient(y_soft) + y_soft


def _is_python_number(*xs: Any) -> bool:
    return all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)


def cosine_anneal(step: int | jax.Array, start_value: float, final_value: float,
                  start_step: int, final_step: int) -> float | jax.Array:
    """Official SLATE `cosine_anneal`: start_value until start_step, cosine down to final_value.

    Python numbers in give a Python float (the official code exactly); a traced or array `step`
    gives a jnp scalar, so the schedule can live inside a jitted train step.
    """
    assert start_value >= final_value
    assert start_step <= final_step
    if _is_python_number(step):
        if step < start_step:
            return float(start_value)
        if step >= final_step:
            return float(final_value)
        a = 0.5 * (start_value - final_value)
        b = 0.5 * (start_value + final_value)
        progress = (step - start_step) / (final_step - start_step)
        return a * math.cos(math.pi * progress) + b
    step = jnp.asarray(step, jnp.float32)
    span = max(final_step - start_step, 1)
    progress = jnp.clip((step - start_step) / span, 0.0, 1.0)
    a = 0.5 * (start_value - final_value)
    b = 0.5 * (start_value + final_value)
    value = a * jnp.cos(jnp.pi * progress) + b
    value = jnp.where(step < start_step, start_value, value)
    return jnp.where(step >= final_step, final_value, value)
