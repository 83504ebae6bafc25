"""Locatello et al.'s (2020) slot-attention set predictor (object property prediction).

CNN encoder (5x5 convs, strides 1, 2, 2, 1 for 128x128: a 32x32 feature grid) + soft position
embedding -> LayerNorm -> MLP -> slot attention (a `fixed_point_layer`, `config.grad` picks the
gradient) -> per-slot MLP Dense(64, relu) -> Dense(D, sigmoid): every entry, positions included,
goes through a sigmoid, as in google-research `slot_attention/model.py::SlotAttentionClassifier`
(targets are in [0, 1]: normalised coordinates, one-hot groups, the real-object flag).

Loss: Keras Huber (delta 1, mean over the D entries) between targets and predictions, optimal
assignment by the Hungarian algorithm (host callback), matched costs summed per image and
averaged over the batch (`utils.hungarian_huber_loss`). Padding rows (absent or invisible
objects) are all-zero targets and are matched like real ones, as in the official code; targets
with fewer rows than slots are padded with zero rows so that every slot is matched.

Average precision needs the host: `evaluate_batch` returns predictions, confidences (the last,
"visible" entry) and targets (`SetPredictions`), and evaluation computes AP at the official
thresholds in the units of the dataset's target layout (`fixed_slots.data.sources.target_layout`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from fixed_slots import configlib
from fixed_slots.data import sources
from fixed_slots.data.synthetic import TargetLayout
from fixed_slots.models import aggregation
from fixed_slots.models.losses import hungarian_huber_per_image
from fixed_slots.models.protocol import (
    EvalBatch,
    FixedPointStep,
    ModelOutput,
    Pictures,
    SetPredictions,
    SlotEncoding,
)
from fixed_slots.models.slot_autoencoder import (
    check_encoder_config,
    check_image,
    cnn_slot_encoder_from_config,
    to_network_range,
)

_glorot = nnx.initializers.xavier_uniform()  # Keras Dense default

RANGES = {"set_prediction.mlp_hidden": configlib.POSITIVE_INT}


def data_layout(config: ml_collections.ConfigDict) -> TargetLayout:
    """The layout of batch["target"], as config.data's dataset declares it (ConfigError if it
    has no per-object properties)."""
    layout = sources.target_layout(config.data)
    if layout is None:
        raise configlib.bad_value("data.name", config.data.name,
                                  "a dataset with per-object properties for set prediction")
    return layout


def pad_objects(target: jax.Array, num_slots: int) -> jax.Array:
    """target [B, K, D] -> [B, num_slots, D] with zero rows appended (K <= num_slots)."""
    k = target.shape[1]
    if k > num_slots:
        raise ValueError(f"batch['target'] has {k} objects per image but there are only "
                         f"{num_slots} slots (config.slot_attention.num_slots); every object "
                         f"needs a slot")
    return jnp.pad(target, ((0, 0), (0, num_slots - k), (0, 0)))


class SetPredictor(nnx.Module):
    """Set prediction. Images [B, H, W, 3] in [0, 1]; batch["target"] [B, K, D], K <= slots."""

    progress_metrics = ("loss",)
    validation_metrics = ("loss",)
    train_metrics = aggregation.collection(
        loss=aggregation.average("loss"), slot_residual=aggregation.average("slot_residual"))
    eval_metrics = aggregation.collection(**aggregation.per_image("loss", "slot_residual"))
    metric_descriptions = {
        "loss": "Hungarian-matched Huber loss between predicted and true object properties.",
        "slot_residual": "Relative residual ||f(z)-z||/||z|| of slot attention's last update.",
    }

    @staticmethod
    def learning_rate_group(path: tuple[str, ...]) -> str:
        return "main"

    @staticmethod
    def check_config(config: ml_collections.ConfigDict) -> None:
        """config.autoencoder's encoder, config.set_prediction, and targets in the data."""
        check_encoder_config(config)
        configlib.check_ranges(config, RANGES)
        data_layout(config)

    def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        self.image_size = int(config.data.image_size)
        self.num_slots = int(config.slot_attention.num_slots)
        self.layout = data_layout(config)
        hidden = int(config.set_prediction.mlp_hidden)
        self.encoder = cnn_slot_encoder_from_config(config, rngs=rngs)
        self.feature_resolution = self.encoder.cnn.out_resolution  # (h, w) of the attention
        slot_size = int(config.slot_attention.slot_size)
        self.head_in = nnx.Linear(slot_size, hidden, kernel_init=_glorot, rngs=rngs)
        self.head_out = nnx.Linear(hidden, self.layout.dim, kernel_init=_glorot, rngs=rngs)

    def _check_image(self, image: jax.Array) -> None:
        check_image(image, self.image_size, "SetPredictor")

    def _check_target(self, target: jax.Array) -> None:
        if target.ndim != 3 or target.shape[-1] != self.layout.dim:
            raise ValueError(
                f"SetPredictor expects batch['target'] [batch, objects, {self.layout.dim}] (the "
                f"target layout of the dataset), got {tuple(target.shape)}")

    def predict(self, slots: jax.Array) -> jax.Array:
        """slots [B, S, D_slot] -> property predictions [B, S, D] in (0, 1)."""
        return jax.nn.sigmoid(self.head_out(jax.nn.relu(self.head_in(slots))))

    def __call__(self, batch: dict[str, jax.Array], key: jax.Array, step: jax.Array, *,
                 train: bool = True, adjoint_probe: jax.Array | None = None) -> ModelOutput:
        del step
        image = batch["image"]  # [B, H, W, 3] in [0, 1]
        self._check_image(image)
        self._check_target(batch["target"])
        slots, attn, info, _ = self.encoder(to_network_range(image), key, train=train,
                                            adjoint_probe=adjoint_probe)
        pred = self.predict(slots)  # [B, S, D]
        target = pad_objects(batch["target"].astype(jnp.float32), self.num_slots)  # [B, S, D]
        loss = jnp.mean(hungarian_huber_per_image(pred, target))
        metrics = {"loss": loss, "slot_residual": jnp.mean(info.final_residual)}
        outputs = {"prediction": pred, "target": target, "attention": attn, "slots": slots}
        return ModelOutput(loss, metrics, outputs)

    def encode_slots(self, image: jax.Array, key: jax.Array, *, num_iterations: int | None = None
                     ) -> SlotEncoding:
        """Slot inference (eval iterations unless given): slots, attention, info, SA inputs."""
        self._check_image(image)
        return self.encoder.infer(image, key, num_iterations=num_iterations)

    def fixed_point_step(self, sa_inputs: jax.Array) -> FixedPointStep:
        return self.encoder.fixed_point_step(sa_inputs)

    def attention_masks(self, attention: jax.Array) -> jax.Array:
        """Attention [B, S, h*w] over the feature grid -> masks [B, S, H, W] (nearest)."""
        b, s, _ = attention.shape
        masks = attention.reshape(b, s, *self.feature_resolution)
        return jax.image.resize(masks, (b, s, self.image_size, self.image_size), "nearest")

    def visualize(self, batch: dict[str, jax.Array], key: jax.Array, step: jax.Array
                  ) -> Pictures:
        """Input and the slots' attention masks [B, S, H, W]."""
        del step
        enc = self.encode_slots(batch["image"], key)
        return Pictures(image=batch["image"], masks=self.attention_masks(enc.attention))

    def evaluate_batch(self, batch: dict[str, jax.Array], key: jax.Array, *, full: bool = True
                       ) -> EvalBatch:
        """Per-example matched Huber loss; predictions and targets for the host-side AP; every
        part is cheap, so `full` changes nothing."""
        del full
        enc = self.encode_slots(batch["image"], key)
        self._check_target(batch["target"])
        pred = self.predict(enc.slots)  # [B, S, D]
        target = pad_objects(batch["target"].astype(jnp.float32), self.num_slots)
        per_example = {"loss": hungarian_huber_per_image(pred, target),
                       "slot_residual": enc.info.final_residual}
        visible = self.layout.visible.start
        predictions = SetPredictions(
            prediction=pred, prediction_prob=pred[..., visible], target=target,
            target_visible=(target[..., visible] > 0.5).astype(jnp.float32))
        return EvalBatch(per_example, set_predictions=predictions)

    def evaluation_pictures(self, batch: dict[str, jax.Array], key: jax.Array) -> Pictures:
        return self.visualize(batch, key, jnp.int32(0))
