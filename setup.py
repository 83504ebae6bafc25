"""fixed_slots: implicit slot attention (fixed points + implicit differentiation) in JAX/Flax.

    pip install .                      # the fixed_point_layer alone: jax and numpy
    pip install -e ".[train]"          # + the models, data pipeline and trainer
    pip install -e ".[dev]"            # + the test tools (what the README's quick start uses)
"""
from setuptools import find_packages, setup

# The layer (fixed_slots.fixed_point) imports only these.
LAYER = ["jax>=0.4.35", "numpy"]

# Models, data, trainer, evaluation: `import fixed_slots.train` names this extra when missing.
TRAIN = [
    "flax>=0.10.4",
    "optax",
    "orbax-checkpoint",
    "tensorflow-datasets",
    "array-record",
    "ml-collections",
    "clu",
    "chex",
    "grain",
    "tensorboardX",
    "pillow",
    "scipy",
    "absl-py",
    "matplotlib",
]

setup(
    name="fixed_slots",
    version="0.1.0",
    description=(
        "Implicit slot attention (Chang, Griffiths, Levine, NeurIPS 2022) in JAX/Flax: "
        "a reusable fixed_point_layer, SLATE and slot-attention models, and their trainer."
    ),
    python_requires=">=3.10",
    # Only fixed_slots: the checkout's data_prep/ is a shortcut to fixed_slots.data_prep, and a
    # top-level package of that generic name would collide in a user's environment.
    packages=find_packages(include=["fixed_slots", "fixed_slots.*"]),
    install_requires=LAYER,
    extras_require={
        "train": TRAIN,
        "dev": TRAIN + ["pytest", "pytest-xdist", "scikit-learn"],
        # CLU's own TensorBoard writers need TensorFlow; without it we write through tensorboardX.
        "tf": ["tensorflow-cpu"],
        # GPU support is opt-in: the CUDA wheels are ~3 GB.
        "cuda12": ["jax[cuda12]"],
    },
)
