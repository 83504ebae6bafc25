"""fixed_slots.train: the trainer. Needs the `train` extra; the fixed_point layer needs only jax."""
import importlib.util as _util

# Import names of setup.py's `train` extra; checked here so that a light install fails with the
# fix instead of a bare ModuleNotFoundError deep inside the trainer.
_missing = [name for name in ("flax", "optax", "orbax", "ml_collections", "absl", "clu", "grain",
                              "tensorflow_datasets", "tensorboardX", "PIL", "matplotlib")
            if _util.find_spec(name) is None]
if _missing:
    raise ImportError(
        f"fixed_slots.train needs the training stack, which is not installed here (missing: "
        f"{', '.join(_missing)}). Install it with: pip install -e \".[train]\" (from a checkout; "
        f"\".[dev]\" adds the test tools). fixed_slots.fixed_point works without it.")
