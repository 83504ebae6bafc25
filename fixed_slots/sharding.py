"""Data parallelism over one `data` mesh axis (batch sharded, state replicated), and joining a
multi-process job.

Multi-process (multi-host, or one process per GPU) jobs: every process runs the same `main.py`
command; `maybe_initialize_distributed()` joins them through `jax.distributed` before any device
is touched. It reads, in this order (docs/multihost.md has the launch recipes):

  FIXED_SLOTS_COORDINATOR=host:port   process 0's address (JAX_COORDINATOR_ADDRESS also works)
  FIXED_SLOTS_NUM_PROCESSES=N         how many processes in the job
  FIXED_SLOTS_PROCESS_ID=i            this process, 0 <= i < N
  FIXED_SLOTS_LOCAL_DEVICE_IDS=0,1    optional: the local accelerators this process uses
  FIXED_SLOTS_DISTRIBUTED=auto        no address given: JAX detects the cluster (SLURM srun,
                                      Open MPI, Cloud TPU pod slices); =off never joins
  FIXED_SLOTS_HEARTBEAT_TIMEOUT_S     seconds without a heartbeat before the job declares a
                                      process dead and every other process exits (JAX: 100)
  FIXED_SLOTS_INITIALIZATION_TIMEOUT_S  seconds to wait for all processes to join (JAX: 300)

With none of these set nothing happens (one process, all local devices). On the CPU, collectives
between processes go through gloo.

One process on a CPU: `split_cpu(config)` (the trainer calls it first) makes the host several
JAX devices so that the batch runs data-parallel over them. XLA's CPU runtime runs one device's
program as a mostly sequential stream of small kernels, so a 2-core host trains the README's
default 1.6x faster as 4 devices of 4 images than as one device of 16 (BENCHMARKS.md). The count
is `config.train.num_devices` when set, else `cpu_device_count(batch)`; an `XLA_FLAGS` with
`--xla_force_host_platform_device_count`, a `jax_num_cpu_devices` of the user's own, a
multi-process job, and a backend that has already started (a notebook that ran JAX) are left
as they are. Accelerators are unaffected (the setting only shapes JAX's CPU backend).

Given the config, `maybe_initialize_distributed(config)` also checks that every process runs the
same one: each publishes its config record (what checkpoints store) in the job's key-value store,
and a difference fails every process alike with one ConfigError naming the keys that differ.

A process of a job that ends with an error calls `leave_job_after_error(code)` (main.py's CLI
does): if every process is failing it exits normally; otherwise it exits at once instead of waiting
in JAX's shutdown barrier (up to 5 minutes) for peers that are themselves waiting in a collective
for it, so they are stopped by JAX's coordination service within the heartbeat timeout.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import sys
import time
from typing import Any, Iterable, Iterator, Mapping, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from fixed_slots import log
from fixed_slots.errors import ConfigError

DATA_AXIS = "data"
T = TypeVar("T")
_END = object()

ENV_COORDINATOR = "FIXED_SLOTS_COORDINATOR"
ENV_NUM_PROCESSES = "FIXED_SLOTS_NUM_PROCESSES"
ENV_PROCESS_ID = "FIXED_SLOTS_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "FIXED_SLOTS_LOCAL_DEVICE_IDS"
ENV_DISTRIBUTED = "FIXED_SLOTS_DISTRIBUTED"
ENV_HEARTBEAT_TIMEOUT = "FIXED_SLOTS_HEARTBEAT_TIMEOUT_S"
ENV_INITIALIZATION_TIMEOUT = "FIXED_SLOTS_INITIALIZATION_TIMEOUT_S"


class DistributedSetupError(ConfigError):
    """The multi-process environment variables are incomplete or malformed (names the variable)."""


def _env_int(env: Mapping[str, str], name: str, *, minimum: int) -> int | None:
    value = env.get(name)
    if value is None or value.strip() == "":
        return None
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or number < minimum:
        raise DistributedSetupError(f"{name}={value!r} must be an integer >= {minimum}")
    return number


def distributed_arguments(environ: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """jax.distributed.initialize keyword arguments from the environment, or None (one process).

    Pure: reads `environ` (default os.environ), touches no device, raises DistributedSetupError
    for an incomplete or malformed setup.
    """
    env = os.environ if environ is None else environ
    mode = env.get(ENV_DISTRIBUTED, "").strip().lower()
    if mode not in ("", "auto", "off"):
        raise DistributedSetupError(f"{ENV_DISTRIBUTED}={env[ENV_DISTRIBUTED]!r} must be "
                                    "'auto' (let JAX detect the cluster) or 'off'")
    if mode == "off":
        return None
    # JAX's own variable keeps JAX's meaning: what it leaves unset, JAX detects.
    if ENV_COORDINATOR not in env and "JAX_COORDINATOR_ADDRESS" in env and not mode:
        mode = "auto"
    coordinator = env.get(ENV_COORDINATOR) or env.get("JAX_COORDINATOR_ADDRESS")
    num_processes = _env_int(env, ENV_NUM_PROCESSES, minimum=1)
    process_id = _env_int(env, ENV_PROCESS_ID, minimum=0)
    if coordinator is None and mode != "auto":
        given = [n for n in (ENV_NUM_PROCESSES, ENV_PROCESS_ID) if n in env]
        if given:
            raise DistributedSetupError(
                f"{' and '.join(given)} set but no {ENV_COORDINATOR}=host:port (process 0's "
                f"address), or {ENV_DISTRIBUTED}=auto on a cluster JAX can detect")
        return None
    if coordinator is not None and (":" not in coordinator
                                    or not coordinator.rsplit(":", 1)[1].isdigit()):
        raise DistributedSetupError(f"{ENV_COORDINATOR}={coordinator!r} must be host:port")
    if num_processes is not None and process_id is not None and process_id >= num_processes:
        raise DistributedSetupError(f"{ENV_PROCESS_ID}={process_id} must be below "
                                    f"{ENV_NUM_PROCESSES}={num_processes}")
    if coordinator is not None and mode != "auto":
        missing = [n for n, v in ((ENV_NUM_PROCESSES, num_processes),
                                  (ENV_PROCESS_ID, process_id)) if v is None]
        if missing:
            raise DistributedSetupError(
                f"{ENV_COORDINATOR} is set but {' and '.join(missing)} is not (or set "
                f"{ENV_DISTRIBUTED}=auto to let JAX read them from SLURM/Open MPI/TPU)")
    args: dict[str, Any] = {"coordinator_address": coordinator,
                            "num_processes": num_processes, "process_id": process_id}
    ids = env.get(ENV_LOCAL_DEVICE_IDS)
    if ids:
        try:
            args["local_device_ids"] = [int(i) for i in ids.split(",")]
        except ValueError:
            raise DistributedSetupError(f"{ENV_LOCAL_DEVICE_IDS}={ids!r} must be comma-"
                                        "separated integers, e.g. 0,1") from None
    heartbeat = _env_int(env, ENV_HEARTBEAT_TIMEOUT, minimum=1)
    if heartbeat is not None:
        args["heartbeat_timeout_seconds"] = heartbeat
    init_timeout = _env_int(env, ENV_INITIALIZATION_TIMEOUT, minimum=1)
    if init_timeout is not None:
        args["initialization_timeout"] = init_timeout
    return {k: v for k, v in args.items() if v is not None}


# JAX's defaults for the timeouts FIXED_SLOTS_* may set (jax.distributed.initialize).
_JAX_HEARTBEAT_TIMEOUT_S = 100
_JAX_INITIALIZATION_TIMEOUT_S = 300
_timeouts = {"heartbeat": _JAX_HEARTBEAT_TIMEOUT_S,
             "initialization": _JAX_INITIALIZATION_TIMEOUT_S}


def _job() -> tuple[Any, int, int] | None:
    """(key-value store client, process index, process count) of a multi-process job this
    process joined, or None; touches no device (the backend may not exist yet)."""
    from jax._src import distributed  # the client orbax and multihost_utils use too

    state = distributed.global_state
    client = getattr(state, "client", None)
    count = getattr(state, "num_processes", None) or 1
    if client is None or count < 2:
        return None
    return client, int(state.process_id), int(count)


def maybe_initialize_distributed(config: Any = None) -> bool:
    """Joins a multi-process job when the environment describes one; returns whether it is one.

    Call before anything touches a device (jax.devices(), jax.device_count(), a computation).
    Calling it again, or after the job was joined some other way, is a no-op, except that a
    given `config` is checked to be the same on every process (`check_same_config`).
    """
    joined = _maybe_initialize()
    if joined and config is not None:
        check_same_config(config)
    return joined


def _maybe_initialize() -> bool:
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    args = distributed_arguments()
    if args is None:
        return False
    _timeouts["heartbeat"] = args.get("heartbeat_timeout_seconds", _JAX_HEARTBEAT_TIMEOUT_S)
    _timeouts["initialization"] = args.get("initialization_timeout",
                                           _JAX_INITIALIZATION_TIMEOUT_S)
    try:
        # Collectives between CPU processes (tests, CPU clusters); accelerators use their own.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, KeyError, ValueError):  # an option a future jax may drop
        pass
    accepted = inspect.signature(jax.distributed.initialize).parameters
    dropped = sorted(set(args) - set(accepted))
    if dropped:  # a timeout this jax version does not take: its default applies
        log.warning("jax %s's distributed.initialize takes no %s; ignored.",
                    jax.__version__, dropped)
    args = {k: v for k, v in args.items() if k in accepted}
    logging.info("Joining a multi-process job: %s", args)
    jax.distributed.initialize(**args)
    log.info("Process %d of %d; %d local of %d global devices.", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return jax.process_count() > 1


_config_checks: list[str] = []  # fingerprints this process has checked, in order


def check_same_config(config: Any) -> None:
    """Raises ConfigError on every process of the job if their configs differ (a no-op in one
    process): the flattened configs (`configlib.flatten`, values as JSON) go through the job's key-value store, no device is touched, and the message names the keys in
    which the first differing process differs from process 0."""
    job = _job()
    if job is None:
        return
    from fixed_slots import configlib  # imports only errors: below this module

    client, index, count = job
    text = json.dumps(configlib.flatten(config), sort_keys=True, default=repr)
    fingerprint = hashlib.sha256(text.encode()).hexdigest()[:16]
    if fingerprint in _config_checks:  # this process checked this config already
        return
    prefix = f"fixed_slots/config_check/{len(_config_checks)}"
    _config_checks.append(fingerprint)
    client.key_value_set(f"{prefix}/fingerprint/{index}", fingerprint)
    client.key_value_set(f"{prefix}/record/{index}", text)
    timeout_ms = 1000 * _timeouts["initialization"]
    fingerprints = [client.blocking_key_value_get(f"{prefix}/fingerprint/{i}", timeout_ms)
                    for i in range(count)]
    others = [i for i in range(count) if fingerprints[i] != fingerprints[0]]
    if not others:
        return
    first, other = (json.loads(client.blocking_key_value_get(f"{prefix}/record/{i}", timeout_ms))
                    for i in (0, others[0]))
    missing = object()
    keys = [k for k in sorted(set(first) | set(other))
            if first.get(k, missing) != other.get(k, missing)]
    shown = "; ".join(f"{k}: {first.get(k, '(none)')!r} on process 0, "
                      f"{other.get(k, '(none)')!r} on process {others[0]}" for k in keys[:4])
    more = f" (and {len(keys) - 4} more keys)" if len(keys) > 4 else ""
    processes = f"process {others[0]}" + (f" and {len(others) - 1} more" if len(others) > 1
                                          else "")
    verb = "differs" if len(others) == 1 else "differ"
    raise ConfigError(f"the processes of this job do not share one config: {processes} "
                      f"{verb} from process 0 in {shown}{more}. Every process must run the same "
                      f"command with the same --config flags.")


# How long a failing process waits for the others to fail too (the same error everywhere) before
# it leaves the job at once: at most this, and at most half the heartbeat timeout.
_PEERS_FAILING_WAIT_S = 10.0


def leave_job_after_error(code: int) -> None:
    """Called when this process of a multi-process job ends with an error (exit `code`).

    Returns (the caller exits normally, through JAX's shutdown barrier) when every process of
    the job is leaving after an error; else, after waiting up to min(10 s, half the heartbeat
    timeout) for that, ends this process at once with `code`: the others, waiting for it in a
    collective, are stopped by JAX's coordination service at once (this is process 0, the
    coordinator) or within the heartbeat timeout, instead of after JAX's 5-minute shutdown
    barrier. A no-op outside a multi-process job.
    """
    job = _job()
    if job is None:
        return
    client, index, count = job
    wait = min(_PEERS_FAILING_WAIT_S, _timeouts["heartbeat"] / 2)
    try:
        client.key_value_set(f"fixed_slots/failed/{index}", str(code), allow_overwrite=True)
        deadline = time.monotonic() + wait
        while len(client.key_value_dir_get("fixed_slots/failed/")) < count:
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        else:
            return  # every process is leaving: the shutdown barrier passes at once
    except Exception:  # the coordinator is gone: no barrier to wait in
        pass
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def reached_preemption_sync_point(step: int) -> bool:
    """Whether every process should save and stop at `step` (multi-process jobs only).

    Once any process receives SIGTERM (JAX's preemption notifier, installed by
    jax.distributed.initialize), JAX agrees on one step past every process's current step and
    this returns True there, on every process. Call it at every step, on every process.
    """
    if jax.process_count() == 1:
        return False
    from jax.experimental import multihost_utils

    return multihost_utils.reached_preemption_sync_point(step)


# How a CPU-only host is split (measured on the 2-core development CPU, BENCHMARKS.md: 1, 2, 4,
# 8, 16 devices for batch 16 ran at 202, 163, 125, 139, 226 ms a step).
CPU_DEVICES_PER_CORE = 2
MIN_IMAGES_PER_CPU_DEVICE = 4  # fewer makes every matmul too small to pay for itself
MAX_CPU_DEVICES = 8  # the most the tests run (8 fake devices); larger splits are unmeasured


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except (AttributeError, OSError):  # no affinity API (macOS, Windows)
        return max(os.cpu_count() or 1, 1)


def cpu_device_count(batch_size: int, cores: int | None = None) -> int:
    """Devices to split a CPU host into for `batch_size`: the largest divisor of the batch that
    is at most CPU_DEVICES_PER_CORE per core and MAX_CPU_DEVICES, with at least
    MIN_IMAGES_PER_CPU_DEVICE images on each (1 when none is)."""
    cores = available_cores() if cores is None else cores
    limit = min(CPU_DEVICES_PER_CORE * max(cores, 1), MAX_CPU_DEVICES,
                batch_size // MIN_IMAGES_PER_CPU_DEVICE)
    return max([d for d in range(1, limit + 1) if batch_size % d == 0], default=1)


def split_cpu(config: Any, environ: Mapping[str, str] | None = None) -> int | None:
    """Makes a CPU host `config.train.num_devices` (else `cpu_device_count`) JAX devices before
    the backend starts; returns the count, or None where the host was left as it is (see the
    module docstring). Call before anything touches a device."""
    env = os.environ if environ is None else environ
    if ("xla_force_host_platform_device_count" in env.get("XLA_FLAGS", "")
            or jax.config.jax_num_cpu_devices != -1  # set by the user (-1: JAX's default)
            or distributed_arguments(env) is not None):
        return None
    count = config.train.num_devices or cpu_device_count(config.train.batch_size)
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # the backend exists already: its devices stay as they are
        return None
    return count


def make_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
    """A 1-D `data` mesh over the first `num_devices` devices (default: all, over all processes)."""
    total = jax.device_count()
    num_devices = num_devices or total
    if jax.process_count() > 1 and num_devices != total:
        # jax.devices()[:n] would leave some processes without a device in the mesh.
        raise ConfigError(f"config.train.num_devices={num_devices}: a job of "
                          f"{jax.process_count()} processes uses all {total} devices (leave it "
                          "unset, or set the devices each process sees with "
                          f"{ENV_LOCAL_DEVICE_IDS})")
    # Auto axes: XLA propagates shardings through the model (explicit axes would make every
    # reshape of a batch-sharded activation spell out its output sharding).
    mesh = jax.make_mesh((num_devices,), (DATA_AXIS,), devices=jax.devices()[:num_devices],
                         axis_types=(jax.sharding.AxisType.Auto,))
    if jax.process_count() > 1:
        log.info("Mesh %s over %d processes: process %d holds devices %s.",
                 dict(mesh.shape), jax.process_count(), jax.process_index(),
                 [d.id for d in mesh.local_devices])
    return mesh


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


# Debugging aid (and the multi-process tests' witness): when set, every process appends one JSON
# line per batch it contributes, holding a fingerprint of each of its examples' images, to
# <value>.process<i>. Off unless set.
ENV_DEBUG_BATCH_LOG = "FIXED_SLOTS_DEBUG_BATCH_LOG"


def example_fingerprints(images: np.ndarray) -> list[str]:
    """One short content hash per example (leading axis) of a NumPy batch."""
    images = np.ascontiguousarray(images)
    return [hashlib.sha1(image.tobytes()).hexdigest()[:16] for image in images]


def _log_batch(batch: dict[str, np.ndarray], path: str) -> None:
    line = json.dumps(example_fingerprints(np.asarray(batch["image"])))
    with open(f"{path}.process{jax.process_index()}", "a") as f:
        f.write(line + "\n")


def put_batch(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """This process's slice of the global batch -> global arrays sharded over the data axis.

    Process i's rows are rows [i*b, (i+1)*b) of the global batch (b = per-process batch).
    """
    if os.environ.get(ENV_DEBUG_BATCH_LOG):
        _log_batch(batch, os.environ[ENV_DEBUG_BATCH_LOG])
    rows, local = len(next(iter(batch.values()))), len(mesh.local_devices)
    if rows % local:
        raise ConfigError(
            f"a batch of {rows * jax.process_count()} examples ({rows} per process) does not "
            f"split over the {mesh.size} devices ({local} per process): make "
            f"config.train.batch_size and config.eval.batch_size multiples of {mesh.size}")
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()}


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    """A pytree holding the same values on every process -> arrays replicated over the mesh."""
    target = replicated(mesh)
    if jax.process_count() == 1:
        return jax.device_put(tree, target)

    def put(x):
        if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(target, x.ndim):
            return x
        if isinstance(x, jax.Array) and x.committed:
            # jax cannot move an array committed to one local device onto devices of other
            # processes; every process holds the same value, so it goes through the host.
            if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
                data = jax.device_put(np.asarray(jax.random.key_data(x)), target)
                return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
            x = np.asarray(x)
        return jax.device_put(x, target)

    return jax.tree.map(put, tree)


def to_host(x: jax.Array | np.ndarray) -> np.ndarray:
    """The whole value of an array as NumPy on this process, also when other processes hold
    parts of it (a batch-sharded global array)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def in_lockstep(iterable: Iterable[T]) -> Iterator[T]:
    """The items of a per-process iterable while every process still has one.

    A finite per-process stream can run out earlier on some processes (e.g. after a filter);
    the others would then wait forever in the next collective. One tiny all-gather per item.
    """
    from jax.experimental import multihost_utils

    iterator = iter(iterable)
    while True:
        item = next(iterator, _END)
        have = multihost_utils.process_allgather(np.int32(item is not _END))
        if not np.all(have):
            return
        yield item
