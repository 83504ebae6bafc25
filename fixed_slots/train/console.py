"""The console: the training progress line and the evaluation progress line, with ETAs.

On a terminal each is one line redrawn in place on stderr (our log lines clear it, print above
it and redraw it: `fixed_slots.log`); otherwise (a log file, a pipe) it is a line of the
`fixed_slots` logger, once per logging step for training and every few batches for an
evaluation. The speed is measured only between moments the host has waited for the device
(the logging steps), so the steps/s shown is the one written to TensorBoard at that step, and
compilation (the first step) never enters the speed or the ETA.
"""
from __future__ import annotations

import collections
import math
import sys
import time
from typing import Callable, Mapping, TextIO

from fixed_slots import log


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


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class _Line:
    """One status line: redrawn in place on a terminal (at most every `min_redraw_seconds`),
    else printed through the logger when `emit` says so."""

    def __init__(self, stream: TextIO | None, min_redraw_seconds: float,
                 clock: Callable[[], float], quiet: bool):
        self._stream = stream if stream is not None else sys.stderr
        self.tty = _is_terminal(self._stream)
        self._clock = clock
        self._min_redraw = min_redraw_seconds
        self._last_draw = -math.inf
        self.quiet = quiet

    def show(self, text: str, *, log_it: bool, final: bool = False) -> str | None:
        """Redraws (terminal) or logs (`log_it`) `text`; returns it if it was shown."""
        if self.quiet:
            return None
        if self.tty:
            now = self._clock()
            if not final and now - self._last_draw < self._min_redraw:
                return None
            self._last_draw = now
            if final:
                log.end_live_line(self._stream, text)
            else:
                log.live_line(self._stream, text)
            return text
        if log_it or final:
            log.info("%s", text)
            return text
        return None

    def close(self) -> None:
        if self.tty and not self.quiet:
            log.end_live_line(self._stream)


class ProgressLine:
    """Training progress: step, the model's progress metrics, steps/s and the ETA.

    `tick(step)` after every step (moves the step counter of an in-place line);
    `measure(step, metrics)` at a logging step, after the metrics were fetched (the device has
    caught up): records the time, returns the steps/s over the last `window` logging steps,
    and shows the line (logged once per logging step when not on a terminal).
    """

    def __init__(self, num_steps: int, *, start_step: int = 0, window: int = 10,
                 stream: TextIO | None = None, min_redraw_seconds: float = 0.5,
                 clock: Callable[[], float] = time.perf_counter,
                 show: tuple[str, ...] = ("loss",), quiet: bool = False):
        """`quiet`: keep the figures (rate, ETA) but print nothing (other hosts of a job)."""
        self.num_steps = int(num_steps)
        self.show = tuple(show)
        self._clock = clock
        self._line = _Line(stream, min_redraw_seconds, clock, quiet)
        self._step = int(start_step)
        self._samples: collections.deque = collections.deque(maxlen=max(2, window + 1))
        self._metrics: dict[str, float] = {}

    def start(self) -> None:
        """Starts (or restarts) the timed window: after compilation, and after work that is not
        training (an evaluation), so that neither enters the steps/s or the ETA."""
        self._samples.clear()
        self._samples.append((self._clock(), self._step))

    def rate(self) -> float:
        """Steps per second over the measured window (0.0 before two measurements)."""
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

    def tick(self, step: int) -> str | None:
        """`step` is done (not measured): redraws an in-place line, prints nothing otherwise."""
        self._step = int(step)
        if not self._line.tty:
            return None
        return self._line.show(self.line(), log_it=False, final=self._step >= self.num_steps)

    def measure(self, step: int, metrics: Mapping[str, float] | None = None) -> float:
        """A logging step, its metrics fetched: records the time and shows the line; returns
        the steps/s (what TensorBoard gets for this step)."""
        self._step = int(step)
        self._samples.append((self._clock(), self._step))
        if metrics:
            self._metrics.update({k: float(v) for k, v in metrics.items() if k in self.show})
        self._line.show(self.line(), log_it=True, final=self._step >= self.num_steps)
        return self.rate()

    def close(self) -> None:
        """Ends an in-place line so later output starts on a fresh line."""
        self._line.close()


class EvaluationProgress:
    """`evaluating: batch 3/8 (37%)  ETA 0:00:12`; the first batch includes compilation, so the
    ETA is measured from the second batch on."""

    def __init__(self, what: str, *, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.perf_counter, quiet: bool = False,
                 log_every_seconds: float = 10.0):
        self.what = what
        self._clock = clock
        self._line = _Line(stream, 0.5, clock, quiet)
        self._first_done: tuple[float, int] | None = None
        self._last_log = clock()
        self._log_every = log_every_seconds
        self._logged = False

    def __call__(self, done: int, total: int) -> str | None:
        now = self._clock()
        if self._first_done is None:
            self._first_done = (now, done)
        t0, d0 = self._first_done
        rate = (done - d0) / (now - t0) if now > t0 and done > d0 else 0.0
        finished = done >= total
        eta = 0.0 if finished else (total - done) / rate if rate > 0 else math.inf
        percent = 100.0 * done / total if total else 100.0
        text = (f"{self.what}: batch {done}/{total} ({percent:.0f}%)  "
                f"ETA {format_duration(eta)}")
        # The last batch is logged only to end earlier logged lines (`final` below).
        log_it = not finished and now - self._last_log >= self._log_every
        if log_it:
            self._last_log = now
            self._logged = True
        # Not on a terminal, an evaluation shorter than one logging interval prints nothing
        # (its summary line follows); a longer one ends its logged lines with the last batch.
        final = finished and (self._line.tty or self._logged)
        return self._line.show(text, log_it=log_it, final=final)
