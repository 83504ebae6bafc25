"""Fig. 6b / 6c: number of slot-attention iterations, vanilla vs implicit (incl. vanilla T=1).

T is the paper's: vanilla runs T differentiated updates, implicit (neumann1) T updates without
gradient and one more with it.
"""
BASE = "configs/slate_clevr.py"
COMMON = {"data.image_size": 64}


def get_runs():
    runs = [("vanilla_T1", {"grad": "unroll", "slot_attention.num_iterations": 1})]
    for t in (3, 5, 7, 10):
        for name, grad in (("vanilla", "unroll"), ("implicit", "neumann1")):
            runs.append((f"{name}_T{t}", {"grad": grad, "slot_attention.num_iterations": t}))
    return runs
