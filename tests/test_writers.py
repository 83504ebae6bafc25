"""Dashboards: the tensorboardX writer with CLU's MetricWriter methods, event files read back
with a minimal TFRecord reader (no TensorFlow or tensorboard needed); the console lines."""
import collections
import io
import logging
import pathlib
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2, plugin_hparams_pb2

from fixed_slots import log
from fixed_slots.train import console, writers


def read_events(logdir: pathlib.Path) -> list:
    """Every Event in every event file under logdir (TFRecord: u64 length, u32 crc, data, u32)."""
    events = []
    for path in sorted(logdir.rglob("events.out.tfevents*")):
        data, offset = path.read_bytes(), 0
        while offset + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            start = offset + 12
            event = event_pb2.Event()
            event.ParseFromString(data[start:start + length])
            events.append(event)
            offset = start + length + 4
    return events


def values_by_tag(events) -> dict:
    """tag -> [(step, Summary.Value)]."""
    found = collections.defaultdict(list)
    for event in events:
        for value in event.summary.value:
            found[value.tag].append((event.step, value))
    return found


def write_everything(writer):
    writer.write_scalars(3, {"loss": 1.5, "grad_norm": np.float32(2.0)})
    writer.write_scalars(4, {"loss": jnp.float32(1.25)})
    writer.write_images(4, {"grid": np.linspace(0, 1, 8 * 6 * 3).reshape(8, 6, 3),
                            "batch": np.zeros((2, 4, 5, 3), np.uint8),
                            "gray": jnp.ones((1, 4, 4, 1))})
    writer.write_histograms(4, {"weights": np.random.default_rng(0).normal(size=100)},
                            num_buckets={"weights": 7})
    writer.write_texts(4, {"note": "hello"})
    writer.write_hparams({"grad": "neumann1", "lr": 1e-4, "iters": 7, "tuple": (1, 2)})
    writer.flush()
    writer.close()


def check_events(logdir: pathlib.Path):
    found = values_by_tag(read_events(logdir))
    assert [(s, v.simple_value) for s, v in found["loss"]] == [(3, 1.5), (4, 1.25)]
    assert [(s, v.simple_value) for s, v in found["grad_norm"]] == [(3, 2.0)]
    (step, grid), = found["grid"]
    assert step == 4 and (grid.image.height, grid.image.width) == (8, 6)
    assert grid.image.encoded_image_string.startswith(b"\x89PNG")
    assert found["batch"][0][1].image.encoded_image_string.startswith(b"\x89PNG")
    assert (found["gray"][0][1].image.height, found["gray"][0][1].image.width) == (4, 4)
    histogram = found["weights"][0][1].histo
    # 7 buckets (tensorboardX may add an empty leading one).
    assert sum(histogram.bucket) == 100 and len(histogram.bucket) in (7, 8)
    text_tags = [tag for tag in found if tag.startswith("note")]
    assert text_tags and found[text_tags[0]][0][1].tensor.string_val == [b"hello"]
    (_, start), = found["_hparams_/session_start_info"]
    plugin = plugin_hparams_pb2.HParamsPluginData()
    plugin.ParseFromString(start.metadata.plugin_data.content)
    hparams = plugin.session_start_info.hparams
    assert hparams["grad"].string_value == "neumann1"
    assert hparams["lr"].number_value == pytest.approx(1e-4)
    assert hparams["iters"].number_value == 7 and hparams["tuple"].string_value == "(1, 2)"
    # All of it in one event file: TensorBoard shows a single run.
    assert len(list(logdir.rglob("events.out.tfevents*"))) == 1


def test_create_writer_picks_clu_only_with_tensorflow(tmp_path):
    writer = writers.create_writer(str(tmp_path))
    assert isinstance(writer, writers.TensorboardXWriter) != writers._tensorflow_available()
    writer.close()


def test_tensorboardx_writer_round_trip(tmp_path):
    write_everything(writers.TensorboardXWriter(str(tmp_path)))
    check_events(tmp_path)


def test_flushed_events_are_on_disk_without_close(tmp_path):
    """What the trainer relies on before each checkpoint: after `flush`, a process killed without
    closing the writer has every event written so far in the file (tensorboardX's own
    SummaryWriter.flush leaves queued events to its background thread)."""
    writer = writers.TensorboardXWriter(str(tmp_path))
    for step in range(1, 201):
        writer.write_scalars(step, {"loss": float(step)})
    writer.flush()
    steps = [s for s, _ in values_by_tag(read_events(tmp_path))["loss"]]
    assert steps == list(range(1, 201))
    writer.close()


_FAKE_TORCH_CHECK = """
import sys, tempfile
from fixed_slots.train import writers
writer = writers.create_writer(tempfile.mkdtemp())
writer.write_scalars(1, {"a": 1.0})
writer.write_images(1, {"b": __import__("numpy").zeros((2, 4, 4, 3), "uint8")})
assert "torch" not in sys.modules, "tensorboardX imported torch"
import torch
assert torch.FAKE, "the installed torch is importable afterwards"
print("ok")
"""


def test_the_writer_does_not_import_torch(tmp_path):
    """tensorboardX imports torch when it is installed (1.5 s and ~480 MiB in a JAX process):
    with a stand-in torch on the path, writing events imports none of it, and torch still
    imports afterwards. Run in a fresh interpreter (the suite may already hold tensorboardX)."""
    import os
    import subprocess
    import sys

    fake = tmp_path / "site" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("FAKE = True\nTensor = type('Tensor', (), {})\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(tmp_path / "site"), str(pathlib.Path(__file__).parents[1]),
         os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", _FAKE_TORCH_CHECK], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


def test_scalars_carry_their_description_once(tmp_path):
    writer = writers.TensorboardXWriter(str(tmp_path), descriptions={"eval/fg_ari": "FG-ARI."})
    writer.write_scalars(1, {"eval/fg_ari": 0.5, "loss": 2.0})
    writer.write_scalars(2, {"eval/fg_ari": 0.6})
    writer.close()
    found = values_by_tag(read_events(tmp_path))
    first, second = (v.metadata.summary_description for _, v in found["eval/fg_ari"])
    assert (first, second) == ("FG-ARI.", "")  # TensorBoard reads the first event's metadata
    assert found["loss"][0][1].metadata.summary_description == ""


def test_logging_writer_for_non_leader_hosts(caplog):
    writer = writers.create_writer("/nonexistent", just_logging=True)
    with caplog.at_level(logging.INFO):
        writer.write_scalars(1, {"loss": 1.0})
    writer.flush()
    assert "loss=1" in caplog.text


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_a_log_call_inside_a_log_call_does_not_deadlock():
    """The trainer's signal handler logs, and it can run while the main thread is inside a log
    call (a SIGTERM'd run once hung there): the console's lock is re-entrant."""
    import threading

    class Interrupted(io.StringIO):  # a "signal handler" logging in the middle of a write
        nested = False

        def write(self, text):
            if not self.nested:
                self.nested = True
                log.logger.warning("from the handler")
            return super().write(text)

    stream = Interrupted()
    handler = log._Handler(stream)
    handler.setFormatter(log._Format())
    log.logger.addHandler(handler)
    try:
        worker = threading.Thread(target=log.logger.warning, args=("a step line",), daemon=True)
        worker.start()
        worker.join(timeout=20)
        assert not worker.is_alive(), "deadlocked"
    finally:
        log.logger.removeHandler(handler)
    assert "from the handler" in stream.getvalue() and "a step line" in stream.getvalue()


def test_progress_line_measures_at_logging_steps_only(caplog):
    clock = FakeClock()
    progress = console.ProgressLine(1000, start_step=100, window=10, stream=io.StringIO(),
                                    clock=clock, show=("loss", "cross_entropy"))
    clock.now = 60.0  # the first step compiles for a minute: not part of the rate or the ETA
    progress.start()
    rates = []
    with caplog.at_level(logging.INFO, logger="fixed_slots"):
        for step in range(101, 121):
            clock.now += 0.1  # 10 steps/s
            assert progress.tick(step) is None  # not a terminal: nothing between log steps
            if step % 5 == 0:
                metrics = {"loss": 1.25, "cross_entropy": 0.5, "dvae_mse": 9.0}
                rates.append(progress.measure(step, metrics))
    assert rates == [pytest.approx(10.0)] * 4  # the figure TensorBoard gets
    assert progress.eta_seconds() == pytest.approx(88.0)  # 880 steps left
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4  # one line per logging step
    assert lines[-1] == "step 120/1000 (12.0%)  loss 1.25  cross_entropy 0.5  10.00 steps/s  ETA 0:01:28"
    assert "dvae_mse" not in caplog.text
    assert console.format_duration(2 * 86400 + 3661) == "2d 1:01:01"
    assert console.format_duration(float("inf")) == "?"


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_line_redraws_one_line_on_a_terminal():
    clock, stream = FakeClock(), Terminal()
    progress = console.ProgressLine(4, min_redraw_seconds=0.5, stream=stream, clock=clock)
    progress.start()
    for step in (1, 2, 3, 4):
        clock.now += 0.3
        progress.tick(step)
    out = stream.getvalue()
    # Drawn at 0.3 s, then 0.9 s (>= 0.5 s later), then the last step; one line in all.
    assert out.count("\r") == 3 and out.endswith("\n") and out.count("\n") == 1
    assert "step 4/4 (100.0%)" in out


def test_log_lines_print_above_the_live_line():
    stream = Terminal()
    handler = log._Handler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.live_line(stream, "step 3/10")
    handler.emit(logging.LogRecord("fixed_slots", logging.INFO, "", 0, "Resumed.", None, None))
    log.end_live_line(stream, "step 10/10")
    out = stream.getvalue()
    # The live line is cleared, the log line printed, the live line drawn again below it.
    assert out.index("Resumed.") > out.index("step 3/10")
    assert out.rindex("step 3/10") > out.index("Resumed.")
    assert out.endswith("step 10/10\n")


def test_evaluation_progress_gives_an_eta_from_the_second_batch():
    clock, stream = FakeClock(), Terminal()
    progress = console.EvaluationProgress("Evaluating", stream=stream, clock=clock)
    clock.now = 30.0  # the first batch compiles
    assert "ETA ?" in progress(1, 5)
    clock.now = 32.0
    clock.now += 0.0
    progress._line._last_draw = -1e9  # redraw now
    assert progress(2, 5) == "Evaluating: batch 2/5 (40%)  ETA 0:00:06"
    clock.now = 38.0
    assert stream.getvalue().count("\n") == 0
    progress(5, 5)
    assert stream.getvalue().endswith("\n")


def test_a_short_evaluation_logs_no_progress_line_off_a_terminal():
    clock, stream = FakeClock(), io.StringIO()
    progress = console.EvaluationProgress("Evaluating", stream=stream, clock=clock)
    clock.now = 3.0
    assert progress(1, 2) is None
    clock.now = 4.0
    assert progress(2, 2) is None  # done within one logging interval: the summary says it
    long = console.EvaluationProgress("Evaluating", stream=stream, clock=clock)
    clock.now = 20.0
    assert long(1, 3) is not None  # 10 s passed: logged
    clock.now = 21.0
    assert long(3, 3) == "Evaluating: batch 3/3 (100%)  ETA 0:00:00"


def test_a_one_batch_evaluation_that_compiles_long_logs_no_progress_line():
    clock, stream = FakeClock(), io.StringIO()
    progress = console.EvaluationProgress("Evaluating", stream=stream, clock=clock)
    clock.now = 30.0  # its only batch compiled for 30 s
    assert progress(1, 1) is None
