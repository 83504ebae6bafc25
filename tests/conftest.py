"""Test-wide settings: CPU only, 8 fake devices for sharding tests."""
import os

# Must be set before jax is imported anywhere.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
# Compile time dominates these small tests; XLA's heavy optimisation passes are not what they check.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "true")
# main.py's persistent compilation cache off: tests that time or interrupt compilation must
# compile, whatever an earlier test left in the user cache (test_startup.py turns it on itself).
os.environ.setdefault("FIXED_SLOTS_CACHE_DIR", "off")
