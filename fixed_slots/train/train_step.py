"""The pure train step: (state, batch, key) -> (state, metrics). No Python side effects inside.

The state that crosses the jit boundary is plain arrays: params are a nested dict of jax.Array
(`nnx.to_pure_dict`), merged into the NNX module only inside the traced function
(`model_from_params`), and the optimizer state is a few flat buffers (`optim.make_optimizer`).
An `nnx.State` would make every call flatten and rebuild one Python `Variable` per parameter on
the host (hundreds per step), which is what kept the GPU waiting (issue 10).

A non-finite loss or gradient leaves params and optimizer state untouched for that step and records
the first such step in `state.first_bad_step`; the host checks it when it fetches metrics and before
every save, so a bad step is named exactly without a per-step device->host sync, and no checkpoint
ever holds the state that came after it.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from fixed_slots.models import Params, pure_params, split_params  # noqa: F401 (re-exported)
from fixed_slots.train.optim import global_norm


def model_from_params(graphdef: nnx.GraphDef, params: Params) -> nnx.Module:
    """The NNX module for `params`; call it inside a traced function (builds Variables)."""
    return nnx.merge(graphdef, params)


@flax.struct.dataclass
class TrainState:
    params: Any  # Params: nested dict of jax.Array
    opt_state: Any  # optax state over a few flat buffers (NamedTuples of arrays)
    step: jax.Array  # [] int32: optimizer steps taken
    first_bad_step: jax.Array  # [] int32: first step with a non-finite loss/gradient, or -1
    # [] float32, starts at 1: multiplies both groups' updates when decay="validation_plateau";
    # a host-side controller changes it between steps (with_lr_scale(state, x)).
    lr_scale: jax.Array

    @classmethod
    def create(cls, params: Any, tx: optax.GradientTransformation) -> "TrainState":
        params = pure_params(params)
        return cls(params, tx.init(params), jnp.zeros((), jnp.int32), jnp.full((), -1, jnp.int32),
                   jnp.ones((), jnp.float32))


def with_lr_scale(state: TrainState, value: float | jax.Array) -> TrainState:
    """The state with a new lr_scale, placed like the old one (same sharding: no new entry in
    the jitted step's cache, which a bare jnp.float32 on the default device would make)."""
    return state.replace(lr_scale=jax.device_put(jnp.asarray(value, jnp.float32),
                                                 state.lr_scale.sharding))


def update_args(decay: str, state: TrainState, loss: jax.Array) -> dict[str, jax.Array]:
    """The extra arguments `tx.update` needs for the decay (optim.make_optimizer)."""
    if decay == "plateau":
        return {"value": loss}
    if decay == "validation_plateau":
        return {"lr_scale": state.lr_scale}
    return {}


def adjoint_metrics(probe_cotangent: jax.Array) -> dict[str, jax.Array]:
    """Scalars of the backward solve from the probe's cotangent [B, 3] = (relative residual
    ||u (I - J) - g|| / ||g||, steps, failed) per example (fixed_point_layer's probe)."""
    residual, steps, failed = (probe_cotangent[:, i] for i in range(3))
    return {"adjoint_residual": jnp.mean(residual), "adjoint_residual_max": jnp.max(residual),
            "adjoint_steps": jnp.mean(steps), "adjoint_failed": jnp.mean(failed)}


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    decay: str = "none", adjoint_stats: bool = False) -> Callable:
    """Builds train_step(state, batch, base_key) for a model split as (graphdef, params).

    `decay` is config.optim.decay: it says which extra arguments the optimizer update takes.
    `adjoint_stats` (grad modes that solve or sum an adjoint: implicit, IB, BB, seriesK): the
    model gets a zero probe whose cotangent reports the backward solve, logged as the
    `adjoint_*` metrics, so a diverging adjoint is never invisible.
    """

    def train_step(state: TrainState, batch: dict[str, jax.Array], base_key: jax.Array):
        key = jax.random.fold_in(base_key, state.step)  # resumable: the key depends on the step

        def loss_fn(params, probe):
            out = model_from_params(graphdef, params)(batch, key, state.step, train=True,
                                                      adjoint_probe=probe)
            return out.loss, out.metrics

        if adjoint_stats:
            probe = jnp.zeros((batch["image"].shape[0], 3), jnp.float32)  # [B, 3]
            (loss, metrics), (grads, probe_ct) = jax.value_and_grad(
                loss_fn, argnums=(0, 1), has_aux=True)(state.params, probe)
            metrics = dict(metrics, **adjoint_metrics(probe_ct))
        else:
            (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params,
                                                                                None)
        updates, opt_state = tx.update(grads, state.opt_state, state.params,
                                       **update_args(decay, state, loss))
        grad_norm = global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        # A non-finite step changes nothing: the select sits in the update's own fusion.
        params = jax.tree.map(lambda p, u: jnp.where(finite, (p + u).astype(p.dtype), p),
                              state.params, updates)
        opt_state = jax.tree.map(lambda a, b: jnp.where(finite, a, b), opt_state,
                                 state.opt_state)
        first_bad = jnp.where((state.first_bad_step < 0) & ~finite, state.step,
                              state.first_bad_step)
        new_state = state.replace(params=params, opt_state=opt_state, step=state.step + 1,
                                  first_bad_step=first_bad)
        metrics = dict(metrics, grad_norm=grad_norm)
        return new_state, metrics

    return train_step
