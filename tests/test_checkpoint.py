"""Checkpoints: round trip, keep-N, atomic saves, corrupt latest falls back with a warning."""
import logging
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import orbax.checkpoint as ocp

from fixed_slots.train.checkpoint import CheckpointRestoreError, Checkpointer, restore_params

# A failed tensorstore read of a corrupt file can later call back into orbax's already-closed
# event loop ("Event loop is closed", reported during whichever test runs then): harmless.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def make_state(seed=0):
    # "w" is large enough for orbax to store it outside the CRC-checked b-tree nodes.
    params = {"dvae": {"w": jax.random.normal(jax.random.key(seed), (32, 64))},
              "main": {"b": jnp.arange(5, dtype=jnp.float32) * seed}}
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.multi_transform(
        {"dvae": optax.adam(1e-3), "main": optax.adam(1e-4)}, {"dvae": {"w": "dvae"},
                                                               "main": {"b": "main"}}))
    opt_state = tx.init(params)
    # One real update so the Adam moments and counts are not all zeros.
    _, opt_state = tx.update(jax.tree.map(jnp.ones_like, params), opt_state, params)
    return {"params": params, "opt_state": opt_state, "step": jnp.int32(seed)}


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def saved_steps(directory: pathlib.Path) -> list[int]:
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def test_round_trip_state_optax_typed_key_and_data_state(tmp_path):
    with Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        assert ckpt.restore_latest(make_state()) is None  # nothing yet: the caller initialises
        state, key = make_state(3), jax.random.key(42)
        assert ckpt.save(7, state_pytree=state, rng=key, data_state=b"\x01grain\xff",
                         metadata={"config": "tiny"})
        step, restored, rng, data_state = ckpt.restore_latest(make_state(0))
        assert (step, data_state) == (7, b"\x01grain\xff")
        assert_trees_equal(restored, state)
        assert jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
        np.testing.assert_array_equal(jax.random.key_data(rng), jax.random.key_data(key))
        assert ckpt.read_metadata() == {"config": "tiny"}
        # An abstract target (ShapeDtypeStruct leaves), a raw uint32 key and a JSON data state.
        raw_key = jax.random.PRNGKey(5)
        ckpt.save(8, state_pytree=state, rng=raw_key, data_state={"index": 3})
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), make_state())
        step, restored, rng, data_state = ckpt.restore_latest(abstract)
        assert (step, data_state) == (8, {"index": 3})
        assert_trees_equal(restored, state)
        assert rng.dtype == jnp.uint32 and np.array_equal(rng, raw_key)


def test_keep_n_interval_and_step_order(tmp_path):
    with Checkpointer(tmp_path, max_to_keep=2, save_interval_steps=2) as ckpt:
        written = [ckpt.save(s, state_pytree=make_state(s), rng=jax.random.key(0))
                   for s in (1, 2, 3, 4, 6)]
        assert written == [False, True, False, True, True]  # every 2 steps
        assert ckpt.save(7, state_pytree=make_state(7), rng=None, force=True)
        assert saved_steps(tmp_path) == [6, 7] and ckpt.latest_step() == 7
        assert not ckpt.save(7, state_pytree=make_state(7), rng=None, force=True)  # already there
        with pytest.raises(ValueError, match="newer step 7"):
            ckpt.save(5, state_pytree=make_state(5), rng=None, force=True)
        step, restored, rng, _ = ckpt.restore_latest(make_state())
        assert step == 7 and int(restored["step"]) == 7 and rng is None


def _array_files(step_dir: pathlib.Path) -> list[pathlib.Path]:
    files = [p for p in (step_dir / "state").rglob("d/*") if p.is_file()]
    assert files, "orbax layout changed: no array data files found"
    return files


def truncate_arrays(step_dir):
    for path in _array_files(step_dir):
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size // 2)


def garble_array_data(step_dir):
    # Same length, 8 bytes inverted in the middle of the largest data file (the big array's
    # chunk): tensorstore decodes it without error; the saved fingerprint catches it.
    path = max(_array_files(step_dir), key=lambda p: p.stat().st_size)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 8] = bytes(255 - b for b in data[middle:middle + 8])
    path.write_bytes(bytes(data))


def delete_state_metadata(step_dir):
    (step_dir / "state" / "_METADATA").unlink()


def delete_meta_item(step_dir):
    for path in sorted((step_dir / "meta").rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    (step_dir / "meta").rmdir()


def garble_meta_json(step_dir):
    (step_dir / "meta" / "metadata").write_text('{"format": 1, "rng"')


@pytest.mark.parametrize("corrupt", [truncate_arrays, garble_array_data, delete_state_metadata,
                                     delete_meta_item, garble_meta_json])
def test_corrupt_latest_falls_back_to_previous_with_warning(tmp_path, caplog, corrupt):
    ckpt = Checkpointer(tmp_path, max_to_keep=3)
    for step in (1, 2):
        ckpt.save(step, state_pytree=make_state(step), rng=jax.random.key(step),
                  data_state=f"pos{step}".encode())
    corrupt(tmp_path / "2")
    with caplog.at_level(logging.WARNING):
        step, restored, rng, data_state = ckpt.restore_latest(make_state())
    assert step == 1 and data_state == b"pos1"
    assert_trees_equal(restored, make_state(1))
    np.testing.assert_array_equal(jax.random.key_data(rng), jax.random.key_data(jax.random.key(1)))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("step 2" in m and str(tmp_path) in m and "could not be restored" in m
               for m in warnings), warnings
    if corrupt is garble_array_data:
        assert any("fingerprint" in m for m in warnings), warnings
    # Nothing deleted: the unreadable step is renamed, and training can save step 2 again.
    assert (tmp_path / "2.corrupt").is_dir() and saved_steps(tmp_path) == [1]
    assert ckpt.save(2, state_pytree=make_state(5), rng=jax.random.key(0))
    assert ckpt.restore_latest(make_state())[0] == 2
    ckpt.close()
    assert (tmp_path / "2.corrupt").is_dir()  # a new Checkpointer's tmp cleanup leaves it alone
    Checkpointer(tmp_path).close()
    assert (tmp_path / "2.corrupt").is_dir()


def test_all_corrupt_is_a_clear_error_and_renames_nothing(tmp_path, caplog):
    ckpt = Checkpointer(tmp_path)
    for step in (1, 2):
        ckpt.save(step, state_pytree=make_state(step), rng=jax.random.key(0))
    truncate_arrays(tmp_path / "1")
    delete_meta_item(tmp_path / "2")
    for _ in range(2):  # a rerun fails the same way: never a silent start from scratch
        with pytest.raises(CheckpointRestoreError, match=f"exist in {tmp_path} but none") as info:
            ckpt.restore_latest(make_state())
        assert "step 2:" in str(info.value) and "step 1:" in str(info.value)
        assert saved_steps(tmp_path) == [1, 2]
    ckpt.close()


_CRASH_MID_SAVE = textwrap.dedent("""
    import os, sys
    import jax, jax.numpy as jnp
    from orbax.checkpoint._src.path import atomicity
    from fixed_slots.train.checkpoint import Checkpointer

    ckpt = Checkpointer(sys.argv[1], max_to_keep=2)
    state = lambda s: {"w": jnp.full((4,), float(s))}
    for step in (1, 2):
        ckpt.save(step, state_pytree=state(step), rng=jax.random.key(step))

    async def crash(self, *args, **kwargs):
        os._exit(17)  # the process dies after writing step 3's files, before the rename

    atomicity.AtomicRenameTemporaryPath.finalize = crash
    ckpt.save(3, state_pytree=state(3), rng=jax.random.key(3))
""")


def test_crash_mid_save_keeps_previous_checkpoints(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _CRASH_MID_SAVE, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 17, proc.stderr[-2000:]
    # Step 1 (beyond max_to_keep=2 once step 3 exists) is still there: deletion waits for the
    # new step to be finalised. Step 3 exists only as an unfinalised temporary directory.
    assert saved_steps(tmp_path) == [1, 2]
    assert any(p.name.startswith("3.") for p in tmp_path.iterdir())
    target = {"w": jnp.zeros(4)}
    with Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        step, restored, _, _ = ckpt.restore_latest(target)
        assert step == 2 and np.all(np.asarray(restored["w"]) == 2.0)
        ckpt.save(3, state_pytree={"w": jnp.full((4,), 3.0)}, rng=jax.random.key(3))
        assert ckpt.restore_latest(target)[0] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["2", "3"]  # tmp cleaned, 1 rotated


# Slow storage, as on a loaded machine or a network file system: every array's tensorstore open
# completes a second late, except the leaf `bad`'s, whose shape does not fit the target. Orbax
# gives up on the restore at `bad` and closes its event loop while the others are in flight.
_ABANDONED_READS = textwrap.dedent("""
    import sys, tempfile, threading
    import tensorstore as ts
    import jax.numpy as jnp
    from fixed_slots.train.checkpoint import Checkpointer, restore_params

    directory = tempfile.mkdtemp(dir=sys.argv[1])
    params = {f"w{i:02d}": jnp.full((8, 8), float(i)) for i in range(20)}
    params["bad"] = jnp.zeros((8, 8))
    with Checkpointer(directory) as ckpt:
        ckpt.save(1, state_pytree={"state": {"params": params}}, rng=None)

    real_open = ts.open

    def slow_open(spec, *args, **kwargs):
        opened = real_open(spec, *args, **kwargs)
        promise, late = ts.Promise.new()

        def finish():
            try:
                promise.set_result(opened.result())
            except Exception as error:
                promise.set_exception(error)

        threading.Timer(0.0 if "bad" in str(spec) else 1.0, finish).start()
        return late

    ts.open = slow_open
    target = dict(params, bad=jnp.zeros((4, 8)))
    for read in (lambda: restore_params(directory, target),
                 lambda: Checkpointer(directory).restore_latest({"state": {"params": target}})):
        try:
            read()
        except Exception as error:
            print("refused:", type(error).__name__, file=sys.stderr)
    threading.Event().wait(3)  # every late read has completed into the closed loop


    class Other:
        def __del__(self):
            raise RuntimeError("an unrelated unraisable error")

    Other()  # still reported: only the abandoned reads are dropped
""")


def test_reads_abandoned_after_a_failed_restore_print_nothing(tmp_path):
    """The wrong config's or the corrupt step's one-line warning is not buried in a traceback
    per abandoned read ("Event loop is closed")."""
    proc = subprocess.run([sys.executable, "-c", _ABANDONED_READS, str(tmp_path)],
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("refused: CheckpointRestoreError") == 2, proc.stderr[-3000:]
    assert "Event loop is closed" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.count("Traceback") == 1, proc.stderr[-3000:]  # the unrelated one
    assert "an unrelated unraisable error" in proc.stderr


def _params_of(step):
    return make_state(step)["params"]


def test_evaluation_beside_a_training_that_keeps_one_checkpoint(tmp_path, monkeypatch, caplog):
    """The training saves step 2 and deletes step 1 between the evaluation's listing and its
    read of step 1: the evaluation reads step 2, and calls nothing corrupt."""
    training = Checkpointer(tmp_path, max_to_keep=1)
    training.save(1, state_pytree={"state": make_state(1)}, rng=None)
    real_restore = ocp.CheckpointManager.restore
    reads = []

    def training_saves_first(self, step, *args, **kwargs):
        reads.append(step)
        if len(reads) == 1:
            training.save(2, state_pytree={"state": make_state(2)}, rng=None)
            assert saved_steps(tmp_path) == [2]
        return real_restore(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "restore", training_saves_first)
    with caplog.at_level(logging.INFO):
        step, params = restore_params(tmp_path, _params_of(0))
    assert (step, reads) == (2, [1, 2])
    assert_trees_equal(params, _params_of(2))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    training.close()


def test_a_step_replaced_at_every_read_is_never_called_corrupt(tmp_path, monkeypatch):
    training = Checkpointer(tmp_path, max_to_keep=1)
    training.save(1, state_pytree={"state": make_state(1)}, rng=None)
    real_restore = ocp.CheckpointManager.restore

    def training_always_faster(self, step, *args, **kwargs):
        training.save(training.latest_step() + 1, state_pytree={"state": make_state(1)},
                      rng=None)
        return real_restore(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "restore", training_always_faster)
    with pytest.raises(CheckpointRestoreError, match="replaced 5 times while being read") as info:
        restore_params(tmp_path, _params_of(0))
    assert "corrupt" not in str(info.value)
    training.close()
