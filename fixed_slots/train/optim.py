"""SLATE's optimiser as one optax transformation; every ablation of the paper's Fig. 5 is a switch.

Keys under `config.optim` (defaults in configs/common.py):
  <group>_lr            Adam learning rate of each parameter group; the model says which group
                        each parameter is in (`SlotModel.learning_rate_group`). SLATE: `dvae_lr`
                        for its dVAE and `main_lr` for the rest (the official two rates); the
                        other models have `main_lr` only.
  use_warmup,           linear warmup of the `main` group only:
  warmup_steps          lr * min(1, (step + 1) / warmup_steps), exactly the official
                        `linear_warmup` (it counts step + 1, so the first update is not wasted);
                        the other groups (SLATE's dVAE) are never warmed up, as in the official
                        code. warmup_steps <= 0 means no warmup.
  decay                 "none";
                        "exponential": both groups * 0.5 ** (step / decay_half_life) from step 0
                          (Locatello et al.'s decay 0.5 per 100k steps is decay_half_life=100_000);
                        "plateau": both groups scaled by plateau_factor whenever the monitored loss,
                          averaged over windows of plateau_accumulation_steps updates (default 1),
                          has not improved (relative tolerance 1e-4, as torch's default) for
                          plateau_patience consecutive windows. Built on
                          optax.contrib.reduce_on_plateau, so `tx.update(..., value=loss)` must be
                          given the loss at every step. An option, not the official rule.
                        "validation_plateau" (SLATE's default, the official rule): both groups'
                          updates multiplied by a scalar `lr_scale` given at every update
                          (`tx.update(..., lr_scale=x)`); the train state carries it and
                          fixed_slots.train.plateau lowers it between steps: the official
                          `train.py` keeps its own counter over the per-epoch *validation* loss,
                          counts an epoch as an improvement only when strictly below the best,
                          and halves both rates on the 4th epoch in a row without one (not
                          torch's ReduceLROnPlateau).
  decay_half_life       steps, for "exponential".
  plateau_patience,     windows without improvement before scaling; the scale factor (0.5 = halve).
  plateau_factor
  clip, clip_value      "none"; "global_norm" (optax.clip_by_global_norm: L2 over all grads);
                        "inf_norm" (max |g| over all grads; every grad scaled by
                        min(1, clip_value / (max|g| + 1e-6)), as torch's clip_grad_norm_(..., 'inf')
                        in the official code). Clipping is joint over both groups.
  b1, b2, eps           Adam.

Flat buffers (`flat=True`, the default): the transformation sees the params as one 1-D buffer per
group (every leaf of the group raveled and concatenated, in tree order), so clipping, Adam, the
plateau and lr_scale scalings are a handful of array ops on two buffers instead of a few ops per
leaf (hundreds of leaves: hundreds of tiny kernels per step on a GPU), and the optimizer state is a
few buffers. The result is the same arithmetic: Adam and the scalings are elementwise, the
inf-norm is a max; only the global L2 norm sums in another order (float32 round-off).
`flat=False` keeps the per-leaf chain (the reference the flat one is tested against).

The slot-attention autoencoder (Locatello et al.: lr 4e-4, warmup 10k, decay 0.5 per 100k) uses the
same keys: it has no dVAE params, so the dVAE group is simply empty.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from optax.contrib import ReduceLROnPlateauState

from fixed_slots import configlib
from fixed_slots.errors import ConfigError

MAIN = "main"  # the group that warms up
DECAYS = ("none", "exponential", "plateau", "validation_plateau")
CLIPS = ("none", "global_norm", "inf_norm")
CHOICES = {"optim.decay": DECAYS, "optim.clip": CLIPS}
RANGES = {
    "optim.warmup_steps": configlib.NON_NEGATIVE_INT,
    "optim.decay_half_life": configlib.POSITIVE,
    "optim.plateau_patience": configlib.POSITIVE_INT,
    "optim.plateau_factor": configlib.UNIT_EXCLUSIVE,
    "optim.plateau_accumulation_steps": configlib.POSITIVE_INT,
    "optim.validation_every_steps": configlib.OPTIONAL_POSITIVE_INT,
    "optim.validation_batches": configlib.OPTIONAL_POSITIVE_INT,
    "optim.clip_value": configlib.POSITIVE,
    "optim.b1": configlib.UNIT_OPEN,
    "optim.b2": configlib.UNIT_OPEN,
    "optim.eps": configlib.POSITIVE,
}


def group_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The parameter groups config.optim defines: one per `<group>_lr` key, `main` among them."""
    return tuple(key[:-len("_lr")] for key in config.keys() if key.endswith("_lr"))


def check_config(config: ml_collections.ConfigDict) -> None:
    """The config.optim section of a full config (ConfigError naming the key)."""
    configlib.check_choices(config, CHOICES)
    configlib.check_ranges(config, RANGES)
    groups = group_names(config.optim)
    if MAIN not in groups:
        raise ConfigError("config.optim has no main_lr: the learning rate of the main parameter "
                          "group is required")
    configlib.check_ranges(config, {f"optim.{g}_lr": configlib.POSITIVE for g in groups})


def _flat_f32(tree: Any) -> jax.Array:
    """Every leaf raveled and concatenated, as float32: one buffer, so a norm over it is one
    reduction (XLA fuses the concatenation into it) rather than one per leaf."""
    leaves = [jnp.ravel(g).astype(jnp.float32) for g in jax.tree.leaves(tree)]
    return jnp.concatenate(leaves) if leaves else jnp.zeros((0,), jnp.float32)


def global_norm(grads: Any) -> jax.Array:
    """L2 norm over every leaf, accumulated in float32 (bf16 grads would lose the sum)."""
    return jnp.sqrt(jnp.sum(jnp.square(_flat_f32(grads))))


def inf_norm(grads: Any) -> jax.Array:
    """max |g| over every leaf (float32); 0 for an empty tree."""
    flat = _flat_f32(grads)
    return jnp.max(jnp.abs(flat)) if flat.size else jnp.zeros((), jnp.float32)


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def param_labels(params: Any, group_of: Callable[[tuple[str, ...]], str]) -> Any:
    """Same-structured labels: `group_of(path)` of each leaf, the path as names (a model's
    `learning_rate_group`). Works on plain nested dicts and on `nnx.State`."""

    def label(path, _):
        return group_of(_path_key(path))

    return jax.tree_util.tree_map_with_path(label, params)


def schedule(config: ml_collections.ConfigDict, group: str) -> optax.Schedule:
    """The group's scheduled rate as a function of the update count (plateau scaling excluded)."""
    groups = group_names(config)
    if group not in groups:
        raise ValueError(f"unknown parameter group {group!r}: expected one of {groups}")
    base = config[f"{group}_lr"]
    warmup = group == MAIN and config.use_warmup and config.warmup_steps > 0

    def rate(step):
        step = jnp.asarray(step, jnp.float32)
        factor = jnp.ones((), jnp.float32)
        if warmup:
            factor = factor * jnp.minimum((step + 1.0) / config.warmup_steps, 1.0)
        if config.decay == "exponential":
            factor = factor * 0.5 ** (step / config.decay_half_life)
        return base * factor

    return rate


def plateau_scale(opt_state: Any) -> float:
    """The current reduce-on-plateau multiplier inside `opt_state` (1.0 if there is none)."""
    is_plateau = lambda x: isinstance(x, ReduceLROnPlateauState)
    scale = 1.0
    for leaf in jax.tree.leaves(opt_state, is_leaf=is_plateau):
        if is_plateau(leaf):
            scale *= float(leaf.scale)
    return scale


def learning_rates(config: ml_collections.ConfigDict, step: int, *,
                   opt_state: Any = None, lr_scale: Any = None) -> dict[str, float]:
    """Group name -> learning rate at `step`, for logging.

    With `opt_state`, the plateau multiplier it holds is included; with `lr_scale` (the train
    state's, for decay="validation_plateau"), that multiplier too; without, the rate is the
    schedule's alone.
    """
    scale = 1.0 if opt_state is None else plateau_scale(opt_state)
    if lr_scale is not None:
        scale *= float(lr_scale)
    return {group: float(schedule(config, group)(step)) * scale
            for group in group_names(config)}


def clip_by_inf_norm(max_norm: float) -> optax.GradientTransformation:
    """Scales every grad by min(1, max_norm / (max |g| + 1e-6)), as torch's inf-norm clipping."""

    def update(updates, state, params=None):
        del params
        scale = jnp.minimum(1.0, max_norm / (inf_norm(updates) + 1e-6))
        return jax.tree.map(lambda g: (g * scale).astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def scale_by_lr_scale() -> optax.GradientTransformationExtraArgs:
    """Multiplies every update by the `lr_scale` extra argument of `update` (required)."""

    def update(updates, state, params=None, *, lr_scale=None, **extra):
        del params, extra
        if lr_scale is None:
            raise TypeError("decay='validation_plateau' needs the current multiplier: "
                            "tx.update(grads, opt_state, params, lr_scale=x)")
        scale = jnp.asarray(lr_scale, jnp.float32)
        return jax.tree.map(lambda u: (u * scale).astype(u.dtype), updates), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


def _path_key(path: tuple) -> tuple[str, ...]:
    """A leaf's path as names, without the `.value` step of an nnx Variable, so an nnx.State and
    its pure-dict twin name each leaf the same."""
    names = [_key_name(k) for k in path]
    return tuple(names[:-1] if names and isinstance(path[-1], jax.tree_util.GetAttrKey)
                 and names[-1] == "value" else names)


def _label_leaves(labels: Any, tree: Any) -> list[str]:
    """The group label of each leaf of `tree` (tree order), from what the caller gave."""
    if callable(labels):
        return jax.tree.leaves(labels(tree))
    by_path = {_path_key(path): label
               for path, label in jax.tree_util.tree_flatten_with_path(labels)[0]}
    out = []
    for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
        key = _path_key(path)
        if key not in by_path:
            raise ValueError(f"no parameter-group label for {jax.tree_util.keystr(path)}")
        out.append(by_path[key])
    return out


class FlatGroups:
    """Ravels a params-shaped tree into {group: 1-D buffer} and back (static layout per tree)."""

    def __init__(self, labels: Any, groups: tuple[str, ...]):
        self.labels = labels
        self.groups = groups

    def ravel(self, tree: Any) -> dict[str, jax.Array]:
        leaves = jax.tree.leaves(tree)
        names = _label_leaves(self.labels, tree)
        out = {}
        for group in self.groups:
            parts = [jnp.ravel(x) for x, g in zip(leaves, names) if g == group]
            out[group] = jnp.concatenate(parts) if parts else jnp.zeros((0,), jnp.float32)
        return out

    def unravel(self, flat: dict[str, jax.Array], like: Any) -> Any:
        leaves, treedef = jax.tree.flatten(like)
        names = _label_leaves(self.labels, like)
        offsets = {group: 0 for group in self.groups}
        out = []
        for x, g in zip(leaves, names):
            start, size = offsets[g], int(np.size(x))
            out.append(flat[g][start:start + size].reshape(np.shape(x)).astype(x.dtype))
            offsets[g] = start + size
        return jax.tree.unflatten(treedef, out)


def flat_by_group(inner: optax.GradientTransformation, labels: Any, group_names: tuple[str, ...]
                  ) -> optax.GradientTransformationExtraArgs:
    """Runs `inner` on {group: buffer} (e.g. {"dvae": ..., "main": ...}) instead of the params.

    Like optax.flatten, with one buffer per parameter group so a per-group transformation
    (optax.multi_transform keyed by group name) and a joint one (clipping over all) both apply.
    """
    inner = optax.with_extra_args_support(inner)
    groups = FlatGroups(_labels_arg(labels, group_names), group_names)

    def init(params):
        for g in _label_leaves(groups.labels, params):
            if g not in group_names:
                raise ValueError(f"unknown parameter group label {g!r}: expected {group_names}")
        return inner.init(groups.ravel(params))

    def update(updates, state, params=None, **extra):
        flat_params = None if params is None else groups.ravel(params)
        flat, state = inner.update(groups.ravel(updates), state, flat_params, **extra)
        return groups.unravel(flat, updates), state

    return optax.GradientTransformationExtraArgs(init, update)


def _labels_arg(labels: Any, groups: tuple[str, ...]) -> Any:
    """A labels function or pytree for optax.multi_transform, checked against the groups."""
    if callable(labels):
        return labels
    unknown = set(jax.tree.leaves(labels)) - set(groups)
    if unknown:
        raise ValueError(f"unknown parameter group labels {sorted(unknown)}: the optimizer "
                         f"config has {groups} (one <group>_lr key each)")
    return labels


def make_optimizer(config: ml_collections.ConfigDict, labels: Callable[[Any], Any] | Any, *,
                   flat: bool = True) -> optax.GradientTransformation:
    """clip (optional) -> Adam per group with its schedule -> plateau / lr_scale (optional).

    `labels`: a labels pytree of group names shaped as the params (`param_labels(params,
    model.learning_rate_group)`), or a function params -> such a pytree.
    With decay="plateau" the update needs `value=<loss>`:
    `tx.update(grads, opt_state, params, value=loss)`; with decay="validation_plateau",
    `lr_scale=<multiplier>`. `flat` (default): the chain runs on one buffer per group (module
    docstring); the updates come back shaped as the params either way.
    """
    check_config(ml_collections.ConfigDict({"optim": config}))
    groups = group_names(config)
    if flat:
        return flat_by_group(_chain(config, {g: g for g in groups}), labels, groups)
    return _chain(config, _labels_arg(labels, groups))


def _chain(config: ml_collections.ConfigDict, labels: Any) -> optax.GradientTransformation:
    chain = []
    if config.clip == "global_norm":
        chain.append(optax.clip_by_global_norm(config.clip_value))
    elif config.clip == "inf_norm":
        chain.append(clip_by_inf_norm(config.clip_value))
    adam = {group: optax.adam(schedule(config, group), b1=config.b1, b2=config.b2, eps=config.eps)
            for group in group_names(config)}
    chain.append(optax.multi_transform(adam, labels))
    # After Adam, scaling the update is scaling both groups' learning rates.
    if config.decay == "plateau":
        chain.append(optax.contrib.reduce_on_plateau(
            factor=config.plateau_factor, patience=config.plateau_patience,
            accumulation_size=config.get("plateau_accumulation_steps", 1)))
    elif config.decay == "validation_plateau":
        chain.append(scale_by_lr_scale())
    return optax.chain(*chain)
