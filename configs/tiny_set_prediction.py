"""A seconds-long set-prediction run for tests: 16x16 synthetic images, tiny widths."""
from fixed_slots import configlib


def get_config():
    config = configlib.set_prediction_base()
    config.data.name = "synthetic"
    config.data.image_size = 16
    config.data.num_train = 256
    config.data.num_eval = 16
    config.data.min_objects = 1
    config.data.max_objects = 3
    config.set_prediction.layout = "synthetic"
    config.set_prediction.mlp_hidden = 16

    config.autoencoder.encoder_channels = (8, 8)
    config.autoencoder.encoder_strides = (1, 2)  # 8x8 feature grid
    config.autoencoder.kernel_size = 3

    config.slot_attention.num_slots = 4
    config.slot_attention.num_iterations = 2
    config.slot_attention.slot_size = 16
    config.slot_attention.mlp_hidden_size = 16

    return configlib.tiny_run(config)
