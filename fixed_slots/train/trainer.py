"""`train(config, workdir)`: the training loop around the pure train step.

Order of things: check the config -> the data loader (a missing dataset fails before anything is
written) -> lock the workdir -> mesh, model, optimizer -> resume from the latest good checkpoint
(else initialise) -> the data iterator at its saved position -> compile the step (said on the
console, with its time) -> the loop: a step, then whatever is due at this step (`due`): logging
(metrics to TensorBoard and the console), the validation pass of the official learning-rate
decay, the Jacobian diagnostic, the picture grids, an evaluation on the held-out images,
a checkpoint -> at the last step, the full evaluation (WORKDIR/eval/ and eval/* in TensorBoard).

A rerun of a finished run says so, evaluates it if its evaluation is missing, and writes nothing
otherwise. SIGTERM / Ctrl-C save a checkpoint and stop (twice: stop without saving).
"""
from __future__ import annotations

import collections
import enum
import json
import os
import signal
import threading
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections

from fixed_slots import configlib, host_memory, log, models, sharding, visualize
from fixed_slots.data import pipeline
from fixed_slots.errors import ConfigError, UserError
from fixed_slots.eval import evaluator as evaluation_loop
from fixed_slots.models import aggregation
from fixed_slots.models.common import slot_jacobian_spectral_norm
from fixed_slots.train import evaluation, optim
from fixed_slots.train.checkpoint import Checkpointer
from fixed_slots.train.console import ProgressLine
from fixed_slots.train.plateau import ValidationPlateau
from fixed_slots.train.train_step import (StepBuilder, TrainState, model_from_params,
                                          with_lr_scale)
from fixed_slots.train.workdir import (
    WorkdirLock,
    check_workdir,
    config_differences,
    config_record,
    refuse_changed_config,
    saved_config,
)
from fixed_slots.train.writers import create_writer

RANGES = {
    "seed": configlib.SEED,
    "train.batch_size": configlib.POSITIVE_INT,
    "train.num_steps": configlib.POSITIVE_INT,
    "train.log_every_steps": configlib.POSITIVE_INT,
    "train.image_every_steps": configlib.NON_NEGATIVE_INT,
    "train.jacobian_every_steps": configlib.NON_NEGATIVE_INT,
    "train.eval_every_steps": configlib.NON_NEGATIVE_INT,
    "train.checkpoint_every_steps": configlib.POSITIVE_INT,
    "train.max_checkpoints_to_keep": configlib.OPTIONAL_POSITIVE_INT,
    "train.num_devices": configlib.OPTIONAL_POSITIVE_INT,
}


class Stream(enum.IntEnum):
    """RNG streams folded into the run's key with the step, so that each is reproducible and
    independent of the others (the train step folds in the step alone)."""
    JACOBIAN = 1
    IMAGES = 2
    VALIDATION = 3


# What TensorBoard shows on each training chart, for the trainer's own scalars; the model's
# metrics are described by the model (`metric_descriptions`).
DESCRIPTIONS = {
    "grad_norm": "L2 norm of the whole gradient before clipping.",
    "slot_attention_grad_norm": "L2 norm of the slot-attention parameters' own gradient before "
                                "clipping (the paper's Fig. 1b / 5: it grows under "
                                "backpropagation through the iterations).",
    "steps_per_second": "Training speed between this point and the previous ones (the "
                        "console's figure at the same step).",
    "jacobian_spectral_norm": "Largest singular value of d(slot update)/d(slots) at the "
                              "slots (the paper's Fig. 1b / 5): above 1 the iteration is not "
                              "a contraction.",
    "adjoint_residual": "Relative residual of the backward (adjoint) solve, mean over images.",
    "adjoint_failed": "Fraction of images whose adjoint solve failed (then the policy of "
                      "slot_attention.fixed_point.adjoint_on_failure applies).",
    "validation/loss": "The loss on the validation split in evaluation mode: what the "
                       "official learning-rate decay watches.",
}


def due(step: int, every: int, *, last: int | None = None) -> bool:
    """Whether something with cadence `every` (0: never) is due at `step`; also at `last`."""
    return bool(every) and (step % every == 0 or step == last)


class NonFiniteLossError(UserError, FloatingPointError):
    """Raised when a step produced a non-finite loss, gradient or parameter; names the step (a
    run's outcome, usually of its hyperparameters: printed without a traceback)."""


def training_only(config: ml_collections.ConfigDict, steps: int, log_every: int
                  ) -> ml_collections.ConfigDict:
    """A copy that only trains for `steps` (no summaries or evaluations, one checkpoint at
    the end): what the benchmarks time and compare."""
    config = config.copy_and_resolve_references()
    config.train.num_steps = steps
    config.train.log_every_steps = log_every
    config.train.checkpoint_every_steps = steps
    config.train.image_every_steps = 0
    config.train.jacobian_every_steps = 0
    config.train.eval_every_steps = 0
    config.train.evaluate_at_end = False
    return config


def check_config(config: ml_collections.ConfigDict) -> None:
    """Every section a training run reads (ConfigError naming the key): the model's (through
    the model), the data's, the optimiser's, the evaluation's and the trainer's own."""
    configlib.check_finite(config)
    configlib.check_ranges(config, RANGES)
    evaluation_loop.check_config(config)  # the model, the data and config.eval
    optim.check_config(config)
    # The device count decides how the batch splits.
    devices = config.train.num_devices or jax.device_count()
    if config.train.num_devices is not None and not 1 <= devices <= jax.device_count():
        raise configlib.bad_value("train.num_devices", devices,
                                  f"between 1 and the {jax.device_count()} devices present")
    if config.train.batch_size % devices:
        raise configlib.bad_value(
            "train.batch_size", config.train.batch_size,
            f"a multiple of the number of devices ({devices}; set config.train.num_devices)")


def hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as TensorBoard hparams (numbers, strings and bools; others as strings)."""
    return {key: value if isinstance(value, (int, float, str, bool)) else str(value)
            for key, value in configlib.flatten(config).items()}


class _Prefetcher:
    """Keeps `depth` batches on device ahead of the step; each carries the loader state *after*
    it, so a checkpoint taken after consuming it resumes with exactly the next batch."""

    def __init__(self, loader, mesh, depth: int = 2):
        self.loader, self.mesh, self.depth = loader, mesh, depth
        self.queue: collections.deque = collections.deque()

    def __iter__(self) -> Iterator:
        return self

    def _fill(self) -> None:
        while len(self.queue) < self.depth:
            batch = next(self.loader)
            self.queue.append((sharding.put_batch(batch, self.mesh), self.loader.get_state()))

    def __next__(self):
        self._fill()
        return self.queue.popleft()

    def peek(self) -> dict[str, jax.Array]:
        """The next batch (on the mesh), left in the queue."""
        self._fill()
        return self.queue[0][0]


# Daemon threads of ours that run XLA work (the train step's compilation, the first step).
# A process must not exit while one is inside XLA: the C++ runtime aborts it (exit 134).
_xla_threads: set[threading.Thread] = set()


def _start_xla_thread(target, name: str) -> threading.Thread:
    def run():
        try:
            target()
        finally:
            _xla_threads.discard(thread)

    thread = threading.Thread(target=run, name=name, daemon=True)
    _xla_threads.add(thread)
    thread.start()
    return thread


def xla_work_in_flight() -> bool:
    """Whether a background thread of the trainer is inside XLA now (the CLI then leaves with
    os._exit instead of running the interpreter's shutdown under it)."""
    return any(t.is_alive() for t in list(_xla_threads))


class _CompileAhead:
    """Compiles the train step in a background thread while the main thread initialises the
    model (XLA compiles without holding the GIL): on a 2-core CPU the README's cold start
    overlaps its ~12 s compilation with the ~4 s of eager initialisation, and a warm start its
    cache read.

    The step is lowered for the abstract state and the first batch and key, exactly as the first
    call will see them, so that call finds the compiled executable in jit's cache (tests check
    that the step compiles once). `wait()` re-raises the compilation's error. The trainer waits
    for it before re-raising an error of its own; after a Ctrl-C the CLI leaves at once
    (`xla_work_in_flight`).
    """

    def __init__(self, step, *args):
        self.started = time.perf_counter()
        self._error: BaseException | None = None

        def compile_step():
            try:
                step.lower(*args).compile()
            except BaseException as e:  # re-raised by wait(), in the thread that needs it
                self._error = e

        self._thread = _start_xla_thread(compile_step, "compile-train-step")

    def wait(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error


class _StopFlag:
    """Set by SIGTERM (and SIGINT): the loop saves a checkpoint and returns; a second signal
    stops at once without saving.

    Signals that arrive while the main thread is inside XLA (a step, a compilation) are all
    delivered to Python as one call of the handler; the wakeup fd receives one byte per
    delivery, so two SIGTERMs 50 ms apart still count as two.

    In a multi-process job (`coordinated`) every process must stop at the same step: SIGTERM is
    left to JAX's preemption notifier (installed by jax.distributed.initialize), which tells
    every process; SIGINT becomes a SIGTERM of this process; the loop sets `stop` when
    `sharding.reached_preemption_sync_point` says all processes have reached the agreed step.
    """

    def __init__(self, coordinated: bool = False):
        self.stop = False
        self.stop_now = False  # a second signal: out at once (see `check`)
        self.coordinated = coordinated
        self._count = 0
        self._previous = {}
        self._wakeup = None
        if threading.current_thread() is threading.main_thread():
            signals = (signal.SIGINT,) if coordinated else (signal.SIGTERM, signal.SIGINT)
            try:
                read, write = os.pipe()
                os.set_blocking(read, False)
                os.set_blocking(write, False)
                self._previous_fd = signal.set_wakeup_fd(write)
                self._wakeup = (read, write)
            except (ValueError, OSError):  # another owner of the wakeup fd: count calls only
                self._wakeup = None
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _deliveries(self) -> int:
        """Signals delivered since the last look (at least the one being handled)."""
        if self._wakeup is None:
            return 1
        try:
            return max(1, len(os.read(self._wakeup[0], 1024)))
        except BlockingIOError:
            return 1

    def _handle(self, signum, frame):
        # The read first, the sum after: a second signal's handler can run nested inside this
        # one's read (Python handles signals between bytecodes, handlers included); written as
        # `self._count += self._deliveries()`, this call would then add to the count it loaded
        # before the nested call and lose that call's increment (two signals seen as one).
        delivered = self._deliveries()
        self._count += delivered
        if self._count >= 2:  # a second signal: the user wants out now
            self.restore()
            self.stop_now = True
            raise KeyboardInterrupt(f"signal {signum} received twice")
        if self.coordinated:
            log.warning("Received signal %d: every process saves a checkpoint at the same step "
                        "and stops (send it again to stop without saving).", signum)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        log.warning("Received signal %d: saving a checkpoint and stopping (send it again to "
                    "stop without saving).", signum)
        self.stop = True

    def check(self) -> None:
        """Raises the second signal's KeyboardInterrupt again: raised from the handler, it is
        lost when the handler ran inside a callback whose errors Python ignores (a garbage
        collector callback of XLA's, seen while the model initialises)."""
        if self.stop_now:
            raise KeyboardInterrupt("signal received twice")

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        if self._wakeup is not None:
            signal.set_wakeup_fd(self._previous_fd)
            for fd in self._wakeup:
                os.close(fd)
            self._wakeup = None


class _Validation:
    """The validation loss the official decay rule reads: the model's training loss in eval mode
    (no dropout), averaged over the validation split (or its first optim.validation_batches)."""

    def __init__(self, config, graphdef, mesh):
        self.config, self.mesh = config, mesh
        names = models.get(config.model.name).validation_metrics

        def losses(params, batch, key, step):
            out = model_from_params(graphdef, params)(batch, key, step, train=False)
            return {name: out.metrics[name] for name in names}

        self._losses = jax.jit(losses, out_shardings=sharding.replicated(mesh))

    def run(self, params, base_key: jax.Array, step: int) -> dict[str, float]:
        config = self.config
        loader = pipeline.make_loader(config, "validation",
                                      global_batch_size=config.eval.batch_size,
                                      seed=config.seed, num_epochs=1, shuffle=False)
        key = jax.random.fold_in(jax.random.fold_in(base_key, step), Stream.VALIDATION)
        limit = config.optim.validation_batches
        sums: dict[str, float] = collections.defaultdict(float)
        count = 0
        batches = sharding.in_lockstep(loader) if jax.process_count() > 1 else loader
        for index, batch in enumerate(batches):
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
        self.num_images = config.eval.num_images
        repl = sharding.replicated(mesh)

        def jacobian_fn(params, image, key):
            model = model_from_params(graphdef, params)
            enc = model.encode_slots(image, key)
            norms = slot_jacobian_spectral_norm(model, enc, key)  # model.fixed_point_step
            return {"jacobian_spectral_norm": jnp.mean(norms),
                    "slot_residual_eval": jnp.mean(enc.info.final_residual)}

        def images_fn(params, batch, key, step):
            return model_from_params(graphdef, params).visualize(batch, key, step)

        self._jacobian = jax.jit(jacobian_fn, out_shardings=repl)
        self._images = jax.jit(images_fn, out_shardings=repl)

    def jacobian(self, state, batch, base_key, step) -> dict[str, float]:
        key = jax.random.fold_in(jax.random.fold_in(base_key, step), Stream.JACOBIAN)
        out = self._jacobian(state.params, batch["image"][: self.num_images], key)
        return {k: float(v) for k, v in jax.device_get(out).items()}

    def images(self, state, batch, base_key, step) -> dict[str, Any]:
        key = jax.random.fold_in(jax.random.fold_in(base_key, step), Stream.IMAGES)
        small = {k: v[: self.num_images] for k, v in batch.items()}
        arrays = jax.device_get(self._images(state.params, small, key, state.step))
        return visualize.model_grids(arrays)


def _saved_config(checkpointer: Checkpointer) -> dict | None:
    """The config record of the newest checkpoint whose metadata reads, or None."""
    for step in reversed(checkpointer.all_steps()):
        try:
            metadata = checkpointer.read_metadata(step)
        except Exception:  # an unreadable step: restore_latest reports and skips it
            continue
        return saved_config(metadata, step, checkpointer.directory)  # no config: refused
    return None


def _evaluated_step(workdir: str) -> int | None:
    """The step of WORKDIR/eval/metrics.json (a finished full evaluation), or None."""
    try:
        with open(os.path.join(workdir, evaluation.EVAL_DIR, "metrics.json")) as f:
            return int(json.load(f)["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


# The running sum of the step's metrics: one jitted call per step (an eager merge per metric
# costs several times the host time, on the critical path of every step).
_merge = jax.jit(lambda total, new: total.merge(new))


class _Run:
    """One training run in a workdir: the parts the loop uses, built by `_setup`."""

    def __init__(self, config, workdir, loader, accept_config_change):
        self.config, self.workdir = config, workdir
        self.primary = jax.process_index() == 0
        self.config_flat = config_record(config)
        self.accept = accept_config_change
        self.loader = loader
        self.ckpt_dir = os.path.join(workdir, "checkpoints")
        self.history: list[dict[str, float]] = []
        self.writer = None
        self.progress: ProgressLine | None = None
        self.stop: _StopFlag | None = None  # installed with the compilation (setup)
        self.ahead: _CompileAhead | None = None

    # -------------------------------------------------------------------------- setup

    def setup(self) -> None:
        config = self.config
        self.checkpointer = Checkpointer(self.ckpt_dir,
                                         max_to_keep=config.train.max_checkpoints_to_keep)
        try:
            # A refused resume is the user's one error line: before anything else is printed.
            self.changes = self._check_resume_config()
            if self.primary:
                log.info("Training %s (grad=%s, %d steps) in %s: building the model ...",
                         config.model.name, config.grad, config.train.num_steps, self.workdir)
            self.mesh = sharding.make_mesh(config.train.num_devices)
            # The step first, the parameters after: it compiles while they are drawn.
            builder = StepBuilder(config, self.mesh)
            self.graphdef, self.train_step = builder.graphdef, builder.step
            self.base_key = jax.random.key(config.seed)
            restored = self.checkpointer.restore_latest({"state": builder.abstract_state})
            self.data_state = None
            if restored is not None:
                step, tree, self.base_key, self.data_state = restored
                self.state = sharding.replicate(tree["state"], self.mesh)
                if step < config.train.num_steps:  # a finished run says so instead (run())
                    log.info("Resumed from %s at step %d%s.", self.ckpt_dir, step,
                             f" with changes {'; '.join(self.changes)}" if self.changes else "")
                if self.data_state is not None:
                    self.loader.set_state(self.data_state)
                self.start_step = int(jax.device_get(self.state.step))
            else:
                self.start_step = 0
            if self.start_step < config.train.num_steps:
                self._start_compiling(builder)
            if restored is None:
                self.state = builder.initial_state()
            if self.stop is not None:
                self.stop.check()
        except BaseException as error:
            # Closed here, or orbax's background threads die noisily at interpreter exit.
            self.checkpointer.close()
            self._abandon_compilation(error)
            raise
        self.plateau = None
        if config.optim.decay == "validation_plateau":
            record = (self.checkpointer.read_metadata(self.start_step).get("plateau", {})
                      if restored is not None else {})
            self.plateau = ValidationPlateau.from_dict(record, config.optim.plateau_patience,
                                                       config.optim.plateau_factor)
            self.state = with_lr_scale(self.state, self.plateau.scale)
            self.validation = _Validation(config, self.graphdef, self.mesh)
            # The official code validates once per epoch of the training split.
            self.validate_every = (config.optim.validation_every_steps
                                   or self.loader.batches_per_epoch)
        self.model_class = models.get(config.model.name)
        self.evaluator = evaluation_loop.Evaluator(config, self.graphdef, self.mesh)

    def _start_compiling(self, builder: StepBuilder) -> None:
        """Signals first (a stop during the compilation is heard at once and acted on after
        step 1), then the compilation in the background, for the first batch."""
        self.stop = _StopFlag(coordinated=jax.process_count() > 1)
        self.batches = _Prefetcher(self.loader, self.mesh)
        self.ahead = _CompileAhead(self.train_step, builder.abstract_state,
                                   self.batches.peek(), self.base_key)
        if self.primary:
            log.info("Compiling the train step (%s, grad=%s) while the model is set up; the "
                     "first step runs with it ...", self.config.model.name, self.config.grad)

    def _abandon_compilation(self, error: BaseException) -> None:
        """After `error`: signals restored; a compilation in flight is waited for, unless the
        user interrupted (the CLI then ends the process at once: `xla_work_in_flight`)."""
        if self.stop is not None:
            self.stop.restore()
        if self.ahead is not None and not isinstance(error, KeyboardInterrupt):
            try:
                self.ahead.wait()
            except BaseException:  # the error being raised is the one to report
                pass

    def _check_resume_config(self) -> list[str]:
        """Refuses a resume whose config changes the run; returns the allowed changes."""
        saved = _saved_config(self.checkpointer)
        if saved is None:
            return []
        refused, allowed = config_differences(saved, self.config_flat, self.accept)
        if refused:
            refuse_changed_config(self.workdir, refused)
        return allowed

    def _open_writer(self) -> Any:
        if self.writer is None:
            descriptions = {**self.model_class.metric_descriptions, **DESCRIPTIONS,
                            **evaluation.descriptions(self.model_class)}
            self.writer = create_writer(self.workdir, just_logging=not self.primary,
                                        descriptions=descriptions)
        return self.writer

    # -------------------------------------------------------------------------- the run

    def run(self) -> list[dict[str, float]]:
        config = self.config
        num_steps = config.train.num_steps
        try:
            if self.start_step >= num_steps:
                self._finished_already()
                return self.history
            try:
                writer = self._open_writer()
                if self.start_step == 0:
                    writer.write_hparams(hparams(config))
                elif self.changes:
                    writer.write_texts(self.start_step,
                                       {"config_changes": "\n".join(self.changes)})
                step = self._loop()
            except BaseException as error:
                self._abandon_compilation(error)
                raise
            finally:
                self.stop.restore()
            if self.stop.stop:
                if self.primary:
                    log.info("Stopped at step %d of %d, saved in %s: the same command "
                             "resumes.", step, num_steps, self.ckpt_dir)
            elif config.train.evaluate_at_end:
                self._evaluate(step, full=True)
        finally:
            self.checkpointer.close()
            if self.writer is not None:
                self.writer.flush()
                self.writer.close()
        return self.history

    def _loop(self) -> int:
        """Steps until num_steps or a stop request; returns the step reached."""
        config, train = self.config, self.config.train
        num_steps = train.num_steps
        batches = self.batches
        progress = ProgressLine(num_steps, start_step=self.start_step,
                                show=self.model_class.progress_metrics, quiet=not self.primary)
        self.progress, totals, data_state = progress, None, self.data_state
        step = self.start_step
        try:
            # The first step runs even when a stop came during setup: it waits for the
            # compilation in flight, and the stop is acted on right after it.
            while step < num_steps and (not self.stop.stop or step == self.start_step):
                batch, data_state = next(batches)
                metrics = self._step(batch, first=step == self.start_step)
                self.stop.check()
                step += 1
                totals = metrics if totals is None else _merge(totals, metrics)
                if self.stop.coordinated and sharding.reached_preemption_sync_point(step):
                    self.stop.stop = True  # the same step on every process; saved below
                if due(step, train.log_every_steps, last=num_steps):
                    self._log(step, totals)
                    totals = None
                if self.plateau is not None and due(step, self.validate_every):
                    self._validate(step)
                if due(step, train.jacobian_every_steps):
                    self._write_scalars(step, self.diagnostics.jacobian(
                        self.state, batch, self.base_key, step))
                if due(step, train.image_every_steps):
                    self._open_writer().write_images(step, self.diagnostics.images(
                        self.state, batch, self.base_key, step))
                if due(step, train.eval_every_steps) and step < num_steps:
                    self._evaluate(step, full=False)
                if due(step, train.checkpoint_every_steps, last=num_steps) or self.stop.stop:
                    self._save(step, data_state, force=self.stop.stop)
                progress.tick(step)
        finally:
            progress.close()
        return step

    def _step(self, batch, *, first: bool):
        """One train step; the first one waits for the compilation begun in setup and says on
        the console how long it took. That wait and step run in a worker thread so that Ctrl-C
        is heard at once (and acted on right after it)."""
        if not first:
            self.state, metrics = self.train_step(self.state, batch, self.base_key)
            return metrics
        self.diagnostics = _Diagnostics(self.config, self.graphdef, self.mesh)
        result: dict[str, Any] = {}

        def work():
            try:
                self.ahead.wait()  # compiling since setup
                host_memory.release_freed_memory()  # the compiler's freed heap (host_memory.py)
                result["out"] = jax.block_until_ready(
                    self.train_step(self.state, batch, self.base_key))
            except BaseException as e:  # re-raised in the main thread
                result["error"] = e

        worker = _start_xla_thread(work, "first-train-step")
        while worker.is_alive():
            worker.join(timeout=0.1)  # the main thread keeps handling signals
            self.stop.check()
        if "error" in result:
            raise result["error"]
        self.state, metrics = result["out"]
        if self.primary:
            log.info("Compiled the train step (in the background since setup) and ran step %d "
                     "in %.1f s.", self.start_step + 1, time.perf_counter() - self.ahead.started)
        self.progress.start()
        return metrics

    # -------------------------------------------------------------------------- what is due

    def _check_finite(self) -> None:
        bad = int(jax.device_get(self.state.first_bad_step))
        if bad < 0:
            return
        # first_bad_step counts updates before the bad one; TensorBoard, checkpoints and the
        # console number a step by the updates done after it: the bad update is step bad + 1.
        latest = self.checkpointer.latest_step()
        kept = (f"the last good checkpoint (step {latest}) is kept in {self.ckpt_dir}"
                if latest is not None else
                f"no checkpoint was saved before it (the first would have been at step "
                f"{self.config.train.checkpoint_every_steps})")
        raise NonFiniteLossError(
            f"non-finite loss, gradient or parameters at step {bad + 1}; training stopped and "
            f"{kept}; no state after step {bad} was saved.")

    def _write_scalars(self, step: int, scalars: dict[str, float]) -> None:
        self._open_writer().write_scalars(step, scalars)

    def _log(self, step: int, totals: Any) -> None:
        self._check_finite()
        values = aggregation.to_host(jax.device_get(totals).compute())
        values.update({f"learning_rate/{group}": rate for group, rate in optim.learning_rates(
            self.config.optim, step, opt_state=self.state.opt_state,
            lr_scale=self.state.lr_scale).items()})
        values["steps_per_second"] = self.progress.measure(step, values)
        self._write_scalars(step, values)
        self.history.append(dict(values, step=step))

    def _validate(self, step: int) -> None:
        scalars = self.validation.run(self.state.params, self.base_key, step)
        loss_name = f"validation/{self.model_class.validation_metrics[0]}"
        if self.plateau.update(scalars[loss_name]):
            self.state = with_lr_scale(self.state, self.plateau.scale)
            log.info("Step %d: validation loss has not improved for %d evaluations; learning "
                     "rates scaled to %g of their schedule.", step, self.plateau.patience,
                     self.plateau.scale)
        scalars["validation/best_loss"] = self.plateau.best
        scalars["learning_rate/scale"] = self.plateau.scale
        self._write_scalars(step, scalars)

    def _evaluate(self, step: int, *, full: bool) -> None:
        self._check_finite()
        evaluation.evaluate_and_record(self.evaluator, self.state.params, step, self.workdir,
                                       self._open_writer(), full=full, primary=self.primary)
        host_memory.release_freed_memory()  # what compiling the evaluation's functions freed
        if self.progress is not None:
            self.progress.start()  # the evaluation's time is not training speed

    def _save(self, step: int, data_state: Any, force: bool = False) -> None:
        """Saves only a state that no non-finite step has touched, with the run's config.

        The writer is flushed first, so every step a checkpoint covers is in the event files
        even if the process is killed right after.
        """
        self._check_finite()
        self._open_writer().flush()
        metadata = {"config": self.config_flat}
        if self.plateau is not None:
            metadata["plateau"] = self.plateau.to_dict()
        self.checkpointer.save(step, state_pytree={"state": self.state}, rng=self.base_key,
                               data_state=data_state, metadata=metadata, force=force)

    def _finished_already(self) -> None:
        """A rerun of a run that reached num_steps: evaluate it if its evaluation is missing
        (e.g. killed during it), else say where its results are; nothing else is written."""
        step = self.start_step
        results = os.path.join(self.workdir, evaluation.EVAL_DIR)
        if not self.config.train.evaluate_at_end or _evaluated_step(self.workdir) == step:
            if self.primary:
                log.info("This run is complete: step %d of %d in %s%s. Nothing to do "
                         "(raise --config.train.num_steps and pass --accept_config_change="
                         "train.num_steps to train further).", step,
                         self.config.train.num_steps, self.ckpt_dir,
                         f"; its evaluation is in {results}"
                         if _evaluated_step(self.workdir) == step else "")
            return
        if self.primary:
            log.info("This run is complete (step %d) but has no evaluation of that step: "
                     "evaluating it now.", step)
        self._evaluate(step, full=True)


def train(config: ml_collections.ConfigDict, workdir: str, *,
          accept_config_change: tuple[str, ...] | list[str] = ()) -> list[dict[str, float]]:
    """Trains (resuming from workdir if it holds checkpoints), then evaluates the last step
    (config.train.evaluate_at_end).

    One run per workdir: a second process on a workdir in use is refused (WorkdirError naming
    the holder). Resuming with a config that changes the run is refused unless every changed key
    is in `accept_config_change` (see fixed_slots.train.workdir).
    Returns the metrics logged in this call, one dict per logged step (with its "step").
    """
    # Before anything touches a device (the checks count devices): jax.distributed.initialize
    # and the CPU's device count cannot change once the backend exists.
    cpu_devices = sharding.split_cpu(config)
    sharding.maybe_initialize_distributed(config)  # and every process has this config
    check_config(config)
    if cpu_devices and cpu_devices > 1 and jax.default_backend() == "cpu":
        log.info("CPU: %d devices of %d images each, data-parallel (%d per core run fastest; "
                 "--config.train.num_devices=1 for one).", cpu_devices,
                 config.train.batch_size // cpu_devices, sharding.CPU_DEVICES_PER_CORE)
    flat = config_record(config)
    unknown = [k for k in accept_config_change if k not in flat]
    if unknown:
        raise ConfigError(f"--accept_config_change names unknown config keys: "
                          f"{', '.join(unknown)}")
    check_workdir(workdir)  # on every process, before anything is written
    # The data first: a missing dataset fails in seconds, before any model is built and before
    # the workdir is created.
    loader = pipeline.make_loader(config, "train", global_batch_size=config.train.batch_size,
                                  shard_index=jax.process_index(),
                                  shard_count=jax.process_count(), seed=config.seed)
    lock = WorkdirLock(workdir) if jax.process_index() == 0 else None
    try:
        run = _Run(config, workdir, loader, accept_config_change)
        run.setup()
        return run.run()
    finally:
        if lock is not None:
            lock.release()
