"""SLATE with implicit slot attention on the embedded synthetic scenes (no download).

Small enough for 2 CPU cores: 32x32 images (8x8 tokens), a 2-block decoder, 64-d everything.
On 2 CPU cores (~5 steps/s) the per-slot masks in TensorBoard's `slate` images
(`tensorboard --logdir=WORKDIR`) pick out single objects after ~3000 steps and the
reconstructions from slots show the objects by ~4000.
"""
from fixed_slots import configlib


def get_config(variant: str | None = None):
    """This experiment; `variant="tiny"` (`--config=FILE:tiny`) is it at test sizes."""
    config = configlib.slate_base()
    config.grad = "neumann1"

    config.data.name = "synthetic"
    config.data.image_size = 32
    config.data.min_objects = 2
    config.data.max_objects = 3

    config.slate.vocab_size = 64
    config.slate.d_model = 64
    config.slate.num_decoder_blocks = 2
    config.slate.num_decoder_heads = 4
    config.slate.dvae_hidden = 32
    config.slate.tau_steps = 1_500

    config.slot_attention.num_slots = 4
    config.slot_attention.num_iterations = 5
    config.slot_attention.slot_size = 64
    config.slot_attention.mlp_hidden_size = 128

    config.optim.warmup_steps = 300
    config.optim.dvae_lr = 1e-3
    config.optim.main_lr = 6e-4
    config.optim.decay = "none"  # too short a run for plateau halving

    config.train.batch_size = 32
    config.train.num_steps = 5_000
    config.train.log_every_steps = 50
    config.train.image_every_steps = 1_000
    config.train.jacobian_every_steps = 250
    config.train.checkpoint_every_steps = 500
    config.eval.batch_size = 32
    return configlib.variant(config, variant)
