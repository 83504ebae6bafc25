"""A seconds-long SLATE run for tests: 16x16 images, tiny widths, a handful of steps."""
from fixed_slots import configlib


def get_config():
    config = configlib.slate_base()
    config.data.name = "synthetic"
    config.data.image_size = 16
    config.data.num_train = 256
    config.data.num_eval = 16
    config.data.max_objects = 2

    config.slate.vocab_size = 16
    config.slate.d_model = 16
    config.slate.num_decoder_blocks = 1
    config.slate.num_decoder_heads = 2
    config.slate.dvae_hidden = 8
    config.slate.tau_steps = 10

    config.slot_attention.num_slots = 3
    config.slot_attention.num_iterations = 2
    config.slot_attention.slot_size = 16
    config.slot_attention.mlp_hidden_size = 16

    return configlib.tiny_run(config)
