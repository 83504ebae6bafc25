"""How the train state and the jitted step are made: model -> pure params -> optimizer -> jit.

`build(config, mesh)` is what the trainer and the benchmarks call. The state type and the helpers
to go between pure params and the NNX module live with the step (`train_step.py`); they are
re-exported here so callers import one place.
"""
from __future__ import annotations

from typing import Callable

import jax
import ml_collections
from flax import nnx

from fixed_slots import models
from fixed_slots.fixed_point import parse_grad_mode
from fixed_slots import sharding
from fixed_slots.train.optim import make_optimizer
from fixed_slots.train.train_step import (  # noqa: F401  (re-exported)
    Params,
    TrainState,
    make_train_step,
    model_from_params,
    pure_params,
    split_params,
    with_lr_scale,
)


def build(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, donate: bool = True,
          flat_optimizer: bool = True) -> tuple[nnx.GraphDef, TrainState, Callable]:
    """(graphdef, initial state replicated on the mesh, jitted train step).

    The step is `step(state, batch, base_key) -> (state, metrics)`, compiled once, with the batch
    sharded over the data axis. `donate` lets the step write the new state into the old state's
    buffers (no second copy of params and optimiser state); False only for the before/after
    memory benchmark. `flat_optimizer=False` (the per-leaf optimizer) only for the before/after
    kernel counts.
    """
    model = models.create(config, rngs=nnx.Rngs(config.seed))
    graphdef, params = split_params(model)
    tx = make_optimizer(config.optim, params, flat=flat_optimizer)
    state = sharding.replicate(TrainState.create(params, tx), mesh)
    # The estimators with an adjoint solve (Implicit, Series) fill the probe.
    step_fn = make_train_step(graphdef, tx, decay=config.optim.decay,
                              adjoint_stats=parse_grad_mode(config.grad).grad in ("implicit",
                                                                                  "series"))
    repl, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    jitted = jax.jit(step_fn, in_shardings=(repl, data, repl), out_shardings=(repl, repl),
                     donate_argnums=(0,) if donate else ())
    return graphdef, state, jitted
