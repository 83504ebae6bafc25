"""configlib.from_file, override (the --set KEY=VALUE flags of the scripts), training_only."""
import pytest

from fixed_slots import configlib
from helpers import ROOT, load_config


def test_override_applies_typed_literals_to_a_copy():
    base = configlib.slate_base()
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
        configlib.override(configlib.slate_base(), [assignment])


@pytest.mark.parametrize("assignments, message", [
    (["slate.attention_impl=cudnn", "slate.attn_prob_dropout=False"], "bf16/fp16 only"),
    (["slate.attention_impl=cudnn", "train.compute_dtype=bfloat16"], "attn_prob_dropout=False"),
])
def test_cudnn_attention_without_its_requirements_is_refused(assignments, message):
    with pytest.raises(ValueError, match=message):
        configlib.validate(configlib.override(configlib.slate_base(), assignments))


def test_cudnn_attention_with_bf16_and_no_probability_dropout_validates():
    configlib.validate(configlib.override(configlib.slate_base(), [
        "slate.attention_impl=cudnn", "train.compute_dtype=bfloat16",
        "slate.attn_prob_dropout=False", "train.num_devices=1"]))


def test_from_file_loads_a_config_file_with_overrides():
    path = str(ROOT / "configs" / "slate_clevr.py")
    assert configlib.from_file(path).data.image_size == 96
    assert configlib.from_file(path, ["data.image_size=64"]).data.image_size == 64


def test_training_only_turns_off_summaries_and_keeps_the_base():
    base = configlib.slate_base()
    config = configlib.training_only(base, steps=300, log_every=50)
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
