"""Start-up of main.py: the persistent compilation cache, flax imported without IPython, and
benchmarks/startup.py (time to the first step)."""
import glob
import json
import os
import subprocess
import sys

from fixed_slots import cli
from helpers import ROOT


def test_compilation_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("FIXED_SLOTS_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cli.compilation_cache_dir() == str(tmp_path / "fixed_slots" / "jax")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cli.compilation_cache_dir() == str(tmp_path / "home" / ".cache" / "fixed_slots" / "jax")
    monkeypatch.setenv("FIXED_SLOTS_CACHE_DIR", str(tmp_path / "mine"))
    assert cli.compilation_cache_dir() == str(tmp_path / "mine")
    for off in ("off", "0", ""):
        monkeypatch.setenv("FIXED_SLOTS_CACHE_DIR", off)
        assert cli.compilation_cache_dir() is None


def test_flax_is_imported_without_ipython_and_ipython_still_imports():
    # IPython is no dependency of ours: where it is not installed only the first half applies.
    code = ("import importlib.util, sys; from fixed_slots import cli; "
            "cli.import_flax_without_ipython(); import flax.nnx; "
            "hidden = 'IPython' not in sys.modules; installed = "
            "importlib.util.find_spec('IPython') is not None; "
            "name = __import__('IPython').__name__ if installed else 'IPython'; "
            "print(hidden, name)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.stdout.split() == ["True", "IPython"]


def test_second_start_loads_the_train_step_from_the_cache(tmp_path):
    cache, figures = tmp_path / "cache", tmp_path / "startup.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("FIXED_SLOTS_CACHE_DIR", None)  # conftest turns it off; --cache_dir sets it here
    subprocess.run([sys.executable, "benchmarks/startup.py", "--runs=2", f"--cache_dir={cache}",
                    f"--json={figures}", "--", "--config=configs/default.py:tiny",
                    "--config.train.image_every_steps=0", "--config.train.jacobian_every_steps=0"],
                   cwd=ROOT, env=env, check=True, capture_output=True, text=True, timeout=900)
    runs = json.loads(figures.read_text())["runs"]
    assert len(runs) == 2 and all(r["seconds"] > 0 and r["peak_rss_mib"] > 0 for r in runs)
    # One executable of the train step, written by the first start and read by the second.
    assert len(glob.glob(str(cache / "jit_train_step-*"))) == 1
