"""benchmarks/fixed_point_compare.py runs at tiny shapes and skips libraries that are absent."""
import importlib.util
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_compare_benchmark_runs_and_skips_missing_libraries_cleanly():
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    out = subprocess.run(
        [sys.executable, "benchmarks/fixed_point_compare.py", "--tiny", "--repeats=1",
         "--problems=tanh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ours |")]
    assert len(rows) == 5 and all("MiB" in row for row in rows), out.stdout
    # The reference row agrees with itself; the implicit rows agree with it.
    assert "| Implicit(GMRES) | " in out.stdout and "| 0.0e+00 |" in out.stdout
    for library in ("optimistix", "jaxopt"):
        if importlib.util.find_spec(library) is None:
            assert f"# {library} is not installed: its rows are skipped" in out.stdout
