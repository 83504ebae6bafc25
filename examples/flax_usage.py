"""One fixed-point cell, z = tanh(W z + U x + b), written in Flax NNX and in Flax linen.

    python examples/flax_usage.py

fixed_point_layer is a JAX function: parameters go in explicitly as a pytree.
  NNX:   graphdef, state = nnx.split(cell); f = lambda state, z, x: nnx.merge(graphdef, state)(z, x)
  linen: variables = cell.init(...);        f = lambda variables, z, x: cell.apply(variables, z, x)
The script checks that the implicit and series gradients w.r.t. those pytrees agree with
backpropagation through a long unrolled solve, and that the two frameworks give the same numbers
from the same weights.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from fixed_slots.fixed_point import Implicit, Iterate, Neumann, Series, Unroll, fixed_point_layer

STATE, INPUT = 8, 3


class NNXCell(nnx.Module):
    """z -> tanh(W z + U x + b) in Flax NNX."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.W = nnx.Linear(STATE, STATE, use_bias=False, rngs=rngs)
        self.U = nnx.Linear(INPUT, STATE, rngs=rngs)

    def __call__(self, z: jax.Array, x: jax.Array) -> jax.Array:
        return jnp.tanh(self.W(z) + self.U(x))


class LinenCell(nn.Module):
    """The same cell in Flax linen."""

    @nn.compact
    def __call__(self, z: jax.Array, x: jax.Array) -> jax.Array:
        return jnp.tanh(nn.Dense(STATE, use_bias=False, name="W")(z)
                        + nn.Dense(STATE, name="U")(x))


def _max_rel_diff(a: Any, b: Any) -> float:
    """max |a - b| / max |b| over matching pytree leaves."""
    return max(float(jnp.max(jnp.abs(x - y)) / (jnp.max(jnp.abs(y)) + 1e-12))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def main(quiet: bool = False) -> dict[str, float]:
    """Returns the largest relative gradient differences (vs unroll, and NNX vs linen)."""
    x = jnp.linspace(-1.0, 1.0, INPUT)
    target = jnp.linspace(0.5, -0.5, STATE)

    # --- NNX: split once, pass the state explicitly, merge inside f.
    cell = NNXCell(rngs=nnx.Rngs(0))
    cell.W.kernel[...] = 0.5 * cell.W.kernel[...] / jnp.linalg.norm(cell.W.kernel[...], 2)
    graphdef, state = nnx.split(cell)

    def nnx_f(state: nnx.State, z: jax.Array, x: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, state)(z, x)

    # --- linen: the variables dict is the params pytree; copy the NNX weights for comparison.
    linen_cell = LinenCell()
    variables = {"params": {"W": {"kernel": state["W"]["kernel"][...]},
                            "U": {"kernel": state["U"]["kernel"][...],
                                  "bias": state["U"]["bias"][...]}}}
    # Same structure as what init would return (init is only used to check it here).
    init_shapes = jax.eval_shape(linen_cell.init, jax.random.key(0), jnp.zeros(STATE), x)
    assert jax.tree.structure(init_shapes) == jax.tree.structure(variables)

    def linen_f(variables: dict, z: jax.Array, x: jax.Array) -> jax.Array:
        return linen_cell.apply(variables, z, x)

    def loss(f, params, grad) -> jax.Array:
        z, _ = fixed_point_layer(f, params, jnp.zeros(STATE), x, solver=Iterate(max_iter=60),
                                 grad=grad)
        return jnp.sum((z - target) ** 2)

    estimators = {"unroll": Unroll(), "implicit": Implicit(adjoint=Iterate(max_iter=60)),
                  "series": Series(order=30)}
    grads = {}
    for name, f, params in (("nnx", nnx_f, state), ("linen", linen_f, variables)):
        for grad, estimator in estimators.items():
            # The option objects are hashable: static arguments of jit.
            grads[name, grad] = jax.jit(jax.grad(loss, argnums=1), static_argnums=(0, 2))(
                f, params, estimator)
    # Map the linen gradient onto the NNX layout to compare the frameworks leaf by leaf.
    linen_as_nnx = {"W": {"kernel": grads["linen", "implicit"]["params"]["W"]["kernel"]},
                    "U": {"kernel": grads["linen", "implicit"]["params"]["U"]["kernel"],
                          "bias": grads["linen", "implicit"]["params"]["U"]["bias"]}}
    nnx_implicit = {"W": {"kernel": grads["nnx", "implicit"]["W"]["kernel"][...]},
                    "U": {"kernel": grads["nnx", "implicit"]["U"]["kernel"][...],
                          "bias": grads["nnx", "implicit"]["U"]["bias"][...]}}
    result = {
        "nnx_implicit_vs_unroll": _max_rel_diff(grads["nnx", "implicit"], grads["nnx", "unroll"]),
        "nnx_series30_vs_unroll": _max_rel_diff(grads["nnx", "series"], grads["nnx", "unroll"]),
        "linen_implicit_vs_unroll": _max_rel_diff(grads["linen", "implicit"],
                                                  grads["linen", "unroll"]),
        "linen_series30_vs_unroll": _max_rel_diff(grads["linen", "series"],
                                                  grads["linen", "unroll"]),
        "nnx_vs_linen_implicit": _max_rel_diff(nnx_implicit, linen_as_nnx),
    }
    # The paper's 1-step estimator (IN) is cheaper and deliberately not the exact gradient.
    g_in = jax.jit(jax.grad(loss, argnums=1), static_argnums=(0, 2))(nnx_f, state, Neumann(1))
    result["nnx_neumann1_vs_unroll"] = _max_rel_diff(g_in, grads["nnx", "unroll"])
    if not quiet:
        for key, value in result.items():
            print(f"{key:26s} max relative gradient difference {value:.1e}")
    return result


if __name__ == "__main__":
    main()
