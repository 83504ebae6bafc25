"""The project's normalisation layers: flax's LayerNorm and GroupNorm with the two-pass variance.

Flax's normalisation layers default to `use_fast_variance=False`, var = E[x^2] - E[x]^2, which
cancels catastrophically in float32 when the mean is large next to the spread: after the dVAE's
convolutions of all-positive softmax inputs it cost ~1% of the dVAE's gradients against the
official PyTorch code (float64 agreed to 5e-7), and bf16 compute makes it worse. The two-pass
form, var = E[(x - E[x])^2], is what PyTorch computes. Every LayerNorm / GroupNorm of the models
is built here (tests/test_norms.py checks that no other one exists in a built model).
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx

Dtype = Any


def layer_norm(num_features: int, *, epsilon: float, dtype: Dtype | None = None,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """PyTorch's `nn.LayerNorm(num_features, eps=epsilon)` over the last axis."""
    return nnx.LayerNorm(num_features, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype,
                         use_fast_variance=False, rngs=rngs)


def group_norm(num_features: int, num_groups: int, *, epsilon: float, dtype: Dtype | None = None,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs) -> nnx.GroupNorm:
    """PyTorch's `F.group_norm(x, num_groups, weight, bias, eps)` on NHWC inputs."""
    return nnx.GroupNorm(num_features, num_groups=num_groups, epsilon=epsilon, dtype=dtype,
                         param_dtype=param_dtype, use_fast_variance=False, rngs=rngs)
