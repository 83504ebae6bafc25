"""The paper's effects on 2 CPU cores: vanilla (unroll) vs implicit (neumann1) SLATE on
the crowded synthetic scenes of configs/study_synthetic.py, 3 seeds each.

- Fig. 1b / 3a: `*_T7` runs, Jacobian spectral norm of the slot-attention step and gradient norm
  over training (full recipe: inf-norm clipping 1.0 and warmup).
- Fig. 6b/c: T = 3, 7, 15 (vanilla differentiates T updates; neumann1 runs T without gradient + 1).
- Fig. 5: T=7 without gradient clipping and without learning-rate warmup (`*_T7_noclip_nowarmup`).

  python -m fixed_slots.experiments.sweep --sweep=configs/sweeps/study_synthetic.py \\
      --workdir=/work/runs/study --seeds=0,1,2
  python -m fixed_slots.experiments.report --sweep_dir=/work/runs/study --out=docs/results_study

`--only=vanilla_T7,implicit_T7` runs a subset (two sweep processes can share the list).
"""
BASE = "configs/study_synthetic.py"
COMMON = {}
GRADS = (("vanilla", "unroll"), ("implicit", "neumann1"))


def get_runs():
    # In order of priority (a sweep goes seed by seed, run by run in this order).
    runs = []
    for t in (7, 15):
        for name, grad in GRADS:
            runs.append((f"{name}_T{t}", {"grad": grad, "slot_attention.num_iterations": t}))
    for name, grad in GRADS:
        runs.append((f"{name}_T7_noclip_nowarmup",
                     {"grad": grad, "optim.clip": "none", "optim.use_warmup": False}))
    for name, grad in GRADS:
        runs.append((f"{name}_T3", {"grad": grad, "slot_attention.num_iterations": 3}))
    return runs
