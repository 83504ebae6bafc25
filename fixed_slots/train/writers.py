"""Dashboards and console progress.

`create_writer` returns an object with `clu.metric_writers.MetricWriter`'s methods (write_scalars,
write_images, write_histograms, write_texts, write_hparams, flush, close). With TensorFlow
installed (the `.[tf]` extra) it is CLU's own `create_default_writer`; without, CLU's writers
cannot even be imported (the package imports TensorFlow), so it is `TensorboardXWriter`. Both write
TensorBoard event files under `logdir`: the dashboard is `tensorboard --logdir=...` either way.
Differences of the tensorboardX path: a batch of images becomes one grid image per tag, and scalars
are stored as `simple_value` (CLU stores tensors); TensorBoard shows both the same way.

`ProgressLine` prints step, the latest loss (and the model's main metric), steps/s over the recent
steps and the ETA: one line redrawn in place when its stream is a terminal, else a line of the
`fixed_slots` logger every `every_steps` steps.
"""
from __future__ import annotations

import collections
import concurrent.futures
import math
import os
import sys
import time
from typing import Any, Callable, Mapping, TextIO

import numpy as np
from absl import logging

from fixed_slots import log


def _tensorflow_available() -> bool:
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        return False
    return True


def _as_image_batch(image: Any) -> np.ndarray:
    """[H, W, C] or [N, H, W, C], float in [0, 1] or uint8 -> uint8 [N, H, W, C]."""
    image = np.asarray(image)
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"images must be [H, W, C] or [N, H, W, C] with C in (1, 3, 4), got "
                         f"shape {image.shape}")
    if image.dtype != np.uint8:
        # Round rather than truncate, so 1.0 -> 255 and 0.5 -> 128.
        image = np.round(np.clip(image.astype(np.float32), 0.0, 1.0) * 255).astype(np.uint8)
    return image


def _tensorflow_bucket_edges() -> list[float]:
    """TensorBoard's default histogram edges: +-1e-12 * 1.1^k up to 1e20, and 0."""
    edges, value = [], 1e-12
    while value < 1e20:
        edges.append(value)
        value *= 1.1
    return [-v for v in reversed(edges)] + [0.0] + edges


def _hparam_value(value: Any) -> bool | int | float | str:
    """TensorBoard's hparams plugin takes bool, number or string values."""
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


class TensorboardXWriter:
    """`clu.metric_writers.MetricWriter`'s methods, writing TensorBoard event files synchronously.

    tensorboardX's `SummaryWriter` queues events for a background thread, and its `flush` does
    not drain that queue: a process killed right after "flush" loses the last events (the
    trainer flushes before every checkpoint and promises the checkpointed steps are on disk).
    So events go straight to tensorboardX's record writer here, each call flushed to the OS
    (a write syscall, ~10 us; logging happens every N steps). Use `AsyncWriter` to take PNG
    encoding off the caller's thread.
    """

    def __init__(self, logdir: str):
        from tensorboardX.event_file_writer import EventsWriter

        self.logdir = os.fspath(logdir)
        os.makedirs(self.logdir, exist_ok=True)
        self._events = EventsWriter(os.path.join(self.logdir, "events"))

    def _write(self, step: int | None, summaries: list[Any]) -> None:
        from tensorboardX.proto import event_pb2

        for summary in summaries:
            event = event_pb2.Event(summary=summary, wall_time=time.time())
            if step is not None:
                event.step = int(step)
            self._events.write_event(event)
        self._events.flush()

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        from tensorboardX.summary import scalar

        self._write(step, [scalar(name, float(value)) for name, value in scalars.items()])

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        from tensorboardX.summary import image

        summaries = []
        for name, value in images.items():
            batch = _as_image_batch(value)
            # One image as is; a batch as one grid image (what SummaryWriter.add_images does).
            summaries.append(image(name, batch[0], dataformats="HWC") if batch.shape[0] == 1
                             else image(name, batch, dataformats="NHWC"))
        self._write(step, summaries)

    def write_histograms(self, step: int, arrays: Mapping[str, Any],
                         num_buckets: Mapping[str, int] | int | None = None) -> None:
        from tensorboardX.summary import histogram

        summaries = []
        for name, values in arrays.items():
            buckets = num_buckets.get(name) if isinstance(num_buckets, Mapping) else num_buckets
            values = np.asarray(values, np.float64).ravel()
            summaries.append(histogram(name, values, buckets or _tensorflow_bucket_edges()))
        self._write(step, summaries)

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        from tensorboardX.summary import text

        self._write(step, [text(name, str(value)) for name, value in texts.items()])

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        from tensorboardX.summary import hparams as hparams_summaries

        clean = {name: _hparam_value(value) for name, value in hparams.items()}
        self._write(None, list(hparams_summaries(clean, {})))

    def flush(self) -> None:
        self._events.flush()

    def close(self) -> None:
        self._events.close()


class LoggingWriter:
    """The same methods, to the absl log only (non-leader hosts, or just_logging=True)."""

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        logging.info("[%d] %s", step,
                     ", ".join(f"{k}={float(v):.6g}" for k, v in scalars.items()))

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        logging.info("[%d] images: %s", step, {k: np.shape(v) for k, v in images.items()})

    def write_histograms(self, step: int, arrays: Mapping[str, Any],
                         num_buckets: Mapping[str, int] | int | None = None) -> None:
        logging.info("[%d] histograms: %s", step, {k: np.shape(v) for k, v in arrays.items()})

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        logging.info("[%d] texts: %s", step, dict(texts))

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        logging.info("hparams: %s", dict(hparams))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def _to_host(values: Mapping[str, Any]) -> dict[str, Any]:
    """Device arrays to NumPy now, in the caller's thread (they may be donated right after)."""
    return {name: value if isinstance(value, str) else np.asarray(value)
            for name, value in values.items()}


class AsyncWriter:
    """Runs another writer's calls on one background thread, in call order.

    Array conversion to NumPy happens in the caller; PNG encoding, histograms and file IO in the
    background. An error in the background is raised by the next call, `flush` or `close`.
    """

    def __init__(self, writer: Any):
        self._writer = writer
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="metric_writer")
        self._pending: collections.deque[concurrent.futures.Future] = collections.deque()

    def _raise_errors(self, wait: bool) -> None:
        while self._pending and (wait or self._pending[0].done()):
            self._pending.popleft().result()

    def _submit(self, fn: Callable, *args: Any, **kwargs: Any) -> None:
        self._raise_errors(wait=False)
        self._pending.append(self._pool.submit(fn, *args, **kwargs))

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        self._submit(self._writer.write_scalars, int(step),
                     {k: float(v) for k, v in scalars.items()})

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        self._submit(self._writer.write_images, int(step), _to_host(images))

    def write_histograms(self, step: int, arrays: Mapping[str, Any],
                         num_buckets: Mapping[str, int] | int | None = None) -> None:
        self._submit(self._writer.write_histograms, int(step), _to_host(arrays), num_buckets)

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        self._submit(self._writer.write_texts, int(step), dict(texts))

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        self._submit(self._writer.write_hparams, dict(hparams))

    def flush(self) -> None:
        self._raise_errors(wait=True)
        self._writer.flush()

    def close(self) -> None:
        try:
            self._raise_errors(wait=True)
        finally:
            self._pool.shutdown(wait=True)
            self._writer.close()


def create_writer(logdir: str, *, just_logging: bool = False, asynchronous: bool = False) -> Any:
    """A MetricWriter-like object writing TensorBoard event files under `logdir`.

    CLU's `create_default_writer` when TensorFlow is importable, else `TensorboardXWriter`
    (wrapped in `AsyncWriter` when `asynchronous`). `just_logging=True` (e.g. for non-leader
    hosts) only logs.
    """
    if _tensorflow_available():
        from clu import metric_writers

        return metric_writers.create_default_writer(
            os.fspath(logdir), just_logging=just_logging, asynchronous=asynchronous)
    if just_logging:
        return LoggingWriter()
    writer = TensorboardXWriter(logdir)
    return AsyncWriter(writer) if asynchronous else writer


def format_duration(seconds: float) -> str:
    """Seconds as [Nd ]H:MM:SS; "?" when unknown (infinite or NaN)."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    days, seconds = divmod(seconds, 86_400)
    hours, seconds = divmod(seconds, 3_600)
    minutes, seconds = divmod(seconds, 60)
    text = f"{hours}:{minutes:02d}:{seconds:02d}"
    return f"{days}d {text}" if days else text


class ProgressLine:
    """Console progress: step, the latest metrics, steps/s over the recent steps, and the ETA.

    The rate window starts at the first `update`, i.e. after the first step has compiled and
    run, so compilation (tens of seconds, again after every resume) never enters the speed or
    the ETA. `update(step, metrics)` with the metrics fetched at a logging step shows them (e.g.
    `loss 0.812  cross_entropy 0.65`) until the next ones.

    On a terminal (`stream.isatty()`) one line is redrawn in place at most every
    `min_redraw_seconds` (and at the last step); otherwise a line goes to the `fixed_slots`
    logger every `every_steps` steps and at the last step.
    """

    def __init__(self, num_steps: int, *, start_step: int = 0, every_steps: int = 100,
                 window: int = 50, stream: TextIO | None = None, min_redraw_seconds: float = 0.5,
                 clock: Callable[[], float] = time.perf_counter,
                 show: tuple[str, ...] = ("loss",), quiet: bool = False):
        """`quiet`: keep the figures (rate, ETA) but print nothing (other hosts of a job)."""
        self.num_steps = int(num_steps)
        self.every_steps = max(1, int(every_steps))
        self.min_redraw_seconds = min_redraw_seconds
        self.show = tuple(show)
        self._stream = stream if stream is not None else sys.stdout
        isatty = getattr(self._stream, "isatty", None)
        self._tty = bool(isatty and isatty())
        self._clock = clock
        self._step = int(start_step)
        self._samples: collections.deque = collections.deque(maxlen=max(2, window))
        self._metrics: dict[str, float] = {}
        self._last_draw = -math.inf
        self._line_open = False
        self.quiet = quiet

    def rate(self) -> float:
        """Steps per second over the recent window (0.0 before two updates)."""
        if len(self._samples) < 2:
            return 0.0
        (t0, s0), (t1, s1) = self._samples[0], self._samples[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 else 0.0

    def eta_seconds(self) -> float:
        rate = self.rate()
        return (self.num_steps - self._step) / rate if rate > 0 else math.inf

    def line(self) -> str:
        step = self._step
        percent = 100.0 * step / self.num_steps if self.num_steps else 100.0
        shown = "".join(f"  {name} {self._metrics[name]:.4g}" for name in self.show
                        if name in self._metrics)
        rate = f"{self.rate():.2f} steps/s" if len(self._samples) > 1 else "? steps/s"
        return (f"step {step}/{self.num_steps} ({percent:.1f}%){shown}  {rate}  "
                f"ETA {format_duration(self.eta_seconds())}")

    def update(self, step: int, metrics: Mapping[str, float] | None = None) -> str | None:
        """Records that `step` is done (with the metrics logged at it); returns the printed line."""
        now, step = self._clock(), int(step)
        self._step = step
        self._samples.append((now, step))
        if metrics:
            self._metrics.update({k: float(v) for k, v in metrics.items() if k in self.show})
        last = step >= self.num_steps
        if self.quiet:
            return None
        if self._tty:
            if not last and now - self._last_draw < self.min_redraw_seconds:
                return None
            self._last_draw = now
            text = self.line()
            # Pad so a shorter line fully covers the previous one.
            self._stream.write("\r" + text.ljust(79) + ("\n" if last else ""))
            self._stream.flush()
            self._line_open = not last
            return text
        if step % self.every_steps == 0 or last:
            text = self.line()
            log.info("%s", text)
            return text
        return None

    def close(self) -> None:
        """Ends an in-place line so later output starts on a fresh line."""
        if self._line_open:
            self._stream.write("\n")
            self._stream.flush()
            self._line_open = False
