"""SLATE (Singh et al., ICLR 2022) with implicit slot attention (Chang et al., NeurIPS 2022).

dVAE (Gumbel-softmax, 4x downsampling) -> hard tokens (detached) -> token embedding + learned
positions -> slot attention (a fixed point; `config.grad` picks its gradient) -> slots projected to
d_model -> image-GPT decoder with cross-attention to the slots, trained with cross-entropy on the
tokens. Loss = dVAE MSE (summed over pixels, averaged over the batch) + cross-entropy (summed over
tokens, averaged over the batch), exactly as the official code; the cross-entropy never reaches the
dVAE because the tokens are sampled and detached.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from fixed_slots import configlib
from fixed_slots.models import aggregation
from fixed_slots.models.common import SlotAttentionEncoder, slot_attention_from_config
from fixed_slots.models.losses import mse_per_image
from fixed_slots.models.protocol import (
    EvalBatch,
    FixedPointStep,
    ModelOutput,
    Pictures,
    SlotEncoding,
)
from fixed_slots.models.segmentation import segmentation_metrics, token_resolution_ceiling
from fixed_slots.modules.decoding import generate_tokens
from fixed_slots.modules.dtypes import at_least_float32
from fixed_slots.modules.dvae import DVAE, argmax, cosine_anneal, gumbel_max, gumbel_softmax
from fixed_slots.modules.encoders import LearnedPositionEmbedding, TokenEmbedding
from fixed_slots.modules.transformer import ATTENTION_IMPLS, TransformerDecoder

_xavier = nnx.initializers.xavier_uniform()
BOS_ID = 0  # decoder-input id of BOS; token k is fed as id k + 1


CHOICES = {"slate.attention_impl": tuple(i for i in ATTENTION_IMPLS if i is not None)}
RANGES = {
    "slate.vocab_size": (lambda v: configlib.is_int(v) and v >= 2, "an integer >= 2"),
    "slate.d_model": configlib.POSITIVE_INT,
    "slate.num_decoder_blocks": configlib.POSITIVE_INT,
    "slate.num_decoder_heads": configlib.POSITIVE_INT,
    "slate.dropout": configlib.UNIT_OPEN,
    "slate.dvae_hidden": configlib.POSITIVE_INT,
    "slate.tau_start": configlib.POSITIVE,
    "slate.tau_final": configlib.POSITIVE,
    "slate.tau_steps": configlib.NON_NEGATIVE_INT,
}


class Slate(nnx.Module):
    """SLATE. Images [B, H, W, 3] in [0, 1]; H, W multiples of 4."""

    # What the trainer shows on the progress line, what the validation pass (the official
    # learning-rate decay rule) averages, and the learning-rate groups of the parameters: the
    # dVAE trains at optim.dvae_lr, everything else at optim.main_lr (the official two rates).
    progress_metrics = ("loss", "cross_entropy")
    validation_metrics = ("loss", "dvae_mse", "cross_entropy")
    train_metrics = aggregation.collection(
        loss=aggregation.average("loss"), dvae_mse=aggregation.average("dvae_mse"),
        cross_entropy=aggregation.average("cross_entropy"),
        gumbel_temperature=aggregation.last("gumbel_temperature"),
        slot_residual=aggregation.average("slot_residual"))
    # What TensorBoard shows on each chart of these metrics (training, and eval/ for evaluation).
    metric_descriptions = {
        "loss": "dVAE MSE + cross-entropy, mean over the steps since the previous point.",
        "dvae_mse": "The dVAE's reconstruction error (sum over pixels and channels per image).",
        "cross_entropy": "Cross-entropy of the decoder's token predictions given the slots (sum "
                         "over tokens per image): how well the slots describe the image.",
        "gumbel_temperature": "The dVAE's Gumbel-softmax temperature (cosine-annealed).",
        "slot_residual": "Relative residual ||f(z)-z||/||z|| of slot attention's last update: "
                         "how close the slots are to a fixed point.",
        "fg_ari": "Foreground ARI of the slots' masks against the true instance masks "
                  "(background pixels ignored), mean over the held-out images; 1 = every object "
                  "in a slot of its own.",
        "ari": "ARI of the slots' masks against the true instance masks, background included.",
        "fg_ari_token_ceiling": "FG-ARI of perfect token-sized masks on the same images: the "
                                "best that masks of 4x4-pixel tokens can reach.",
        "mse_slot_recon": "Squared error of the image decoded autoregressively from the slots "
                          "(sum over pixels and channels, images in [0, 1]; the papers' MSE). "
                          "Full evaluations only.",
        "mse_dvae_recon": "Squared error of the dVAE's decoding of its own tokens: the floor of "
                          "mse_slot_recon.",
    }
    eval_metrics = aggregation.collection(**aggregation.per_image(
        "fg_ari", "ari", "fg_ari_token_ceiling", "mse_slot_recon", "mse_dvae_recon",
        "slot_residual"))

    @staticmethod
    def learning_rate_group(path: tuple[str, ...]) -> str:
        return "dvae" if path[0] == "dvae" else "main"

    @staticmethod
    def check_config(config: ml_collections.ConfigDict) -> None:
        """config.slate and what SLATE needs of the image size (ConfigError)."""
        configlib.check_choices(config, CHOICES)
        configlib.check_ranges(config, RANGES)
        s = config.slate
        if s.attention_impl == "cudnn":
            # Fail here rather than on the GPU (float32) or silently fall back to the unfused
            # path in training (dropout on the probabilities, which the fused kernel lacks).
            if config.train.compute_dtype != "bfloat16":
                raise configlib.bad_value(
                    "slate.attention_impl", "cudnn",
                    "'xla' or 'einsum' with float32 compute: cuDNN's fused attention is bf16/fp16 "
                    "only (set train.compute_dtype='bfloat16')")
            if s.attn_prob_dropout and s.dropout > 0:
                raise configlib.bad_value(
                    "slate.attention_impl", "cudnn",
                    "'xla' or 'einsum' while slate.attn_prob_dropout=True: the fused kernel has "
                    "no dropout on attention probabilities (set slate.attn_prob_dropout=False)")
        if config.data.image_size % 4:
            raise configlib.bad_value("data.image_size", config.data.image_size,
                                      "a multiple of 4 (the dVAE downsamples 4x)")
        if s.d_model % s.num_decoder_heads:
            raise configlib.bad_value("slate.num_decoder_heads", s.num_decoder_heads,
                                      f"a divisor of d_model={s.d_model}")
        if s.tau_final > s.tau_start:
            raise configlib.bad_value(
                "slate.tau_final", s.tau_final,
                f"at most slate.tau_start={s.tau_start} (the temperature anneals down)")

    def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        s = config.slate
        self.vocab_size = s.vocab_size
        self.d_model = s.d_model
        self.tau_start, self.tau_final, self.tau_steps = s.tau_start, s.tau_final, s.tau_steps
        self.hard = s.hard
        # Mixed precision: params stay float32; the dVAE, embeddings and decoder compute in
        # `compute_dtype`; slot attention (the fixed-point solve) and the losses in float32.
        self.compute_dtype = jnp.dtype(config.train.compute_dtype)
        dtype = None if self.compute_dtype == jnp.float32 else self.compute_dtype
        self.image_size = config.data.image_size
        self.grid = config.data.image_size // 4
        self.segmentation_metrics = config.eval.segmentation_metrics
        self.num_mask_ids = config.data.max_objects + 1
        self.num_tokens = self.grid * self.grid
        self.dvae = DVAE(s.vocab_size, 3, s.dvae_hidden, dtype=dtype, rngs=rngs)
        self.dictionary = TokenEmbedding(s.vocab_size + 1, s.d_model, dtype=dtype, rngs=rngs)
        self.positions = LearnedPositionEmbedding(1 + self.num_tokens, s.d_model, s.dropout,
                                                  rngs=rngs)
        self.encoder = SlotAttentionEncoder(
            s.d_model, slot_attention_from_config(config, input_size=s.d_model, rngs=rngs),
            rngs=rngs)
        self.slot_proj = nnx.Linear(config.slot_attention.slot_size, s.d_model, use_bias=False,
                                    kernel_init=_xavier, dtype=dtype, rngs=rngs)
        self.decoder = TransformerDecoder(
            s.num_decoder_blocks, self.num_tokens, s.d_model, s.num_decoder_heads, s.dropout,
            attention_impl=s.attention_impl, attn_prob_dropout=s.attn_prob_dropout, dtype=dtype,
            rngs=rngs)
        self.head = nnx.Linear(s.d_model, s.vocab_size, use_bias=False, kernel_init=_xavier,
                               dtype=dtype, rngs=rngs)

    def _compute(self, x: jax.Array) -> jax.Array:
        """x in the mixed-precision compute dtype; unchanged when computing in float32."""
        return x if self.compute_dtype == jnp.float32 else x.astype(self.compute_dtype)

    def temperature(self, step: jax.Array) -> jax.Array:
        return cosine_anneal(step, self.tau_start, self.tau_final, 0, self.tau_steps)

    def _check_image(self, image: jax.Array) -> None:
        expected = (self.image_size, self.image_size, 3)
        if image.ndim != 4 or tuple(image.shape[1:]) != expected:
            raise ValueError(f"SLATE expects images [batch, {expected[0]}, {expected[1]}, 3] "
                             f"(config.data.image_size={self.image_size}), got {tuple(image.shape)}")

    def embed(self, ids: jax.Array, start: int | jax.Array = 0, *, train: bool = False,
              rng: jax.Array | None = None) -> jax.Array:
        """Decoder-input ids [B, t] at positions start.. -> embeddings [B, t, D]."""
        return self.positions(self.dictionary(ids), start, deterministic=not train, rng=rng)

    def __call__(self, batch: dict[str, jax.Array], key: jax.Array, step: jax.Array, *,
                 train: bool = True, adjoint_probe: jax.Array | None = None) -> ModelOutput:
        """Loss = dVAE MSE + cross-entropy. train=False is the official validation pass: no
        dropout and hard (one-hot, straight-through) Gumbel samples for the dVAE reconstruction."""
        image = batch["image"]  # [B, H, W, 3]
        self._check_image(image)
        image = at_least_float32(image)
        k_soft, k_hard, k_pos, k_slots, k_dec = jax.random.split(key, 5)
        tau = self.temperature(step)
        log_probs = self.dvae.encode(image)  # [B, h, w, V]
        z_soft = gumbel_softmax(k_soft, log_probs, tau, self.hard or not train, axis=-1)
        recon = at_least_float32(self.dvae.decode(self._compute(z_soft)))
        mse = jnp.sum((image - recon) ** 2) / image.shape[0]

        tokens = jax.lax.stop_gradient(gumbel_max(k_hard, log_probs))  # [B, h, w] detached
        tokens = tokens.reshape(tokens.shape[0], -1).astype(jnp.int32)  # [B, L] row-major
        ids = jnp.concatenate([jnp.full((tokens.shape[0], 1), BOS_ID, jnp.int32), tokens + 1], 1)
        emb = self.embed(ids, train=train, rng=k_pos)  # [B, L + 1, D]
        slots, attn, info, _ = self.encoder(at_least_float32(emb[:, 1:]), k_slots, train=train,
                                            adjoint_probe=adjoint_probe)
        dec = self.decoder(emb[:, :-1], self.slot_proj(slots), deterministic=not train, rng=k_dec)
        logits = at_least_float32(self.head(dec))  # [B, L, V]
        log_p = jax.nn.log_softmax(logits, axis=-1)
        cross_entropy = -jnp.mean(jnp.sum(
            jnp.take_along_axis(log_p, tokens[..., None], axis=-1), axis=(1, 2)))
        loss = mse + cross_entropy
        metrics = {
            "loss": loss,
            "dvae_mse": mse,
            "cross_entropy": cross_entropy,
            "gumbel_temperature": jnp.asarray(tau, jnp.float32),
            "slot_residual": jnp.mean(info.final_residual),
        }
        outputs = {"dvae_recon": jnp.clip(recon, 0.0, 1.0), "attention": attn, "slots": slots,
                   "tokens": tokens}
        return ModelOutput(loss, metrics, outputs)

    def encode_slots(self, image: jax.Array, key: jax.Array, *, num_iterations: int | None = None
                     ) -> SlotEncoding:
        """Deterministic slot inference (no dropout, argmax tokens): slots, attention over the
        token grid, SA inputs, and the tokens."""
        self._check_image(image)
        log_probs = self.dvae.encode(image)
        tokens = argmax(log_probs, axis=-1).reshape(image.shape[0], -1).astype(jnp.int32)
        emb = self.embed(tokens + 1, 1)  # positions 1..L, as in training
        slots, attn, info, sa_inputs = self.encoder(at_least_float32(emb), key, train=False,
                                                    num_iterations=num_iterations)
        return SlotEncoding(slots, attn, info, sa_inputs, tokens)

    def fixed_point_step(self, sa_inputs: jax.Array) -> FixedPointStep:
        return self.encoder.fixed_point_step(sa_inputs)

    def decode_slots(self, slots: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Slots [B, S, D_slot] -> (image [B, H, W, 3] in [0, 1], tokens [B, L]) by greedy
        autoregressive decoding with the KV cache, then the dVAE decoder."""
        tokens = generate_tokens(self.decoder, lambda ids, start: self.embed(ids, start),
                                 self.head, self.slot_proj(slots), self.num_tokens, BOS_ID,
                                 token_id_offset=1)
        one_hot = jax.nn.one_hot(tokens.reshape(-1, self.grid, self.grid), self.vocab_size)
        image = self.dvae.decode(one_hot.astype(self.compute_dtype)).astype(jnp.float32)
        return jnp.clip(image, 0.0, 1.0), tokens

    def dvae_reconstruct(self, tokens: jax.Array) -> jax.Array:
        """Token ids [B, L] -> dVAE decoding of their one-hot grid, [B, H, W, 3] in [0, 1]."""
        grid_tokens = tokens.reshape(-1, self.grid, self.grid)
        one_hot = jax.nn.one_hot(grid_tokens, self.vocab_size, dtype=self.compute_dtype)
        return jnp.clip(self.dvae.decode(one_hot).astype(jnp.float32), 0, 1)

    def _pictures(self, image: jax.Array, enc: SlotEncoding) -> Pictures:
        slot_recon, _ = self.decode_slots(enc.slots)
        return Pictures(image=image,
                        masks=upsample_attention(enc.attention, self.grid, self.image_size),
                        recon=slot_recon, dvae_recon=self.dvae_reconstruct(enc.tokens))

    def visualize(self, batch: dict[str, jax.Array], key: jax.Array, step: jax.Array
                  ) -> Pictures:
        """Arrays for the dashboard / Fig. 4: input, dVAE and slot reconstructions, masks."""
        return self._pictures(batch["image"], self.encode_slots(batch["image"], key))

    def evaluate_batch(self, batch: dict[str, jax.Array], key: jax.Array, *, full: bool = True
                       ) -> EvalBatch:
        """Table 3: MSE of the autoregressive reconstruction from slots (and of the dVAE), and
        ARI / FG-ARI of the attention masks. `full=False` skips the autoregressive decoding
        (the costly part: one decoder pass per token), as evaluations during training do."""
        image = batch["image"]
        enc = self.encode_slots(image, key)
        per_example = {
            "mse_dvae_recon": mse_per_image(image, self.dvae_reconstruct(enc.tokens)),
            "slot_residual": enc.info.final_residual,
        }
        slot_recon = None
        if full:
            slot_recon, _ = self.decode_slots(enc.slots)
            per_example["mse_slot_recon"] = mse_per_image(image, slot_recon)
        if self.segmentation_metrics and "mask" in batch:
            masks = upsample_attention(enc.attention, self.grid, self.image_size)
            per_example.update(segmentation_metrics(batch["mask"], masks, self.num_mask_ids))
            per_example["fg_ari_token_ceiling"] = token_resolution_ceiling(
                batch["mask"], self.image_size // self.grid, self.num_mask_ids)
        return EvalBatch(per_example, generated=slot_recon)

    def evaluation_pictures(self, batch: dict[str, jax.Array], key: jax.Array) -> Pictures:
        """Fig. 4 arrays plus Fig. 9's slot deletion: [B, S, H, W, 3] decoded without slot s."""
        enc = self.encode_slots(batch["image"], key)
        slots = enc.slots  # [B, S, D]
        b, s, d = slots.shape
        removed = jnp.stack([jnp.delete(slots, i, axis=1, assume_unique_indices=True)
                             for i in range(s)], axis=1)  # [B, S, S-1, D]
        images, _ = self.decode_slots(removed.reshape(b * s, s - 1, d))
        return self._pictures(batch["image"], enc)._replace(
            slot_deletion=images.reshape(b, s, *images.shape[1:]))


def upsample_attention(attention: jax.Array, grid: int, image_size: int) -> jax.Array:
    """Token-grid attention [B, S, grid*grid] -> pixel masks [B, S, H, W] (nearest, as official)."""
    b, s, _ = attention.shape
    masks = attention.reshape(b, s, grid, grid)
    factor = image_size // grid
    return jnp.repeat(jnp.repeat(masks, factor, axis=2), factor, axis=3)
