"""Train, evaluate or show a config.

    python main.py --config=configs/default.py --workdir=/tmp/run            # train (resumes), evaluate
    python main.py --workdir=/tmp/run --mode=eval                # evaluate with the run's own config
    python main.py --config=configs/slate_clevr.py --mode=show_config        # keys, values, choices

`--config=path:arg` picks a variant of a config file (e.g. `configs/default.py:tiny`), and
`--config.KEY=VALUE` overrides any key. Mistakes in flags, config, data or workdir print one or
two lines and exit with code 2; `--verbosity=0` (or `-v 0`) also shows the libraries' INFO logs.
"""
import os
import sys

from absl import flags
from ml_collections import config_flags

from fixed_slots import cli

# The default experiment, wherever main.py is run from.
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.py")
_CONFIG = config_flags.DEFINE_config_file(
    "config", DEFAULT_CONFIG, "Experiment config file (`path` or `path:variant`).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and event files go.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "show_config"],
                          "Train (resuming from workdir), evaluate the latest checkpoint, or "
                          "print the resolved config with the allowed values of its choice keys.")
_ACCEPT_CHANGE = flags.DEFINE_list(
    "accept_config_change", [],
    "Config keys (e.g. train.num_steps) allowed to differ from the checkpoints' config when "
    "resuming; any other change to a run's meaning is refused.")


def main(argv):
    if len(argv) > 1:
        raise cli.UserError(f"unexpected arguments: {' '.join(argv[1:])}")
    config = _CONFIG.value
    if _MODE.value == "show_config":
        cli.show_config(config)
        return
    if not _WORKDIR.value:
        raise cli.UserError(f"--workdir is required for --mode={_MODE.value}")
    if _MODE.value == "train":
        from fixed_slots.train.trainer import train

        train(config, _WORKDIR.value, accept_config_change=_ACCEPT_CHANGE.value)
        return
    from fixed_slots import trained

    # The run's stored config; a --config file given explicitly must agree with it, and
    # --config.KEY flags may change only what is free to change (trained.FREE_TO_CHANGE).
    if flags.FLAGS["config"].present:
        trained.evaluate(_WORKDIR.value, config)
    else:
        trained.evaluate(_WORKDIR.value, overrides=cli.config_overrides(sys.argv))


if __name__ == "__main__":
    cli.run(main, default_config=DEFAULT_CONFIG)
