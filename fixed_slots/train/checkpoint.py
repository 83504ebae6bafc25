"""Checkpoints: the only module that talks to orbax.

A checkpoint at step N is the directory `<directory>/N` with two orbax items:
  state  the train-state pytree (params, optimizer state, step), via StandardSave/StandardRestore;
  meta   JSON: the base PRNG key as raw key data plus its implementation (so typed keys and raw
         uint32 keys both round-trip), the data iterator's state (bytes as base64, or a JSON dict),
         the caller's metadata, and a content fingerprint of every state leaf.

Resume order is explicit: `restore_latest` returns the newest checkpoint that restores, or None
when the directory holds no checkpoint at all (the caller then initialises from scratch).

Reading a trained model: `restore_params` reads only the params of the saved train state (orbax
partial restore: the optimizer state is never read, no optimizer or TrainState is built) and
changes nothing on disk (no directory created, no temporary directory cleaned, nothing renamed),
so it may run while training writes to the same directory.

Corruption. A checkpoint "fails to restore" when orbax raises (truncated or missing files, missing
items, garbled JSON) or when a restored leaf does not match the fingerprint written at save time
(garbled array bytes can decode without any error; the fingerprint catches them). Each failure is
logged with `absl.logging.warning` (the `absl` logger, so it reaches the training log and pytest's
`caplog`; not `warnings.warn`, whose once-per-location filter would hide a second corrupt step),
naming the step, the directory and the error; the previous step is tried next. Once an older
checkpoint restores, the newer failing ones are renamed to `<step>.corrupt` (never deleted): they
would otherwise stay "latest" and orbax would refuse to save those steps again. If checkpoints
exist and none restores, `CheckpointRestoreError` names the directory and every step's error, and
nothing is renamed, so a rerun cannot silently start from scratch.

Abandoned reads. Orbax restores every array of a step concurrently on an asyncio event loop that
it closes as soon as one read fails (a shape that does not fit, a truncated file); the reads still
in flight finish afterwards on tensorstore's threads, and each one's completion callback finds the
loop closed: Python reports a `RuntimeError: Event loop is closed` traceback per abandoned read
(hundreds per step, long after the step's one-line warning). They change nothing; while this
module is in use a `sys.unraisablehook` drops exactly these reports (that exception, raised in
asyncio's `call_soon_threadsafe` called from native code) and passes every other one on.

Atomicity. Orbax writes a step into `<step>.orbax-checkpoint-tmp-*` and renames it to `<step>` only
once every item is written; a crash before the rename leaves an unfinalised temporary directory,
which is ignored when listing steps and cleaned up when the next Checkpointer opens the directory.
Steps beyond `max_to_keep` are deleted only after the new step is finalised (orbax's finalize
order; `tests/test_checkpoint.py` kills a save before its rename to check this).
"""
from __future__ import annotations

import ast
import base64
import os
import re
import sys
import traceback
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from fixed_slots.errors import WorkdirError

_FORMAT = 1
_STATE, _META = "state", "meta"


class CheckpointRestoreError(WorkdirError):
    """Checkpoints exist in the directory but none of them could be restored."""


# What orbax says when the saved arrays or tree do not fit the model being restored into.
_SHAPE_MISMATCH = re.compile(r"not compatible with the stored shape|tree structures? (do|does) not "
                             r"match|[Ss]hape mismatch|structure mismatch")


def _restore_advice(directory: str, failed: list[tuple[int, BaseException]]) -> str:
    if all(_SHAPE_MISMATCH.search(str(error)) for _, error in failed):
        return (f"The checkpoints in {directory} hold a model of other shapes than this config "
                f"builds (a changed model config, or another fixed_slots version): train in a "
                f"new --workdir, or resume with the config they were trained with. Nothing was "
                f"renamed or deleted.")
    return (f"Nothing was renamed or deleted. If they are corrupt, move the directory aside to "
            f"start from scratch; otherwise fix the cause.")


class FingerprintMismatchError(ValueError):
    """A restored array differs from what was saved (garbled bytes that still decoded)."""


# --- reads orbax abandoned after a failure -------------------------------------------------

def _is_abandoned_read(unraisable: Any) -> bool:
    """Whether an unraisable-exception report is a tensorstore read completing into the event
    loop orbax closed after another read of the same restore failed."""
    if (unraisable.exc_type is not RuntimeError or unraisable.object is not None
            or str(unraisable.exc_value) != "Event loop is closed"):
        return False
    frames = traceback.extract_tb(unraisable.exc_traceback)
    # Called from native code: the first Python frame is asyncio's call_soon_threadsafe.
    return bool(frames) and frames[0].name == "call_soon_threadsafe" and (
        os.path.basename(frames[0].filename) == "base_events.py")


def _drop_abandoned_reads() -> None:
    """Installs (once per current hook) a sys.unraisablehook that drops `_is_abandoned_read`
    reports and hands every other report to the hook it replaces."""
    previous = sys.unraisablehook
    if getattr(previous, "_fixed_slots_drops_abandoned_reads", False):
        return

    def hook(unraisable):
        if not _is_abandoned_read(unraisable):
            previous(unraisable)

    hook._fixed_slots_drops_abandoned_reads = True
    sys.unraisablehook = hook


# --- content fingerprints -------------------------------------------------------------------

def _as_uint32(x: jax.Array) -> jax.Array:
    """The raw bits of x as a flat uint32 vector (any dtype, typed PRNG keys included)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        x = jnp.stack([x.real, x.imag])
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32).ravel()
    # 8-byte types (x64 mode) bitcast to uint32 gain a trailing axis of 2; that is fine here.
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}.get(x.dtype.itemsize)
    try:
        bits = jax.lax.bitcast_convert_type(x, unsigned)
    except (TypeError, ValueError):  # sub-byte dtypes (int4, float4): compare through float32
        bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return bits.astype(jnp.uint32).ravel()


@jax.jit
def _fingerprints(leaves: list[jax.Array]) -> jax.Array:
    """One uint32 per leaf: sum_i bits_i * w_i mod 2^32 with odd, position-dependent weights w_i.

    Odd weights are invertible mod 2^32, so any change of a single element changes the sum (and
    garbage spread over many elements almost surely does); integer sums are exact in any reduction
    order, so sharded and unsharded arrays give the same value.
    """
    sums = []
    for leaf in leaves:
        bits = _as_uint32(leaf)
        weights = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(0x3C6EF362) + jnp.uint32(1)
        sums.append(jnp.sum(bits * weights, dtype=jnp.uint32))
    return jnp.stack(sums) if sums else jnp.zeros((0,), jnp.uint32)


def _fingerprint_table(tree: Any) -> dict[str, list]:
    """keystr(path) -> [dtype name, fingerprint] for every leaf."""
    paths_leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    leaves = [jnp.asarray(leaf) for _, leaf in paths_leaves]
    values = np.asarray(jax.device_get(_fingerprints(leaves))).tolist()
    return {jax.tree_util.keystr(path): [str(leaf.dtype), int(value)]
            for (path, _), leaf, value in zip(paths_leaves, leaves, values)}


def _verify_fingerprints(tree: Any, saved: dict[str, list] | None) -> None:
    if saved is None:
        return
    for path, (dtype, value) in _fingerprint_table(tree).items():
        expected = saved.get(path)
        # A leaf restored into a different dtype than it was saved with cannot be compared.
        if expected is not None and expected[0] == dtype and expected[1] != value:
            raise FingerprintMismatchError(
                f"leaf {path} does not match the fingerprint written at save time "
                f"(saved {expected[1]}, restored {value}): its bytes are garbled")


# --- meta encoding --------------------------------------------------------------------------

def _encode_rng(rng: jax.Array | None) -> dict | None:
    if rng is None:
        return None
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        data, impl = jax.random.key_data(rng), str(jax.random.key_impl(rng))
    else:  # a raw uint32 key (jax.random.PRNGKey)
        data, impl = rng, None
    data = np.asarray(jax.device_get(data))
    return {"impl": impl, "dtype": str(data.dtype), "shape": list(data.shape),
            "data": data.ravel().tolist()}


def _decode_rng(encoded: dict | None) -> jax.Array | None:
    if encoded is None:
        return None
    data = np.asarray(encoded["data"], dtype=encoded["dtype"]).reshape(encoded["shape"])
    if encoded["impl"] is None:
        return jnp.asarray(data)
    return jax.random.wrap_key_data(data, impl=encoded["impl"])


def _encode_data_state(data_state: bytes | str | dict | None) -> dict | None:
    if data_state is None:
        return None
    if isinstance(data_state, (bytes, bytearray)):
        return {"kind": "bytes", "value": base64.b64encode(bytes(data_state)).decode("ascii")}
    if isinstance(data_state, str):
        return {"kind": "str", "value": data_state}
    if isinstance(data_state, dict):
        return {"kind": "json", "value": data_state}
    raise TypeError(f"data_state must be bytes, str, a JSON dict or None, got "
                    f"{type(data_state).__name__}")


def _decode_data_state(encoded: dict | None) -> bytes | str | dict | None:
    if encoded is None:
        return None
    if encoded["kind"] == "bytes":
        return base64.b64decode(encoded["value"])
    return encoded["value"]


def _abstract_leaf(leaf: Any) -> jax.ShapeDtypeStruct:
    """Shape, dtype and target sharding; leaves without a sharding go to the first local device."""
    sharding = getattr(leaf, "sharding", None)
    dtype = getattr(leaf, "dtype", None)
    if not isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct)):
        leaf = np.asarray(leaf)
        dtype = jax.dtypes.canonicalize_dtype(leaf.dtype)  # int64 -> int32 unless x64 is on
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.ShapeDtypeStruct(leaf.shape, dtype, sharding=sharding)


def _short(error: BaseException, limit: int = 400) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


class Checkpointer:
    """Saves and restores (state pytree, PRNG key, data iterator state) with orbax.

    Call `save`/`restore_latest` from every process (orbax synchronises hosts); only the primary
    host writes shared files and renames corrupt steps.
    """

    def __init__(self, directory: str, *, max_to_keep: int | None = 3,
                 save_interval_steps: int = 1):
        """`max_to_keep=None` keeps every step. Saves are synchronous: `save` returns once the
        step is finalised on disk."""
        self.directory = os.path.abspath(os.fspath(directory))
        _drop_abandoned_reads()
        # Due every save_interval_steps (or at a multi-host preemption sync point); unlike
        # orbax's default policy, not also "the first step of an empty directory".
        policy = ocp.checkpoint_managers.AnySavePolicy([
            ocp.checkpoint_managers.FixedIntervalPolicy(save_interval_steps),
            ocp.checkpoint_managers.PreemptionCheckpointingPolicy()])
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, save_decision_policy=policy, create=True,
            enable_async_checkpointing=False, cleanup_tmp_directories=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=(_STATE, _META))

    def latest_step(self) -> int | None:
        """The newest saved step (restorable or not), or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, *, state_pytree: Any, rng: jax.Array | None,
             data_state: bytes | str | dict | None = None, metadata: dict | None = None,
             force: bool = False) -> bool:
        """Writes `step` if due (every `save_interval_steps`) or `force`; returns whether it did.

        Saving a step that already exists is a no-op (False); saving a step older than the latest
        existing one is an error (a newer checkpoint than this state exists).
        """
        step = int(step)
        latest = self.latest_step()
        if latest is not None and step <= latest:
            if step == latest:
                return False
            raise ValueError(f"cannot save step {step} in {self.directory}: it already holds the "
                             f"newer step {latest}")
        if not force and not self._manager.should_save(step):
            return False
        meta = {
            "format": _FORMAT,
            "rng": _encode_rng(rng),
            "data_state": _encode_data_state(data_state),
            "metadata": dict(metadata or {}),
            "fingerprints": _fingerprint_table(state_pytree),
        }
        saved = self._manager.save(step, args=ocp.args.Composite(**{
            _STATE: ocp.args.StandardSave(state_pytree), _META: ocp.args.JsonSave(meta)}),
            force=True)
        self._manager.wait_until_finished()  # finalised (renamed) before `save` returns
        return saved

    def _restore_step(self, step: int, abstract: Any):
        restored = self._manager.restore(step, args=ocp.args.Composite(**{
            _STATE: ocp.args.StandardRestore(abstract), _META: ocp.args.JsonRestore()}))
        meta = restored[_META]
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
            raise ValueError(f"item {_META!r} is not a fixed_slots checkpoint record (format "
                             f"{_FORMAT}): {str(meta)[:200]}")
        state = restored[_STATE]
        _verify_fingerprints(state, meta.get("fingerprints"))
        return (step, state, _decode_rng(meta["rng"]),
                _decode_data_state(meta["data_state"]))

    def restore_latest(self, target: Any) -> tuple[int, Any, Any, Any] | None:
        """(step, state, rng, data_state) of the newest checkpoint that restores, or None if the
        directory holds none.

        `target` is a pytree shaped like the saved state: concrete arrays or
        jax.ShapeDtypeStruct leaves; restored arrays take their shardings. Raises
        CheckpointRestoreError if checkpoints exist and none restores.
        """
        self._manager.reload()  # the directory may have changed since this object opened it
        steps = sorted(self._manager.all_steps(), reverse=True)
        if not steps:
            return None
        abstract = jax.tree.map(_abstract_leaf, target)
        failed: list[tuple[int, BaseException]] = []
        for step in steps:
            try:
                result = self._restore_step(step, abstract)
            except Exception as error:  # any failure to read makes this step unusable
                failed.append((step, error))
                logging.warning(
                    "Checkpoint at step %d in %s could not be restored (%s); trying the "
                    "previous checkpoint.", step, self.directory, _short(error))
                continue
            if failed:
                self._set_aside([s for s, _ in failed])
                logging.warning("Resuming from step %d in %s; the newer unreadable step(s) %s "
                                "were renamed to <step>.corrupt.", step, self.directory,
                                [s for s, _ in failed])
            return result
        details = "\n  ".join(f"step {s}: {_short(e, 240)}" for s, e in failed)
        raise CheckpointRestoreError(
            f"{len(failed)} checkpoint(s) exist in {self.directory} but none could be "
            f"restored:\n  {details}\n{_restore_advice(self.directory, failed)}")

    def read_metadata(self, step: int | None = None) -> dict:
        """The `metadata` dict saved with `step` (default: the latest step)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        meta = self._manager.restore(step, args=ocp.args.Composite(
            **{_META: ocp.args.JsonRestore()}))[_META]
        return meta["metadata"]

    def _set_aside(self, steps: list[int]) -> None:
        """Renames unreadable steps to <step>.corrupt[-k] (primary host only), then re-lists."""
        ocp.multihost.sync_global_processes("fixed_slots_checkpoint_set_aside_start")
        if ocp.multihost.is_primary_host(0):
            for step in steps:
                path = os.path.join(self.directory, str(step))
                if not os.path.isdir(path):
                    continue
                target, k = f"{path}.corrupt", 1
                while os.path.exists(target):
                    k += 1
                    target = f"{path}.corrupt-{k}"
                os.rename(path, target)
        ocp.multihost.sync_global_processes("fixed_slots_checkpoint_set_aside_done")
        self._manager.reload()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- params-only restore (evaluation, a user loading a trained model) -------------------------

_PARAMS = "params"  # the train state's field holding the model params (TrainState.params)
_KEY_PART = re.compile(r"""\[('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|-?\d+)\]|\.(\w+)""")


def _path_names(keystr: str) -> tuple[str, ...] | None:
    """"['state'].params['blocks'][0]" -> ("state", "params", "blocks", "0"): the names of a
    leaf's path, the same whether a level is a dict, a dataclass or a list (None if unparsable)."""
    names, end = [], 0
    for match in _KEY_PART.finditer(keystr):
        if match.start() != end:
            return None
        key, attr = match.groups()
        names.append(attr if attr is not None else str(ast.literal_eval(key)))
        end = match.end()
    return tuple(names) if end == len(keystr) else None


def _verify_subtree_fingerprints(tree: Any, saved: dict[str, list] | None) -> None:
    """Like `_verify_fingerprints` for a part of the saved tree restored into plain dicts: leaves
    are matched by the names along their paths."""
    if saved is None:
        return
    by_names = {_path_names(path): entry for path, entry in saved.items()}
    for path, (dtype, value) in _fingerprint_table(tree).items():
        expected = by_names.get(_path_names(path))
        if expected is not None and expected[0] == dtype and expected[1] != value:
            raise FingerprintMismatchError(
                f"leaf {path} does not match the fingerprint written at save time "
                f"(saved {expected[1]}, restored {value}): its bytes are garbled")


# How many times a read of the newest step starts over when a training run writing the directory
# saved a newer step and deleted the one being read (`max_to_keep`).
_READ_ROUNDS = 5


def restore_params(directory: str, target: Any, *, step: int | None = None
                   ) -> tuple[int, Any] | None:
    """(step, params) from the train state saved in `directory` (`save(state_pytree={"state":
    TrainState})`, as the trainer does), reading nothing else; None if it holds no checkpoint.

    `target` is shaped like the params: concrete arrays or jax.ShapeDtypeStruct leaves (restored
    arrays take their shardings; none: the first local device). Without `step`, the newest step
    that restores (a newer unreadable one is logged and skipped, never renamed); a given `step`
    must restore. Raises CheckpointRestoreError if checkpoints exist and none restores.

    Beside a training run on the same directory: a step that fails while the run saves a newer
    one and deletes it (keeping `max_to_keep`) is not corrupt; the read starts over from the
    newest step (up to `_READ_ROUNDS` times), and such steps are never reported as corrupt.
    """
    directory = os.path.abspath(os.fspath(directory))
    if not os.path.isdir(directory):
        return None
    _drop_abandoned_reads()
    abstract = {_STATE: {_PARAMS: jax.tree.map(_abstract_leaf, target)}}
    args = ocp.args.Composite(**{
        _STATE: ocp.args.PyTreeRestore(
            item=abstract, partial_restore=True,
            restore_args=ocp.checkpoint_utils.construct_restore_args(abstract)),
        _META: ocp.args.JsonRestore()})
    # Read-only use: create nothing, clean no temporary directory of a save in progress.
    options = ocp.CheckpointManagerOptions(create=False, cleanup_tmp_directories=False)
    manager = ocp.CheckpointManager(directory, options=options, item_names=(_STATE, _META))

    def read(candidate: int) -> Any:
        restored = manager.restore(candidate, args=args)
        meta = restored[_META]
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
            raise ValueError(f"item {_META!r} is not a fixed_slots checkpoint record "
                             f"(format {_FORMAT}): {str(meta)[:200]}")
        tree = restored[_STATE]
        _verify_subtree_fingerprints(tree, meta.get("fingerprints"))
        return tree[_STATE][_PARAMS]

    def listed() -> list[int]:
        manager.reload()
        return sorted(manager.all_steps(), reverse=True)

    failed: dict[int, BaseException] = {}  # unreadable steps that are still there
    replaced: list[int] = []  # steps a training run deleted while they were being read
    try:
        for _ in range(_READ_ROUNDS):
            available = listed()
            if step is not None and int(step) not in available:
                gone = " (deleted while it was being read)" if int(step) in replaced else ""
                raise FileNotFoundError(f"no checkpoint at step {step} in {directory}{gone} "
                                        f"(steps: {sorted(available) or 'none'})")
            candidates = ([int(step)] if step is not None
                          else [s for s in available if s not in failed])
            if not candidates and not failed:
                return None
            started_over = False
            for candidate in candidates:
                try:
                    return candidate, read(candidate)
                except Exception as error:  # any failure to read makes this step unusable
                    now = listed()
                    if candidate not in now or (now and now[0] > available[0]):
                        # A newer step was saved (and this one deleted) while it was being read.
                        replaced.append(candidate)
                        logging.info("Checkpoint at step %d in %s was replaced by a newer one "
                                     "while being read; reading the newest.", candidate,
                                     directory)
                        started_over = True
                        break
                    if step is not None:
                        raise
                    failed[candidate] = error
                    logging.warning("Checkpoint at step %d in %s could not be restored (%s); "
                                    "trying the previous checkpoint.", candidate, directory,
                                    _short(error))
            if not started_over:
                break
        if not failed:
            raise CheckpointRestoreError(
                f"the checkpoints in {directory} were replaced {len(replaced)} times while "
                f"being read (steps {replaced}): a training run writing there keeps only "
                f"train.max_checkpoints_to_keep of them and saves faster than they can be "
                f"read. Nothing is wrong with them: evaluate again, or keep more of them.")
        details = "\n  ".join(f"step {s}: {_short(e, 240)}" for s, e in failed.items())
        also = (f"\n(Steps {replaced} were replaced by newer ones while being read; they are "
                f"not corrupt.)" if replaced else "")
        failures = list(failed.items())
        raise CheckpointRestoreError(
            f"{len(failed)} checkpoint(s) exist in {directory} but none could be restored:"
            f"\n  {details}\n{_restore_advice(directory, failures)}{also}")
    finally:
        manager.close()


def read_newest_metadata(directory: str) -> tuple[int, dict] | None:
    """(step, the caller's metadata) of the newest checkpoint whose record reads, read-only (as
    `restore_params`: nothing created or cleaned); None if the directory holds no checkpoint.
    Steps whose record is unreadable are skipped (restoring reports them)."""
    directory = os.path.abspath(os.fspath(directory))
    if not os.path.isdir(directory):
        return None
    options = ocp.CheckpointManagerOptions(create=False, cleanup_tmp_directories=False)
    manager = ocp.CheckpointManager(directory, options=options, item_names=(_STATE, _META))
    try:
        for step in sorted(manager.all_steps(), reverse=True):
            try:
                meta = manager.restore(step, args=ocp.args.Composite(
                    **{_META: ocp.args.JsonRestore()}))[_META]
            except Exception:  # unreadable: restoring the step reports it
                continue
            if isinstance(meta, dict) and meta.get("format") == _FORMAT:
                return int(step), dict(meta.get("metadata") or {})
        return None
    finally:
        manager.close()
