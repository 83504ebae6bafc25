"""Dtype rules shared by the modules.

Where a computation must not run in a low-precision compute dtype (softmax logits, losses, the
fixed-point solve), it is promoted to *at least* float32, never cast down: a float64 model
(the gradient tests' exact reference) stays float64 end to end.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def at_least_float32(x: jax.Array) -> jax.Array:
    """x in float32 if its dtype is narrower (bf16, fp16), else unchanged (float32, float64)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))
