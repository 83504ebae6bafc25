"""A trained model from a workdir, for evaluation and for anyone importing one.

```python
import jax
import numpy as np
from fixed_slots import trained

model = trained.load("configs/slate_clevr.py", "/tmp/clevr")  # latest checkpoint's params
images = np.random.rand(2, 96, 96, 3).astype(np.float32)  # [B, H, W, 3] in [0, 1]
enc = model.encode_slots(images, jax.random.key(0))  # a models.protocol.SlotEncoding
enc.slots.shape, enc.attention.shape  # (2, 7, 192), (2, 7, 576): 7 slots over 24x24 tokens
recon, tokens = model.decode_slots(enc.slots)  # SLATE: greedy decoding with the KV cache
```

Only the params are read from the checkpoint (no optimizer state, no optimizer built), into a
model built from the same config the run was trained with.
"""
from __future__ import annotations

import os

import ml_collections
from flax import nnx

from fixed_slots import configlib, models
from fixed_slots.errors import WorkdirError
from fixed_slots.models.protocol import SlotModel
from fixed_slots.train import checkpoint


class NoCheckpointError(WorkdirError, FileNotFoundError):
    """The workdir holds no checkpoint to read."""


def checkpoint_dir(workdir: str) -> str:
    """Where the trainer keeps the checkpoints of a workdir."""
    return os.path.join(os.fspath(workdir), "checkpoints")


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


def load(config: ml_collections.ConfigDict | str, workdir: str, *, step: int | None = None
         ) -> SlotModel:
    """The model trained in `workdir` with `config` (a ConfigDict or a config file path, as
    main.py's --config), with the params of its latest good checkpoint (or of `step`)."""
    if isinstance(config, str):
        config = configlib.from_file(config)
    models.check_config(config)
    graphdef, params, _ = restore_params(config, workdir, step=step)
    return nnx.merge(graphdef, params)
