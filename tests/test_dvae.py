"""SLATE dVAE: shapes, parameter count vs the official layer list, Gumbel-softmax, schedules."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fixed_slots.modules.dvae import (
    DVAE, Conv2d, Conv2dBlock, argmax, conv2d, cosine_anneal, gumbel_max, gumbel_softmax,
    pixel_shuffle)


def _num_params(module: nnx.Module) -> int:
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(module, nnx.Param)))


def _official_dvae_params(vocab: int, c: int = 3, h: int = 64) -> int:
    # Conv2dBlock(in, out, k): k*k*in*out conv weights (no bias) + GroupNorm scale and shift.
    def block(i, o, k):
        return k * k * i * o + 2 * o

    enc = block(c, h, 4) + 6 * block(h, h, 1) + (h * vocab + vocab)
    dec_stage = block(h, h, 3) + 2 * block(h, h, 1) + block(h, 4 * h, 1)
    dec = block(vocab, h, 1) + 2 * dec_stage + (h * c + c)
    return enc + dec


def test_shapes_and_param_count():
    vocab = 20
    model = DVAE(vocab, rngs=nnx.Rngs(0))
    image = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3))
    log_probs = model.encode(image)
    assert log_probs.shape == (2, 4, 4, vocab)
    np.testing.assert_allclose(jnp.exp(log_probs).sum(-1), 1.0, rtol=1e-5)
    recon = model.decode(jax.nn.one_hot(jnp.argmax(log_probs, -1), vocab))
    assert recon.shape == (2, 16, 16, 3)
    assert _num_params(model) == _official_dvae_params(vocab)
    recon2, lp2 = model(image, jax.random.key(2), tau=1.0, hard=True)
    assert recon2.shape == image.shape and lp2.shape == log_probs.shape


def test_official_default_param_count():
    # vocab 1024 at d 64: counted without building (eval_shape keeps it instant).
    abstract = nnx.eval_shape(lambda: DVAE(1024, rngs=nnx.Rngs(0)))
    assert _num_params(abstract) == _official_dvae_params(1024)


def test_conv_block_init_and_groupnorm():
    block = Conv2dBlock(8, 16, 3, 1, 1, rngs=nnx.Rngs(0))
    w = block.conv.kernel[...]
    assert w.shape == (3, 3, 8, 16) and block.conv.bias is None
    bound = math.sqrt(6.0 / (3 * 3 * 8))  # Kaiming-uniform, ReLU gain
    assert float(jnp.abs(w).max()) <= bound and float(jnp.abs(w).max()) > 0.8 * bound
    x = jax.random.normal(jax.random.key(0), (2, 5, 5, 8)) * 3.0 + 1.0
    pre = block.conv(x)
    normed = block.norm(pre)
    # One group: zero mean / unit variance over (H, W, C) of each image.
    np.testing.assert_allclose(normed.mean(axis=(1, 2, 3)), 0.0, atol=1e-5)
    np.testing.assert_allclose(normed.var(axis=(1, 2, 3)), 1.0, atol=1e-3)
    assert float(block(x).min()) >= 0.0


@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
def test_pointwise_conv_as_matmul_is_nnx_conv(use_bias, dtype):
    """The 1x1 case runs as a dot: the same values and gradients as nnx.Conv's convolution."""
    jax.config.update("jax_enable_x64", True)
    try:
        conv = conv2d(5, 7, 1, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float64,
                      rngs=nnx.Rngs(0))
        assert conv._is_pointwise()
        if use_bias:  # a nonzero bias, so a dropped or misplaced bias shows
            conv.bias[...] = jnp.arange(7, dtype=jnp.float64) / 7
        x = jax.random.normal(jax.random.key(1), (2, 3, 4, 5), jnp.float64)
        graphdef, params = nnx.split(conv)

        def loss(call, p, x):
            y = call(nnx.merge(graphdef, p), x)
            return jnp.sum(jnp.sin(y.astype(jnp.float64))), y

        (ours, y), g_ours = jax.value_and_grad(loss, argnums=(1, 2), has_aux=True)(
            Conv2d.__call__, params, x)
        (ref, y_ref), g_ref = jax.value_and_grad(loss, argnums=(1, 2), has_aux=True)(
            nnx.Conv.__call__, params, x)
        assert y.dtype == y_ref.dtype and y.shape == y_ref.shape == (2, 3, 4, 7)
        tol = 1e-12 if dtype is None else 2e-2
        np.testing.assert_allclose(np.asarray(y, np.float64), np.asarray(y_ref, np.float64),
                                   rtol=tol, atol=tol)
        for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref)):
            np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                                       rtol=tol, atol=tol * 10)
    finally:
        jax.config.update("jax_enable_x64", False)


def test_pointwise_conv_is_reverse_mode_only_as_documented():
    conv = conv2d(3, 4, 1, rngs=nnx.Rngs(0))
    x = jnp.ones((1, 2, 2, 3), jnp.float32)
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(conv, (x,), (x,))


def test_only_pointwise_convs_take_the_matmul_path():
    rngs = nnx.Rngs(0)
    assert not conv2d(4, 4, 3, 1, 1, rngs=rngs)._is_pointwise()
    assert not conv2d(4, 4, 1, 2, rngs=rngs)._is_pointwise()  # strided
    assert not conv2d(4, 4, 1, 1, 1, rngs=rngs)._is_pointwise()  # padded
    assert not conv2d(4, 4, 4, 4, rngs=rngs)._is_pointwise()
    strided = conv2d(4, 6, 1, 2, rngs=rngs)
    x = jax.random.normal(jax.random.key(0), (1, 6, 6, 4))
    assert strided(x).shape == (1, 3, 3, 6)


def test_pixel_shuffle_matches_torch_layout():
    # torch: out[c, h*r + i, w*r + j] = in[c*r*r + i*r + j, h, w]
    b, h, w, c, r = 1, 2, 3, 2, 2
    x = jnp.arange(b * h * w * c * r * r, dtype=jnp.float32).reshape(b, h, w, c * r * r)
    y = pixel_shuffle(x, r)
    assert y.shape == (b, h * r, w * r, c)
    for ci in range(c):
        for hi in range(h):
            for wi in range(w):
                for i in range(r):
                    for j in range(r):
                        src = x[0, hi, wi, ci * r * r + i * r + j]
                        assert y[0, hi * r + i, wi * r + j, ci] == src


def test_gumbel_softmax_soft_hard_and_straight_through():
    key = jax.random.key(0)
    logits = jax.random.normal(jax.random.key(1), (4, 7))
    soft = gumbel_softmax(key, logits, tau=0.5, hard=False)
    np.testing.assert_allclose(soft.sum(-1), 1.0, rtol=1e-6)
    hard = gumbel_softmax(key, logits, tau=0.5, hard=True)
    np.testing.assert_array_equal(hard, jax.nn.one_hot(jnp.argmax(soft, -1), 7))
    # Same key -> the hard sample is the argmax of the soft one; gradient is the soft one's.
    w = jax.random.normal(jax.random.key(2), (4, 7))
    g_hard = jax.grad(lambda l: jnp.sum(w * gumbel_softmax(key, l, 0.5, True)))(logits)
    g_soft = jax.grad(lambda l: jnp.sum(w * gumbel_softmax(key, l, 0.5, False)))(logits)
    np.testing.assert_allclose(g_hard, g_soft, rtol=1e-6)
    assert float(jnp.abs(g_hard).sum()) > 0.0
    # Axis argument: sampling over the channel axis of an NCHW-like tensor.
    s = gumbel_softmax(key, jnp.zeros((2, 5, 3, 3)), 1.0, True, axis=1)
    np.testing.assert_array_equal(s.sum(1), 1.0)


def test_gumbel_max_distribution():
    logits = jnp.log(jnp.array([0.7, 0.2, 0.1]))
    idx = gumbel_max(jax.random.key(0), jnp.broadcast_to(logits, (20000, 3)))
    freq = jnp.bincount(idx, length=3) / idx.size
    np.testing.assert_allclose(freq, [0.7, 0.2, 0.1], atol=0.02)


def _official_cosine(step, start_value, final_value, start_step, final_step):
    if step < start_step:
        return start_value
    if step >= final_step:
        return final_value
    a = 0.5 * (start_value - final_value)
    b = 0.5 * (start_value + final_value)
    progress = (step - start_step) / (final_step - start_step)
    return a * math.cos(math.pi * progress) + b


@pytest.mark.parametrize("step", [0, 1, 100, 7500, 15000, 29999, 30000, 50000])
def test_schedules_match_official(step):
    args = (1.0, 0.1, 0, 30000)
    assert cosine_anneal(step, *args) == pytest.approx(_official_cosine(step, *args), abs=1e-12)
    traced = jax.jit(lambda s: cosine_anneal(s, *args))(jnp.int32(step))
    assert float(traced) == pytest.approx(_official_cosine(step, *args), abs=1e-6)


def test_schedules_with_offset_start():
    for step in [0, 9, 10, 11, 19, 20, 25]:
        assert cosine_anneal(step, 2.0, 0.5, 10, 20) == pytest.approx(
            _official_cosine(step, 2.0, 0.5, 10, 20))
        assert float(cosine_anneal(jnp.asarray(step), 2.0, 0.5, 10, 20)) == pytest.approx(
            _official_cosine(step, 2.0, 0.5, 10, 20), abs=1e-6)


def test_argmax_equals_jnp_argmax_with_ties_and_nans():
    x = jax.random.normal(jax.random.key(3), (4, 5, 7))
    x = x.at[0, 0, 2].set(9.0).at[0, 0, 5].set(9.0)  # a tie: the first index wins
    x = x.at[1, 2, 4].set(jnp.nan).at[1, 2, 6].set(jnp.nan)  # the first NaN wins
    x = x.at[2, 1].set(-jnp.inf).at[3, 3].set(1.0)  # all -inf; all equal
    for axis in (0, 1, 2, -1):
        np.testing.assert_array_equal(argmax(x, axis), jnp.argmax(x, axis))
