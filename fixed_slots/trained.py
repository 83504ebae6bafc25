"""A trained run from its workdir: the model as it was trained, and its evaluation.

```python
import jax
import numpy as np
from fixed_slots import trained

model = trained.load("/tmp/clevr")  # the config stored with the run, its latest good params
images = np.random.rand(2, 96, 96, 3).astype(np.float32)  # [B, H, W, 3] in [0, 1]
enc = model.encode_slots(images, jax.random.key(0))  # a models.protocol.SlotEncoding
enc.slots.shape, enc.attention.shape  # (2, 7, 192), (2, 7, 576): 7 slots over 24x24 tokens
recon, tokens = model.decode_slots(enc.slots)  # SLATE: greedy decoding with the KV cache
```

Every checkpoint stores the config its run was trained with, so no config file is needed and
it works from any directory. `overrides` ("key=value", as the scripts' --set) change keys that
do not change what the model is (e.g. slot_attention.eval_num_iterations, data.data_dir,
eval.*); a config passed in full must agree with the stored one on everything else: a difference
that changes the model or the data is refused, naming every key, as a resume is.

Only the params are read from the checkpoint (no optimizer state, no optimizer built).
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import jax
import ml_collections
from flax import nnx

from fixed_slots import configlib, models, sharding
from fixed_slots.errors import WorkdirError
from fixed_slots.eval.evaluator import Evaluator, check_config
from fixed_slots.models.protocol import SlotModel
from fixed_slots.train import checkpoint, evaluation
from fixed_slots.train.workdir import config_record
from fixed_slots.train.writers import create_writer

# Keys an evaluation or a loaded model may take from the caller instead of the stored config:
# everything that is not the model or the data (how training ran, how the evaluation runs and
# is shown), where the data is, and the iterations at inference. Prefixes end with ".".
FREE_TO_CHANGE = (
    "train.",
    "optim.",
    "eval.",
    "data.data_dir",
    "data.num_workers",
    "slot_attention.eval_num_iterations",
)
# ... except the compute dtype, which is how the model computes.
NOT_FREE = ("train.compute_dtype",)


class NoCheckpointError(WorkdirError, FileNotFoundError):
    """The workdir holds no checkpoint to read."""


def checkpoint_dir(workdir: str) -> str:
    """Where the trainer keeps the checkpoints of a workdir."""
    return os.path.join(os.fspath(workdir), "checkpoints")


def from_record(record: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """The ConfigDict of a stored config record ({"a.b": value}, lists for tuples)."""
    nested: dict[str, Any] = {}
    for key, value in record.items():
        *parents, leaf = key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = tuple(value) if isinstance(value, list) else value
    return ml_collections.ConfigDict(nested)


def stored_config(workdir: str) -> ml_collections.ConfigDict:
    """The config the run in `workdir` was trained with (its newest checkpoint's record)."""
    found = checkpoint.read_newest_metadata(checkpoint_dir(workdir))
    if found is None:
        raise NoCheckpointError(
            f"no checkpoint in {os.path.abspath(checkpoint_dir(workdir))}: train first with "
            f"`python main.py --config=... --workdir={workdir}`")
    step, metadata = found
    record = metadata.get("config")
    if not record:
        raise WorkdirError(
            f"the checkpoint at step {step} in {os.path.abspath(checkpoint_dir(workdir))} "
            f"stores no config (written by an older fixed_slots): pass the config it was "
            f"trained with explicitly")
    return from_record(record)


def _free(key: str) -> bool:
    return key not in NOT_FREE and any(key == k or (k.endswith(".") and key.startswith(k))
                                       for k in FREE_TO_CHANGE)


def resolve_config(workdir: str, config: ml_collections.ConfigDict | str | None = None,
                   overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """The config to evaluate or load the run in `workdir` with.

    Without `config`: the stored one, with `overrides` applied (only keys free to change).
    With `config` (a ConfigDict or a config file path): it, after checking that it differs from
    the stored config only in keys free to change (WorkdirError listing every other one).
    """
    stored = stored_config(workdir)
    if config is None:
        refused = [a.partition("=")[0] for a in overrides if not _free(a.partition("=")[0])]
        if refused:
            raise WorkdirError(
                f"{', '.join(refused)} would change the model or the data of the run in "
                f"{workdir}; only {', '.join(FREE_TO_CHANGE)} may differ from the config it "
                f"was trained with")
        return configlib.override(stored, overrides)
    if isinstance(config, str):
        config = configlib.from_file(config)
    config = configlib.override(config, overrides)
    saved, given = config_record(stored), config_record(config)
    refused = [f"{key}: {saved[key]!r} (trained) vs {given[key]!r} (given)"
               for key in sorted(set(saved) & set(given))
               if saved[key] != given[key] and not _free(key)]
    if refused:
        raise WorkdirError(
            f"the run in {workdir} was trained with another config; this one changes:\n"
            + "".join(f"  {line}\n" for line in refused)
            + "Evaluate with the stored config (leave out --config; --config.eval.* and the "
              "other keys free to change still apply) or with the same config file and flags "
              "as training.")
    return config


def restore_params(config: ml_collections.ConfigDict, workdir: str, *, step: int | None = None
                   ) -> tuple[nnx.GraphDef, models.Params, int]:
    """(graphdef, params, step) of the latest good checkpoint in workdir (or of `step`).

    Raises NoCheckpointError (a WorkdirError) if there is none, and creates nothing on disk.
    """
    graphdef, target = models.abstract_params(config)
    directory = checkpoint_dir(workdir)
    restored = checkpoint.restore_params(directory, target, step=step)
    if restored is None:
        raise NoCheckpointError(
            f"no checkpoint in {os.path.abspath(directory)}: train first with "
            f"`python main.py --config=... --workdir={workdir}`")
    step, params = restored
    return graphdef, params, step


def load(workdir: str, config: ml_collections.ConfigDict | str | None = None, *,
         overrides: Sequence[str] = (), step: int | None = None) -> SlotModel:
    """The model trained in `workdir` with the params of its latest good checkpoint (or of
    `step`), built from the stored config (see `resolve_config` for `config` / `overrides`)."""
    config = resolve_config(workdir, config, overrides)
    models.check_config(config)
    graphdef, params, step = restore_params(config, workdir, step=step)
    evaluation.check_params_finite(params, step, checkpoint_dir(workdir))
    return nnx.merge(graphdef, params)


def evaluate(workdir: str, config: ml_collections.ConfigDict | str | None = None, *,
             overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Evaluates the latest good checkpoint of `workdir` (what `main.py --mode=eval` runs).

    Writes WORKDIR/eval/ (metrics.json, per_image.json, pictures) and the eval/* scalars into
    the run's TensorBoard, at the checkpoint's step; returns the metrics.
    """
    sharding.maybe_initialize_distributed()  # before the checks, which count devices
    config = resolve_config(workdir, config, overrides)
    sharding.maybe_initialize_distributed(config)  # every process evaluates this config
    check_config(config)  # before any work
    graphdef, params, step = restore_params(config, workdir)
    evaluation.check_params_finite(params, step, checkpoint_dir(workdir))
    primary = jax.process_index() == 0
    mesh = sharding.make_mesh() if jax.process_count() > 1 else None
    writer = create_writer(workdir, just_logging=not primary,
                           descriptions=evaluation.descriptions(models.get(config.model.name)))
    try:
        return evaluation.evaluate_and_record(Evaluator(config, graphdef, mesh), params, step,
                                              workdir, writer, full=True, primary=primary)
    finally:
        writer.close()
