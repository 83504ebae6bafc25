"""A CPU host split into devices for data parallelism (sharding.split_cpu, cpu_device_count)."""
import json
import os
import subprocess
import sys

import ml_collections
import pytest

from fixed_slots import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("batch, cores, expected", [
    (16, 2, 4),   # the README's default on the 2-core machine: 4 devices of 4 images
    (16, 1, 2),   # 2 per core
    (16, 8, 4),   # at least 4 images a device
    (50, 2, 2),   # the paper's batch: the largest divisor of 50 within 4
    (64, 16, 8),  # at most 8 devices
    (6, 2, 1),    # too small a batch to split
    (7, 2, 1),    # no divisor fits
    (1, 2, 1),
    (12, 2, 3),
])
def test_cpu_device_count(batch, cores, expected):
    assert sharding.cpu_device_count(batch, cores) == expected


def _config(batch: int, num_devices: int | None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict({"train": {"batch_size": batch}})
    config.train.num_devices = ml_collections.config_dict.placeholder(int)
    config.train.num_devices = num_devices
    return config


def _devices_in_fresh_process(batch: int, num_devices: int | None, xla_flags: str | None,
                              cores: int = 2, **extra_env: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
    env.update(extra_env)
    code = (
        "import json, os, ml_collections, jax\n"
        "from fixed_slots import sharding\n"
        f"sharding.available_cores = lambda: {cores}\n"
        "config = ml_collections.ConfigDict({'train': {'batch_size': %d}})\n"
        "config.train.num_devices = ml_collections.config_dict.placeholder(int)\n"
        "config.train.num_devices = %r\n"
        "split = sharding.split_cpu(config)\n"
        "print(json.dumps({'split': split, 'devices': jax.device_count()}))\n"
    ) % (batch, num_devices)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_split_cpu_makes_the_devices_in_a_fresh_process():
    # The default: 2 per core (2 cores here), at least 4 images each: batch 16 -> 4 devices.
    assert _devices_in_fresh_process(16, None, None) == {"split": 4, "devices": 4}
    # An explicit train.num_devices is the count (1: the whole CPU as one device, as before).
    assert _devices_in_fresh_process(16, 1, None) == {"split": 1, "devices": 1}
    assert _devices_in_fresh_process(16, 8, None) == {"split": 8, "devices": 8}


def test_split_cpu_leaves_the_users_own_device_count():
    assert _devices_in_fresh_process(
        16, None, "--xla_force_host_platform_device_count=3") == {"split": None, "devices": 3}


def test_split_cpu_after_the_backend_started_changes_nothing():
    import jax

    before = jax.device_count()  # this process's backend exists (8 fake devices)
    assert sharding.split_cpu(_config(16, None), environ={}) is None
    assert jax.device_count() == before


def test_split_cpu_leaves_a_multi_process_job():
    # Each process's devices are the job's business (never joined here: nothing listens).
    job = {"FIXED_SLOTS_COORDINATOR": "localhost:1234", "FIXED_SLOTS_NUM_PROCESSES": "2",
           "FIXED_SLOTS_PROCESS_ID": "0"}
    assert _devices_in_fresh_process(16, None, None, **job) == {"split": None, "devices": 1}
