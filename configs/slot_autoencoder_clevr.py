"""Locatello et al.'s object discovery on CLEVR6 (128x128, 7 slots, 3 iterations), implicit.

The base config is the paper's setting: four 5x5 convs (64 channels, stride 1), an 8x8 spatial
broadcast decoder with strides 2, 2, 2, 2, 1, slot size 64 (MLP 128), Adam 4e-4 with 10k warm-up
steps and halving every 100k, batch 64, 500k steps, no gradient clipping. Data: the CLEVR frames
cropped to rows 29:221, cols 64:256 (the official `apply_crop`) and resized to 128x128.

CLEVR6 keeps the scenes with at most 6 objects (`max_n_objects=6` in the official data.py):
`data.max_visible_objects = 6` filters the stream. ARI / FG-ARI use ids 0..10.
Build the data first: `python -m fixed_slots.data_prep build clevr_with_masks --source=DIR`.
"""
from configs import common


def get_config(variant: str | None = None):
    """This experiment; `variant="tiny"` (`--config=FILE:tiny`) is it at test sizes."""
    config = common.slot_autoencoder_base()
    config.grad = "neumann1"
    config.data.name = "clevr_with_masks"
    config.data.crop = "clevr"
    config.data.image_size = 128
    config.data.max_objects = 10  # instance ids in the CLEVR masks go up to 10
    config.data.max_visible_objects = 6  # CLEVR6
    config.slot_attention.num_slots = 7
    config.slot_attention.num_iterations = 3
    config.train.log_every_steps = 100
    config.train.image_every_steps = 5_000
    config.train.checkpoint_every_steps = 5_000
    config.eval.batch_size = 64
    if common.check_variant(variant) == "tiny":
        common.tiny_slot_autoencoder(config)
    return config
