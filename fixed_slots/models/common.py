"""Pieces every model shares: the slot-attention encoder and the Jacobian diagnostic.

The output types and the model contract are in `fixed_slots.models.protocol`.
"""
from __future__ import annotations

import jax
import ml_collections
from flax import nnx

from fixed_slots import configlib
from fixed_slots.errors import ConfigError
from fixed_slots.fixed_point import (
    ADJOINT_SOLVERS,
    FixedPointInfo,
    jacobian_spectral_norm,
    parse_grad_mode,
)
from fixed_slots.fixed_point.modes import VALID_GRAD_MODES
from fixed_slots.fixed_point.options import ON_FAILURE
from fixed_slots.models.protocol import FixedPointStep, SlotEncoding, SlotModel
from fixed_slots.modules.norms import layer_norm
from fixed_slots.modules.slot_attention import SlotAttention

_xavier = nnx.initializers.xavier_uniform()
_kaiming = nnx.initializers.variance_scaling(2.0, "fan_in", "uniform")


# "float32", or "bfloat16" for mixed precision (config.train.compute_dtype, read by every model).
COMPUTE_DTYPES = ("float32", "bfloat16")

# The keys every model shares: the gradient mode, slot attention and its fixed-point knobs.
CHOICES = {
    "grad": VALID_GRAD_MODES,
    "train.compute_dtype": COMPUTE_DTYPES,
    "slot_attention.fixed_point.adjoint_solver": ADJOINT_SOLVERS,
    "slot_attention.fixed_point.adjoint_on_failure": ON_FAILURE,
}
RANGES = {
    "slot_attention.num_slots": configlib.POSITIVE_INT,
    "slot_attention.num_iterations": configlib.POSITIVE_INT,
    "slot_attention.eval_num_iterations": (
        lambda v: v is None or (configlib.is_int(v) and v >= 1),
        "None (follow num_iterations) or a positive integer"),
    "slot_attention.slot_size": configlib.POSITIVE_INT,
    "slot_attention.mlp_hidden_size": configlib.POSITIVE_INT,
    "slot_attention.num_heads": configlib.POSITIVE_INT,
    "slot_attention.epsilon": configlib.POSITIVE,
    "slot_attention.fixed_point.tol": configlib.OPTIONAL_POSITIVE,
    "slot_attention.fixed_point.damping": configlib.UNIT_HALF_OPEN,
    "slot_attention.fixed_point.anderson_memory": configlib.POSITIVE_INT,
    "slot_attention.fixed_point.broyden_memory": configlib.POSITIVE_INT,
    "slot_attention.fixed_point.adjoint_max_iter": configlib.OPTIONAL_POSITIVE_INT,
    "slot_attention.fixed_point.adjoint_tol": configlib.OPTIONAL_POSITIVE,
}


def check_slot_attention_config(config: ml_collections.ConfigDict) -> None:
    """config.grad, config.slot_attention and config.train.compute_dtype (ConfigError)."""
    configlib.check_choices(config, {k: v for k, v in CHOICES.items() if k != "grad"})
    configlib.check_ranges(config, RANGES)
    try:
        parse_grad_mode(config.grad)
    except ValueError as e:
        raise ConfigError(f"config.grad: {e}") from None
    try:
        parse_grad_mode(config.grad).layer_options(config.slot_attention.num_iterations,
                                                   **fixed_point_options(config))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config.grad={config.grad!r} with config.slot_attention.fixed_point: "
                          f"{e}") from None
    sa = config.slot_attention
    if sa.slot_size % sa.num_heads:
        raise configlib.bad_value("slot_attention.num_heads", sa.num_heads,
                                  f"a divisor of slot_size={sa.slot_size}")


def reports_adjoint(config: ml_collections.ConfigDict) -> bool:
    """Whether config.grad solves or sums an adjoint in the backward pass (implicit, IB, BB,
    seriesK, BN): the train step then hands the model a probe whose cotangent reports it."""
    # The estimators with an adjoint solve or sum (Implicit, Series) fill the probe.
    return parse_grad_mode(config.grad).grad in ("implicit", "series")


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
