"""SLATE + implicit slot attention on CLEVR-Mirror at 96x96 (the paper's Table 3 setting).

Build the data first (a local copy of the scenes: images/, and masks/ for ARI/FG-ARI):
  python -m fixed_slots.data_prep build clevr_mirror --source=DIR --data_dir=DATA
  (on the development machine: --source=/work/shared/data/clevr_mirror --data_dir=/work/data/tfds)
Run: python main.py --config=configs/slate_clevr.py --config.grad=neumann1 --workdir=W
     --config.data.data_dir=DATA   (default: $TFDS_DATA_DIR, else ~/tensorflow_datasets)
Images are resized whole (no crop), as the authors' loader does. Masks: 0 background (floor,
sky and the mirror, reflections included), 1..k the scene's 3-6 objects, hence max_objects 6.
Table 2 / Fig. 3b use 64x64: --config.data.image_size=64 (configs/sweeps/table2.py; the 2-CPU
version is configs/study_clevr_mirror.py).
"""
from configs import common


def get_config(variant: str | None = None):
    """This experiment; `variant="tiny"` (`--config=FILE:tiny`) is it at test sizes."""
    config = common.slate_base()  # official SLATE hyperparameters, batch 50
    config.data.name = "clevr_mirror"
    config.data.image_size = 96
    # Mask ids 0..6 (3-6 objects): FG-ARI's contingency table has max_objects + 1 ids.
    config.data.min_objects = 3
    config.data.max_objects = 6
    config.slot_attention.num_slots = 7
    config.slot_attention.num_iterations = 7  # the paper's baseline iterations
    if common.check_variant(variant) == "tiny":
        common.tiny_slate(config)
    return config
