"""Pieces every model shares: the slot-attention encoder and the Jacobian diagnostic.

The output types and the model contract are in `fixed_slots.models.protocol`.
"""
from __future__ import annotations

import jax
import ml_collections
from flax import nnx

from fixed_slots.fixed_point import FixedPointInfo, jacobian_spectral_norm
from fixed_slots.models.protocol import FixedPointStep, SlotEncoding, SlotModel
from fixed_slots.modules.norms import layer_norm
from fixed_slots.modules.slot_attention import SlotAttention

_xavier = nnx.initializers.xavier_uniform()
_kaiming = nnx.initializers.variance_scaling(2.0, "fan_in", "uniform")


def fixed_point_options(config: ml_collections.ConfigDict) -> dict:
    """config.slot_attention.fixed_point without its unset (None) keys: SlotAttention's
    `fixed_point_options`."""
    return {k: v for k, v in config.slot_attention.fixed_point.items() if v is not None}


def slot_attention_from_config(config: ml_collections.ConfigDict, *, input_size: int,
                               rngs: nnx.Rngs) -> SlotAttention:
    sa = config.slot_attention
    return SlotAttention(
        input_size, sa.slot_size, sa.mlp_hidden_size, num_slots=sa.num_slots,
        num_iterations=sa.num_iterations, eval_num_iterations=sa.eval_num_iterations,
        num_heads=sa.num_heads, epsilon=sa.epsilon, grad=config.grad,
        fixed_point_options=fixed_point_options(config), rngs=rngs)


class SlotAttentionEncoder(nnx.Module):
    """SLATE's SlotAttentionEncoder: LayerNorm -> MLP on the inputs, then slot attention."""

    def __init__(self, input_size: int, slot_attention: SlotAttention, *, rngs: nnx.Rngs):
        self.norm = layer_norm(input_size, epsilon=1e-5, rngs=rngs)
        self.mlp_in = nnx.Linear(input_size, input_size, kernel_init=_kaiming, rngs=rngs)
        self.mlp_out = nnx.Linear(input_size, input_size, kernel_init=_xavier, rngs=rngs)
        self.slot_attention = slot_attention

    def __call__(self, inputs: jax.Array, key: jax.Array, *, train: bool = True,
                 num_iterations: int | None = None, adjoint_probe: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array, FixedPointInfo, jax.Array]:
        """inputs [B, N, D] -> (slots [B, S, D_slot], attention [B, S, N], info, SA inputs)."""
        x = self.mlp_out(jax.nn.relu(self.mlp_in(self.norm(inputs))))
        slots, attn, info = self.slot_attention(x, key, train=train,
                                                num_iterations=num_iterations,
                                                adjoint_probe=adjoint_probe)
        return slots, attn, info, x

    def fixed_point_step(self, sa_inputs: jax.Array) -> FixedPointStep:
        """(f, params, args) of the slot-attention update on the SA inputs [B, N, D]."""
        return self.slot_attention.step_function(sa_inputs)


def slot_jacobian_spectral_norm(model: SlotModel, encoding: SlotEncoding, key: jax.Array,
                                num_iters: int = 20) -> jax.Array:
    """Per-example spectral norm of d step / d slots at the encoding's slots (Fig. 1b / 5). [B]"""
    f, params, args = model.fixed_point_step(encoding.sa_inputs)
    return jacobian_spectral_norm(f, params, encoding.slots, *args, key=key, num_iters=num_iters,
                                  batch_axis=0, has_aux=True)
