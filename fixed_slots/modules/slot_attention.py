"""Slot attention (Locatello et al. 2020) whose iteration is a `fixed_point_layer` call.

The refinement step z <- f(z; k, v) (Fig. 2 of Chang et al. 2022) lives in `SlotAttentionStep`, a
pure module: no RNG, no mutation. `SlotAttention` computes keys and values once, splits the step's
state with `nnx.split` and hands it to `fixed_point_layer` explicitly, so the gradient mode
(unroll / neumannK / IN / IB / BN / BB) is a config string and nothing else changes.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from fixed_slots.fixed_point import FixedPointInfo, fixed_point_layer, parse_grad_mode
from fixed_slots.modules.dtypes import at_least_float32
from fixed_slots.modules.norms import layer_norm

_xavier = nnx.initializers.xavier_uniform()
_kaiming = nnx.initializers.variance_scaling(2.0, "fan_in", "uniform")  # PyTorch kaiming_uniform_(relu)
_orthogonal = nnx.initializers.orthogonal()


def torch_xavier_uniform_3d(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """PyTorch's `xavier_uniform_` on a >2-d tensor such as the (1, 1, D) slot mean.

    torch's fan rule multiplies dims 0 and 1 by the receptive field prod(shape[2:]):
    fan_in = shape[1] * r, fan_out = shape[0] * r, bound = sqrt(6 / (fan_in + fan_out)); for
    (1, 1, D) that is sqrt(3 / D). Flax's xavier on the same shape sees fan_in = 1 (a sqrt(2)
    wider bound), so SLATE's `slots_mu` / `slots_log_sigma` need this one.
    """
    receptive = 1
    for size in shape[2:]:
        receptive *= size
    fan_in, fan_out = shape[1] * receptive, shape[0] * receptive
    bound = (6.0 / (fan_in + fan_out)) ** 0.5
    return jax.random.uniform(key, shape, dtype, -bound, bound)
_LN_EPS = 1e-5  # PyTorch LayerNorm default, as the official code


class GRUCell(nnx.Module):
    """PyTorch-convention GRU cell (the official code's): r, z gates; n = tanh(W_in x + r (W_hn h + b_hn)).

    Xavier-uniform input weights, orthogonal recurrent weights, zero biases (SLATE's gru_cell).
    """

    def __init__(self, input_size: int, hidden_size: int, *, rngs: nnx.Rngs):
        # Whole-matrix inits as PyTorch's xavier_uniform_(weight_ih) / orthogonal_(weight_hh);
        # gate columns are ordered [reset, update, new].
        self.w_ih = nnx.Param(_xavier(rngs.params(), (input_size, 3 * hidden_size)))
        self.w_hh = nnx.Param(_orthogonal(rngs.params(), (hidden_size, 3 * hidden_size)))
        self.b_ih = nnx.Param(jnp.zeros((3 * hidden_size,)))
        self.b_hh = nnx.Param(jnp.zeros((3 * hidden_size,)))

    def __call__(self, x: jax.Array, h: jax.Array) -> jax.Array:
        gi = x @ self.w_ih[...] + self.b_ih[...]
        gh = h @ self.w_hh[...] + self.b_hh[...]
        i_r, i_z, i_n = jnp.split(gi, 3, axis=-1)
        h_r, h_z, h_n = jnp.split(gh, 3, axis=-1)
        r = jax.nn.sigmoid(i_r + h_r)
        z = jax.nn.sigmoid(i_z + h_z)
        n = jnp.tanh(i_n + r * h_n)
        return (1.0 - z) * n + z * h


class SlotAttentionStep(nnx.Module):
    """One refinement step f(slots; k, v) -> (slots, attention). Pure."""

    def __init__(self, slot_size: int, mlp_hidden_size: int, num_heads: int, epsilon: float,
                 *, rngs: nnx.Rngs):
        if slot_size % num_heads:
            raise ValueError(f"slot_size {slot_size} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.epsilon = epsilon
        self.norm_slots = layer_norm(slot_size, epsilon=_LN_EPS, rngs=rngs)
        self.project_q = nnx.Linear(slot_size, slot_size, use_bias=False, kernel_init=_xavier,
                                    rngs=rngs)
        self.gru = GRUCell(slot_size, slot_size, rngs=rngs)
        self.norm_mlp = layer_norm(slot_size, epsilon=_LN_EPS, rngs=rngs)
        self.mlp_in = nnx.Linear(slot_size, mlp_hidden_size, kernel_init=_kaiming, rngs=rngs)
        self.mlp_out = nnx.Linear(mlp_hidden_size, slot_size, kernel_init=_xavier, rngs=rngs)

    def __call__(self, slots: jax.Array, k: jax.Array, v: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
        # slots [B, S, D]; k, v [B, N, H, D/H] (k already scaled by (D/H)^-0.5)
        batch, num_slots, size = slots.shape
        q = self.project_q(self.norm_slots(slots)).reshape(batch, num_slots, self.num_heads, -1)
        logits = at_least_float32(jnp.einsum("bnhd,bshd->bnhs", k, q.astype(k.dtype)))
        num_inputs = logits.shape[1]
        # Competition over slots; with several heads the official code normalises over
        # (heads x slots) jointly, so the per-slot masks summed over heads still sum to 1.
        attn = jax.nn.softmax(logits.reshape(batch, num_inputs, -1), axis=-1)
        attn = attn.reshape(logits.shape)  # [B, N, H, S]
        attn_vis = jnp.sum(attn, axis=2).transpose(0, 2, 1)  # [B, S, N]
        attn = attn + self.epsilon
        attn = attn / jnp.sum(attn, axis=1, keepdims=True)  # weighted mean over inputs
        updates = jnp.einsum("bnhs,bnhd->bshd", attn.astype(v.dtype), v).reshape(batch, num_slots, size)
        new = self.gru(updates.reshape(-1, size).astype(slots.dtype), slots.reshape(-1, size))
        new = new.reshape(batch, num_slots, size)
        new = new + self.mlp_out(jax.nn.relu(self.mlp_in(self.norm_mlp(new))))
        return new.astype(slots.dtype), attn_vis


class SlotAttention(nnx.Module):
    """Locatello et al.'s slot attention with learned Gaussian slot initialisation.

    `grad` picks the backward pass: "unroll" (vanilla), "neumannK", "seriesK", "implicit", or the
    paper's Table 2 names "IN", "IB", "BN", "BB". `num_iterations` is the paper's T: unroll runs T
    differentiated updates; the implicit modes run T updates without gradient and then their
    differentiated update(s) (T + 1, or T + K for neumannK; see fixed_slots.fixed_point.modes).
    `fixed_point_options` are the solver knobs the mode leaves open: the keys of
    `config.slot_attention.fixed_point` (tol, damping, anderson_memory, broyden_memory,
    adjoint_solver, adjoint_max_iter, adjoint_tol, adjoint_on_failure); `GradMode.layer_options`
    turns them and the mode into the layer's solver and gradient objects once, here.
    `__call__(..., adjoint_probe=z)` with z = zeros [B, 3]: the cotangent of z is the backward
    solve's (relative residual, steps, failed) per example (implicit modes; zeros otherwise).
    """

    def __init__(
        self,
        input_size: int,
        slot_size: int,
        mlp_hidden_size: int,
        *,
        num_slots: int,
        num_iterations: int,
        eval_num_iterations: int | None = None,
        num_heads: int = 1,
        epsilon: float = 1e-8,
        grad: str = "neumann1",
        fixed_point_options: Mapping[str, Any] | None = None,
        rngs: nnx.Rngs,
    ):
        self.num_slots = num_slots
        self.slot_size = slot_size
        self.num_heads = num_heads
        self.num_iterations = num_iterations
        self.eval_num_iterations = eval_num_iterations or num_iterations
        self.grad_mode = parse_grad_mode(grad)
        self.fixed_point_options = dict(fixed_point_options or {})
        # Built once (validated now, not at trace time); static under jit.
        self._layer_options = {
            t: self.grad_mode.layer_options(t, **self.fixed_point_options)
            for t in {self.num_iterations, self.eval_num_iterations}}
        self.norm_inputs = layer_norm(input_size, epsilon=_LN_EPS, rngs=rngs)
        self.project_k = nnx.Linear(input_size, slot_size, use_bias=False, kernel_init=_xavier,
                                    rngs=rngs)
        self.project_v = nnx.Linear(input_size, slot_size, use_bias=False, kernel_init=_xavier,
                                    rngs=rngs)
        self.step = SlotAttentionStep(slot_size, mlp_hidden_size, num_heads, epsilon, rngs=rngs)
        self.slots_mu = nnx.Param(torch_xavier_uniform_3d(rngs.params(), (1, 1, slot_size)))
        self.slots_log_sigma = nnx.Param(
            torch_xavier_uniform_3d(rngs.params(), (1, 1, slot_size)))

    def initial_slots(self, key: jax.Array, batch: int, num_slots: int | None = None) -> jax.Array:
        num_slots = num_slots or self.num_slots
        # float32 noise whatever the params' dtype: a float64 model sees the same draws.
        noise = jax.random.normal(key, (batch, num_slots, self.slot_size), jnp.float32)
        return self.slots_mu[...] + jnp.exp(self.slots_log_sigma[...]) * noise  # [B, S, D]

    def __call__(
        self,
        inputs: jax.Array,
        key: jax.Array,
        *,
        train: bool = True,
        num_slots: int | None = None,
        num_iterations: int | None = None,
        slots_init: jax.Array | None = None,
        adjoint_probe: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array, FixedPointInfo]:
        """inputs [B, N, D_in] -> slots [B, S, D], attention [B, S, N] (sums to 1 over S), info."""
        f, step_state, (k, v) = self.step_function(inputs)
        slots0 = slots_init if slots_init is not None else self.initial_slots(
            key, inputs.shape[0], num_slots)
        if num_iterations is None:
            num_iterations = self.num_iterations if train else self.eval_num_iterations
        options = self._layer_options.get(num_iterations) or self.grad_mode.layer_options(
            num_iterations, **self.fixed_point_options)
        (slots, attn), info = fixed_point_layer(
            f, step_state, slots0, k, v, batch_axis=0, has_aux=True, probe=adjoint_probe,
            **options)
        return slots, attn, info

    def step_function(self, inputs: jax.Array):
        """(f, params, args) of the refinement step on `inputs`, for Jacobian diagnostics."""
        batch, num_inputs, _ = inputs.shape
        head_size = self.slot_size // self.num_heads
        inputs = self.norm_inputs(inputs)
        k = self.project_k(inputs).reshape(batch, num_inputs, self.num_heads, head_size)
        k = k * head_size ** -0.5
        v = self.project_v(inputs).reshape(batch, num_inputs, self.num_heads, head_size)
        graphdef, step_state = nnx.split(self.step)

        def f(state, slots, k, v):
            return nnx.merge(graphdef, state)(slots, k, v)

        return f, step_state, (k, v)
