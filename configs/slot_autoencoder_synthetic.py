"""Slot-attention autoencoder (object discovery) with implicit slot attention on the embedded
synthetic scenes (no download).

Sized for 2 CPU cores (a few tenths of a second per step): 32x32 images with 2-3 objects, 4 slots,
32-channel CNNs with 3x3 kernels (the paper: 5x5, 64 channels), an 8x8 broadcast decoder with
strides 2, 2 (8 * 4 = 32). Watch the `reconstruction` images (masks) and the
`ari` / `fg_ari` scalars in TensorBoard (`tensorboard --logdir=WORKDIR`).
"""
from configs import common


def get_config(variant: str | None = None):
    """This experiment; `variant="tiny"` (`--config=FILE:tiny`) is it at test sizes."""
    config = common.slot_autoencoder_base()
    config.grad = "neumann1"

    config.data.name = "synthetic"
    config.data.image_size = 32
    config.data.min_objects = 2
    config.data.max_objects = 3

    config.autoencoder.encoder_channels = (32, 32, 32, 32)
    config.autoencoder.encoder_strides = (1, 1, 1, 1)
    config.autoencoder.decoder_channels = (32, 32)
    config.autoencoder.decoder_strides = (2, 2)
    config.autoencoder.broadcast_size = 8
    config.autoencoder.kernel_size = 3

    config.slot_attention.num_slots = 4
    config.slot_attention.num_iterations = 3
    config.slot_attention.slot_size = 64
    config.slot_attention.mlp_hidden_size = 128

    config.optim.main_lr = 4e-4
    config.optim.warmup_steps = 500
    config.optim.decay = "none"  # too short a run for the 100k-step halving

    config.train.batch_size = 16
    config.train.num_steps = 3_000
    config.train.log_every_steps = 50
    config.train.image_every_steps = 500
    config.train.jacobian_every_steps = 250
    config.train.checkpoint_every_steps = 1_000
    config.eval.batch_size = 16
    if common.check_variant(variant) == "tiny":
        common.tiny_synthetic_data(config, min_objects=1, max_objects=2)
        common.tiny_slot_autoencoder(config)
    return config
