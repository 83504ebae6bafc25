"""configlib: from_file, override (the --set KEY=VALUE flags of the scripts), the checks; the
config files' own variants; the trainer's training_only."""
import math

import pytest

from fixed_slots import configlib
from fixed_slots.errors import ConfigError
from fixed_slots.train.trainer import check_config, training_only
from helpers import ROOT, load_config


def slate():
    return load_config("slate_clevr")


def test_override_applies_typed_literals_to_a_copy():
    base = slate()
    config = configlib.override(base, [
        "slate.dvae_hidden=8", "slate.attention_impl=cudnn", "optim.main_lr=1e-3",
        "train.num_devices=2", "slate.hard=True", "data.crop='center'"])
    assert config.slate.dvae_hidden == 8 and isinstance(config.slate.dvae_hidden, int)
    assert config.slate.attention_impl == "cudnn"  # a bare word is a string
    assert config.optim.main_lr == 1e-3
    assert config.train.num_devices == 2  # a placeholder takes a value of its type
    assert config.slate.hard is True and config.data.crop == "center"
    assert base.slate.dvae_hidden == 64 and base.train.num_devices is None  # the base is untouched


@pytest.mark.parametrize("assignment, message", [
    ("slate.no_such_key=1", "config has no key 'slate.no_such_key'"),
    ("nothing.here=1", "config has no key 'nothing.here'"),
    ("slate.dvae_hidden.deeper=1", "config has no key 'slate.dvae_hidden.deeper'"),
    ("slate.dvae_hidden=wide", "slate.dvae_hidden=wide"),
    ("slate.dvae_hidden", "expected key.path=value"),
    ("=3", "expected key.path=value"),
])
def test_override_names_the_bad_assignment(assignment, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        configlib.override(slate(), [assignment])


@pytest.mark.parametrize("assignments, message", [
    (["slate.attention_impl=cudnn", "slate.attn_prob_dropout=False"], "bf16/fp16 only"),
    (["slate.attention_impl=cudnn", "train.compute_dtype=bfloat16"], "attn_prob_dropout=False"),
])
def test_cudnn_attention_without_its_requirements_is_refused(assignments, message):
    with pytest.raises(ValueError, match=message):
        check_config(configlib.override(slate(), assignments))


def test_cudnn_attention_with_bf16_and_no_probability_dropout_validates():
    check_config(configlib.override(slate(), [
        "slate.attention_impl=cudnn", "train.compute_dtype=bfloat16",
        "slate.attn_prob_dropout=False", "train.num_devices=1"]))


def test_from_file_loads_a_config_file_with_overrides():
    path = str(ROOT / "configs" / "slate_clevr.py")
    assert configlib.from_file(path).data.image_size == 96
    assert configlib.from_file(path, ["data.image_size=64"]).data.image_size == 64


def test_training_only_turns_off_summaries_and_keeps_the_base():
    base = slate()
    config = training_only(base, steps=300, log_every=50)
    assert (config.train.num_steps, config.train.log_every_steps,
            config.train.checkpoint_every_steps) == (300, 50, 300)
    assert config.train.image_every_steps == 0 and config.train.jacobian_every_steps == 0
    assert base.train.num_steps == 250_000 and base.train.image_every_steps == 5_000


def test_slate_crops_follow_the_authors_loaders():
    """The authors' image-folder loader resizes the whole frame; COCO's centre crop is ours."""
    assert load_config("slate_clevr").data.crop == "none"
    assert load_config("slate_shapestacks").data.crop == "none"
    assert load_config("slate_coco").data.crop == "center"
    assert load_config("slot_autoencoder_clevr").data.crop == "clevr"  # Locatello et al.


@pytest.mark.parametrize("key, value", [("optim.main_lr", math.inf), ("optim.dvae_lr", math.nan),
                                        ("slot_attention.epsilon", -math.inf)])
def test_non_finite_numbers_are_refused_anywhere(key, value):
    config = configlib.override(slate(), ["train.num_devices=1"])
    section, name = key.split(".")
    config[section][name] = value
    with pytest.raises(ConfigError, match=r"expected a finite number"):
        check_config(config)


def test_tiny_is_each_configs_own_variant_and_keeps_typed_placeholders():
    """:tiny is built by the config file itself, so keys whose default is None (placeholders)
    still take a value of their type, as on the full config."""
    for name in ("default:tiny", "slate_clevr:tiny", "slot_autoencoder_synthetic:tiny"):
        config = load_config(name)
        config.data.data_dir = "/data"
        config.train.num_devices = 2
        config.eval.inception_weights = "w.npz"
        with pytest.raises(TypeError):
            config.train.num_devices = "two"
    with pytest.raises(ConfigError, match="unknown config variant 'huge'"):
        load_config("default:huge")


def test_configlib_checks_name_the_key():
    config = slate()
    with pytest.raises(ConfigError, match=r"config.slate.dropout=1.5 is invalid: expected"):
        check_config(configlib.override(config, ["slate.dropout=1.5", "train.num_devices=1"]))
    with pytest.raises(ConfigError, match=r"config.data.crop='middle' is invalid: expected one "
                                          r"of 'center', 'none', 'clevr'"):
        check_config(configlib.override(config, ["data.crop=middle", "train.num_devices=1"]))
    with pytest.raises(ConfigError, match=r"config.seed=4294967296 is invalid"):
        check_config(configlib.override(config, [f"seed={2 ** 32}", "train.num_devices=1"]))
    assert math.isfinite(config.optim.main_lr)
