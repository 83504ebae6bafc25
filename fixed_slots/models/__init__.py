"""Composed models, picked by `config.model.name` from an explicit registry.

Every model satisfies `protocol.SlotModel` (training forward pass, slot encoding, its fixed-point
step, pictures, evaluation) and returns the NamedTuples of `protocol`. A trained one is read from
a workdir with `fixed_slots.trained.load`.
"""
from __future__ import annotations

import importlib
import importlib.util as _util
from typing import Any

# What the models import from setup.py's `train` extra: a light install (`pip install .`, the
# fixed_point layer alone) gets the fix, as from fixed_slots.train, not a bare ModuleNotFoundError.
_missing = [name for name in ("flax", "optax", "ml_collections", "absl", "scipy")
            if _util.find_spec(name) is None]
if _missing:
    raise ImportError(
        f"fixed_slots.models needs the training stack, which is not installed here (missing: "
        f"{', '.join(_missing)}). Install it with: pip install -e \".[train]\" (from a checkout; "
        f"\".[dev]\" adds the test tools). fixed_slots.fixed_point works without it.")

import ml_collections  # noqa: E402  (after the check above)
from flax import nnx

from fixed_slots.errors import ConfigError
from fixed_slots.models import common
from fixed_slots.models.protocol import SlotModel

Params = dict  # nested dict of jax.Array: a model's nnx.Param values (what checkpoints hold)

# name -> (module, class); imported on demand so one model's dependencies do not load the others.
_REGISTRY = {
    "slate": ("fixed_slots.models.slate", "Slate"),
    "slot_autoencoder": ("fixed_slots.models.slot_autoencoder", "SlotAutoencoder"),
    "set_prediction": ("fixed_slots.models.set_prediction", "SetPredictor"),
}
# The valid values of config.model.name.
NAMES = tuple(_REGISTRY)


def get(name: str) -> type:
    if name not in _REGISTRY:
        raise ConfigError(f"config.model.name={name!r} is invalid: expected one of "
                          f"{', '.join(repr(n) for n in _REGISTRY)}")
    module, cls = _REGISTRY[name]
    return getattr(importlib.import_module(module), cls)


def check_config(config: ml_collections.ConfigDict) -> None:
    """The model's sections of `config`: model.name, grad, slot_attention, compute dtype, and
    the model's own (e.g. config.slate), through the model's `check_config` (ConfigError)."""
    model = get(config.model.name)
    common.check_slot_attention_config(config)
    model.check_config(config)


def choices(config: ml_collections.ConfigDict) -> dict[str, tuple]:
    """Config key -> allowed values, for the keys the configured model reads."""
    out = {"model.name": NAMES, **common.CHOICES}
    if config.model.name in _REGISTRY:
        out.update(getattr(importlib.import_module(_REGISTRY[config.model.name][0]),
                           "CHOICES", {}))
    return out


def create(config: ml_collections.ConfigDict, *, rngs: nnx.Rngs) -> SlotModel:
    return get(config.model.name)(config, rngs=rngs)


def pure_params(params: Any) -> Params:
    """An nnx.State of params -> its nested dict of arrays (a pure dict is returned as is)."""
    if not isinstance(params, nnx.State):
        return params
    # nnx.to_pure_dict is the newer spelling (the State method is deprecated in flax 0.12).
    to_pure = getattr(nnx, "to_pure_dict", None)
    return to_pure(params) if to_pure else params.to_pure_dict()


def split_params(model: nnx.Module) -> tuple[nnx.GraphDef, Params]:
    """(graphdef, params as a nested dict of arrays) of a model whose variables are all
    nnx.Param; `nnx.merge(graphdef, params)` rebuilds it (inside a traced function: it builds
    Variables)."""
    graphdef, state = nnx.split(model, nnx.Param)
    return graphdef, pure_params(state)


def abstract_params(config: ml_collections.ConfigDict) -> tuple[nnx.GraphDef, Any]:
    """(graphdef, params as jax.ShapeDtypeStruct leaves) of the configured model, computing
    nothing (no initialisation): the target for restoring a checkpoint's params."""
    return split_params(nnx.eval_shape(lambda: create(config, rngs=nnx.Rngs(config.seed))))
