"""Slot-attention set prediction with implicit slot attention on the embedded synthetic scenes.

Sized for 2 CPU cores: 32x32 images with 2-4 objects, 32-channel CNN with strides 1, 2, 2, 1
(an 8x8 feature grid), 5 slots (the targets are padded with zero rows to the slot count).
Targets: (y, x) | shape (5) | colour (8) | size (2) | visible = 18 floats (the "synthetic"
layout). AP at the paper's thresholds comes from `main.py --mode=eval`.
"""
from configs import common


def get_config(variant: str | None = None):
    """This experiment; `variant="tiny"` (`--config=FILE:tiny`) is it at test sizes."""
    config = common.set_prediction_base()
    config.grad = "neumann1"

    config.data.name = "synthetic"
    config.data.image_size = 32
    config.data.min_objects = 2
    config.data.max_objects = 4

    config.autoencoder.encoder_channels = (32, 32, 32, 32)
    config.autoencoder.encoder_strides = (1, 2, 2, 1)

    config.slot_attention.num_slots = 5
    config.slot_attention.num_iterations = 3
    config.slot_attention.slot_size = 64
    config.slot_attention.mlp_hidden_size = 128

    config.optim.main_lr = 4e-4
    config.optim.warmup_steps = 500
    config.optim.decay = "none"

    config.train.batch_size = 64
    config.train.num_steps = 3_000
    config.train.log_every_steps = 50
    config.train.image_every_steps = 500
    config.train.jacobian_every_steps = 250
    config.train.checkpoint_every_steps = 1_000
    config.eval.batch_size = 64
    if common.check_variant(variant) == "tiny":
        common.tiny_synthetic_data(config, min_objects=1, max_objects=3)
        common.tiny_set_prediction(config)
    return config
