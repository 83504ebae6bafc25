"""The benchmark scripts run on CPU at tiny shapes, so they cannot rot."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import ROOT, load_config


def run(args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    result = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_fixed_point_memory_benchmark_runs():
    out = run(["benchmarks/fixed_point_memory.py", "--batch=2", "--inputs=16", "--dim=8",
               "--iters=1,3", "--repeats=1"])
    assert "| unroll |" in out and "| neumann1 |" in out and "| implicit |" in out
    assert "peak temp memory T=3 / T=1" in out


def test_train_step_benchmark_runs():
    out = run(["benchmarks/train_step.py", "--config=configs/tiny.py", "--iters=1",
               "--grads=neumann1", "--steps=1", "--decode_repeats=1"])
    assert "| neumann1 | 1 |" in out and "| KV cache |" in out


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_step_benchmark_json_rows_and_isolation(tmp_path):
    path = tmp_path / "figures.json"
    run(["benchmarks/train_step.py", "--config=configs/tiny.py", "--iters=2", "--grads=unroll",
         "--steps=1", "--warmup=1", "--decode_repeats=1", "--decode_batch=3",
         "--decode_variants=kv_cache", "--loop_steps=4", f"--json={path}"])
    figures = json.loads(path.read_text())
    (row,) = figures["rows"]
    assert (row["grad"], row["iters"]) == ("unroll", 2)
    assert row["ms"] > 0 and row["images_per_s"] > 0 and row["compiled_mib"] > 0
    assert np.isfinite(row["loss"]) and row["mfu"] is None  # no peak FLOP/s known for CPU
    assert figures["decode"]["batch"] == 3 and figures["decode"]["kv_cache"] > 0
    assert "full_recompute" not in figures["decode"]
    assert figures["header"]["batch_size"] == 8
    # the config's own grad/T (neumann1, T=2) is not among the rows, so its bare step was timed
    assert figures["loop"]["grad"] == "neumann1" and figures["loop"]["iters"] == 2
    assert figures["loop"]["loop_ms"] > 0 and figures["loop"]["bare_ms"] > 0


def test_side_by_side_derives_the_papers_official_arguments():
    """configs/slate_clevr.py must give exactly the official harness defaults (the paper's
    setting), so the two sides are timed at the same shapes."""
    side_by_side, official = _load("side_by_side"), _load("official_slate")
    derived = official.parse_args(["--slate_dir=x"] + side_by_side.official_args_from_config(
        load_config("slate_clevr")))
    defaults = official.parse_args(["--slate_dir=x"])
    assert vars(derived) == vars(defaults)
    assert (defaults.image_size, defaults.batch_size, defaults.num_iterations) == (96, 50, 7)


def test_side_by_side_refuses_configs_the_official_model_cannot_match():
    side_by_side = _load("side_by_side")
    config = load_config("slate_clevr")
    config.slate.dvae_hidden = 32
    with pytest.raises(ValueError, match="dvae_hidden=32"):
        side_by_side.official_args_from_config(config)
    with pytest.raises(ValueError, match="SLATE config"):
        side_by_side.official_args_from_config(load_config("slot_autoencoder_synthetic"))


def test_side_by_side_table_ratios():
    side_by_side = _load("side_by_side")
    official = {
        "unroll": {"num_iterations": 7, "ms": 300.0, "peak_mib": 9000.0},
        "implicit": {"num_iterations": 7, "ms": 200.0, "peak_mib": 6000.0},
        "decode": {"batch_size": 50, "tokens": 576, "decode_images_per_s": 2.0},
    }
    ours = {"rows": [{"grad": "unroll", "iters": 7, "ms": 100.0, "peak_mib": 4500.0},
                     {"grad": "neumann1", "iters": 7, "ms": 50.0, "peak_mib": 0.0}],
            "decode": {"kv_cache": 50.0}}
    lines = side_by_side.side_by_side_table(official, ours)
    vanilla, implicit = lines[2].split(" | "), lines[3].split(" | ")
    assert vanilla[1:] == ["300.0", "100.0", "3.00x", "9000", "4500", "2.00x |"]
    # a backend without a peak counter (0) prints n/a, not a ratio against zero
    assert implicit[1:] == ["200.0", "50.0", "4.00x", "6000", "n/a", "n/a |"]
    assert lines[-1].endswith("| 2 | 50 | 25.0x |")
    assert "unroll n/a vs official unroll n/a" in "\n".join(lines)  # no RSS in these records


def test_mixed_precision_benchmark_runs(tmp_path):
    path, plot = tmp_path / "curves.json", tmp_path / "curves.png"
    out = run(["benchmarks/mixed_precision.py", "--config=configs/tiny.py", "--steps=4",
               "--log_every=2", "--noise_floor", f"--json={path}", f"--plot={plot}"])
    figures = json.loads(path.read_text())
    rows = figures["rows"]
    assert [r["step"] for r in rows] == [2, 4]
    for name in ("float32", "bfloat16", "float32_seed+1"):
        assert all(np.isfinite(r[f"{name}/loss"]) for r in rows)
    # the reseeded float32 run really is another run (the noise floor is not zero by construction)
    assert rows[-1]["float32_seed+1/loss"] != rows[-1]["float32/loss"]
    assert set(figures["max_second_half"]) == {"bfloat16", "float32_seed+1"}
    assert "max |loss rel. diff from float32|" in out and plot.stat().st_size > 0
