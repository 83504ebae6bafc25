"""Table 2 / Fig. 3b at 64x64 on CLEVR-Mirror on 2 CPU cores: the arms, the commands.

Arms (T = the paper's number of slot-attention iterations):
  vanilla     `unroll`, T=7: backpropagation through all 7 updates
  vanilla_T8  `unroll`, T=8: as many updates as the implicit arms run (7 without gradient + 1)
  IN          naive iteration forward, first-order Neumann backward (`neumann1`), T=7
  IB, BN, BB  Broyden forward and/or Broyden adjoint (Table 2's other variants), T=7
The main comparison is IN vs vanilla (6 seeds); the other arms have 3 seeds. The runs of record
(docs/results.md, 800 steps): 5 seeds of vanilla and IN, seeds 0-2 of vanilla_T8, BN, BB, IB.

  DATA=/work/data/tfds W=/work/runs/study_clevr_mirror
  python -m fixed_slots.data_prep build clevr_mirror --source=/work/shared/data/clevr_mirror --data_dir=$DATA
  python -m fixed_slots.experiments.baselines --config=configs/study_clevr_mirror.py \\
      --set=data.data_dir=$DATA --out=$W
  # the main comparison first, then the other arms (the runs of record: docs/results.md)
  python -m fixed_slots.experiments.sweep --sweep=configs/sweeps/study_clevr_mirror.py \\
      --workdir=$W --seeds=0,1,2,3,4,5 --only=vanilla,IN --set=data.data_dir=$DATA
  python -m fixed_slots.experiments.sweep --sweep=configs/sweeps/study_clevr_mirror.py \\
      --workdir=$W --seeds=0,1,2 --only=vanilla_T8,BN,BB,IB --set=data.data_dir=$DATA
  python -m fixed_slots.experiments.report --sweep_dir=$W --out=$W/report \\
      --paired=IN-vanilla,IN-vanilla_T8,BN-vanilla,BB-vanilla,IB-vanilla \\
      --tags=cross_entropy,loss,grad_norm,slot_attention_grad_norm,jacobian_spectral_norm,slot_residual,adjoint_failed

The report states whether IN - vanilla on FG-ARI is decided (one-sided exact sign-flip test
over the 6 paired seeds, p < 0.05; 3 seeds could never reach it: 2^-3 = 0.125) and puts the
trivial baselines of $W/baselines.json next to the runs. The run time and the step count are
in configs/study_clevr_mirror.py's docstring. Two sweep processes can share the work directory
(run locks), but on 2 cores they only share the same CPU time.
"""
BASE = "configs/study_clevr_mirror.py"
COMMON = {}


def get_runs():
    # In order of priority (a sweep goes seed by seed, run by run in this order).
    return [("vanilla", {"grad": "unroll", "slot_attention.num_iterations": 7}),
            ("IN", {"grad": "IN", "slot_attention.num_iterations": 7}),
            ("vanilla_T8", {"grad": "unroll", "slot_attention.num_iterations": 8}),
            ("BN", {"grad": "BN", "slot_attention.num_iterations": 7}),
            ("BB", {"grad": "BB", "slot_attention.num_iterations": 7}),
            ("IB", {"grad": "IB", "slot_attention.num_iterations": 7})]
