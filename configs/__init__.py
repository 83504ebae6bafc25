"""Experiment configs: each file's `get_config(variant=None)` is one experiment, read top to bottom.

`common.py` holds the defaults the files start from (the official hyperparameters); a file says
what its experiment changes and defines its own variants (`:tiny`, the test sizes).
"""
