"""Moved to `fixed_slots.modules.decoding` (decoding is a model building block, next to the
transformer). This alias stays only until benchmarks/train_step.py imports the new place."""
from fixed_slots.modules.decoding import (  # noqa: F401
    generate_tokens,
    generate_tokens_full_recompute,
)
