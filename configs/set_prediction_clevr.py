"""Locatello et al.'s set prediction on CLEVR (128x128, 10 slots, 3 iterations), implicit.

The base config is the paper's setting: 5x5 convs with strides 1, 2, 2, 1 (a 32x32 feature
grid), slot size 64 (MLP 128), per-slot head Dense(64, relu) -> Dense(19, sigmoid), Hungarian
Huber loss, Adam 4e-4 with 10k warm-up steps and halving every 100k, batch 512, 150k steps.
The official set-prediction data is not cropped (only resized to 128x128). AP at the thresholds
inf, 1, 0.5, 0.25, 0.125 is computed by `main.py --mode=eval` (fixed_slots.eval.evaluator).
Build the data first: `python -m fixed_slots.data_prep build clevr_with_masks --source=DIR`.
"""
from configs import common


def get_config(variant: str | None = None):
    """This experiment; `variant="tiny"` (`--config=FILE:tiny`) is it at test sizes."""
    config = common.set_prediction_base()
    config.grad = "neumann1"
    config.data.name = "clevr_with_masks"
    config.data.crop = "none"
    config.data.image_size = 128
    config.data.max_objects = 10
    config.slot_attention.num_slots = 10
    config.slot_attention.num_iterations = 3
    config.eval.batch_size = 512
    config.eval.num_batches = 30  # up to 15360 images (the official full evaluation: 15000)
    if common.check_variant(variant) == "tiny":
        common.tiny_set_prediction(config)
    return config
