"""The train state and the pure train step: (state, batch, key) -> (state, metrics).

`build(config, mesh)` makes both: model -> pure params -> optimizer -> jitted step. The state
that crosses the jit boundary is plain arrays: params are a nested dict of jax.Array
(`nnx.to_pure_dict`), merged into the NNX module only inside the traced function
(`model_from_params`), and the optimizer state is a few flat buffers (`optim.make_optimizer`).
An `nnx.State` would make every call flatten and rebuild one Python `Variable` per parameter on
the host (hundreds per step), which kept the GPU waiting.

The step returns its metrics as the model's clu collection (`SlotModel.train_metrics`, plus the
gradient norm and, for the gradient modes that solve an adjoint, its statistics), so the
trainer only merges them between logging steps.

A step whose loss, gradient or updated parameters are not all finite leaves params and
optimizer state untouched and records the first such step in `state.first_bad_step`; the host
checks it when it fetches metrics and before every save, so a bad step is named exactly without
a per-step device->host sync, and no checkpoint ever holds the state that came after it.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from fixed_slots import models, sharding
from fixed_slots.models import Params, aggregation, pure_params, split_params
from fixed_slots.models.common import reports_adjoint
from fixed_slots.train.optim import global_norm, inf_norm, make_optimizer, param_labels


def model_from_params(graphdef: nnx.GraphDef, params: Params) -> nnx.Module:
    """The NNX module for `params`; call it inside a traced function (builds Variables)."""
    return nnx.merge(graphdef, params)


@flax.struct.dataclass
class TrainState:
    params: Any  # Params: nested dict of jax.Array
    opt_state: Any  # optax state over a few flat buffers (NamedTuples of arrays)
    step: jax.Array  # [] int32: optimizer steps taken
    first_bad_step: jax.Array  # [] int32: first step with a non-finite loss/gradient, or -1
    # [] float32, starts at 1: multiplies every group's updates when decay="validation_plateau";
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


# The probe's cotangent [B, 3] = (relative residual ||u (I - J) - g|| / ||g||, steps, failed) per
# example (fixed_point_layer's probe), summarised over the logged steps.
ADJOINT_METRICS = {
    "adjoint_residual": aggregation.average("adjoint_residual"),
    "adjoint_residual_max": aggregation.average("adjoint_residual_max"),
    "adjoint_steps": aggregation.average("adjoint_steps"),
    "adjoint_failed": aggregation.average("adjoint_failed"),
}


def adjoint_metrics(probe_cotangent: jax.Array) -> dict[str, jax.Array]:
    """Scalars of the backward solve from the probe's cotangent [B, 3]."""
    residual, steps, failed = (probe_cotangent[:, i] for i in range(3))
    return {"adjoint_residual": jnp.mean(residual), "adjoint_residual_max": jnp.max(residual),
            "adjoint_steps": jnp.mean(steps), "adjoint_failed": jnp.mean(failed)}


def slot_attention_leaves(grads: Any) -> list[jax.Array]:
    """The leaves under a module attribute named `slot_attention` (every model of ours holds its
    SlotAttention there): the paper's Fig. 1b/5 tracks this gradient's norm on its own, as the
    one that grows without bound under backpropagation through the iterations."""
    flat, _ = jax.tree_util.tree_flatten_with_path(grads)
    return [leaf for path, leaf in flat
            if any(getattr(k, "key", getattr(k, "name", None)) == "slot_attention" for k in path)]


def step_metrics(model_class: type, adjoint_stats: bool) -> type[aggregation.Collection]:
    """The collection a train step returns: the model's, the gradient norm, the adjoint's."""
    extra = {"grad_norm": aggregation.average("grad_norm"),
             "slot_attention_grad_norm": aggregation.average("slot_attention_grad_norm")}
    if adjoint_stats:
        extra.update(ADJOINT_METRICS)
    return aggregation.extend(model_class.train_metrics, **extra)


def apply_updates(params: Params, updates: Params, loss: jax.Array, grad_norm: jax.Array
                  ) -> tuple[Params, jax.Array]:
    """(params + updates, True), or (params unchanged, False) when the loss, the gradient norm
    or an updated parameter is not finite (a finite gradient times a huge rate can overflow
    the parameters). The max |p + u| is finite exactly when every entry is; a sum of squares
    could overflow.

    (A check that reads only the inputs, max |p| + max |u|, lets each leaf's add and select
    fuse into one kernel: 116 fewer kernels in the default SLATE step on the CPU, but the
    unroll step ran 10-15% slower and the compilation no faster; BENCHMARKS.md.)
    """
    new_params = jax.tree.map(lambda p, u: (p + u).astype(p.dtype), params, updates)
    finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
              & jnp.isfinite(inf_norm(new_params)))
    # A non-finite step changes nothing.
    return jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_params,
                        params), finite


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    metrics: type[aggregation.Collection], decay: str = "none",
                    adjoint_stats: bool = False) -> Callable:
    """Builds train_step(state, batch, base_key) -> (state, metrics collection) for a model
    split as (graphdef, params).

    `decay` is config.optim.decay: it says which extra arguments the optimizer update takes.
    `adjoint_stats` (grad modes that solve or sum an adjoint: implicit, IB, BB, seriesK, BN):
    the model gets a zero probe whose cotangent reports the backward solve, logged as the
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
            (loss, values), (grads, probe_ct) = jax.value_and_grad(
                loss_fn, argnums=(0, 1), has_aux=True)(state.params, probe)
            values = dict(values, **adjoint_metrics(probe_ct))
        else:
            (loss, values), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params,
                                                                               None)
        updates, opt_state = tx.update(grads, state.opt_state, state.params,
                                       **update_args(decay, state, loss))
        grad_norm = global_norm(grads)
        slot_attention_grad_norm = global_norm(slot_attention_leaves(grads))
        params, finite = apply_updates(state.params, updates, loss, grad_norm)
        opt_state = jax.tree.map(lambda a, b: jnp.where(finite, a, b), opt_state,
                                 state.opt_state)
        first_bad = jnp.where((state.first_bad_step < 0) & ~finite, state.step,
                              state.first_bad_step)
        new_state = state.replace(params=params, opt_state=opt_state, step=state.step + 1,
                                  first_bad_step=first_bad)
        return new_state, metrics.single_from_model_output(
            **values, grad_norm=grad_norm, slot_attention_grad_norm=slot_attention_grad_norm)

    return train_step


def _jitted_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, model: nnx.Module,
                 donate: bool, flat_optimizer: bool):
    """(graphdef, params, optimizer, jitted step) for `model`, concrete or abstract."""
    graphdef, params = split_params(model)
    labels = param_labels(params, model.learning_rate_group)
    tx = make_optimizer(config.optim, labels, flat=flat_optimizer)
    adjoint_stats = reports_adjoint(config)
    step_fn = make_train_step(graphdef, tx, step_metrics(type(model), adjoint_stats),
                              decay=config.optim.decay, adjoint_stats=adjoint_stats)
    repl, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    jitted = jax.jit(step_fn, in_shardings=(repl, data, repl), out_shardings=(repl, repl),
                     donate_argnums=(0,) if donate else ())
    return graphdef, params, tx, jitted


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
    graphdef, params, tx, jitted = _jitted_step(config, mesh, model, donate, flat_optimizer)
    state = sharding.replicate(TrainState.create(params, tx), mesh)
    return graphdef, state, jitted


class StepBuilder:
    """The train step before the model is initialised, then the initial state.

    `build` in two halves, so that the step can compile while the parameters are drawn:
    `StepBuilder(config, mesh)` traces the model's construction abstractly (no parameter is
    computed) and gives `graphdef`, `abstract_state` (jax.ShapeDtypeStruct leaves with the
    replicated sharding, what `step.lower` and a checkpoint restore take) and the jitted `step`;
    `initial_state()` then draws the parameters eagerly, exactly as `build` does (the same
    values), on the mesh.
    """

    def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                 donate: bool = True):
        self.config, self.mesh = config, mesh
        model = nnx.eval_shape(lambda: models.create(config, rngs=nnx.Rngs(config.seed)))
        self.graphdef, params, self._tx, self.step = _jitted_step(config, mesh, model, donate,
                                                                  flat_optimizer=True)
        repl = sharding.replicated(mesh)
        self.abstract_state: TrainState = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl,
                                           weak_type=x.weak_type),
            jax.eval_shape(lambda p: TrainState.create(p, self._tx), params))

    def initial_state(self) -> TrainState:
        model = models.create(self.config, rngs=nnx.Rngs(self.config.seed))
        _, params = split_params(model)
        return sharding.replicate(TrainState.create(params, self._tx), self.mesh)
