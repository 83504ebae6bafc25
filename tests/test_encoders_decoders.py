"""CNN encoder, position embeddings, token embedding and the spatial broadcast decoder."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fixed_slots.modules.decoders import SpatialBroadcastDecoder, alpha_composite, spatial_broadcast
from fixed_slots.modules.encoders import (
    CNNEncoder, LearnedPositionEmbedding, SoftPositionEmbed, TokenEmbedding, build_grid)


def _num_params(module):
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(module, nnx.Param)))


def test_build_grid():
    g = build_grid((3, 5))
    assert g.shape == (1, 3, 5, 4)
    np.testing.assert_allclose(g[0, :, 0, 0], [0.0, 0.5, 1.0])  # channel 0 runs down the rows
    np.testing.assert_allclose(g[0, 0, :, 1], np.linspace(0, 1, 5))  # channel 1 along columns
    np.testing.assert_allclose(g[..., 2:], 1.0 - g[..., :2])


def test_soft_position_embed_properties():
    pos = SoftPositionEmbed(8, (4, 6), rngs=nnx.Rngs(0))
    assert _num_params(pos) == 4 * 8 + 8
    x = jax.random.normal(jax.random.key(0), (2, 4, 6, 8))
    e = pos(x) - x  # [2, 4, 6, 8]: the same additive table for every input
    np.testing.assert_allclose(e[0], e[1], atol=1e-6)
    np.testing.assert_allclose(pos(x + 1.0) - (x + 1.0), e, atol=1e-5)
    # Point reflection: grid(i, j) + grid(H-1-i, W-1-j) = (1, 1, 1, 1), so the embedding pair
    # sums to dense(ones) + bias at every pixel.
    flipped = e[0, ::-1, ::-1]
    const = pos.dense(jnp.ones((4,))) + pos.dense.bias[...]
    np.testing.assert_allclose(e[0] + flipped, jnp.broadcast_to(const, e[0].shape), atol=1e-5)
    # Different pixels get different embeddings.
    assert not np.allclose(e[0, 0, 0], e[0, 1, 0])


@pytest.mark.parametrize("strides,res_out", [((1, 1, 1, 1), 12), ((1, 2, 2, 1), 3)])
def test_cnn_encoder_shapes_and_params(strides, res_out):
    enc = CNNEncoder((12, 12), features=(8, 8, 8, 8), strides=strides, mlp_hidden=16,
                     out_features=10, rngs=nnx.Rngs(0))
    out = enc(jax.random.uniform(jax.random.key(0), (2, 12, 12, 3)))
    assert out.shape == (2, res_out * res_out, 10)
    assert enc.out_resolution == (res_out, res_out)
    convs = (25 * 3 * 8 + 8) + 3 * (25 * 8 * 8 + 8)
    expected = convs + (4 * 8 + 8) + 2 * 8 + (8 * 16 + 16) + (16 * 10 + 10)
    assert _num_params(enc) == expected


def test_cnn_encoder_default_is_locatello():
    enc = nnx.eval_shape(lambda: CNNEncoder((128, 128), rngs=nnx.Rngs(0)))
    convs = (25 * 3 * 64 + 64) + 3 * (25 * 64 * 64 + 64)
    assert _num_params(enc) == convs + (4 * 64 + 64) + 2 * 64 + 2 * (64 * 64 + 64)
    assert enc.layer_norm.epsilon == 1e-3  # Keras LayerNormalization default


def test_cnn_encoder_translation_equivariance_without_position():
    enc = CNNEncoder((16, 16), features=(4, 4), kernel_size=3, strides=(1, 1), mlp_hidden=8,
                     out_features=6, rngs=nnx.Rngs(0))
    enc.pos.dense.kernel[...] = jnp.zeros_like(enc.pos.dense.kernel[...])
    img = jnp.zeros((1, 16, 16, 3)).at[0, 6:9, 5:8].set(1.0)
    shifted = jnp.roll(img, (2, 1), axis=(1, 2))
    f = enc(img).reshape(1, 16, 16, 6)
    fs = enc(shifted).reshape(1, 16, 16, 6)
    # Away from the zero-padded border the features move with the image.
    np.testing.assert_allclose(fs[0, 5:12, 4:12], f[0, 3:10, 3:11], atol=1e-5)


def test_learned_position_embedding():
    pe = LearnedPositionEmbedding(10, 6, dropout=0.5, rngs=nnx.Rngs(0))
    table = pe.pe[...]
    assert table.shape == (10, 6) and float(jnp.abs(table).max()) <= 2.0
    x = jnp.zeros((2, 3, 6))
    np.testing.assert_allclose(pe(x, 4), jnp.broadcast_to(table[4:7], x.shape))
    traced = jax.jit(lambda x, o: pe(x, o))(x, jnp.int32(4))
    np.testing.assert_allclose(traced, pe(x, 4))
    dropped = pe(x, 0, deterministic=False, rng=jax.random.key(0))
    assert float((dropped == 0).mean()) > 0.2
    with pytest.raises(ValueError):
        pe(x, 0, deterministic=False)


def test_token_embedding():
    emb = TokenEmbedding(5, 4, rngs=nnx.Rngs(0))
    ids = jnp.array([[0, 3, 4]])
    out = emb(ids)
    assert out.shape == (1, 3, 4)


def test_spatial_broadcast_decoder_clevr_layout():
    dec = SpatialBroadcastDecoder(8, (32, 32), initial_resolution=(4, 4), features=(8, 8, 8, 8),
                                  strides=(2, 2, 2, 1), rngs=nnx.Rngs(0))
    slots = jax.random.normal(jax.random.key(0), (2, 3, 8))
    recon, recons, masks = dec(slots)
    assert recon.shape == (2, 32, 32, 3)
    assert recons.shape == (2, 3, 32, 32, 3) and masks.shape == (2, 3, 32, 32, 1)
    np.testing.assert_allclose(masks.sum(1), 1.0, atol=1e-6)
    np.testing.assert_allclose(recon, (recons * masks).sum(1), atol=1e-5)
    expected = (4 * 8 + 8) + 4 * (25 * 8 * 8 + 8) + (9 * 8 * 4 + 4)
    assert _num_params(dec) == expected


def test_spatial_broadcast_decoder_full_resolution_and_slot_permutation():
    dec = SpatialBroadcastDecoder(6, (8, 8), initial_resolution=(8, 8), features=(8, 8),
                                  strides=(1, 1), rngs=nnx.Rngs(1))
    slots = jax.random.normal(jax.random.key(0), (1, 4, 6))
    recon, recons, masks = dec(slots)
    perm = jnp.array([2, 0, 3, 1])
    recon_p, recons_p, masks_p = dec(slots[:, perm])
    # The decoder treats slots as a set: outputs permute with them, the image is invariant.
    np.testing.assert_allclose(recon_p, recon, atol=1e-5)
    np.testing.assert_allclose(recons_p, recons[:, perm], atol=1e-5)
    np.testing.assert_allclose(masks_p, masks[:, perm], atol=1e-6)


def test_decoder_rejects_inconsistent_resolution():
    with pytest.raises(ValueError):
        SpatialBroadcastDecoder(8, (128, 128), initial_resolution=(8, 8), strides=(2, 2, 2, 1, 1),
                                rngs=nnx.Rngs(0))


def test_broadcast_and_composite_helpers():
    slots = jnp.arange(12.0).reshape(2, 3, 2)
    grid = spatial_broadcast(slots, (4, 5))
    assert grid.shape == (6, 4, 5, 2)
    np.testing.assert_array_equal(grid[4, 3, 2], slots[1, 1])
    x = jnp.zeros((6, 4, 5, 4)).at[:, :, :, 3].set(jnp.arange(6.0)[:, None, None])
    recon, recons, masks = alpha_composite(x, 2)
    np.testing.assert_allclose(masks.sum(1), 1.0, atol=1e-6)
    np.testing.assert_allclose(masks[0, :, 0, 0, 0], jax.nn.softmax(jnp.arange(3.0)), atol=1e-6)
