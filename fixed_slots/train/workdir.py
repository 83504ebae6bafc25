"""One run per workdir, and a resumed run means what it meant when it started.

`WorkdirLock`: the training process (process 0 of a multi-host job) holds an exclusive `flock` on
`<workdir>/.lock` for the whole run; a second run on the same workdir is refused with a message
naming the holder (host, pid, start time, command). The kernel drops the lock when its process
dies, so a crashed or killed run never leaves it stuck. (On network file systems `flock` is only
as good as the server's lock support; NFSv4 and Lustre have it.)

`check_workdir`: a training run's workdir is checked on every process before anything is written:
not the file system root, not a file (nor under one), and writable (or creatable in a writable
directory); a WorkdirError names the problem and nothing is created.

Config records: every checkpoint carries the flattened config it was trained with
(`config_record`); on resume `config_differences` lists what changed. Keys that only change what
is logged or kept (cadences, evaluation settings, data location, device count) may change freely;
any other change (model, gradient mode, data order, optimiser, seed, run length, ...) is refused
unless named in `--accept_config_change`. A checkpoint whose record has no config (an older
fixed_slots, another program) cannot be checked: resuming from it is refused (`saved_config`).
"""
from __future__ import annotations

import datetime
import errno
import json
import os
import socket
import sys
from typing import Any, Iterable

import ml_collections

from fixed_slots.errors import WorkdirError

LOCK_NAME = ".lock"

# Keys (or section prefixes ending in ".") that do not change what a run computes.
FREE_TO_CHANGE = (
    "train.log_every_steps",
    "train.image_every_steps",
    "train.jacobian_every_steps",
    "train.checkpoint_every_steps",
    "train.max_checkpoints_to_keep",
    "train.evaluate_at_end",
    "train.num_devices",
    "data.data_dir",
    "eval.",
)


def check_workdir(workdir: str) -> str:
    """The absolute path of `workdir` if a training run can write there; creates nothing.

    Raises WorkdirError for the file system root, a file (or a path under one), and a directory
    (or, for a workdir still to be created, its nearest existing parent) this process cannot
    write to.
    """
    path = os.path.abspath(os.fspath(workdir))
    if os.path.dirname(path) == path:
        raise WorkdirError(f"--workdir={workdir} is the file system root: give the run a "
                           f"directory of its own, e.g. --workdir=/tmp/run")
    existing = path
    while not os.path.lexists(existing):  # (a dangling link exists, and is no directory)
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        kind = "a file" if os.path.isfile(existing) else "not a directory"
        where = f"is {kind}" if existing == path else f"is under {existing}, which is {kind}"
        raise WorkdirError(f"--workdir={workdir} {where}: give the run a directory (it is "
                           f"created if missing)")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = ("" if existing == path else
                 f" (it does not exist and its parent {existing} is not writable)")
        raise WorkdirError(f"--workdir={workdir} is not writable{where}: give the run a "
                           f"directory this user can write to")
    return path


class WorkdirLock:
    """Exclusive lock on a workdir for this process's lifetime (or until `release`)."""

    def __init__(self, workdir: str):
        import fcntl

        self.workdir = check_workdir(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self.path = os.path.join(self.workdir, LOCK_NAME)
        self._file = open(self.path, "a+")
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            self._file.seek(0)
            holder = self._file.read().strip()
            self._file.close()
            self._file = None
            raise WorkdirError(
                f"workdir {self.workdir} is in use by another run ({_describe(holder)}); "
                f"wait for it to finish or stop it, or use another --workdir") from None
        self._file.seek(0)
        self._file.truncate()
        json.dump({"host": socket.gethostname(), "pid": os.getpid(),
                   "started": datetime.datetime.now().isoformat(timespec="seconds"),
                   "command": " ".join(sys.argv)}, self._file)
        self._file.flush()

    def release(self) -> None:
        if self._file is not None:
            import fcntl

            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> "WorkdirLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _describe(holder: str) -> str:
    try:
        info = json.loads(holder)
        return (f"pid {info['pid']} on {info['host']}, started {info['started']}: "
                f"{info['command']}")
    except (ValueError, KeyError, TypeError):
        return "holder unknown"


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def config_record(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """{"a.b.c": value} of every leaf (JSON values), as stored with each checkpoint."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: ml_collections.ConfigDict) -> None:
        for key, value in node.items():
            if isinstance(value, ml_collections.ConfigDict):
                walk(f"{prefix}{key}.", value)
            else:
                flat[f"{prefix}{key}"] = _jsonable(value)

    walk("", config)
    return flat


def saved_config(metadata: Any, step: int, directory: str) -> dict[str, Any]:
    """The config record in a checkpoint's metadata; WorkdirError if it holds none (resuming
    could not check that the run is the one it was trained as)."""
    record = metadata.get("config") if isinstance(metadata, dict) else None
    if not isinstance(record, dict):
        raise WorkdirError(
            f"the checkpoint at step {step} in {directory} records no config (written by a "
            f"fixed_slots older than config records, or by another program), so resuming "
            f"cannot check that this config is the one it was trained with: resume with the "
            f"version that wrote it, or train in a new --workdir. Nothing was changed.")
    return record


def _free(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in FREE_TO_CHANGE)


def config_differences(saved: dict[str, Any], current: dict[str, Any],
                       accepted: Iterable[str] = ()) -> tuple[list[str], list[str]]:
    """(refused, allowed) lines `key: old -> new` for keys present in both records.

    Keys only one side has come from another version of fixed_slots (a key added or removed):
    they are not differences of the run.
    """
    accepted = set(accepted)
    refused, allowed = [], []
    for key in sorted(set(saved) & set(current)):
        if saved[key] == current[key]:
            continue
        line = f"{key}: {saved[key]!r} -> {current[key]!r}"
        (allowed if _free(key) or key in accepted else refused).append(line)
    return refused, allowed


def refuse_changed_config(workdir: str, refused: list[str]) -> None:
    keys = ",".join(line.split(":", 1)[0] for line in refused)
    raise WorkdirError(
        f"workdir {workdir} holds a run trained with another config; resuming would change:\n"
        + "".join(f"  {line}\n" for line in refused)
        + f"Use a new --workdir for a new run, or pass --accept_config_change={keys} if the "
          f"change is deliberate (e.g. a longer train.num_steps).")
