"""Shared config pieces and the one place config values are validated.

Each file in configs/ starts from `slate_base()` (the official SLATE hyperparameters, which the
implicit-slot-attention paper used everywhere) or `slot_autoencoder_base()` / `set_prediction_base()`
and states what its experiment changes. `validate(config)` turns a bad value into a clear error
before anything is built or written.
"""
from __future__ import annotations

import ast
import importlib.util
from typing import Sequence

import ml_collections

from fixed_slots.fixed_point import parse_grad_mode

MODEL_NAMES = ("slate", "slot_autoencoder", "set_prediction")


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
    # Extra fixed_point_layer options (solver memories, tol, damping, adjoint budget).
    c.slot_attention.tol = ml_collections.config_dict.placeholder(float)
    c.slot_attention.damping = 1.0
    c.slot_attention.broyden_memory = 30
    c.slot_attention.adjoint_max_iter = ml_collections.config_dict.placeholder(int)

    c.data = ml_collections.ConfigDict()
    c.data.name = "synthetic"
    c.data.data_dir = ml_collections.config_dict.placeholder(str)
    c.data.image_size = 64
    c.data.seed = 0
    c.data.num_train = 100_000
    c.data.num_eval = 512
    c.data.min_objects = 2
    c.data.max_objects = 4
    # The authors' SLATE loaders resize the whole frame (no crop, non-square images squashed):
    # "none". "center" and "clevr" are for COCO and Locatello et al.'s CLEVR crop.
    c.data.crop = "none"
    c.data.num_workers = 0
    # Keep only scenes with at most this many visible objects (CLEVR6: 6); None keeps all.
    c.data.max_visible_objects = ml_collections.config_dict.placeholder(int)

    c.optim = ml_collections.ConfigDict()
    c.optim.dvae_lr = 3e-4
    c.optim.main_lr = 1e-4
    c.optim.use_warmup = True
    c.optim.warmup_steps = 30_000
    # The official code halves both rates when the validation loss stalls for 4 epochs; we
    # halve on the training loss averaged over windows of plateau_accumulation_steps.
    c.optim.decay = "plateau"
    c.optim.decay_half_life = 250_000
    c.optim.plateau_patience = 4
    c.optim.plateau_factor = 0.5
    c.optim.plateau_accumulation_steps = 2_000
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
    c.optim.dvae_lr = 4e-4  # no dVAE here; kept equal so the grouping is a no-op
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
    # Layout of batch["target"] (and of the predictions): "clevr" (CLEVR_TARGET_LAYOUT, 19 floats),
    # "synthetic" (SYNTHETIC_TARGET_LAYOUT, 18 floats) or "auto" (from data.name); see
    # fixed_slots.models.set_prediction.
    c.set_prediction.layout = "auto"
    c.data.max_objects = 10
    c.optim.decay_half_life = 100_000
    c.train.batch_size = 512
    c.train.num_steps = 150_000
    return c


def tiny_run(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The seconds-long training schedule the tiny test configs share (4 steps, batch 8)."""
    config.optim.warmup_steps = 2
    config.optim.decay = "none"
    config.train.batch_size = 8
    config.train.num_steps = 4
    config.train.log_every_steps = 2
    config.train.image_every_steps = 4
    config.train.jacobian_every_steps = 4
    config.train.checkpoint_every_steps = 2
    config.eval.batch_size = 8
    config.eval.num_batches = 1
    config.eval.num_images = 2
    return config


def from_file(path: str, assignments: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """get_config() of a config file (as main.py's --config), with `override` assignments."""
    spec = importlib.util.spec_from_file_location("config_file", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return override(module.get_config(), assignments)


def training_only(config: ml_collections.ConfigDict, steps: int, log_every: int
                  ) -> ml_collections.ConfigDict:
    """A copy that only trains for `steps` (no image or Jacobian summaries, one checkpoint at
    the end): what the benchmarks time and compare."""
    config = config.copy_and_resolve_references()
    config.train.num_steps = steps
    config.train.log_every_steps = log_every
    config.train.checkpoint_every_steps = steps
    config.train.image_every_steps = 0
    config.train.jacobian_every_steps = 0
    return config


def override(config: ml_collections.ConfigDict, assignments: Sequence[str]
             ) -> ml_collections.ConfigDict:
    """A copy of `config` with "key.path=value" assignments applied (the scripts' --set flags).

    Values are Python literals (`64`, `1e-3`, `'cudnn'`, `(1, 2)`); anything else is a string.
    Unknown keys and values of the wrong type raise ValueError naming the assignment.
    """
    config = config.copy_and_resolve_references()
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        if not sep or not key:
            raise ValueError(f"override {assignment!r}: expected key.path=value")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
        if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
            raise ValueError(f"override {assignment!r}: config has no key {key!r}")
        try:
            setattr(node, leaf, value)
        except TypeError as e:
            raise ValueError(f"override {assignment!r}: {e}") from None
    return config


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the key when a config value is out of its domain."""

    def bad(key, value, expected):
        raise ValueError(f"config.{key}={value!r} is invalid: expected {expected}")

    try:
        parse_grad_mode(config.grad)
    except ValueError as e:
        raise ValueError(f"config.grad: {e}") from None
    if config.model.name not in MODEL_NAMES:
        bad("model.name", config.model.name, f"one of {MODEL_NAMES}")
    if config.slot_attention.eval_num_iterations is not None and not (
            isinstance(config.slot_attention.eval_num_iterations, int)
            and config.slot_attention.eval_num_iterations >= 1):
        bad("slot_attention.eval_num_iterations", config.slot_attention.eval_num_iterations,
            "None (follow num_iterations) or a positive integer")
    positive = ["slot_attention.num_slots", "slot_attention.num_iterations",
                "slot_attention.slot_size",
                "slot_attention.mlp_hidden_size", "slot_attention.num_heads", "data.image_size",
                "train.batch_size", "train.num_steps", "train.log_every_steps",
                "train.checkpoint_every_steps"]
    for key in positive:
        value = config
        for part in key.split("."):
            value = value[part]
        if not isinstance(value, int) or value < 1:
            bad(key, value, "a positive integer")
    if config.slot_attention.slot_size % config.slot_attention.num_heads:
        bad("slot_attention.num_heads", config.slot_attention.num_heads,
            f"a divisor of slot_size={config.slot_attention.slot_size}")
    if config.optim.decay not in ("none", "exponential", "plateau"):
        bad("optim.decay", config.optim.decay, "'none', 'exponential' or 'plateau'")
    if config.optim.clip not in ("none", "global_norm", "inf_norm"):
        bad("optim.clip", config.optim.clip, "'none', 'global_norm' or 'inf_norm'")
    if config.train.compute_dtype not in ("float32", "bfloat16"):
        bad("train.compute_dtype", config.train.compute_dtype, "'float32' or 'bfloat16'")
    if config.model.name == "slate":
        if config.slate.attention_impl not in ("xla", "cudnn", "einsum"):
            bad("slate.attention_impl", config.slate.attention_impl, "'xla', 'cudnn' or 'einsum'")
        if config.slate.attention_impl == "cudnn":
            # Fail here rather than on the GPU (float32) or silently fall back to the unfused
            # path in training (dropout on the probabilities, which the fused kernel lacks).
            if config.train.compute_dtype != "bfloat16":
                bad("slate.attention_impl", "cudnn",
                    "'xla' or 'einsum' with float32 compute: cuDNN's fused attention is "
                    "bf16/fp16 only (set train.compute_dtype='bfloat16')")
            if config.slate.attn_prob_dropout and config.slate.dropout > 0:
                bad("slate.attention_impl", "cudnn",
                    "'xla' or 'einsum' while slate.attn_prob_dropout=True: the fused kernel has "
                    "no dropout on attention probabilities (set slate.attn_prob_dropout=False)")
        if config.data.image_size % 4:
            bad("data.image_size", config.data.image_size, "a multiple of 4 (the dVAE downsamples 4x)")
        if config.slate.d_model % config.slate.num_decoder_heads:
            bad("slate.num_decoder_heads", config.slate.num_decoder_heads,
                f"a divisor of d_model={config.slate.d_model}")
    import jax  # the device count decides how the batch splits

    devices = config.train.num_devices or jax.device_count()
    if config.train.num_devices is not None and not 1 <= devices <= jax.device_count():
        bad("train.num_devices", devices, f"between 1 and the {jax.device_count()} devices present")
    if config.train.batch_size % devices:
        bad("train.batch_size", config.train.batch_size,
            f"a multiple of the number of devices ({devices}; set config.train.num_devices)")
