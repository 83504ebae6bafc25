"""Composed models, picked by `config.model.name` from an explicit registry.

Every model satisfies `protocol.SlotModel` (training forward pass, slot encoding, its fixed-point
step, pictures, evaluation) and returns the NamedTuples of `protocol`. A trained one is read from
a workdir with `fixed_slots.trained.load`.
"""
from __future__ import annotations

import importlib
from typing import Any

import ml_collections
from flax import nnx

from fixed_slots.models.protocol import SlotModel

Params = dict  # nested dict of jax.Array: a model's nnx.Param values (what checkpoints hold)

# name -> (module, class); imported on demand so one model's dependencies do not load the others.
_REGISTRY = {
    "slate": ("fixed_slots.models.slate", "Slate"),
    "slot_autoencoder": ("fixed_slots.models.slot_autoencoder", "SlotAutoencoder"),
    "set_prediction": ("fixed_slots.models.set_prediction", "SetPredictor"),
}
# The valid values of config.model.name (configlib validates and lists them from here).
NAMES = tuple(_REGISTRY)


def get(name: str) -> type:
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(_REGISTRY)}")
    module, cls = _REGISTRY[name]
    return getattr(importlib.import_module(module), cls)


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
