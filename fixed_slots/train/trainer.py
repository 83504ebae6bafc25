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
from absl import logging

from fixed_slots import configlib
from fixed_slots.data.pipeline import make_loader
from fixed_slots.eval import visualize
from fixed_slots.train import sharding
from fixed_slots.train.checkpoint import Checkpointer
from fixed_slots.train.optim import learning_rates
from fixed_slots.train.state import TrainState, build, model_from_params
from fixed_slots.train.writers import ProgressLine, create_writer


class NonFiniteLossError(FloatingPointError):
    """Raised when a step produced a non-finite loss or gradient; names the step."""


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
            logging.warning("Received signal %d: every process saves a checkpoint at the same "
                            "step and stops (send it again to stop without saving).", signum)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        logging.warning("Received signal %d: saving a checkpoint and stopping "
                        "(send it again to stop without saving).", signum)
        self.stop = True

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _check_finite(state: TrainState, ckpt_dir: str) -> None:
    bad = int(jax.device_get(state.first_bad_step))
    if bad >= 0:
        raise NonFiniteLossError(
            f"non-finite loss or gradient at step {bad}; training stopped. The last good "
            f"checkpoint is kept in {ckpt_dir} (nothing after step {bad} was saved).")


def _save(checkpointer: Checkpointer, step: int, state: TrainState, base_key: jax.Array,
          data_state: Any, force: bool = False) -> None:
    """Saves only a state that no non-finite step has touched."""
    _check_finite(state, checkpointer.directory)
    checkpointer.save(step, state_pytree={"state": state}, rng=base_key, data_state=data_state,
                      force=force)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> list[dict[str, float]]:
    """Trains (resuming from workdir if it holds checkpoints).

    Returns the metrics written in this call, one dict per logged step (with its "step").
    """
    # Before anything touches a device (validate counts devices): jax.distributed.initialize
    # refuses to run once the backend exists.
    sharding.maybe_initialize_distributed()
    configlib.validate(config)
    # The data first: a missing dataset fails in seconds, before any model is built.
    loader = make_loader(config, "train", global_batch_size=config.train.batch_size,
                         shard_index=jax.process_index(), shard_count=jax.process_count(),
                         seed=config.seed)
    mesh = sharding.make_mesh(config.train.num_devices)
    graphdef, state, train_step = build(config, mesh)
    base_key = jax.random.key(config.seed)

    ckpt_dir = f"{workdir}/checkpoints"
    checkpointer = Checkpointer(ckpt_dir, max_to_keep=config.train.max_checkpoints_to_keep)
    restored = checkpointer.restore_latest({"state": state})
    data_state = None
    if restored is not None:
        step0, tree, base_key, data_state = restored
        state = sharding.replicate(tree["state"], mesh)
        logging.info("Resumed from %s at step %d.", ckpt_dir, step0)
    if data_state is not None:
        loader.set_state(data_state)
    batches = _Prefetcher(loader, mesh)

    writer = create_writer(workdir, just_logging=jax.process_index() > 0)
    start_step = int(jax.device_get(state.step))
    if start_step == 0:
        writer.write_hparams(_flatten_config(config))
    num_steps = config.train.num_steps
    progress = ProgressLine(num_steps, start_step=start_step)
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
            accumulated = metrics if accumulated is None else jax.tree.map(
                jnp.add, accumulated, metrics)
            count += 1
            if step % config.train.log_every_steps == 0 or step == num_steps:
                _check_finite(state, ckpt_dir)
                last = {k: float(v) / count for k, v in jax.device_get(accumulated).items()}
                last.update({f"learning_rate/{k}": v
                             for k, v in learning_rates(config.optim, step,
                                                        opt_state=state.opt_state).items()})
                last["steps_per_second"] = progress.rate()
                writer.write_scalars(step, last)
                history.append(dict(last, step=step))
                accumulated, count = None, 0
            if config.train.jacobian_every_steps and step % config.train.jacobian_every_steps == 0:
                writer.write_scalars(step, diagnostics.jacobian(state, batch, base_key, step))
            if config.train.image_every_steps and step % config.train.image_every_steps == 0:
                writer.write_images(step, diagnostics.images(state, batch, base_key, step))
            if step % config.train.checkpoint_every_steps == 0 or step == num_steps:
                _save(checkpointer, step, state, base_key, data_state_now)
            progress.update(step)
        if stop.stop and step % config.train.checkpoint_every_steps != 0:
            _save(checkpointer, step, state, base_key, data_state_now, force=True)
    finally:
        progress.close()
        stop.restore()
        checkpointer.wait_until_finished()
        checkpointer.close()
        writer.flush()
        writer.close()
    return history


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
        norms = slot_jacobian_spectral_norm(model.encoder.slot_attention, enc["sa_inputs"],
                                            enc["slots"], key)
        return {"jacobian_spectral_norm": jnp.mean(norms),
                "slot_residual_eval": jnp.mean(enc["info"].final_residual)}

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
