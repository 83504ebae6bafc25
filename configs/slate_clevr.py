"""SLATE + implicit slot attention on CLEVR-Mirror at 96x96 (the paper's Table 3 setting).

Build the data first: python -m fixed_slots.data_prep build clevr_mirror --source=DIR --data_dir=DIR
Run: python main.py --config=configs/slate_clevr.py --config.grad=neumann1 --workdir=W
     --config.data.data_dir=DIR   (default: $TFDS_DATA_DIR, else ~/tensorflow_datasets)
Images are resized whole (no crop), as the authors' loader does. Built from the generator's
layout (images/, scenes/, masks/), the data has instance masks and evaluation reports ARI/FG-ARI
(the mirror counts as background).
Table 2 / Fig. 3b use 64x64: --config.data.image_size=64.
"""
from configs import common


def get_config(variant: str | None = None):
    """This experiment; `variant="tiny"` (`--config=FILE:tiny`) is it at test sizes."""
    config = common.slate_base()  # official SLATE hyperparameters, batch 50
    config.data.name = "clevr_mirror"
    config.data.image_size = 96
    config.data.max_objects = 6  # mask ids 0..6 (3-6 objects a scene): ARI/FG-ARI count ids 0..6
    config.slot_attention.num_slots = 7
    config.slot_attention.num_iterations = 7  # the paper's baseline iterations
    if common.check_variant(variant) == "tiny":
        common.tiny_slate(config)
    return config
