"""Locatello et al.'s (2020) slot-attention autoencoder for object discovery, as a fixed point.

CNN encoder (5x5 convs, ReLU) + soft position embedding -> flatten -> LayerNorm -> MLP -> slot
attention (a `fixed_point_layer`; `config.grad` picks unroll / neumannK / IN / IB / BN / BB) ->
spatial broadcast decoder per slot -> RGB + alpha logit per slot, alpha masks softmax-normalised
over the slots, image = sum_s alpha_s * rgb_s. As google-research `slot_attention`: the network
sees images in [-1, 1] and the loss is the mean squared error over pixels and channels in that
range (`utils.l2_loss`). Images come in and go out in [0, 1]; the `mse` metric is the same error
in [0, 1] units (loss / 4).
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from fixed_slots import configlib
from fixed_slots.fixed_point import FixedPointInfo
from fixed_slots.models import aggregation
from fixed_slots.models.common import slot_attention_from_config
from fixed_slots.models.losses import mse_per_image
from fixed_slots.models.protocol import (
    EvalBatch,
    FixedPointStep,
    ModelOutput,
    Pictures,
    SlotEncoding,
)
from fixed_slots.models.segmentation import segmentation_metrics
from fixed_slots.modules.decoders import SpatialBroadcastDecoder
from fixed_slots.modules.dtypes import at_least_float32
from fixed_slots.modules.encoders import CNNEncoder
from fixed_slots.modules.slot_attention import SlotAttention


def check_image(image: jax.Array, image_size: int, model_name: str) -> None:
    """Raises a ValueError naming config.data.image_size unless image is [B, S, S, 3]."""
    expected = (image_size, image_size, 3)
    if image.ndim != 4 or tuple(image.shape[1:]) != expected:
        raise ValueError(f"{model_name} expects images [batch, {expected[0]}, {expected[1]}, 3] "
                         f"(config.data.image_size={image_size}), got {tuple(image.shape)}")


def to_network_range(image: jax.Array) -> jax.Array:
    """[0, 1] -> [-1, 1], the official preprocessing."""
    return at_least_float32(image) * 2.0 - 1.0


def from_network_range(x: jax.Array) -> jax.Array:
    """[-1, 1] -> [0, 1], clipped."""
    return jnp.clip((x + 1.0) * 0.5, 0.0, 1.0)


def compute_dtype_of(config: ml_collections.ConfigDict) -> Any:
    """Flax `dtype` argument for the convolutions: None (float32) or the mixed-precision dtype."""
    dtype = jnp.dtype(config.train.compute_dtype)
    return None if dtype == jnp.float32 else dtype


class CNNSlotEncoder(nnx.Module):
    """Image [B, H, W, 3] in [-1, 1] -> CNN feature set [B, N, D] -> slot attention."""

    def __init__(self, cnn: CNNEncoder, slot_attention: SlotAttention):
        self.cnn = cnn
        self.slot_attention = slot_attention

    def __call__(self, image: jax.Array, key: jax.Array, *, train: bool = True,
                 num_iterations: int | None = None, adjoint_probe: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array, FixedPointInfo, jax.Array]:
        """-> (slots [B, S, D_slot], attention [B, S, N], info, slot-attention inputs [B, N, D])."""
        x = at_least_float32(self.cnn(image))  # [B, N, D]; the fixed point runs in float32
        slots, attn, info = self.slot_attention(x, key, train=train,
                                                num_iterations=num_iterations,
                                                adjoint_probe=adjoint_probe)
        return slots, attn, info, x

    def infer(self, image: jax.Array, key: jax.Array, *, num_iterations: int | None = None
              ) -> SlotEncoding:
        """Evaluation-mode slots of images in [0, 1]: slots, attention, info, SA inputs."""
        slots, attn, info, sa_inputs = self(to_network_range(image), key, train=False,
                                            num_iterations=num_iterations)
        return SlotEncoding(slots, attn, info, sa_inputs)

    def fixed_point_step(self, sa_inputs: jax.Array) -> FixedPointStep:
        """(f, params, args) of the slot-attention update on the SA inputs [B, N, D]."""
        return self.slot_attention.step_function(sa_inputs)


def cnn_slot_encoder_from_config(config: ml_collections.ConfigDict, *, rngs: nnx.Rngs
                                 ) -> CNNSlotEncoder:
    """Encoder sized by config.autoencoder.{encoder_channels, encoder_strides, kernel_size}."""
    check_encoder_config(config)
    ae = config.autoencoder
    channels = tuple(int(c) for c in ae.encoder_channels)
    strides = tuple(int(s) for s in ae.encoder_strides)
    size = int(config.data.image_size)
    # The official MLP after the CNN is Dense(64, relu) -> Dense(64): the CNN width both times.
    cnn = CNNEncoder((size, size), 3, channels, int(ae.kernel_size), strides,
                     mlp_hidden=channels[-1], out_features=channels[-1],
                     dtype=compute_dtype_of(config), rngs=rngs)
    sa = slot_attention_from_config(config, input_size=channels[-1], rngs=rngs)
    return CNNSlotEncoder(cnn, sa)


ENCODER_RANGES = {
    "autoencoder.encoder_channels": configlib.POSITIVE_INTS,
    "autoencoder.encoder_strides": configlib.POSITIVE_INTS,
    "autoencoder.kernel_size": configlib.POSITIVE_INT,
}
DECODER_RANGES = {
    "autoencoder.decoder_channels": configlib.POSITIVE_INTS,
    "autoencoder.decoder_strides": configlib.POSITIVE_INTS,
    "autoencoder.broadcast_size": configlib.POSITIVE_INT,
}


def check_encoder_config(config: ml_collections.ConfigDict) -> None:
    """config.autoencoder's CNN encoder keys (ConfigError)."""
    configlib.check_ranges(config, ENCODER_RANGES)
    ae = config.autoencoder
    if len(ae.encoder_channels) != len(ae.encoder_strides):
        raise configlib.bad_value(
            "autoencoder.encoder_strides", tuple(ae.encoder_strides),
            f"one stride per conv of encoder_channels={tuple(ae.encoder_channels)}")


class SlotAutoencoder(nnx.Module):
    """Object-discovery autoencoder. Images [B, H, W, 3] in [0, 1], H = config.data.image_size."""

    progress_metrics = ("loss", "mse")
    validation_metrics = ("loss", "mse")
    train_metrics = aggregation.collection(
        loss=aggregation.average("loss"), mse=aggregation.average("mse"),
        slot_residual=aggregation.average("slot_residual"))
    eval_metrics = aggregation.collection(**aggregation.per_image(
        "fg_ari", "ari", "mse_recon", "slot_residual"))
    metric_descriptions = {
        "loss": "Mean squared error over pixels and channels, images in [-1, 1] (the official "
                "loss).",
        "mse": "The loss in [0, 1] image units (loss / 4).",
        "slot_residual": "Relative residual ||f(z)-z||/||z|| of slot attention's last update.",
        "fg_ari": "Foreground ARI of the decoder's alpha masks against the true instance masks, "
                  "mean over the held-out images.",
        "ari": "ARI of the alpha masks, background included.",
        "mse_recon": "Squared error of the reconstruction (sum over pixels and channels, images "
                     "in [0, 1]).",
    }

    @staticmethod
    def learning_rate_group(path: tuple[str, ...]) -> str:
        return "main"

    @staticmethod
    def check_config(config: ml_collections.ConfigDict) -> None:
        """config.autoencoder (ConfigError)."""
        check_encoder_config(config)
        configlib.check_ranges(config, DECODER_RANGES)
        ae = config.autoencoder
        strides = tuple(ae.decoder_strides)
        if ae.broadcast_size * math.prod(strides) != config.data.image_size:
            raise configlib.bad_value(
                "autoencoder.broadcast_size", ae.broadcast_size,
                f"image_size / prod(decoder_strides) = {config.data.image_size} / "
                f"{math.prod(strides)} (the decoder must draw config.data.image_size pixels)")
        if len(ae.decoder_channels) != len(strides):
            raise configlib.bad_value(
                "autoencoder.decoder_strides", strides,
                f"one stride per layer of decoder_channels={tuple(ae.decoder_channels)}")

    def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        self.check_config(config)
        ae = config.autoencoder
        self.image_size = int(config.data.image_size)
        self.num_slots = int(config.slot_attention.num_slots)
        self.num_mask_ids = int(config.data.max_objects) + 1  # ids 0 (background) .. max_objects
        self.segmentation_metrics = bool(config.eval.segmentation_metrics)
        broadcast = int(ae.broadcast_size)
        strides = tuple(int(s) for s in ae.decoder_strides)
        self.encoder = cnn_slot_encoder_from_config(config, rngs=rngs)
        self.decoder = SpatialBroadcastDecoder(
            config.slot_attention.slot_size, (self.image_size, self.image_size),
            (broadcast, broadcast), tuple(int(c) for c in ae.decoder_channels), strides,
            kernel_size=int(ae.kernel_size), dtype=compute_dtype_of(config), rngs=rngs)

    def _check_image(self, image: jax.Array) -> None:
        check_image(image, self.image_size, "SlotAutoencoder")

    def _decode(self, slots: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """slots [B, S, D] -> recon [B,H,W,3], recons [B,S,H,W,3] in [-1, 1], masks [B,S,H,W]."""
        recon, recons, masks = self.decoder(slots)
        return at_least_float32(recon), at_least_float32(recons), masks[..., 0]

    def __call__(self, batch: dict[str, jax.Array], key: jax.Array, step: jax.Array, *,
                 train: bool = True, adjoint_probe: jax.Array | None = None) -> ModelOutput:
        del step  # no schedule inside the model
        image = batch["image"]  # [B, H, W, 3] in [0, 1]
        self._check_image(image)
        x = to_network_range(image)
        slots, attn, info, _ = self.encoder(x, key, train=train, adjoint_probe=adjoint_probe)
        recon, recons, masks = self._decode(slots)
        loss = jnp.mean(jnp.square(recon - x))  # official l2_loss, images in [-1, 1]
        metrics = {
            "loss": loss,
            "mse": loss * 0.25,  # the same error for images in [0, 1], mean over pixels
            "slot_residual": jnp.mean(info.final_residual),
        }
        if self.segmentation_metrics and "mask" in batch:
            seg = segmentation_metrics(batch["mask"], masks, self.num_mask_ids)
            metrics.update({name: jnp.mean(value) for name, value in seg.items()})
        outputs = {"recon": from_network_range(recon), "recons": from_network_range(recons),
                   "masks": masks, "attention": attn, "slots": slots}
        return ModelOutput(loss, metrics, outputs)

    def encode_slots(self, image: jax.Array, key: jax.Array, *, num_iterations: int | None = None
                     ) -> SlotEncoding:
        """Slot inference (eval iterations unless given): slots, attention, info, SA inputs."""
        self._check_image(image)
        return self.encoder.infer(image, key, num_iterations=num_iterations)

    def fixed_point_step(self, sa_inputs: jax.Array) -> FixedPointStep:
        return self.encoder.fixed_point_step(sa_inputs)

    def decode_slots(self, slots: jax.Array) -> dict[str, jax.Array]:
        """Slots [B, S, D] -> recon [B,H,W,3], recons [B,S,H,W,3] (both [0, 1]), masks [B,S,H,W]."""
        recon, recons, masks = self._decode(slots)
        return {"recon": from_network_range(recon), "recons": from_network_range(recons),
                "masks": masks}

    def visualize(self, batch: dict[str, jax.Array], key: jax.Array, step: jax.Array
                  ) -> Pictures:
        """Input, reconstruction, alpha masks [B,S,H,W], per-slot images [B,S,H,W,3].

        `per_slot` is each slot's RGB shown through its alpha mask on white (the official
        notebook's `recons * masks + (1 - masks)`).
        """
        del step
        image = batch["image"]
        dec = self.decode_slots(self.encode_slots(image, key).slots)
        m = dec["masks"][..., None]
        return Pictures(image=image, masks=dec["masks"], recon=dec["recon"],
                        per_slot=dec["recons"] * m + (1.0 - m))

    def evaluate_batch(self, batch: dict[str, jax.Array], key: jax.Array, *, full: bool = True
                       ) -> EvalBatch:
        """Per-example reconstruction MSE (sum over pixels, [0, 1] images), ARI, FG-ARI; every
        part is cheap, so `full` changes nothing."""
        del full
        image = batch["image"]
        enc = self.encode_slots(image, key)
        dec = self.decode_slots(enc.slots)
        per_example = {"mse_recon": mse_per_image(image, dec["recon"]),
                       "slot_residual": enc.info.final_residual}
        if self.segmentation_metrics and "mask" in batch:
            per_example.update(segmentation_metrics(batch["mask"], dec["masks"],
                                                    self.num_mask_ids))
        return EvalBatch(per_example)

    def evaluation_pictures(self, batch: dict[str, jax.Array], key: jax.Array) -> Pictures:
        """`visualize` plus slot deletion [B, S, H, W, 3]: the image composed without slot s.

        Deleting a slot renormalises the alpha masks of the others, which is exactly the
        softmax over the remaining slots' alpha logits.
        """
        enc = self.encode_slots(batch["image"], key)
        recon, recons, masks = self._decode(enc.slots)
        s = masks.shape[1]
        keep = 1.0 - jnp.eye(s, dtype=masks.dtype)  # [deleted, S]
        kept = masks[:, None] * keep[None, :, :, None, None]  # [B, S_del, S, H, W]
        kept = kept / jnp.maximum(jnp.sum(kept, axis=2, keepdims=True), 1e-12)
        deleted = jnp.sum(recons[:, None] * kept[..., None], axis=2)  # [B, S_del, H, W, 3]
        m = masks[..., None]
        per_slot = from_network_range(recons) * m + (1.0 - m)
        return Pictures(image=batch["image"], masks=masks, recon=from_network_range(recon),
                        per_slot=per_slot, slot_deletion=from_network_range(deleted))
