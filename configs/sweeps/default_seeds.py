"""The README's default run (configs/default.py) with several seeds: what docs/results.md reports.

  python -m fixed_slots.experiments.sweep --sweep=configs/sweeps/default_seeds.py \
      --workdir=/tmp/default_seeds --seeds=0,1,2
  python -m fixed_slots.experiments.report --sweep_dir=/tmp/default_seeds
"""
BASE = "configs/default.py"
COMMON = {}


def get_runs():
    return [("default", {})]
