"""Table 3: implicit (IN) vs vanilla SLATE at 96x96 on CLEVR-Mirror, ShapeStacks and COCO.

Report MSE (mse_slot_recon) and FID (pass --set=eval.inception_weights=PATH). Every dataset is
read from one TFDS root, DATA, where `python -m fixed_slots.data_prep build NAME --source=... --data_dir=DATA`
wrote it (CLEVR-Mirror: --source=/work/shared/data/clevr_mirror on the development machine):

  python -m fixed_slots.experiments.sweep --sweep=configs/sweeps/table3.py --workdir=W \\
      --seeds=0,1,2 --set=data.data_dir=DATA
  P=clevr_mirror_implicit-clevr_mirror_vanilla,shapestacks_implicit-shapestacks_vanilla
  python -m fixed_slots.experiments.report --sweep_dir=W --paired=$P,coco_implicit-coco_vanilla \\
      --main_metric=mse_slot_recon
"""
BASE = "configs/slate_clevr.py"


def get_runs():
    runs = []
    for dataset, extra in (("clevr_mirror", {}), ("shapestacks", {}),
                           ("coco", {"eval.segmentation_metrics": False})):
        for name, grad in (("vanilla", "unroll"), ("implicit", "neumann1")):
            runs.append((f"{dataset}_{name}", {"data.name": dataset, "grad": grad, **extra}))
    return runs
