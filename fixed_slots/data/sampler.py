"""Which records each process reads: one global stream, each global batch split by rows.

    global stream   g = 0, 1, 2, ...  record keys of grain's IndexSampler with no sharding
                    (shuffled per epoch with `seed`, or in order)
    global batch j  stream positions [j*B, (j+1)*B)
    process i       rows [i*b, (i+1)*b) of every global batch, b = B // shard_count

So the global batch at every step is the same set of examples whatever the number of processes
(a job on 4 hosts trains on the batches a 1-host job would), each epoch's examples are split
disjointly between processes, and a loader's position (grain's DataLoader state) is the same on
every process: its `repr`, which grain stores in the state and checks on restore, names the
process count but not the process index. grain's own `ShardOptions` sharding instead gives each
process a contiguous slice of the records shuffled on its own, which makes the batches depend on
the process count and the state on the process index.
"""
from __future__ import annotations

import sys

import grain.python as grain


class ProcessSliceSampler:
    """grain sampler (`__len__`, `__getitem__`) of process `shard_index`'s rows of each global
    batch; use it with `grain.DataLoader(..., shard_options=grain.NoSharding())`.

    Only complete global batches are read (a finite stream's last partial one is dropped, as a
    single process dropping its incomplete final batch would).
    """

    def __init__(self, num_records: int, *, global_batch_size: int, shard_index: int,
                 shard_count: int, shuffle: bool, num_epochs: int | None, seed: int):
        if shard_count < 1 or not 0 <= shard_index < shard_count:
            raise ValueError(f"shard_index {shard_index} is not in [0, {shard_count})")
        if global_batch_size % shard_count:
            raise ValueError(f"global batch size {global_batch_size} is not divisible by "
                             f"{shard_count} processes")
        self._global = grain.IndexSampler(num_records=num_records,
                                          shard_options=grain.NoSharding(), shuffle=shuffle,
                                          num_epochs=num_epochs, seed=seed)
        self.global_batch_size = global_batch_size
        self.shard_index, self.shard_count = shard_index, shard_count
        self.per_process = global_batch_size // shard_count
        global_len = len(self._global)
        self._len = (sys.maxsize if global_len == sys.maxsize
                     else global_len // global_batch_size * self.per_process)

    def __len__(self) -> int:
        return self._len

    def global_position(self, index: int) -> int:
        """Position in the global stream of this process's `index`-th record."""
        batch, row = divmod(index, self.per_process)
        return batch * self.global_batch_size + self.shard_index * self.per_process + row

    def __getitem__(self, index: int) -> grain.RecordMetadata:
        if not 0 <= index < self._len:
            raise IndexError(f"index {index} is outside this process's {self._len} records")
        meta = self._global[self.global_position(index)]
        # The local index (what grain's iterator counts), the global record and its RNG.
        return grain.RecordMetadata(index=index, record_key=meta.record_key, rng=meta.rng)

    def __repr__(self) -> str:
        # No shard_index: processes in step hold identical loader states (see module docstring).
        return (f"ProcessSliceSampler({self._global!r}, global_batch_size="
                f"{self.global_batch_size}, shard_count={self.shard_count})")
