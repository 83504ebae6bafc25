"""SLATE + implicit slot attention on ShapeStacks at 96x96 (Table 3).

Build the data first: python -m fixed_slots.data_prep build shapestacks --source=DIR --data_dir=DIR
"""
from configs import common


def get_config(variant: str | None = None):
    """This experiment; `variant="tiny"` (`--config=FILE:tiny`) is it at test sizes."""
    config = common.slate_base()
    config.data.name = "shapestacks"
    config.data.image_size = 96
    config.slot_attention.num_slots = 7
    config.slot_attention.num_iterations = 7
    if common.check_variant(variant) == "tiny":
        common.tiny_slate(config)
    return config
