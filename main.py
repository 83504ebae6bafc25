"""Train or evaluate: python main.py --config=configs/default.py --workdir=/tmp/run [--mode=eval]."""
import fixed_slots.train  # noqa: F401  (first: names the `train` extra if the stack is missing)
from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/default.py", "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and event files go.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"], "Train, or evaluate the latest checkpoint.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if _MODE.value == "train":
        from fixed_slots.train.trainer import train_and_evaluate

        train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    else:
        from fixed_slots.eval.evaluate import evaluate

        evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
