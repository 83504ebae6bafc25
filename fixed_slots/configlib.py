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

from fixed_slots.errors import ConfigError
from fixed_slots.fixed_point import parse_grad_mode


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
    # main.py evaluates the last checkpoint when a run reaches num_steps (not when stopped).
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


def tiny(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The `:tiny` variant of any config: the same model, data and gradient mode at test sizes
    (16x16 images, 16-wide layers, 2 iterations) and a seconds-long schedule (`tiny_run`)."""
    config = config.copy_and_resolve_references()
    name = config.model.name
    config.data.image_size = 16
    if config.data.name == "synthetic":
        config.data.num_train = 256
        config.data.num_eval = 16
        if "synthetic_style" in config.data:
            config.data.synthetic_style = "classic"
        config.data.min_objects, config.data.max_objects = {
            "slate": (2, 2), "slot_autoencoder": (1, 2), "set_prediction": (1, 3)}[name]
    sa = config.slot_attention
    sa.num_slots = 4 if name == "set_prediction" else 3
    sa.num_iterations = 2
    sa.eval_num_iterations = None
    sa.slot_size = sa.mlp_hidden_size = 16
    sa.num_heads = 1
    if name == "slate":
        config.slate.update(vocab_size=16, d_model=16, num_decoder_blocks=1, num_decoder_heads=2,
                            dvae_hidden=8, tau_steps=10)
    else:
        ae = config.autoencoder
        ae.encoder_channels = (8, 8)
        ae.kernel_size = 3
        if name == "slot_autoencoder":
            ae.encoder_strides = (1, 1)
            ae.decoder_channels = (8, 8)
            ae.decoder_strides = (2, 1)
            ae.broadcast_size = 8  # 8 * 2 * 1 = 16
        else:
            ae.encoder_strides = (1, 2)  # an 8x8 feature grid
            config.set_prediction.mlp_hidden = 16
    return tiny_run(config)


VARIANTS = {"tiny": tiny}


def variant(config: ml_collections.ConfigDict, name: str | None) -> ml_collections.ConfigDict:
    """`config` itself (name None or "") or its named variant (`--config=FILE:NAME`)."""
    if not name:
        return config
    if name not in VARIANTS:
        raise ConfigError(f"unknown config variant {name!r}; variants: {', '.join(VARIANTS)}")
    return VARIANTS[name](config)


def from_file(path: str, assignments: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """get_config() of a config file (as main.py's --config), with `override` assignments.

    `path:variant` calls `get_config("variant")` (ml_collections' config_flags convention, e.g.
    `configs/default.py:tiny`); a file whose get_config takes no argument has no variants.
    """
    path, sep, variant = path.partition(":")
    spec = importlib.util.spec_from_file_location("config_file", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(variant) if sep else module.get_config()
    return override(config, assignments)


def describe(config: ml_collections.ConfigDict) -> str:
    """The resolved config as `key = value` lines, with the allowed values of the choice keys."""
    allowed = choices()
    lines = []

    def walk(prefix: str, node: ml_collections.ConfigDict) -> None:
        for key in node.keys():  # insertion order: the order the config file reads
            value = node[key]
            name = f"{prefix}{key}"
            if isinstance(value, ml_collections.ConfigDict):
                lines.append(f"{name}:")
                walk(name + ".", value)
                continue
            line = f"{name} = {value!r}"
            if name in allowed:
                line = f"{line:<48}  # one of: {', '.join(str(a) for a in allowed[name])}"
            lines.append(line)

    walk("", config)
    return "\n".join(lines)


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


COMPUTE_DTYPES = ("float32", "bfloat16")


def choices() -> dict[str, tuple[str, ...]]:
    """Config key -> its allowed values, each list read from the module that implements it."""
    from fixed_slots import models
    from fixed_slots.data.pipeline import CROP_MODES
    from fixed_slots.data.sources import DATASETS
    from fixed_slots.fixed_point.modes import VALID_GRAD_MODES
    from fixed_slots.fixed_point import ADJOINT_SOLVERS
    from fixed_slots.fixed_point.options import ON_FAILURE
    from fixed_slots.models.set_prediction import LAYOUTS
    from fixed_slots.modules.transformer import ATTENTION_IMPLS
    from fixed_slots.train.optim import CLIPS, DECAYS

    return {
        "grad": VALID_GRAD_MODES,
        "model.name": models.NAMES,
        "data.name": DATASETS,
        "data.crop": CROP_MODES,
        "optim.decay": DECAYS,
        "optim.clip": CLIPS,
        "train.compute_dtype": COMPUTE_DTYPES,
        "slate.attention_impl": tuple(i for i in ATTENTION_IMPLS if i is not None),
        "set_prediction.layout": ("auto",) + tuple(LAYOUTS),
        "slot_attention.fixed_point.adjoint_solver": ADJOINT_SOLVERS,
        "slot_attention.fixed_point.adjoint_on_failure": ON_FAILURE,
    }


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v  # not NaN


_POSITIVE_INT = (lambda v: _is_int(v) and v >= 1, "a positive integer")
_NON_NEGATIVE_INT = (lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0 turns it off)")
_POSITIVE = (lambda v: _is_num(v) and v > 0, "a number > 0")
_OPTIONAL_POSITIVE = (lambda v: v is None or (_is_num(v) and v > 0), "None or a number > 0")
_OPTIONAL_POSITIVE_INT = (lambda v: v is None or (_is_int(v) and v >= 1),
                          "None or a positive integer")
_UNIT_OPEN = (lambda v: _is_num(v) and 0 <= v < 1, "a number in [0, 1)")
_UNIT_EXCLUSIVE = (lambda v: _is_num(v) and 0 < v < 1, "a number in (0, 1)")
_DAMPING = (lambda v: _is_num(v) and 0 < v <= 1, "a number in (0, 1]")
_POSITIVE_INTS = (lambda v: isinstance(v, (tuple, list)) and len(v) > 0
                  and all(_is_int(x) and x >= 1 for x in v), "a non-empty tuple of positive ints")

# Every numeric key whose sign or range is fixed (keys a config does not have are skipped).
RANGES = {
    "seed": _NON_NEGATIVE_INT,
    "slot_attention.num_slots": _POSITIVE_INT,
    "slot_attention.num_iterations": _POSITIVE_INT,
    "slot_attention.eval_num_iterations": (
        lambda v: v is None or (_is_int(v) and v >= 1),
        "None (follow num_iterations) or a positive integer"),
    "slot_attention.slot_size": _POSITIVE_INT,
    "slot_attention.mlp_hidden_size": _POSITIVE_INT,
    "slot_attention.num_heads": _POSITIVE_INT,
    "slot_attention.epsilon": _POSITIVE,
    "slot_attention.fixed_point.tol": _OPTIONAL_POSITIVE,
    "slot_attention.fixed_point.damping": _DAMPING,
    "slot_attention.fixed_point.anderson_memory": _POSITIVE_INT,
    "slot_attention.fixed_point.broyden_memory": _POSITIVE_INT,
    "slot_attention.fixed_point.adjoint_max_iter": _OPTIONAL_POSITIVE_INT,
    "slot_attention.fixed_point.adjoint_tol": _OPTIONAL_POSITIVE,
    "data.image_size": _POSITIVE_INT,
    "optim.dvae_lr": _POSITIVE,
    "optim.main_lr": _POSITIVE,
    "optim.warmup_steps": _NON_NEGATIVE_INT,
    "optim.decay_half_life": _POSITIVE,
    "optim.plateau_patience": _POSITIVE_INT,
    "optim.plateau_factor": _UNIT_EXCLUSIVE,
    "optim.plateau_accumulation_steps": _POSITIVE_INT,
    "optim.validation_every_steps": _OPTIONAL_POSITIVE_INT,
    "optim.validation_batches": _OPTIONAL_POSITIVE_INT,
    "optim.clip_value": _POSITIVE,
    "optim.b1": _UNIT_OPEN,
    "optim.b2": _UNIT_OPEN,
    "optim.eps": _POSITIVE,
    "train.batch_size": _POSITIVE_INT,
    "train.num_steps": _POSITIVE_INT,
    "train.log_every_steps": _POSITIVE_INT,
    "train.image_every_steps": _NON_NEGATIVE_INT,
    "train.jacobian_every_steps": _NON_NEGATIVE_INT,
    "train.checkpoint_every_steps": _POSITIVE_INT,
    "train.max_checkpoints_to_keep": _OPTIONAL_POSITIVE_INT,
    "train.num_devices": _OPTIONAL_POSITIVE_INT,
    "eval.num_batches": _NON_NEGATIVE_INT,
    "eval.batch_size": _POSITIVE_INT,
    "eval.num_images": _POSITIVE_INT,
    "slate.vocab_size": (lambda v: _is_int(v) and v >= 2, "an integer >= 2"),
    "slate.d_model": _POSITIVE_INT,
    "slate.num_decoder_blocks": _POSITIVE_INT,
    "slate.num_decoder_heads": _POSITIVE_INT,
    "slate.dropout": _UNIT_OPEN,
    "slate.dvae_hidden": _POSITIVE_INT,
    "slate.tau_start": _POSITIVE,
    "slate.tau_final": _POSITIVE,
    "slate.tau_steps": _NON_NEGATIVE_INT,
    "autoencoder.encoder_channels": _POSITIVE_INTS,
    "autoencoder.encoder_strides": _POSITIVE_INTS,
    "autoencoder.decoder_channels": _POSITIVE_INTS,
    "autoencoder.decoder_strides": _POSITIVE_INTS,
    "autoencoder.broadcast_size": _POSITIVE_INT,
    "autoencoder.kernel_size": _POSITIVE_INT,
    "set_prediction.mlp_hidden": _POSITIVE_INT,
}


def _lookup(config: ml_collections.ConfigDict, key: str):
    """(True, value) for a dotted key, (False, None) if the config lacks it."""
    node = config
    for part in key.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the key when a config value is out of its domain."""

    def bad(key, value, expected):
        raise ConfigError(f"config.{key}={value!r} is invalid: expected {expected}")

    try:
        parse_grad_mode(config.grad)
    except ValueError as e:
        raise ConfigError(f"config.grad: {e}") from None
    from fixed_slots.models.common import fixed_point_options

    try:
        parse_grad_mode(config.grad).layer_options(config.slot_attention.num_iterations,
                                                   **fixed_point_options(config))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config.slot_attention.fixed_point with grad={config.grad!r}: "
                          f"{e}") from None
    for key, allowed in choices().items():
        present, value = _lookup(config, key)
        if present and key != "grad" and value is not None and value not in allowed:
            bad(key, value, "one of " + ", ".join(repr(a) for a in allowed))
    for key, (ok, expected) in RANGES.items():
        present, value = _lookup(config, key)
        if present and not ok(value):
            bad(key, value, expected)
    if config.slot_attention.slot_size % config.slot_attention.num_heads:
        bad("slot_attention.num_heads", config.slot_attention.num_heads,
            f"a divisor of slot_size={config.slot_attention.slot_size}")
    if config.model.name == "slate":
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
        if config.slate.tau_final > config.slate.tau_start:
            bad("slate.tau_final", config.slate.tau_final,
                f"at most slate.tau_start={config.slate.tau_start} (the temperature anneals down)")
    import jax  # the device count decides how the batch splits

    devices = config.train.num_devices or jax.device_count()
    if config.train.num_devices is not None and not 1 <= devices <= jax.device_count():
        bad("train.num_devices", devices, f"between 1 and the {jax.device_count()} devices present")
    if config.train.batch_size % devices:
        bad("train.batch_size", config.train.batch_size,
            f"a multiple of the number of devices ({devices}; set config.train.num_devices)")
