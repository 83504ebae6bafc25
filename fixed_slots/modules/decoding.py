"""Greedy autoregressive generation of tokens from slots with `TransformerDecoder` (SLATE's
`reconstruct_autoregressive`), a building block of the models.

Two algorithms with one signature:
- `generate_tokens`: KV cache, one token per step, O(L) attention work per step, a `lax.scan`
  over static shapes (jit-able).
- `generate_tokens_full_recompute`: the official algorithm, re-running the decoder over the whole
  prefix for every new token (O(L^2) per step). It keeps a fixed [B, L] buffer whose not-yet-
  generated tail holds BOS; the causal mask makes row t depend on rows <= t only, so this equals
  growing the prefix, with static shapes. The test reference and the baseline for benchmarks.

Conventions shared by both (so a SLATE model passes its own pieces in):
- `embed_tokens(ids [B, t] int32, start) -> [B, t, D]`: decoder-input ids to embeddings with
  positions start .. start+t-1 added (start is a Python int or a traced int32 scalar).
- `head(h [B, t, D]) -> logits [B, t, vocab]`.
- step t feeds the previous token at position t (BOS at t = 0) and emits token t. A generated id
  k is fed back as decoder-input id k + token_id_offset (SLATE: BOS = 0, offset 1).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from fixed_slots.modules.transformer import TransformerDecoder

EmbedFn = Callable[[jax.Array, "int | jax.Array"], jax.Array]
HeadFn = Callable[[jax.Array], jax.Array]


def generate_tokens(
    decoder: TransformerDecoder,
    embed_tokens: EmbedFn,
    head: HeadFn,
    slots: jax.Array,
    num_tokens: int,
    bos_token_id: int,
    *,
    token_id_offset: int = 0,
    return_logits: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Greedy decoding with a KV cache.

    slots [B, S, D] (already projected to d_model) -> tokens [B, num_tokens] int32, and with
    `return_logits` also the per-step logits [B, num_tokens, vocab] (float32).
    """
    batch = slots.shape[0]
    slots_kv = decoder.precompute_cross_kv(slots)  # once per image, reused by every step
    cache_dtype = decoder.dtype if decoder.dtype is not None else slots.dtype
    cache = decoder.init_cache(batch, num_tokens, cache_dtype)
    first = jnp.full((batch, 1), bos_token_id, jnp.int32)  # [B, 1]

    def step(carry, t):
        prev_ids, cache = carry
        emb = embed_tokens(prev_ids, t)  # [B, 1, D]
        out, cache = decoder.decode_step(emb, cache, t, slots_kv)  # [B, 1, D]
        logits = head(out)[:, 0].astype(jnp.float32)  # [B, vocab]
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B]
        next_ids = (token + token_id_offset)[:, None]  # [B, 1]
        return (next_ids, cache), (token, logits)

    positions = jnp.arange(num_tokens, dtype=jnp.int32)
    _, (tokens, logits) = jax.lax.scan(step, (first, cache), positions)
    tokens = tokens.T  # [B, L]
    if return_logits:
        return tokens, jnp.swapaxes(logits, 0, 1)  # [B, L, vocab]
    return tokens


def generate_tokens_full_recompute(
    decoder: TransformerDecoder,
    embed_tokens: EmbedFn,
    head: HeadFn,
    slots: jax.Array,
    num_tokens: int,
    bos_token_id: int,
    *,
    token_id_offset: int = 0,
    return_logits: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Greedy decoding as the official code does it: full causal forward over the prefix per token.

    Same arguments and returns as `generate_tokens`.
    """
    batch = slots.shape[0]
    inputs = jnp.full((batch, num_tokens), bos_token_id, jnp.int32)  # [B, L] decoder input ids
    tokens = jnp.zeros((batch, num_tokens), jnp.int32)

    def step(t, carry):
        inputs, tokens, all_logits = carry
        h = decoder(embed_tokens(inputs, 0), slots, deterministic=True)  # [B, L, D]
        h_t = jax.lax.dynamic_slice_in_dim(h, t, 1, axis=1)  # [B, 1, D]
        logits = head(h_t)[:, 0].astype(jnp.float32)  # [B, vocab]
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B]
        tokens = tokens.at[:, t].set(token)
        # Token t becomes the input at position t + 1 (dropped after the last step).
        nxt = jnp.minimum(t + 1, num_tokens - 1)
        inputs = jnp.where(t + 1 < num_tokens,
                           inputs.at[:, nxt].set(token + token_id_offset), inputs)
        all_logits = all_logits.at[:, t].set(logits)
        return inputs, tokens, all_logits

    vocab = jax.eval_shape(lambda: head(jnp.zeros((batch, 1, decoder.d_model),
                                                  slots.dtype))).shape[-1]
    all_logits = jnp.zeros((batch, num_tokens, vocab), jnp.float32)
    _, tokens, all_logits = jax.lax.fori_loop(0, num_tokens, step, (inputs, tokens, all_logits))
    if return_logits:
        return tokens, all_logits
    return tokens
