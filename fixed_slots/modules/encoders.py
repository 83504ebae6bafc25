"""Input encoders: Locatello et al.'s CNN + soft position embedding, SLATE's token embeddings.

- `SoftPositionEmbed`, `CNNEncoder`: google-research `slot_attention/model.py` (Keras defaults:
  Glorot-uniform kernels, zero biases, LayerNormalization eps 1e-3), in NHWC.
- `LearnedPositionEmbedding`, `TokenEmbedding`: SLATE's `PositionalEncoding` (learned table,
  truncated-normal init, dropout) and `OneHotDictionary` (nn.Embedding, N(0, 1) init).
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fixed_slots.modules.norms import layer_norm
from fixed_slots.modules.transformer import dropout

Dtype = Any

glorot_uniform = jax.nn.initializers.xavier_uniform()


def build_grid(resolution: Sequence[int]) -> np.ndarray:
    """Position grid [1, H, W, 4] with channels (row, col, 1 - row, 1 - col), each in [0, 1]."""
    ranges = [np.linspace(0.0, 1.0, num=res) for res in resolution]
    grid = np.stack(np.meshgrid(*ranges, sparse=False, indexing="ij"), axis=-1)  # [H, W, 2]
    grid = grid[None].astype(np.float32)  # [1, H, W, 2]
    return np.concatenate([grid, 1.0 - grid], axis=-1)


class SoftPositionEmbed(nnx.Module):
    """Adds a learned linear projection of the 4-channel position grid to a feature map."""

    def __init__(self, hidden_size: int, resolution: Sequence[int], *,
                 dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.resolution = tuple(int(r) for r in resolution)
        self.dense = nnx.Linear(4, hidden_size, kernel_init=glorot_uniform,
                                dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, H, W, hidden] -> x + dense(grid), same shape."""
        grid = jnp.asarray(build_grid(self.resolution))  # [1, H, W, 4], a compile-time constant
        return x + self.dense(grid).astype(x.dtype)


def conv_output_size(size: int, strides: Sequence[int]) -> int:
    """Spatial size after 'SAME' convolutions with these strides (ceil division each time)."""
    for s in strides:
        size = -(-size // s)
    return size


class CNNEncoder(nnx.Module):
    """Locatello et al.'s encoder: convs (ReLU, 'SAME') -> position embed -> flatten -> LN -> MLP.

    Defaults are the object-discovery model (four 5x5 convs, 64 channels, stride 1, MLP 64-64);
    the set-prediction variant uses `strides=(1, 2, 2, 1)`.
    """

    def __init__(
        self,
        resolution: Sequence[int],
        in_channels: int = 3,
        features: Sequence[int] = (64, 64, 64, 64),
        kernel_size: int = 5,
        strides: Sequence[int] = (1, 1, 1, 1),
        mlp_hidden: int = 64,
        out_features: int = 64,
        layer_norm_epsilon: float = 1e-3,
        *,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        assert len(features) == len(strides), "one stride per conv layer"
        self.resolution = tuple(int(r) for r in resolution)
        self.out_resolution = tuple(conv_output_size(r, strides) for r in self.resolution)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        chans = [in_channels, *features]
        self.convs = nnx.List([
            nnx.Conv(chans[i], chans[i + 1], (kernel_size, kernel_size), strides=(s, s),
                     padding="SAME", kernel_init=glorot_uniform, **kw)
            for i, s in enumerate(strides)
        ])
        self.pos = SoftPositionEmbed(features[-1], self.out_resolution, **kw)
        self.layer_norm = layer_norm(features[-1], epsilon=layer_norm_epsilon, **kw)
        self.mlp_in = nnx.Linear(features[-1], mlp_hidden, kernel_init=glorot_uniform, **kw)
        self.mlp_out = nnx.Linear(mlp_hidden, out_features, kernel_init=glorot_uniform, **kw)

    def __call__(self, image: jax.Array) -> jax.Array:
        """image [B, H, W, C] -> set of features [B, h*w, out_features]."""
        x = image
        for conv in self.convs:
            x = jax.nn.relu(conv(x))  # [B, h, w, F]
        x = self.pos(x)
        x = x.reshape(x.shape[0], -1, x.shape[-1])  # [B, h*w, F], row-major
        return self.mlp_out(jax.nn.relu(self.mlp_in(self.layer_norm(x))))


class LearnedPositionEmbedding(nnx.Module):
    """SLATE's `PositionalEncoding`: adds a learned table [max_len, d] then applies dropout."""

    def __init__(self, max_len: int, d_model: int, dropout: float = 0.0, *,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.max_len = max_len
        self.dropout = dropout
        # torch.nn.init.trunc_normal_ defaults: mean 0, std 1, cut at -2 and 2.
        init = jax.nn.initializers.truncated_normal(stddev=1.0, lower=-2.0, upper=2.0)
        self.pe = nnx.Param(init(rngs.params(), (max_len, d_model), param_dtype))

    def __call__(
        self,
        x: jax.Array,
        offset: int | jax.Array = 0,
        *,
        deterministic: bool = True,
        rng: jax.Array | None = None,
    ) -> jax.Array:
        """x [B, T, D] holding positions offset .. offset+T-1 -> x + pe, dropped out."""
        t = x.shape[1]
        if isinstance(offset, int):
            assert offset + t <= self.max_len, f"positions up to {offset + t} > {self.max_len}"
            pe = self.pe[...][offset:offset + t]
        else:
            # Traced offset (a decoding step): static-size slice at a dynamic start.
            pe = jax.lax.dynamic_slice_in_dim(self.pe[...], offset, t, axis=0)  # [T, D]
        return dropout(x + pe.astype(x.dtype), self.dropout, rng, deterministic)


class TokenEmbedding(nnx.Module):
    """Embedding table for token ids (SLATE: vocab + 1 entries, BOS at id 0), N(0, 1) init."""

    def __init__(self, num_embeddings: int, d_model: int, *,
                 dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.num_embeddings = num_embeddings
        self.embed = nnx.Embed(num_embeddings, d_model,
                               embedding_init=jax.nn.initializers.normal(stddev=1.0),
                               dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, ids: jax.Array) -> jax.Array:
        """Integer ids [B, T] -> embeddings [B, T, D]."""
        return self.embed(ids)
