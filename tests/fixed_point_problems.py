"""The small tanh fixed-point problem several fixed-point test files share (jax only)."""
import jax
import jax.numpy as jnp

N = 5


def tanh_problem(dtype=jnp.float32, contraction: float = 0.6):
    """params {W [N, N] with ||W||_2 = contraction, b [N]} and an input x [N]."""
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    W = jax.random.normal(k1, (N, N), dtype)
    W = contraction * W / jnp.linalg.norm(W, 2)
    b = 0.1 * jax.random.normal(k2, (N,), dtype)
    x = jax.random.normal(k3, (N,), dtype)
    return {"W": W, "b": b}, x


def tanh_map(params, z, x):  # z, x: [N] or [batch, N]
    return jnp.tanh(z @ params["W"].T + params["b"] + x)
