"""JAX's threefry2x32 PRNG on the CPU as straight-line code: the same bits, a fraction of the time.

JAX lowers its `threefry2x32` hash (every `jax.random` draw of a default key) on the CPU as a
rolled loop, five iterations of four rounds, to keep compile times short for huge programs; on
other backends it is unrolled. XLA's CPU backend then runs each draw as a `while` loop whose
body writes every intermediate array to memory: a SLATE step's dropout masks and Gumbel noise
(~4 M random words at the README's default) cost about a fifth of the step, and the 39 loops
add tens of seconds to its compilation. `install()` registers the unrolled form of the very
same hash (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11: Threefry-2x32,
20 rounds, rotations 13 15 26 6 / 17 29 16 24, key parity 0x1BD11BDA, a key injection every
four rounds) as the CPU lowering, so each draw becomes one elementwise fusion. Nothing about the
numbers changes: keys, splits, fold-ins and random bits are bit-for-bit JAX's own (tests check
against the Random123 known-answer vectors and against JAX's rolled lowering).

It is installed when `fixed_slots.modules` is imported (before anything is traced), for the
whole process: other code's threefry draws on the CPU get the same bits, faster.
"""
from __future__ import annotations

import numpy as np
from jax.extend.random import threefry2x32_p
from jax.interpreters import mlir

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = np.uint32(0x1BD11BDA)


def _rotate_left(x, d: int):
    # uint32 operands: `>>` is the logical shift.
    return (x << np.uint32(d)) | (x >> np.uint32(32 - d))


def threefry2x32(key1, key2, x1, x2):
    """Threefry-2x32 with 20 rounds of uint32 arrays (broadcasting): (out1, out2)."""
    ks = (key1, key2, key1 ^ key2 ^ _PARITY)
    x1, x2 = x1 + ks[0], x2 + ks[1]
    for i in range(5):
        for rotation in _ROTATIONS[i % 2]:
            x1 = x1 + x2
            x2 = x1 ^ _rotate_left(x2, rotation)
        x1 = x1 + ks[(i + 1) % 3]
        x2 = x2 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x1, x2


_installed = False


def install() -> None:
    """Registers the unrolled hash as the CPU lowering of JAX's threefry2x32 (idempotent)."""
    global _installed
    if not _installed:
        mlir.register_lowering(threefry2x32_p,
                               mlir.lower_fun(threefry2x32, multiple_results=True),
                               platform="cpu")
        _installed = True
