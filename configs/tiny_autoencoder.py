"""A seconds-long slot-autoencoder run for tests: 16x16 synthetic images, tiny widths."""
from fixed_slots import configlib


def get_config():
    config = configlib.slot_autoencoder_base()
    config.data.name = "synthetic"
    config.data.image_size = 16
    config.data.num_train = 256
    config.data.num_eval = 16
    config.data.min_objects = 1
    config.data.max_objects = 2

    config.autoencoder.encoder_channels = (8, 8)
    config.autoencoder.encoder_strides = (1, 1)
    config.autoencoder.decoder_channels = (8, 8)
    config.autoencoder.decoder_strides = (2, 1)
    config.autoencoder.broadcast_size = 8  # 8 * 2 * 1 = 16
    config.autoencoder.kernel_size = 3

    config.slot_attention.num_slots = 3
    config.slot_attention.num_iterations = 2
    config.slot_attention.slot_size = 16
    config.slot_attention.mlp_hidden_size = 16

    return configlib.tiny_run(config)
