"""Fig. 11: Neumann orders 1..5 of the implicit gradient, as the paper defines them (and vanilla).

neumannK: T updates without gradient, then backpropagation through K more updates ("higher-order
Neumann approximations require backpropagating through more iterations"). The series evaluated at
the fixed point is `seriesK`; add `("series{k}", {"grad": f"series{k}"})` runs to compare.
"""
BASE = "configs/slate_clevr.py"
COMMON = {"data.image_size": 64}


def get_runs():
    return [("vanilla", {"grad": "unroll"})] + [
        (f"neumann{k}", {"grad": f"neumann{k}"}) for k in range(1, 6)]
