"""The paper's 64x64 experiment (Table 2, Fig. 3b) on CLEVR-Mirror, sized for 2 CPU cores.

SLATE at 64x64 (16x16 dVAE tokens of 4x4 pixels) on CLEVR-Mirror scenes of 3-6 objects, 7 slots,
the paper's T=7; the small SLATE of configs/study_synthetic.py (64-d, 2 decoder blocks, vocab 64),
batch 16, the default's learning rates with the official inf-norm clipping (1.0) and warmup.
The sweep configs/sweeps/study_clevr_mirror.py runs vanilla (`unroll`, T=7 and T=8), IN, IB, BN,
BB. STEP-COUNT ARITHMETIC: see SIZING below.

Data (built once; records `image`, `mask` 0 = background incl. the mirror, 1..k objects):
  python -m data_prep build clevr_mirror --source=/work/shared/data/clevr_mirror \\
      --data_dir=/work/data/tfds
and every command passes --config.data.data_dir=/work/data/tfds (None: $TFDS_DATA_DIR, else
~/tensorflow_datasets). One run:
  python main.py --config=configs/study_clevr_mirror.py --config.grad=unroll \\
      --config.data.data_dir=/work/data/tfds --workdir=W
"""
from fixed_slots import configlib

SIZING = None  # filled in below (a docstring paragraph, kept next to the numbers it explains)


def get_config(variant: str | None = None):
    """This experiment; `variant="tiny"` (`--config=FILE:tiny`) is it at test sizes."""
    config = configlib.slate_base()
    config.grad = "neumann1"

    config.data.name = "clevr_mirror"
    config.data.image_size = 64  # the paper's Table 2 resolution
    # Masks carry ids 0..6 (3-6 objects): FG-ARI's contingency table needs max_objects + 1 ids.
    config.data.min_objects = 3
    config.data.max_objects = 6

    config.slate.vocab_size = 64
    config.slate.d_model = 64
    config.slate.num_decoder_blocks = 2
    config.slate.num_decoder_heads = 4
    config.slate.dvae_hidden = 32
    config.slate.tau_steps = 1_500

    config.slot_attention.num_slots = 7
    config.slot_attention.num_iterations = 7  # the paper's T
    config.slot_attention.slot_size = 64
    config.slot_attention.mlp_hidden_size = 128

    # The default run's rates with the official gradient clipping (inf-norm 1.0, slate_base's)
    # and a linear warmup.
    config.optim.warmup_steps = 300
    config.optim.dvae_lr = 1e-3
    config.optim.main_lr = 6e-4
    config.optim.decay = "none"

    config.train.batch_size = 16
    config.train.num_steps = 4_000
    config.train.log_every_steps = 50
    config.train.image_every_steps = 2_000
    config.train.jacobian_every_steps = 200
    config.train.checkpoint_every_steps = 1_000
    # The whole validation split: 455 scenes = 13 batches of 35 (the evaluation's standard error
    # over images is then ~half of what 128 images give).
    config.eval.batch_size = 35
    config.eval.num_batches = 0
    return configlib.variant(config, variant)
