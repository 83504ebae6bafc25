"""The defaults every experiment config starts from, and the shared test-size helpers.

`slate_base()` is the official SLATE (ShapeStacks) hyperparameters, which the implicit
slot-attention paper used everywhere; `slot_autoencoder_base()` / `set_prediction_base()` are
Locatello et al.'s. A config file states what its experiment changes and its own variants:
`get_config("tiny")` (`--config=FILE:tiny`) is the same model, data and gradient mode at test
sizes, built from the helpers at the bottom of this file.

This is the only place config defaults live: library code reads every value from the config and
repeats none of them as keyword defaults.
"""
from __future__ import annotations

import ml_collections

from fixed_slots.errors import ConfigError

VARIANTS = ("tiny",)


def check_variant(variant: str | None) -> str | None:
    """The variant name (None or "" for the experiment itself); unknown names are refused."""
    if variant and variant not in VARIANTS:
        raise ConfigError(f"unknown config variant {variant!r}; variants: {', '.join(VARIANTS)}")
    return variant or None


def _common(model_name: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    # Gradient estimator of slot attention: unroll, neumannK, implicit, IN, IB, BN, BB.
    c.grad = "neumann1"

    c.model = ml_collections.ConfigDict()
    c.model.name = model_name

    c.slot_attention = ml_collections.ConfigDict()
    c.slot_attention.num_slots = 7
    # The paper's T: unroll differentiates T updates; the implicit modes run T updates without
    # gradient, then their differentiated update(s) (neumann1/IN: T + 1 updates in all).
    c.slot_attention.num_iterations = 7
    # Iterations at evaluation / inference; None follows num_iterations.
    c.slot_attention.eval_num_iterations = ml_collections.config_dict.placeholder(int)
    c.slot_attention.slot_size = 192
    c.slot_attention.mlp_hidden_size = 192
    c.slot_attention.num_heads = 1
    c.slot_attention.epsilon = 1e-8
    # The solver knobs `grad` leaves open, all in one place (None: the object's default).
    # `grad` picks solver, gradient and update count; these tune them. Read in one place:
    # fixed_slots.fixed_point.modes, GradMode.layer_options(T, **these).
    fp = c.slot_attention.fixed_point = ml_collections.ConfigDict()
    fp.tol = ml_collections.config_dict.placeholder(float)  # early exit of the forward solve
    fp.damping = 1.0  # naive iteration: z <- (1 - d) z + d f(z)
    fp.anderson_memory = 5
    fp.broyden_memory = 30
    # Implicit modes (implicit, IB, BB) only: the adjoint solver (None: the mode's, iterate for
    # "implicit", broyden for IB/BB; or anderson, gmres), its budget (None: T + 1 evaluations),
    # tolerance, and what a failed solve does ("fallback": the first-order term u = g for the
    # failed examples, with a warning; "nan": a non-finite gradient the trainer stops on;
    # "raise"). The backward solve's residual, steps and failures are logged as metrics.
    fp.adjoint_solver = ml_collections.config_dict.placeholder(str)
    fp.adjoint_max_iter = ml_collections.config_dict.placeholder(int)
    fp.adjoint_tol = ml_collections.config_dict.placeholder(float)
    fp.adjoint_on_failure = "fallback"

    c.data = ml_collections.ConfigDict()
    c.data.name = "synthetic"
    c.data.data_dir = ml_collections.config_dict.placeholder(str)
    c.data.image_size = 64
    c.data.seed = 0
    c.data.num_train = 100_000
    c.data.num_eval = 512
    c.data.min_objects = 2
    c.data.max_objects = 4
    # Synthetic scenes only: a preset of fixed_slots.data.synthetic.SCENE_STYLES.
    c.data.synthetic_style = "classic"
    # The authors' SLATE loaders resize the whole frame (no crop, non-square images squashed):
    # "none". "center" and "clevr" are for COCO and Locatello et al.'s CLEVR crop.
    c.data.crop = "none"
    c.data.num_workers = 0
    # Keep only scenes with at most this many visible objects (CLEVR6: 6); None keeps all.
    c.data.max_visible_objects = ml_collections.config_dict.placeholder(int)

    c.optim = ml_collections.ConfigDict()
    # One Adam learning rate per parameter group of the model (<group>_lr; SLATE adds dvae_lr).
    c.optim.main_lr = 1e-4
    c.optim.use_warmup = True
    c.optim.warmup_steps = 30_000
    # "validation_plateau" is the official SLATE rule: the validation loss, evaluated every
    # validation_every_steps (None: once per epoch of the training split, as the official code),
    # not strictly below its best plateau_patience times in a row halves both rates
    # (fixed_slots.train.plateau). "plateau": optax's reduce_on_plateau on the training loss
    # averaged over windows of plateau_accumulation_steps; "exponential": halve every
    # decay_half_life steps; "none".
    c.optim.decay = "validation_plateau"
    c.optim.decay_half_life = 250_000
    c.optim.plateau_patience = 4
    c.optim.plateau_factor = 0.5
    c.optim.plateau_accumulation_steps = 2_000
    c.optim.validation_every_steps = ml_collections.config_dict.placeholder(int)
    # Batches of eval.batch_size per validation pass; None: the whole validation split.
    c.optim.validation_batches = ml_collections.config_dict.placeholder(int)
    c.optim.clip = "inf_norm"
    c.optim.clip_value = 1.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 50
    c.train.num_steps = 250_000
    c.train.log_every_steps = 100
    c.train.image_every_steps = 5_000
    c.train.jacobian_every_steps = 1_000
    c.train.checkpoint_every_steps = 5_000
    c.train.max_checkpoints_to_keep = 3
    # An evaluation on the held-out images (eval.num_batches x eval.batch_size) every N steps,
    # without the costly parts (SLATE's autoregressive decoding, FID): eval/* in TensorBoard.
    c.train.eval_every_steps = 5_000
    # The full evaluation when a run reaches num_steps (not when stopped): WORKDIR/eval/.
    c.train.evaluate_at_end = True
    # "float32", or "bfloat16" for mixed precision (params and the fixed-point solve stay float32).
    c.train.compute_dtype = "float32"
    # Devices of the data-parallel mesh; None uses every device (all hosts).
    c.train.num_devices = ml_collections.config_dict.placeholder(int)

    c.eval = ml_collections.ConfigDict()
    c.eval.num_batches = 4
    c.eval.batch_size = 50
    c.eval.inception_weights = ml_collections.config_dict.placeholder(str)
    c.eval.num_images = 8
    # ARI / FG-ARI of the attention masks vs ground-truth instance masks (ids 0..max_objects),
    # when the data has masks.
    c.eval.segmentation_metrics = True
    return c


def slate_base() -> ml_collections.ConfigDict:
    """The official SLATE (ShapeStacks) hyperparameters; the implicit paper's Table 3 uses 96x96."""
    c = _common("slate")
    c.data.image_size = 96
    # The official two rates: the dVAE's (never warmed up) and everything else's (main_lr).
    c.optim.dvae_lr = 3e-4
    c.slate = ml_collections.ConfigDict()
    c.slate.vocab_size = 1024
    c.slate.d_model = 192
    c.slate.num_decoder_blocks = 4
    c.slate.num_decoder_heads = 4
    c.slate.dropout = 0.1
    c.slate.dvae_hidden = 64
    c.slate.tau_start = 1.0
    c.slate.tau_final = 0.1
    c.slate.tau_steps = 30_000
    c.slate.hard = False
    # Attention backend of the decoder: "xla" (jax.nn.dot_product_attention), "cudnn" (fused
    # kernel on NVIDIA GPUs), "einsum" (plain reference). attn_prob_dropout=True is the official
    # dropout on attention probabilities, which needs the unfused path while training.
    c.slate.attention_impl = "xla"
    c.slate.attn_prob_dropout = True
    return c


def slot_autoencoder_base() -> ml_collections.ConfigDict:
    """Locatello et al.'s object-discovery autoencoder (CLEVR6 128x128 hyperparameters)."""
    c = _common("slot_autoencoder")
    c.slot_attention.slot_size = 64
    c.slot_attention.mlp_hidden_size = 128
    c.slot_attention.num_iterations = 3
    c.data.image_size = 128
    c.autoencoder = ml_collections.ConfigDict()
    c.autoencoder.encoder_channels = (64, 64, 64, 64)
    c.autoencoder.encoder_strides = (1, 1, 1, 1)
    c.autoencoder.decoder_channels = (64, 64, 64, 64, 64)
    c.autoencoder.decoder_strides = (2, 2, 2, 2, 1)
    c.autoencoder.broadcast_size = 8
    # Kernel side of the encoder convs and the decoder's transposed convs (the last one is 3x3).
    c.autoencoder.kernel_size = 5
    c.optim.main_lr = 4e-4
    c.optim.warmup_steps = 10_000
    c.optim.decay = "exponential"
    c.optim.decay_half_life = 100_000
    c.optim.clip = "none"
    c.train.batch_size = 64
    c.train.num_steps = 500_000
    return c


def set_prediction_base() -> ml_collections.ConfigDict:
    """Locatello et al.'s property-prediction model (CLEVR 128x128, 10 slots)."""
    c = slot_autoencoder_base()
    c.model.name = "set_prediction"
    c.slot_attention.num_slots = 10
    c.autoencoder.encoder_strides = (1, 2, 2, 1)
    c.set_prediction = ml_collections.ConfigDict()
    c.set_prediction.mlp_hidden = 64
    c.data.max_objects = 10
    c.optim.decay_half_life = 100_000
    c.train.batch_size = 512
    c.train.num_steps = 150_000
    return c


# ----------------------------------------------------------------------------- test sizes
# Each config's `get_config("tiny")` calls the helpers of its model family: the same model, data
# and gradient mode at test sizes (16x16 images, 16-wide layers, 2 iterations) and a seconds-long
# schedule. Nothing here looks at which model or dataset a config uses.

def tiny_schedule(config: ml_collections.ConfigDict) -> None:
    """The seconds-long training schedule the test variants share (4 steps, batch 8)."""
    config.optim.warmup_steps = 2
    config.optim.decay = "none"
    config.train.batch_size = 8
    config.train.num_steps = 4
    config.train.log_every_steps = 2
    config.train.image_every_steps = 4
    config.train.jacobian_every_steps = 4
    config.train.checkpoint_every_steps = 2
    config.train.eval_every_steps = 0  # tests that read the eval/ curves turn it on
    config.eval.batch_size = 8
    config.eval.num_batches = 1
    config.eval.num_images = 2


def tiny_synthetic_data(config: ml_collections.ConfigDict, min_objects: int,
                        max_objects: int) -> None:
    """Few, small synthetic scenes of the classic style."""
    config.data.num_train = 256
    config.data.num_eval = 16
    config.data.synthetic_style = "classic"
    config.data.min_objects, config.data.max_objects = min_objects, max_objects


def _tiny_slot_attention(config: ml_collections.ConfigDict, num_slots: int) -> None:
    config.data.image_size = 16
    sa = config.slot_attention
    sa.num_slots = num_slots
    sa.num_iterations = 2
    sa.eval_num_iterations = None
    sa.slot_size = sa.mlp_hidden_size = 16
    sa.num_heads = 1


def tiny_slate(config: ml_collections.ConfigDict) -> None:
    """A SLATE config at test sizes: vocab 16, 16-wide, one decoder block, 3 slots."""
    _tiny_slot_attention(config, num_slots=3)
    config.slate.update(vocab_size=16, d_model=16, num_decoder_blocks=1, num_decoder_heads=2,
                        dvae_hidden=8, tau_steps=10)
    tiny_schedule(config)


def tiny_slot_autoencoder(config: ml_collections.ConfigDict) -> None:
    """A slot-autoencoder config at test sizes: two 8-channel 3x3 convs, 3 slots."""
    _tiny_slot_attention(config, num_slots=3)
    ae = config.autoencoder
    ae.encoder_channels = (8, 8)
    ae.kernel_size = 3
    ae.encoder_strides = (1, 1)
    ae.decoder_channels = (8, 8)
    ae.decoder_strides = (2, 1)
    ae.broadcast_size = 8  # 8 * 2 * 1 = 16
    tiny_schedule(config)


def tiny_set_prediction(config: ml_collections.ConfigDict) -> None:
    """A set-prediction config at test sizes: an 8x8 feature grid, 4 slots."""
    _tiny_slot_attention(config, num_slots=4)
    ae = config.autoencoder
    ae.encoder_channels = (8, 8)
    ae.kernel_size = 3
    ae.encoder_strides = (1, 2)  # an 8x8 feature grid
    config.set_prediction.mlp_hidden = 16
    tiny_schedule(config)
