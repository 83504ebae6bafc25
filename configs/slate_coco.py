"""SLATE + implicit slot attention on COCO-2017 at 96x96 (Table 3), centre-cropped.

No released SLATE code loads COCO; the largest centred square is our choice (the authors'
image-folder loader squashes instead, `data.crop = "none"`).

Build the data first: python -m fixed_slots.data_prep build coco --source=DIR --data_dir=DIR
"""
from configs import common


def get_config(variant: str | None = None):
    """This experiment; `variant="tiny"` (`--config=FILE:tiny`) is it at test sizes."""
    config = common.slate_base()
    config.data.name = "coco"
    config.data.image_size = 96
    config.data.crop = "center"
    config.eval.segmentation_metrics = False  # up to 100 instances: not the papers' metric here
    config.slot_attention.num_slots = 7
    config.slot_attention.num_iterations = 7
    if common.check_variant(variant) == "tiny":
        common.tiny_slate(config)
    return config
