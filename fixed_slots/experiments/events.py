"""Reads TensorBoard event files (as written by tensorboardX or CLU) without TensorFlow."""
from __future__ import annotations

import collections
import glob
import os
import struct

from fixed_slots.train.writers import import_tensorboardx


def _records(path: str):
    with open(path, "rb") as f:
        data = f.read()
    offset = 0
    while offset + 12 <= len(data):
        (length,) = struct.unpack("<Q", data[offset:offset + 8])
        start = offset + 12  # length (8) + its CRC (4)
        end = start + length
        if end + 4 > len(data):
            break  # a record still being written
        yield data[start:end]
        offset = end + 4  # payload CRC


def read_scalars(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] sorted by step, from every event file under run_dir."""
    import_tensorboardx()
    from tensorboardX.proto import event_pb2

    series: dict[str, dict[int, float]] = collections.defaultdict(dict)
    pattern = os.path.join(run_dir, "**", "events.out.tfevents*")
    for path in sorted(glob.glob(pattern, recursive=True)):
        for record in _records(path):
            event = event_pb2.Event()
            event.ParseFromString(record)
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    series[value.tag][event.step] = value.simple_value
                elif value.HasField("tensor") and value.tensor.float_val:
                    series[value.tag][event.step] = value.tensor.float_val[0]
    return {tag: sorted(points.items()) for tag, points in series.items()}
