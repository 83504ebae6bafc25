"""Jacobian diagnostics and regularisers for f at a fixed point (JAX only).

The paper's Fig. 1b / 5 track the spectral norm of J = df/dz at z*; torchdeq's Jacobian
regulariser penalises its Frobenius norm. Both only need Jacobian-vector products, never J.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from fixed_slots.fixed_point._flat import make_flattener, row_norm
from fixed_slots.fixed_point._fn import state_map

PyTree = Any


def jacobian_spectral_norm(
    f: Callable[..., PyTree],
    params: PyTree,
    z: PyTree,
    *args: Any,
    key: jax.Array | None = None,
    num_iters: int = 20,
    batch_axis: int | None = None,
    has_aux: bool = False,
) -> jax.Array:
    """Largest singular value of df/dz at z, by power iteration on J^T J (jvp then vjp).

    With batch_axis, f must treat examples independently (J block-diagonal, as in slot
    attention) and the result is per example, [batch]; otherwise a scalar. No gradient.
    """
    if num_iters < 1:
        raise ValueError(f"num_iters must be >= 1, got {num_iters}")
    params, z, args = jax.lax.stop_gradient((params, z, args))
    g = state_map(f, params, args, has_aux)
    flatten, unflatten, batch = make_flattener(z, batch_axis)
    _, vjp = jax.vjp(g, z)
    key = jax.random.key(0) if key is None else key
    v = jax.random.normal(key, flatten(z).shape, flatten(z).dtype)
    v = v / (row_norm(v)[:, None] + 1e-30)

    def body(_, v):
        jv = jax.jvp(g, (z,), (unflatten(v),))[1]
        w = flatten(vjp(jv)[0])
        return w / (row_norm(w)[:, None] + 1e-30)

    v = jax.lax.fori_loop(0, num_iters, body, v)
    sigma = row_norm(flatten(jax.jvp(g, (z,), (unflatten(v),))[1]))
    return sigma[0] if batch_axis is None else sigma


def jacobian_frobenius_penalty(
    f: Callable[..., PyTree],
    params: PyTree,
    z: PyTree,
    *args: Any,
    key: jax.Array,
    num_samples: int = 1,
    normalize: bool = True,
    has_aux: bool = False,
) -> jax.Array:
    """Hutchinson estimate of ||df/dz||_F^2 at z (a differentiable loss term, as torchdeq's).

    E_eps ||eps^T J||^2 = ||J||_F^2 for eps ~ N(0, I). z is detached (the fixed point is a given
    point), gradients reach params and args through f. normalize divides by the number of
    state elements, as torchdeq does, so the weight does not depend on the state's size.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    z = jax.lax.stop_gradient(z)
    g = state_map(f, params, args, has_aux)
    _, vjp = jax.vjp(g, z)
    leaves, treedef = jax.tree.flatten(z)
    total = 0.0
    for key_i in jax.random.split(key, num_samples):
        keys = jax.random.split(key_i, len(leaves))
        eps = jax.tree.unflatten(treedef, [jax.random.normal(k, jnp.shape(l), jnp.result_type(l))
                                           for k, l in zip(keys, leaves)])
        eps_j = vjp(eps)[0]
        total = total + sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                            for x in jax.tree.leaves(eps_j))
    estimate = total / num_samples
    if normalize:
        estimate = estimate / sum(jnp.size(l) for l in leaves)
    return estimate
