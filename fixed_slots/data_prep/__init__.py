"""Dataset builders and the `python -m fixed_slots.data_prep build NAME` CLI."""
