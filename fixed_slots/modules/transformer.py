"""SLATE's image-GPT decoder (official `transformer.py`) with a KV cache for generation.

Fidelity to singhgautam/slate:
- pre-LayerNorm blocks (LayerNorm eps 1e-5): causal self-attention, cross-attention to the
  slots (the slots themselves are not normalised), ReLU FFN of width 4*d_model;
- the first block normalises the residual stream itself (`input = LN(input)`) before its
  self-attention residual, the other blocks normalise only the attention input;
- q/k/v/o projections without bias, Xavier-uniform; the attention output projection and the
  second FFN layer use Xavier gain (3 * num_blocks) ** -0.5; first FFN layer Kaiming-uniform;
  FFN biases zero; final LayerNorm;
- dropout (rate `dropout`) on the attention probabilities, after each attention output
  projection and after the FFN.

Randomness: modules hold no RNG state. Every call that may drop out takes `deterministic` and an
explicit `rng` key (required when `deterministic=False` and the rate is positive), split inside
per block and per dropout site, so a train step stays a pure function of (params, batch, key).

Attention backends (`attention_impl`): None or "xla" -> `jax.nn.dot_product_attention` with XLA;
"cudnn" -> the cuDNN fused kernel for the teacher-forced causal self-attention (GPU,
bf16/fp16 `dtype` only; cross-attention and single-token decode steps use XLA);
"einsum" -> a plain einsum/softmax reference path.
`jax.nn.dot_product_attention` has no dropout on the probabilities, so when probability dropout
is active (training, rate > 0, `attn_prob_dropout=True`) the einsum path is used; set
`attn_prob_dropout=False` to keep the fused kernel in training and drop out only the attention
output, FFN and embeddings (a documented deviation from the official code).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from fixed_slots.modules.dtypes import at_least_float32
from fixed_slots.modules.norms import layer_norm

Dtype = Any
Cache = list[dict[str, jax.Array]]
CrossKV = list[tuple[jax.Array, jax.Array]]

ATTENTION_IMPLS = (None, "xla", "cudnn", "einsum")

kaiming_uniform = jax.nn.initializers.variance_scaling(2.0, "fan_in", "uniform")


def xavier_uniform(gain: float = 1.0) -> jax.nn.initializers.Initializer:
    """torch.nn.init.xavier_uniform_(w, gain): U(-b, b), b = gain * sqrt(6 / (fan_in + fan_out))."""
    return jax.nn.initializers.variance_scaling(gain * gain, "fan_avg", "uniform")


def dropout(x: jax.Array, rate: float, rng: jax.Array | None, deterministic: bool) -> jax.Array:
    """Inverted dropout as a pure function of an explicit key (identity when deterministic)."""
    if deterministic or rate == 0.0:
        return x
    if rng is None:
        raise ValueError("dropout with deterministic=False needs an explicit `rng` key")
    keep = 1.0 - rate
    mask = jax.random.bernoulli(rng, keep, x.shape)
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


def _split(rng: jax.Array | None, n: int) -> list[jax.Array | None]:
    # Keys for n dropout sites; None stays None so deterministic calls need no key.
    if rng is None:
        return [None] * n
    return list(jax.random.split(rng, n))


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | None = None,
    is_causal: bool = False,
    impl: str | None = None,
    prob_dropout: float = 0.0,
    rng: jax.Array | None = None,
) -> jax.Array:
    """Scaled dot-product attention; q [B,T,H,Dh], k/v [B,S,H,Dh], mask broadcastable to [B,H,T,S].

    `mask` is boolean, True = attend. Returns [B, T, H, Dh].
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    if impl == "einsum" or prob_dropout > 0.0:
        scale = q.shape[-1] ** -0.5
        logits = jnp.einsum("bthd,bshd->bhts", q * scale, k)  # [B, H, T, S]
        logits = at_least_float32(logits)  # softmax in float32 (or wider) whatever the compute dtype
        if is_causal:
            t, s = logits.shape[-2:]
            causal = jnp.tril(jnp.ones((t, s), dtype=bool))
            mask = causal if mask is None else jnp.logical_and(mask, causal)
        if mask is not None:
            # Finite minimum instead of -inf: identical after softmax, no NaN in the gradient.
            logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
        probs = jax.nn.softmax(logits, axis=-1)
        probs = dropout(probs, prob_dropout, rng, deterministic=False).astype(v.dtype)
        return jnp.einsum("bhts,bshd->bthd", probs, v)  # [B, T, H, Dh]
    implementation = None if impl in (None, "xla") else impl
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=is_causal, implementation=implementation)


class MultiHeadAttention(nnx.Module):
    """Official SLATE MultiHeadAttention: bias-free projections, dropout on probs and output."""

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        dropout: float = 0.0,
        gain: float = 1.0,
        *,
        attention_impl: str | None = None,
        attn_prob_dropout: bool = True,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        assert d_model % num_heads == 0, "d_model must be divisible by num_heads"
        if attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}")
        self.d_model = d_model
        self.num_heads = num_heads
        self.dropout = dropout
        self.attention_impl = attention_impl
        self.attn_prob_dropout = attn_prob_dropout
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.proj_q = nnx.Linear(d_model, d_model, kernel_init=xavier_uniform(), **kw)
        self.proj_k = nnx.Linear(d_model, d_model, kernel_init=xavier_uniform(), **kw)
        self.proj_v = nnx.Linear(d_model, d_model, kernel_init=xavier_uniform(), **kw)
        self.proj_o = nnx.Linear(d_model, d_model, kernel_init=xavier_uniform(gain), **kw)

    def _heads(self, x: jax.Array) -> jax.Array:
        # [B, T, D] -> [B, T, H, D/H]
        return x.reshape(*x.shape[:-1], self.num_heads, self.d_model // self.num_heads)

    def project_q(self, x: jax.Array) -> jax.Array:
        """Queries [B, T, D] -> [B, T, H, Dh] (the 1/sqrt(Dh) scale is applied in `attention`)."""
        return self._heads(self.proj_q(x))

    def project_kv(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Keys/values of a source sequence [B, S, D] -> ([B, S, H, Dh], [B, S, H, Dh])."""
        return self._heads(self.proj_k(x)), self._heads(self.proj_v(x))

    def attend(
        self,
        q: jax.Array,
        k: jax.Array,
        v: jax.Array,
        *,
        mask: jax.Array | None = None,
        is_causal: bool = False,
        impl: str | None = None,
        deterministic: bool = True,
        rng: jax.Array | None = None,
    ) -> jax.Array:
        """Attention of projected heads, output projection and output dropout -> [B, T, D]."""
        prob_key, out_key = _split(rng, 2)
        active = not deterministic and self.dropout > 0.0
        prob_rate = self.dropout if (active and self.attn_prob_dropout) else 0.0
        impl = self.attention_impl if impl is None else impl
        o = attention(q, k, v, mask=mask, is_causal=is_causal, impl=impl,
                      prob_dropout=prob_rate, rng=prob_key)  # [B, T, H, Dh]
        o = self.proj_o(o.reshape(*o.shape[:-2], self.d_model))  # [B, T, D]
        return dropout(o, self.dropout, out_key, deterministic)

    def __call__(
        self,
        q: jax.Array,
        k: jax.Array,
        v: jax.Array,
        *,
        is_causal: bool = False,
        deterministic: bool = True,
        rng: jax.Array | None = None,
    ) -> jax.Array:
        """q [B, T, D], k/v [B, S, D] -> [B, T, D]."""
        qh = self.project_q(q)
        kh, vh = self._heads(self.proj_k(k)), self._heads(self.proj_v(v))
        return self.attend(qh, kh, vh, is_causal=is_causal, deterministic=deterministic, rng=rng)


class TransformerDecoderBlock(nnx.Module):
    """Pre-LN block: causal self-attention, cross-attention to slots, ReLU FFN (4x)."""

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        dropout: float = 0.0,
        gain: float = 1.0,
        is_first: bool = False,
        *,
        attention_impl: str | None = None,
        attn_prob_dropout: bool = True,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.is_first = is_first
        self.dropout = dropout
        ln = dict(epsilon=1e-5, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        attn = dict(attention_impl=attention_impl, attn_prob_dropout=attn_prob_dropout,
                    dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.self_attn_layer_norm = layer_norm(d_model, **ln)
        self.self_attn = MultiHeadAttention(d_model, num_heads, dropout, gain, **attn)
        self.encoder_decoder_attn_layer_norm = layer_norm(d_model, **ln)
        self.encoder_decoder_attn = MultiHeadAttention(d_model, num_heads, dropout, gain, **attn)
        self.ffn_layer_norm = layer_norm(d_model, **ln)
        self.ffn_in = nnx.Linear(d_model, 4 * d_model, kernel_init=kaiming_uniform,
                                 dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.ffn_out = nnx.Linear(4 * d_model, d_model, kernel_init=xavier_uniform(gain),
                                  dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def _self_attn_input(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        # Returns (residual stream, attention input). The official first block replaces the
        # stream by its normalisation; later blocks normalise only the attention input.
        if self.is_first:
            x = self.self_attn_layer_norm(x)
            return x, x
        return x, self.self_attn_layer_norm(x)

    def _cross_and_ffn(self, x: jax.Array, slots_kv: tuple[jax.Array, jax.Array],
                       deterministic: bool, keys: list[jax.Array | None]) -> jax.Array:
        k, v = slots_kv  # [B, S, H, Dh] each
        q = self.encoder_decoder_attn.project_q(self.encoder_decoder_attn_layer_norm(x))
        # The fused kernel pays off on the L x L self-attention; the L x S cross-attention
        # (a handful of slots) stays on XLA, which takes any shape.
        impl = "einsum" if self.encoder_decoder_attn.attention_impl == "einsum" else "xla"
        x = x + self.encoder_decoder_attn.attend(q, k, v, impl=impl, deterministic=deterministic,
                                                 rng=keys[0])
        h = jax.nn.relu(self.ffn_in(self.ffn_layer_norm(x)))  # [B, T, 4D]
        h = dropout(self.ffn_out(h), self.dropout, keys[1], deterministic)
        return x + h

    def cross_kv(self, slots: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Cross-attention keys/values of the slots [B, S, D] -> ([B,S,H,Dh], [B,S,H,Dh])."""
        return self.encoder_decoder_attn.project_kv(slots)

    def __call__(
        self,
        x: jax.Array,
        slots_kv: tuple[jax.Array, jax.Array],
        *,
        deterministic: bool = True,
        rng: jax.Array | None = None,
    ) -> jax.Array:
        """x [B, T, D] with causal self-attention -> [B, T, D]."""
        keys = _split(rng, 3)
        x, h = self._self_attn_input(x)
        q = self.self_attn.project_q(h)
        k, v = self.self_attn.project_kv(h)
        x = x + self.self_attn.attend(q, k, v, is_causal=True, deterministic=deterministic,
                                      rng=keys[0])
        return self._cross_and_ffn(x, slots_kv, deterministic, keys[1:])

    def decode_step(
        self,
        x: jax.Array,
        cache: dict[str, jax.Array],
        position: jax.Array,
        slots_kv: tuple[jax.Array, jax.Array],
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Token x [B, 1, D] at `position`: writes its k/v to the cache, attends to <= position."""
        x, h = self._self_attn_input(x)
        q = self.self_attn.project_q(h)  # [B, 1, H, Dh]
        k, v = self.self_attn.project_kv(h)  # [B, 1, H, Dh]
        position = jnp.asarray(position, jnp.int32)
        zero = jnp.zeros((), jnp.int32)
        index = (zero, position, zero, zero)
        new_k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), index)
        new_v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), index)
        max_len = new_k.shape[1]
        mask = (jnp.arange(max_len) <= position)[None, None, None, :]  # [1, 1, 1, L]
        # A single query gains nothing from the fused kernel; XLA handles the arbitrary mask.
        impl = "einsum" if self.self_attn.attention_impl == "einsum" else "xla"
        x = x + self.self_attn.attend(q, new_k.astype(q.dtype), new_v.astype(q.dtype),
                                      mask=mask, impl=impl)
        x = self._cross_and_ffn(x, slots_kv, True, [None, None])
        return x, {"k": new_k, "v": new_v}


class TransformerDecoder(nnx.Module):
    """Stack of SLATE decoder blocks + final LayerNorm, with cached single-token decoding."""

    def __init__(
        self,
        num_blocks: int,
        max_len: int,
        d_model: int,
        num_heads: int,
        dropout: float = 0.0,
        *,
        attention_impl: str | None = None,
        attn_prob_dropout: bool = True,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.num_blocks = num_blocks
        self.max_len = max_len
        self.d_model = d_model
        self.num_heads = num_heads
        self.dropout = dropout
        self.dtype = dtype
        gain = (3 * num_blocks) ** -0.5 if num_blocks > 0 else 1.0
        self.blocks = nnx.List([
            TransformerDecoderBlock(
                d_model, num_heads, dropout, gain, is_first=(i == 0),
                attention_impl=attention_impl, attn_prob_dropout=attn_prob_dropout,
                dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            for i in range(num_blocks)
        ])
        self.layer_norm = layer_norm(d_model, epsilon=1e-5, dtype=dtype,
                                     param_dtype=param_dtype, rngs=rngs)

    def precompute_cross_kv(self, slots: jax.Array) -> CrossKV:
        """Per-block cross-attention keys/values of slots [B, S, D]; computed once per image."""
        return [block.cross_kv(slots) for block in self.blocks]

    def __call__(
        self,
        x: jax.Array,
        slots: jax.Array,
        *,
        deterministic: bool = True,
        rng: jax.Array | None = None,
    ) -> jax.Array:
        """Teacher-forced pass: x [B, L, D] (causal), slots [B, S, D] -> [B, L, D]."""
        assert x.shape[1] <= self.max_len, f"sequence {x.shape[1]} > max_len {self.max_len}"
        keys = _split(rng, max(self.num_blocks, 1))
        for block, key in zip(self.blocks, keys):
            x = block(x, block.cross_kv(slots), deterministic=deterministic, rng=key)
        return self.layer_norm(x)

    def init_cache(self, batch: int, max_len: int | None = None,
                   dtype: Dtype = jnp.float32) -> Cache:
        """Zeroed self-attention cache: per block {'k', 'v'}: [batch, max_len, heads, d/heads]."""
        max_len = self.max_len if max_len is None else max_len
        shape = (batch, max_len, self.num_heads, self.d_model // self.num_heads)
        return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
                for _ in range(self.num_blocks)]

    def decode_step(
        self,
        token_embedding: jax.Array,
        cache: Cache,
        position: int | jax.Array,
        slots_kv: CrossKV,
    ) -> tuple[jax.Array, Cache]:
        """Deterministic step: token [B, 1, D] at `position` -> (output [B, 1, D], new cache).

        Equal to row `position` of `__call__` on the sequence whose earlier rows went through
        earlier steps. O(max_len) work per step; all shapes static, so it runs inside scan/jit.
        """
        x = token_embedding
        new_cache = []
        for block, block_cache, kv in zip(self.blocks, cache, slots_kv):
            x, c = block.decode_step(x, block_cache, position, kv)
            new_cache.append(c)
        return self.layer_norm(x), new_cache
