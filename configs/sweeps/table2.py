"""Table 2 / Fig. 3b on a GPU: vanilla vs the four implicit variants on CLEVR-Mirror at 64x64.

The paper's SLATE (configs/slate_clevr.py: batch 50, vocab 1024, d_model 192, 4 decoder blocks,
250k steps) with the arms of the 2-CPU study configs/sweeps/study_clevr_mirror.py: vanilla
(`unroll`) at T=7 and at T=8 (as many updates as the implicit arms: 7 without gradient + 1),
and IN/IB/BN/BB at T=7 = forward naive Iteration or Broyden x backward first-order Neumann or
Broyden adjoint (IN == `neumann1`). Evaluation on the whole validation split (455 scenes of the
3033 in /work/shared/data/clevr_mirror, in 13 batches of 35).

  DATA=/work/data/tfds W=/data/runs/table2   # DATA: where `data_prep build` wrote the records
  python -m fixed_slots.data_prep build clevr_mirror --source=/work/shared/data/clevr_mirror --data_dir=$DATA
  python -m fixed_slots.experiments.baselines --config=configs/slate_clevr.py \\
      --set=data.data_dir=$DATA --set=data.image_size=64 --set=eval.batch_size=35 \\
      --set=eval.num_batches=0 --out=$W
  python -m fixed_slots.experiments.sweep --sweep=configs/sweeps/table2.py --workdir=$W \\
      --seeds=0,1,2,3,4,5 --only=vanilla,IN --set=data.data_dir=$DATA   # the main comparison
  python -m fixed_slots.experiments.sweep --sweep=configs/sweeps/table2.py --workdir=$W \\
      --seeds=0,1,2 --only=vanilla_T8,BN,BB,IB --set=data.data_dir=$DATA
  python -m fixed_slots.experiments.report --sweep_dir=$W \\
      --paired=IN-vanilla,IN-vanilla_T8,BN-vanilla,BB-vanilla,IB-vanilla \\
      --tags=cross_entropy,loss,grad_norm,jacobian_spectral_norm,slot_residual

Time on one H100/H200, an ESTIMATE (nothing measured at 64x64): the float32 step measured at
the paper's 96x96 setting is 25.2 ms (unroll) / 27.9 ms (neumann1) on an H200 (BENCHMARKS.md,
2026-11-26); the step is launch-bound (the official code's 64x64 step costs 0.94x its 96x96
one), so 64x64 is taken as the same, plus ~5-10% for the official per-epoch validation passes
(an epoch is 42 steps of the 2123 training scenes): ~1.9-2.1 h a run of 250k steps. The
Broyden arms (IB, BN, BB) are not measured on a GPU; on the CPU their step is within 12% of
IN's (configs/study_clevr_mirror.py), on a launch-bound GPU Broyden's extra small kernels may
cost more. 24 runs (6 arms x 3 seeds + 3 more seeds of vanilla and IN) one at a time: ~50 h.
The model uses ~5 GiB, so several sweep processes sharing $W (run locks) on one H200 should
take less, not measured. Produces $W/<arm>/seed_<s>/ (TensorBoard events, eval/metrics.json,
eval/per_image.json, the Fig. 4 pictures) and the report (tables, paired tests, baselines,
curves). Caveat: 250k steps are ~5900 epochs of these 2123 scenes, and the official
validation-plateau rule halves the rates after 4 epochs without a better validation loss.
"""
BASE = "configs/slate_clevr.py"
COMMON = {"data.image_size": 64, "eval.batch_size": 35, "eval.num_batches": 0}


def get_runs():
    # In order of priority (a sweep goes seed by seed, run by run in this order).
    return [("vanilla", {"grad": "unroll", "slot_attention.num_iterations": 7}),
            ("IN", {"grad": "IN", "slot_attention.num_iterations": 7}),
            ("vanilla_T8", {"grad": "unroll", "slot_attention.num_iterations": 8}),
            ("BN", {"grad": "BN", "slot_attention.num_iterations": 7}),
            ("BB", {"grad": "BB", "slot_attention.num_iterations": 7}),
            ("IB", {"grad": "IB", "slot_attention.num_iterations": 7})]
