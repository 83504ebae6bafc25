"""The CPU study of the paper's effects: small SLATE on crowded synthetic scenes.

The README's default model (64-d, 2 decoder blocks) at 32x32 (8x8 dVAE tokens) on harder
scenes: 3-5 objects with heavy occlusion, rotated shapes and jittered colours, 6 slots, the
paper's T=7, batch 16, 4000 steps: about 5 minutes a run on 2 cores (~15 steps/s). The sweep
`configs/sweeps/study_synthetic.py` varies the gradient (vanilla `unroll` vs implicit
`neumann1`), T, and clipping/warmup; docs/results.md reports what came out (3 seeds). The same
study at the paper's scale (CLEVR-Mirror, GPU) is
`configs/sweeps/study_clevr.py`.

  python main.py --config=configs/study_synthetic.py --config.grad=unroll --workdir=W
"""
from configs import common


def get_config(variant: str | None = None):
    """This experiment; `variant="tiny"` (`--config=FILE:tiny`) is it at test sizes."""
    config = common.slate_base()
    config.grad = "neumann1"

    config.data.name = "synthetic"
    config.data.synthetic_style = "crowded"  # heavy occlusion, rotation, colour jitter
    config.data.image_size = 32
    config.data.min_objects = 3
    config.data.max_objects = 5

    config.slate.vocab_size = 64
    config.slate.d_model = 64
    config.slate.num_decoder_blocks = 2
    config.slate.num_decoder_heads = 4
    config.slate.dvae_hidden = 32
    config.slate.tau_steps = 1_500

    config.slot_attention.num_slots = 6
    config.slot_attention.num_iterations = 7  # the paper's T
    config.slot_attention.slot_size = 64
    config.slot_attention.mlp_hidden_size = 128

    # The default run's rates (6x the paper's main rate: a short run) with the official
    # gradient clipping (inf-norm 1.0) and a linear warmup; the Fig. 5 runs remove them.
    config.optim.warmup_steps = 300
    config.optim.dvae_lr = 1e-3
    config.optim.main_lr = 6e-4
    config.optim.decay = "none"

    # Batch 16: half the default's cost per step, so that 3 seeds of every run fit a few hours of
    # 2 CPU cores; the effects are about the optimisation over steps.
    config.train.batch_size = 16
    config.train.num_steps = 4_000
    config.train.log_every_steps = 50
    config.train.image_every_steps = 2_000
    config.train.jacobian_every_steps = 200
    config.train.checkpoint_every_steps = 1_000
    config.eval.batch_size = 32
    config.eval.num_batches = 4
    if common.check_variant(variant) == "tiny":
        common.tiny_synthetic_data(config, min_objects=2, max_objects=2)
        common.tiny_slate(config)
    return config
