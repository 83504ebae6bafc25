"""float32 gradients against a float64 run of the same model: exact up to float32 round-off.

Flax's normalisation layers default to the one-pass variance E[x^2] - E[x]^2, which cancels in
float32 when a layer's input has a large mean next to its spread (it cost ~1% of the dVAE's
gradients against the official code). These tests give a norm layer exactly such an input and
compare every parameter's float32 gradient with float64 (`jax.enable_x64`, params cast up, the
same noise: the models draw their Gumbel and slot noise in float32 whatever their dtype).
With the one-pass variance they fail (relative errors ~1e-4 to 1e-2); with the two-pass variance
of `fixed_slots.modules.norms` every leaf is within 1e-5.
"""
import jax
import jax.numpy as jnp
import jax.tree_util as tu
import numpy as np
import pytest
from flax import nnx

from fixed_slots import models
from fixed_slots.modules.dvae import DVAE
from helpers import load_config, synthetic_scenes

TOLERANCE = 1e-5  # relative, per parameter leaf


def _relative_errors(g32, g64) -> dict[str, float]:
    """Parameter path -> ||g32 - g64|| / ||g64|| (in float64).

    A leaf whose exact gradient is zero (slot attention's pre-query LayerNorm bias: the softmax
    over slots cancels it) is measured against 1e-3 of the whole gradient's norm instead of its
    own round-off-sized one.
    """
    leaves32 = [np.asarray(a, np.float64) for a in jax.tree.leaves(g32)]
    leaves64 = [np.asarray(b, np.float64) for b in jax.tree.leaves(g64)]
    floor = 1e-3 * np.sqrt(sum(np.sum(b * b) for b in leaves64))
    paths = [tu.keystr(path) for path, _ in tu.tree_leaves_with_path(g32)]
    return {path: float(np.linalg.norm(a - b) / max(np.linalg.norm(b), floor))
            for path, a, b in zip(paths, leaves32, leaves64)}


def _offset(params, prefix: str, value: float):
    """params with `value` added to the leaf whose path starts with `prefix` (one leaf)."""
    hits = []

    def add(path, leaf):
        if tu.keystr(path).startswith(prefix):
            hits.append(path)
            return leaf + value
        return leaf

    out = tu.tree_map_with_path(add, params)
    assert len(hits) == 1, (prefix, hits)
    return out


def _float32_vs_float64(loss, params, *inputs) -> dict[str, float]:
    """Per-leaf relative error of grad(loss) in float32 against the same in float64."""
    g32 = jax.jit(jax.grad(loss))(params, *inputs)
    with jax.enable_x64(True):
        up = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)  # noqa: E731
        g64 = jax.jit(jax.grad(loss))(up(params), *up(inputs))
        for leaf in jax.tree.leaves(g64):
            assert leaf.dtype == jnp.float64  # the reference really ran in float64
        return _relative_errors(g32, g64)


def _worst(errors: dict[str, float]) -> str:
    path, value = max(errors.items(), key=lambda kv: kv[1])
    return f"worst leaf {path}: {value:.2e}"


def test_every_norm_layer_uses_the_two_pass_variance():
    """No model builds a LayerNorm/GroupNorm outside fixed_slots.modules.norms."""
    seen = 0
    for name in ("default:tiny", "slot_autoencoder_synthetic:tiny",
                 "set_prediction_synthetic:tiny"):
        model = models.create(load_config(name), rngs=nnx.Rngs(0))
        for path, node in nnx.iter_graph(model):
            if isinstance(node, (nnx.LayerNorm, nnx.GroupNorm)):
                seen += 1
                assert node.use_fast_variance is False, (name, path)
    assert seen >= 10


def test_dvae_float32_gradients_match_float64_with_a_large_mean_input_to_a_norm():
    vocab, image_size = 16, 16
    model = DVAE(vocab, 3, 8, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    # A constant on the decoder's first 1x1 kernel: for one-hot tokens its outputs (exact in
    # float32) have mean ~7 next to a spread of ~0.4, what GroupNorm then normalises.
    params = _offset(params, "['decoder']['layers'][0]['conv']['kernel']", 7.0)
    image = jax.random.uniform(jax.random.key(1), (2, image_size, image_size, 3))
    tokens = jax.random.randint(jax.random.key(2), (2, image_size // 4, image_size // 4), 0, vocab)
    one_hot = jax.nn.one_hot(tokens, vocab)

    def loss(params, image, one_hot):
        dvae = nnx.merge(graphdef, params)
        recon = dvae.decode(one_hot)
        log_probs = dvae.encode(image)
        return jnp.sum((image - recon) ** 2) - jnp.sum(log_probs * one_hot)

    errors = _float32_vs_float64(loss, params, image, one_hot)
    assert max(errors.values()) < TOLERANCE, _worst(errors)


@pytest.mark.parametrize("grad", ["neumann1", "unroll"])
def test_slate_float32_gradients_match_float64_with_a_large_mean_input_to_a_norm(grad):
    config = load_config("default:tiny")
    config.grad = grad
    config.slate.dropout = 0.0  # dropout masks are the only noise drawn in the float dtype
    model = models.create(config, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    # Token embeddings N(0, 1) shifted by 30: the LayerNorms reading them (the slot-attention
    # encoder's and the decoder's first) see a mean 30x their spread.
    params = _offset(params, "['dictionary']['embed']['embedding']", 30.0)
    images, _ = synthetic_scenes(config, n=2)

    def loss(params, image):
        out = nnx.merge(graphdef, params)({"image": image}, jax.random.key(3), jnp.int32(0))
        return out.loss

    errors = _float32_vs_float64(loss, params, images)
    assert max(errors.values()) < TOLERANCE, _worst(errors)
