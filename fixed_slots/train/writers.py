"""TensorBoard writers.

`create_writer` returns an object with `clu.metric_writers.MetricWriter`'s methods (write_scalars,
write_images, write_histograms, write_texts, write_hparams, flush, close). With TensorFlow
installed (the `.[tf]` extra) it is CLU's own `create_default_writer`; without, CLU's writers
cannot even be imported (the package imports TensorFlow), so it is `TensorboardXWriter`. Both write
TensorBoard event files under `logdir`: the dashboard is `tensorboard --logdir=...` either way.
Differences of the tensorboardX path: a batch of images becomes one grid image per tag, scalars
are stored as `simple_value` (CLU stores tensors) and carry their descriptions; TensorBoard shows
both the same way. The console's progress lines are in `fixed_slots.train.console`.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Mapping

import numpy as np
from absl import logging



def _tensorflow_available() -> bool:
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        return False
    return True


def import_tensorboardx() -> None:
    """Imports tensorboardX without letting it import PyTorch.

    tensorboardX's package `__init__` imports torch whenever torch is installed (for its
    `SummaryWriter`, which is not used here): in a JAX training process that cost 1.5 s of
    start-up and ~480 MiB of resident memory (2-core CPU, torch 2.14.1). During that one import
    `torch` is marked unimportable (tensorboardX then falls back to numpy, which is all it is
    given here); a torch the program already imported is left as it is. Not thread-safe
    against another thread importing torch at that moment (none does in the trainer).
    """
    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        import tensorboardX  # noqa: F401
        return
    sys.modules["torch"] = None  # type: ignore[assignment]  # `import torch` -> ImportError
    try:
        import tensorboardX  # noqa: F401
    finally:
        if sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]


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
    (a write syscall, ~10 us; logging happens every N steps).

    `descriptions` (tag -> text) go into the first event of each scalar tag: TensorBoard shows
    them on the scalar's chart.
    """

    def __init__(self, logdir: str, descriptions: Mapping[str, str] | None = None):
        import_tensorboardx()
        from tensorboardX.event_file_writer import EventsWriter

        self.logdir = os.fspath(logdir)
        os.makedirs(self.logdir, exist_ok=True)
        self._events = EventsWriter(os.path.join(self.logdir, "events"))
        self._descriptions = dict(descriptions or {})
        self._described: set[str] = set()

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

        summaries = []
        for name, value in scalars.items():
            description = ""
            if name not in self._described:
                self._described.add(name)
                description = self._descriptions.get(name, "")
            summaries.append(scalar(name, float(value), summary_description=description))
        self._write(step, summaries)

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


def create_writer(logdir: str, *, just_logging: bool = False,
                  descriptions: Mapping[str, str] | None = None) -> Any:
    """A MetricWriter-like object writing TensorBoard event files under `logdir`.

    CLU's `create_default_writer` when TensorFlow is importable (synchronous, so that a flush
    before a checkpoint puts every covered step on disk), else `TensorboardXWriter`, which also
    writes each scalar's description (TensorBoard shows it on the chart). `just_logging=True`
    (e.g. for non-leader hosts) only logs.
    """
    if _tensorflow_available():
        from clu import metric_writers

        return metric_writers.create_default_writer(
            os.fspath(logdir), just_logging=just_logging, asynchronous=False)
    if just_logging:
        return LoggingWriter()
    return TensorboardXWriter(logdir, descriptions=descriptions)
