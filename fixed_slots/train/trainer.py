"""`train_and_evaluate(config, workdir)`: the training loop around the pure train step.

Order of things: validate config -> mesh -> model + optimizer -> resume from the latest good
checkpoint in workdir (else initialise) -> data iterator at its saved position -> loop:
step, every `log_every_steps` fetch metrics and check for a non-finite step, write scalars,
images, Jacobian norms at their cadences, save checkpoints; SIGTERM saves and exits cleanly.
"""
from __future__ import annotations

import collections
import os
import signal
import threading
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fixed_slots import configlib, log
from fixed_slots.errors import ConfigError, UserError, WorkdirError
from fixed_slots.data.pipeline import make_loader
from fixed_slots import visualize
from fixed_slots import sharding
from fixed_slots.train.checkpoint import Checkpointer
from fixed_slots.train.optim import learning_rates
from fixed_slots.train.plateau import ValidationPlateau
from fixed_slots.train.state import TrainState, build, model_from_params, with_lr_scale
from fixed_slots.train.workdir import (
    WorkdirLock,
    check_workdir,
    config_differences,
    config_record,
    refuse_changed_config,
    saved_config,
)
from fixed_slots.train.writers import ProgressLine, create_writer


# Shown on the console progress line when the model reports them (SLATE's main metric is its
# cross-entropy; the autoencoder's, FG-ARI on data with masks).
PROGRESS_METRICS = ("loss", "cross_entropy", "fg_ari")


class NonFiniteLossError(UserError, FloatingPointError):
    """Raised when a step produced a non-finite loss or gradient; names the step (a run's
    outcome, usually of its hyperparameters: printed without a traceback)."""


def _flatten_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    flat = {}

    def walk(prefix, node):
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, ml_collections.ConfigDict):
                walk(name + ".", value)
            else:
                flat[name] = value if isinstance(value, (int, float, str, bool)) else str(value)

    walk("", config)
    return flat


class _Prefetcher:
    """Keeps `depth` batches on device ahead of the step; each carries the loader state *after*
    it, so a checkpoint taken after consuming it resumes with exactly the next batch."""

    def __init__(self, loader, mesh, depth: int = 2):
        self.loader, self.mesh, self.depth = loader, mesh, depth
        self.queue: collections.deque = collections.deque()

    def _fill(self):
        while len(self.queue) < self.depth:
            batch = next(self.loader)
            self.queue.append((sharding.put_batch(batch, self.mesh), self.loader.get_state()))

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        self._fill()
        return self.queue.popleft()


class _StopFlag:
    """Set by SIGTERM (and SIGINT): the loop saves a checkpoint and returns.

    In a multi-process job (`coordinated`) every process must stop at the same step: SIGTERM is
    left to JAX's preemption notifier (installed by jax.distributed.initialize), which tells
    every process; SIGINT becomes a SIGTERM of this process; the loop sets `stop` when
    `sharding.reached_preemption_sync_point` says all processes have reached the agreed step.
    """

    def __init__(self, coordinated: bool = False):
        self.stop = False
        self.coordinated = coordinated
        self._signalled = False
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            signals = (signal.SIGINT,) if coordinated else (signal.SIGTERM, signal.SIGINT)
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.stop or self._signalled:  # a second signal: the user wants out now
            self.restore()
            raise KeyboardInterrupt(f"signal {signum} received twice")
        self._signalled = True
        if self.coordinated:
            log.warning("Received signal %d: every process saves a checkpoint at the same step "
                        "and stops (send it again to stop without saving).", signum)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        log.warning("Received signal %d: saving a checkpoint and stopping (send it again to "
                    "stop without saving).", signum)
        self.stop = True

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _check_finite(state: TrainState, ckpt_dir: str) -> None:
    bad = int(jax.device_get(state.first_bad_step))
    if bad >= 0:
        # first_bad_step counts updates before the bad one; TensorBoard, checkpoints and the
        # console number a step by the updates done after it: the bad update is step bad + 1.
        raise NonFiniteLossError(
            f"non-finite loss or gradient at step {bad + 1}; training stopped. The last good "
            f"checkpoint is kept in {ckpt_dir} (no state after step {bad} was saved).")


def _save(checkpointer: Checkpointer, step: int, state: TrainState, base_key: jax.Array,
          data_state: Any, writer: Any, metadata: dict, force: bool = False) -> None:
    """Saves only a state that no non-finite step has touched, with the run's config.

    The writer is flushed first, so every step a checkpoint covers is in the event files even if
    the process is killed right after (CLU's writer would otherwise hold them until its periodic
    flush; the tensorboardX writer writes through).
    """
    _check_finite(state, checkpointer.directory)
    writer.flush()
    checkpointer.save(step, state_pytree={"state": state}, rng=base_key, data_state=data_state,
                      metadata=metadata, force=force)


def _saved_config(checkpointer: Checkpointer) -> dict | None:
    """The config record of the newest checkpoint whose metadata reads, or None."""
    for step in reversed(checkpointer.all_steps()):
        try:
            metadata = checkpointer.read_metadata(step)
        except Exception:  # an unreadable step: restore_latest reports and skips it
            continue
        return saved_config(metadata, step, checkpointer.directory)  # no config: refused
    return None


def _check_resume_config(checkpointer: Checkpointer, config_flat: dict, workdir: str,
                         accept_config_change) -> list[str]:
    """Refuses a resume whose config changes the run; returns the allowed changes."""
    saved = _saved_config(checkpointer)
    if saved is None:
        return []
    refused, allowed = config_differences(saved, config_flat, accept_config_change)
    if refused:
        refuse_changed_config(workdir, refused)
    return allowed


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       accept_config_change: tuple[str, ...] | list[str] = ()
                       ) -> list[dict[str, float]]:
    """Trains (resuming from workdir if it holds checkpoints).

    One run per workdir: a second process on a workdir in use is refused (WorkdirError naming
    the holder). Resuming with a config that changes the run is refused unless every changed key
    is in `accept_config_change` (see fixed_slots.train.workdir).
    Returns the metrics written in this call, one dict per logged step (with its "step").
    """
    # Before anything touches a device (validate counts devices): jax.distributed.initialize
    # refuses to run once the backend exists.
    sharding.maybe_initialize_distributed(config)  # and every process has this config
    configlib.validate(config)
    config_flat = config_record(config)
    unknown = [k for k in accept_config_change if k not in config_flat]
    if unknown:
        raise ConfigError(f"--accept_config_change names unknown config keys: "
                          f"{', '.join(unknown)}")
    check_workdir(workdir)  # on every process, before anything is written
    # The data first: a missing dataset fails in seconds, before any model is built and before
    # the workdir is created.
    loader = make_loader(config, "train", global_batch_size=config.train.batch_size,
                         shard_index=jax.process_index(), shard_count=jax.process_count(),
                         seed=config.seed)
    lock = WorkdirLock(workdir) if jax.process_index() == 0 else None
    try:
        return _train(config, workdir, config_flat, accept_config_change, loader)
    finally:
        if lock is not None:
            lock.release()


def _train(config: ml_collections.ConfigDict, workdir: str, config_flat: dict,
           accept_config_change, loader) -> list[dict[str, float]]:
    mesh = sharding.make_mesh(config.train.num_devices)
    graphdef, state, train_step = build(config, mesh)
    base_key = jax.random.key(config.seed)

    ckpt_dir = f"{workdir}/checkpoints"
    checkpointer = Checkpointer(ckpt_dir, max_to_keep=config.train.max_checkpoints_to_keep)
    try:
        changes = _check_resume_config(checkpointer, config_flat, workdir, accept_config_change)
        restored = checkpointer.restore_latest({"state": state})
    except BaseException:
        # Closed here, or orbax's background threads die noisily at interpreter exit.
        checkpointer.close()
        raise
    data_state = None
    if restored is not None:
        step0, tree, base_key, data_state = restored
        state = sharding.replicate(tree["state"], mesh)
        log.info("Resumed from %s at step %d%s.", ckpt_dir, step0,
                 f" with changes {'; '.join(changes)}" if changes else "")
    if data_state is not None:
        loader.set_state(data_state)
    plateau, validation, validate_every = None, None, 0
    if config.optim.decay == "validation_plateau":
        record = (checkpointer.read_metadata(step0).get("plateau", {})
                  if restored is not None else {})
        plateau = ValidationPlateau.from_dict(record, config.optim.plateau_patience,
                                              config.optim.plateau_factor)
        state = with_lr_scale(state, plateau.scale)
        validation = _Validation(config, graphdef, mesh)
        # The official code validates once per epoch of the training split.
        validate_every = config.optim.validation_every_steps or loader.batches_per_epoch
    batches = _Prefetcher(loader, mesh)

    writer = create_writer(workdir, just_logging=jax.process_index() > 0)
    start_step = int(jax.device_get(state.step))
    if start_step == 0:
        writer.write_hparams(_flatten_config(config))
    elif changes:
        writer.write_texts(start_step, {"config_changes": "\n".join(changes)})
    num_steps = config.train.num_steps
    progress = ProgressLine(num_steps, start_step=start_step,
                            every_steps=config.train.log_every_steps,
                            show=PROGRESS_METRICS, quiet=jax.process_index() > 0)
    diagnostics = _Diagnostics(config, graphdef, mesh)
    stop = _StopFlag(coordinated=jax.process_count() > 1)
    accumulated, count, history = None, 0, []
    data_state_now = data_state
    try:
        step = start_step
        while step < num_steps and not stop.stop:
            batch, data_state_now = next(batches)
            state, metrics = train_step(state, batch, base_key)
            step += 1
            if stop.coordinated and sharding.reached_preemption_sync_point(step):
                stop.stop = True  # the same step on every process; saved below
            accumulated = metrics if accumulated is None else _add_metrics(accumulated, metrics)
            count += 1
            if step % config.train.log_every_steps == 0 or step == num_steps:
                _check_finite(state, ckpt_dir)
                last = {k: float(v) / count for k, v in jax.device_get(accumulated).items()}
                last.update({f"learning_rate/{k}": v
                             for k, v in learning_rates(config.optim, step,
                                                        opt_state=state.opt_state,
                                                        lr_scale=state.lr_scale).items()})
                last["steps_per_second"] = progress.rate()
                writer.write_scalars(step, last)
                history.append(dict(last, step=step))
                progress.update(step, last)
                accumulated, count = None, 0
            if validate_every and step % validate_every == 0:
                scalars = validation.run(state.params, base_key, step)
                if plateau.update(scalars["validation/loss"]):
                    state = with_lr_scale(state, plateau.scale)
                    log.info("Step %d: validation loss has not improved for %d evaluations; "
                             "learning rates scaled to %g of their schedule.", step,
                             plateau.patience, plateau.scale)
                scalars["validation/best_loss"] = plateau.best
                scalars["learning_rate/scale"] = plateau.scale
                writer.write_scalars(step, scalars)
            if config.train.jacobian_every_steps and step % config.train.jacobian_every_steps == 0:
                writer.write_scalars(step, diagnostics.jacobian(state, batch, base_key, step))
            if config.train.image_every_steps and step % config.train.image_every_steps == 0:
                writer.write_images(step, diagnostics.images(state, batch, base_key, step))
            if step % config.train.checkpoint_every_steps == 0 or step == num_steps:
                _save(checkpointer, step, state, base_key, data_state_now, writer,
                      _metadata(config_flat, plateau))
            if step % config.train.log_every_steps and step != num_steps:
                progress.update(step)
        if stop.stop and step % config.train.checkpoint_every_steps != 0:
            _save(checkpointer, step, state, base_key, data_state_now, writer,
                  _metadata(config_flat, plateau), force=True)
        if stop.stop and jax.process_index() == 0:
            log.info("Stopped at step %d of %d, saved in %s: the same command resumes.", step,
                     num_steps, ckpt_dir)
    finally:
        progress.close()
        stop.restore()
        checkpointer.close()
        writer.flush()
        writer.close()
    return history


# The running sum of the step's metrics: one jitted call per step (an eager add per metric costs
# ~3x the host time, on the critical path of every step).
_add_metrics = jax.jit(lambda total, new: jax.tree.map(jnp.add, total, new))


def _metadata(config_flat: dict, plateau: ValidationPlateau | None) -> dict:
    """What each checkpoint carries besides the state: the run's config, the decay counters."""
    metadata = {"config": config_flat}
    if plateau is not None:
        metadata["plateau"] = plateau.to_dict()
    return metadata


class _Validation:
    """The validation loss the official decay rule reads: the model's training loss in eval mode
    (no dropout), averaged over the validation split (or its first optim.validation_batches)."""

    def __init__(self, config, graphdef, mesh):
        self.config, self.mesh = config, mesh
        repl = sharding.replicated(mesh)

        def losses(params, batch, key, step):
            out = model_from_params(graphdef, params)(batch, key, step, train=False)
            return {"loss": out.loss, **{k: v for k, v in out.metrics.items()
                                         if k in ("dvae_mse", "cross_entropy", "mse")}}

        self._losses = jax.jit(losses, out_shardings=repl)

    def run(self, params, base_key: jax.Array, step: int) -> dict[str, float]:
        config = self.config
        loader = make_loader(config, "validation", global_batch_size=config.eval.batch_size,
                             seed=config.seed, num_epochs=1, shuffle=False)
        key = jax.random.fold_in(jax.random.fold_in(base_key, step), 3)
        limit = config.optim.validation_batches
        sums: dict[str, float] = collections.defaultdict(float)
        count = 0
        for index, batch in enumerate(sharding.in_lockstep(loader) if jax.process_count() > 1
                                      else loader):
            if limit and index >= limit:
                break
            out = self._losses(params, sharding.put_batch(batch, self.mesh),
                               jax.random.fold_in(key, index), jnp.int32(step))
            for name, value in jax.device_get(out).items():
                sums[name] += float(value)
            count += 1
        return {f"validation/{name}": total / count for name, total in sums.items()}


class _Diagnostics:
    """Jitted, host-side-written extras: Jacobian spectral norm and picture grids."""

    def __init__(self, config, graphdef, mesh):
        self.graphdef = graphdef
        self.num_images = config.eval.num_images
        repl = sharding.replicated(mesh)
        self._jacobian = jax.jit(self._jacobian_fn, out_shardings=repl)
        self._images = jax.jit(self._images_fn, out_shardings=repl)

    def _model(self, params):
        return model_from_params(self.graphdef, params)

    def _jacobian_fn(self, params, image, key):
        from fixed_slots.models.common import slot_jacobian_spectral_norm

        model = self._model(params)
        enc = model.encode_slots(image, key)
        norms = slot_jacobian_spectral_norm(model, enc, key)  # model.fixed_point_step
        return {"jacobian_spectral_norm": jnp.mean(norms),
                "slot_residual_eval": jnp.mean(enc.info.final_residual)}

    def jacobian(self, state, batch, base_key, step) -> dict[str, float]:
        key = jax.random.fold_in(jax.random.fold_in(base_key, step), 1)
        out = self._jacobian(state.params, batch["image"][: self.num_images], key)
        return {k: float(v) for k, v in jax.device_get(out).items()}

    def _images_fn(self, params, batch, key, step):
        model = self._model(params)
        return model.visualize(batch, key, step)

    def images(self, state, batch, base_key, step) -> dict[str, np.ndarray]:
        key = jax.random.fold_in(jax.random.fold_in(base_key, step), 2)
        small = {k: v[: self.num_images] for k, v in batch.items()}
        arrays = jax.device_get(self._images(state.params, small, key, state.step))
        return visualize.model_grids(arrays)
