"""The contract between a model and the code that drives it, and the model's typed outputs.

The train step, the trainer's diagnostics, evaluation and the pictures use a model only through
`SlotModel`'s methods and read only these NamedTuples (all jax pytrees, so they cross `jax.jit`
and `jax.device_get` as they are). Fields that a model does not produce are None.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Protocol, runtime_checkable

import jax

from fixed_slots.fixed_point import FixedPointInfo

Batch = dict[str, jax.Array]  # "image" [B, H, W, 3] in [0, 1]; "mask" [B, H, W]; "target" ...


class ModelOutput(NamedTuple):
    """What a training forward pass (`model(batch, key, step)`) returns."""
    loss: jax.Array  # [] scalar to minimise
    metrics: dict[str, jax.Array]  # scalars, averaged over the batch
    outputs: dict[str, jax.Array]  # per-example arrays of the forward pass (for tests/debugging)


class SlotEncoding(NamedTuple):
    """Deterministic slot inference of a batch of images (`encode_slots`)."""
    slots: jax.Array  # [B, S, D_slot] the fixed point
    attention: jax.Array  # [B, S, N] over the slot-attention inputs, sums to 1 over S
    info: FixedPointInfo  # the forward solve: residual per iteration, steps, final residual [B]
    sa_inputs: jax.Array  # [B, N, D] the inputs slot attention attended to (fixed_point_step)
    tokens: Optional[jax.Array] = None  # [B, L] int32 SLATE's dVAE tokens (argmax); else None


class SetPredictions(NamedTuple):
    """Set-prediction outputs of one batch, what the host-side average precision reads."""
    prediction: jax.Array  # [B, S, D] property vectors in (0, 1)
    prediction_prob: jax.Array  # [B, S] confidence of each prediction (its "visible" entry)
    target: jax.Array  # [B, S, D] targets padded with zero rows to one per slot
    target_visible: jax.Array  # [B, S] float 0/1: whether each target row is a real object


class EvalBatch(NamedTuple):
    """What `evaluate_batch` returns for one batch (see `fixed_slots.eval.evaluator`)."""
    per_example: dict[str, jax.Array]  # name -> [B], averaged over the evaluation set
    generated: Optional[jax.Array] = None  # [B, H, W, 3] in [0, 1] images decoded from slots (FID)
    set_predictions: Optional[SetPredictions] = None  # for average precision


class Pictures(NamedTuple):
    """Arrays for the picture grids (`fixed_slots.visualize.model_grids`); images in [0, 1]."""
    image: jax.Array  # [B, H, W, 3] the input
    masks: jax.Array  # [B, S, H, W] per-slot masks in [0, 1] (attention or alpha), sum 1 over S
    recon: Optional[jax.Array] = None  # [B, H, W, 3] reconstruction from the slots
    dvae_recon: Optional[jax.Array] = None  # [B, H, W, 3] SLATE: dVAE decoding of the tokens
    per_slot: Optional[jax.Array] = None  # [B, S, H, W, 3] what each slot draws on its own
    slot_deletion: Optional[jax.Array] = None  # [B, S, H, W, 3] decoded without slot s (Fig. 9)


# f(params, slots, *args) -> (slots, aux): one slot-attention update (fixed_point_layer's
# convention with has_aux=True); params a pytree of arrays, args the precomputed keys/values.
FixedPointStep = tuple[Callable[..., Any], Any, tuple]


@runtime_checkable
class SlotModel(Protocol):
    """What every model in `fixed_slots.models` provides (NNX modules; all methods jittable).

    Besides the methods, a model class declares what the code driving it must not guess:
    `progress_metrics` (names of `ModelOutput.metrics` shown on the console progress line),
    `validation_metrics` (those the validation pass averages; the first is the loss the
    learning-rate decay reads), `train_metrics` / `eval_metrics` (the clu collections that sum
    them over steps and images), `learning_rate_group(path) -> group` (the optimizer group, i.e.
    the `config.optim.<group>_lr`, of the parameter at a path of names) and
    `check_config(config)` (its config sections, raising ConfigError; run before building).
    """

    progress_metrics: tuple[str, ...]
    validation_metrics: tuple[str, ...]
    train_metrics: type  # clu.metrics.Collection over ModelOutput.metrics (models.aggregation)
    eval_metrics: type  # clu.metrics.Collection over EvalBatch.per_example (per-image averages)
    metric_descriptions: dict[str, str]  # metric -> what its TensorBoard chart shows

    @staticmethod
    def learning_rate_group(path: tuple[str, ...]) -> str:
        """The optimizer group of the parameter at `path` (e.g. ("dvae", "encoder", ...))."""

    @staticmethod
    def check_config(config: Any) -> None:
        """Raises ConfigError naming the key when the model's config sections are invalid."""

    def __call__(self, batch: Batch, key: jax.Array, step: jax.Array, *,
                 train: bool = True, adjoint_probe: jax.Array | None = None) -> ModelOutput:
        """Training forward pass: loss, scalar metrics and per-example outputs.

        train=False is evaluation mode (no dropout; the validation loss). `adjoint_probe`, zeros
        [B, 3], is handed to slot attention: its cotangent under `jax.grad` is the backward
        solve's (relative residual, steps, failed) per example (fixed_point_layer's probe)."""

    def encode_slots(self, image: jax.Array, key: jax.Array, *,
                     num_iterations: int | None = None) -> SlotEncoding:
        """Slots of images [B, H, W, 3] in [0, 1] without dropout (evaluation iterations unless
        `num_iterations` is given)."""

    def fixed_point_step(self, sa_inputs: jax.Array) -> FixedPointStep:
        """(f, params, args) of the slot-attention update on `SlotEncoding.sa_inputs`, for
        diagnostics at the fixed point (e.g. the Jacobian's spectral norm)."""

    def visualize(self, batch: Batch, key: jax.Array, step: jax.Array) -> Pictures:
        """Arrays for the training dashboard's picture grid."""

    def evaluate_batch(self, batch: Batch, key: jax.Array, *, full: bool = True) -> EvalBatch:
        """Per-example evaluation metrics and the arrays for host-side metrics. `full=False`
        leaves out what is costly (SLATE's autoregressive decoding and the images for FID), for
        the evaluations during training."""

    def evaluation_pictures(self, batch: Batch, key: jax.Array) -> Pictures:
        """`visualize`'s arrays plus the slot-deletion decodings, where the model has them."""
