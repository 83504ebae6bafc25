"""Spatial broadcast decoder of Locatello et al. (google-research `slot_attention/model.py`).

Each slot is tiled over an initial grid, gets a soft position embedding, and goes through
transposed 5x5 convolutions (ReLU, 'SAME'); a last 3x3 transposed conv gives RGB plus one alpha
logit per pixel. Alpha logits are softmax-normalised over the slots and the per-slot images
are mixed with them. Defaults are the 128x128 CLEVR model (8x8 start, strides 2,2,2,2,1);
the small variant broadcasts to the full resolution and uses stride 1 everywhere.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from fixed_slots.modules.dtypes import at_least_float32
from fixed_slots.modules.encoders import SoftPositionEmbed

Dtype = Any

glorot_uniform = jax.nn.initializers.xavier_uniform()


def spatial_broadcast(slots: jax.Array, resolution: Sequence[int]) -> jax.Array:
    """slots [B, S, D] -> grid [B*S, h, w, D] (slot and batch axes merged)."""
    b, s, d = slots.shape
    x = slots.reshape(b * s, 1, 1, d)
    return jnp.broadcast_to(x, (b * s, resolution[0], resolution[1], d))


def alpha_composite(
    x: jax.Array, batch_size: int, num_channels: int = 3
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """[B*S, H, W, C+1] -> (recon [B,H,W,C], recons [B,S,H,W,C], masks [B,S,H,W,1])."""
    x = x.reshape(batch_size, -1, *x.shape[1:])  # [B, S, H, W, C+1]
    recons, logits = x[..., :num_channels], x[..., num_channels:]
    # Softmax over the slots axis in float32: the masks must sum to one per pixel.
    masks = jax.nn.softmax(at_least_float32(logits), axis=1)  # [B, S, H, W, 1]
    recon = jnp.sum(at_least_float32(recons) * masks, axis=1)  # [B, H, W, C]
    return recon, recons, masks


class SpatialBroadcastDecoder(nnx.Module):
    """Slots [B, S, D] -> (recon [B,H,W,C], per-slot recons [B,S,H,W,C], masks [B,S,H,W,1])."""

    def __init__(
        self,
        slot_size: int,
        resolution: Sequence[int],
        initial_resolution: Sequence[int] = (8, 8),
        features: Sequence[int] = (64, 64, 64, 64, 64),
        strides: Sequence[int] = (2, 2, 2, 2, 1),
        kernel_size: int = 5,
        final_kernel_size: int = 3,
        out_channels: int = 3,
        *,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        assert len(features) == len(strides), "one stride per transposed conv"
        self.resolution = tuple(int(r) for r in resolution)
        self.initial_resolution = tuple(int(r) for r in initial_resolution)
        self.out_channels = out_channels
        up = math.prod(strides)
        if tuple(r * up for r in self.initial_resolution) != self.resolution:
            raise ValueError(
                f"initial resolution {self.initial_resolution} times the stride product {up} "
                f"must equal the output resolution {self.resolution}")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.pos = SoftPositionEmbed(slot_size, self.initial_resolution, **kw)
        chans = [slot_size, *features]
        self.deconvs = nnx.List([
            nnx.ConvTranspose(chans[i], chans[i + 1], (kernel_size, kernel_size),
                              strides=(s, s), padding="SAME", kernel_init=glorot_uniform, **kw)
            for i, s in enumerate(strides)
        ])
        self.final = nnx.ConvTranspose(chans[-1], out_channels + 1,
                                       (final_kernel_size, final_kernel_size), strides=(1, 1),
                                       padding="SAME", kernel_init=glorot_uniform, **kw)

    def __call__(self, slots: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """slots [B, S, D] -> (recon [B,H,W,C], recons [B,S,H,W,C], masks [B,S,H,W,1])."""
        x = spatial_broadcast(slots, self.initial_resolution)  # [B*S, h0, w0, D]
        x = self.pos(x)
        for deconv in self.deconvs:
            x = jax.nn.relu(deconv(x))  # [B*S, h, w, F]
        x = self.final(x)  # [B*S, H, W, C+1]
        return alpha_composite(x, slots.shape[0], self.out_channels)
