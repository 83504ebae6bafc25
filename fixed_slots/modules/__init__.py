"""fixed_slots.modules: the Flax modules of the models.

Importing it installs the straight-line CPU lowering of JAX's threefry2x32 PRNG
(`threefry_cpu`: the same random bits, several times faster on a CPU) before any module draws.
"""
from fixed_slots.modules import threefry_cpu

threefry_cpu.install()
