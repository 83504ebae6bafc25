"""The paper's effects at its scale (GPU): the study of configs/sweeps/study_synthetic.py on
CLEVR-Mirror with the paper's SLATE (configs/slate_clevr.py at 64x64, as Table 2 / Fig. 3, 5, 6).

  DATA=/work/data/tfds   # where `python -m fixed_slots.data_prep build clevr_mirror` wrote the records
  python -m fixed_slots.data_prep build clevr_mirror --source=/work/shared/data/clevr_mirror --data_dir=$DATA
  python -m fixed_slots.experiments.baselines --config=configs/slate_clevr.py \\
      --set=data.data_dir=$DATA --set=data.image_size=64 --set=eval.batch_size=35 \\
      --set=eval.num_batches=0 --out=/data/runs/study_clevr
  python -m fixed_slots.experiments.sweep --sweep=configs/sweeps/study_clevr.py \\
      --workdir=/data/runs/study_clevr --seeds=0,1,2 \\
      --set=data.data_dir=$DATA   # add --set=train.num_steps=N to shorten
  python -m fixed_slots.experiments.report --sweep_dir=/data/runs/study_clevr \\
      --versus=slot_attention.num_iterations \\
      --paired=implicit_T7-vanilla_T7,implicit_T15-vanilla_T15

Runs: vanilla (unroll) and implicit (neumann1) at T = 3, 7, 15, and at T=7 without gradient
clipping and warmup (Fig. 5). The Jacobian spectral norm is logged every 1000 steps. Evaluation
on the whole validation split (455 scenes, 13 batches of 35), as configs/sweeps/table2.py
(which has Table 2's arms and the GPU time estimate: ~2 h a run of 250k steps for vanilla/IN).
"""
BASE = "configs/slate_clevr.py"
COMMON = {"data.image_size": 64, "train.jacobian_every_steps": 1_000, "eval.batch_size": 35,
          "eval.num_batches": 0}
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
