"""The state that crosses the jit boundary: pure arrays, a flat optimizer equal to the per-leaf
one, and the lr_scale multiplier."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from fixed_slots import sharding
from fixed_slots.models.slate import Slate
from fixed_slots.train.optim import learning_rates, make_optimizer, param_labels, plateau_scale
from fixed_slots.train.train_step import (
    TrainState,
    apply_updates,
    build,
    model_from_params,
    split_params,
    with_lr_scale,
)
from helpers import load_config


def tiny_config(**optim):
    config = load_config("default:tiny")
    config.train.num_devices = 1
    config.optim.update(optim)
    return config


def image_batch(config, mesh, seed=0):
    size = config.data.image_size
    rng = np.random.default_rng(seed)
    return sharding.put_batch(
        {"image": rng.random((config.train.batch_size, size, size, 3), np.float32)}, mesh)


def is_variable(x):
    return isinstance(x, nnx.Variable)


def test_state_crossing_jit_is_plain_arrays_and_lr_scale_scales_both_groups():
    # decay="validation_plateau": the step also multiplies both groups' updates by lr_scale
    config = tiny_config(decay="validation_plateau", use_warmup=False)
    mesh = sharding.make_mesh(1)
    graphdef, state, step = build(config, mesh, donate=False)
    batch, key = image_batch(config, mesh), jax.random.key(0)
    full, metrics = step(state, batch, key)
    for tree in (state, full, metrics):
        leaves = jax.tree.leaves(tree, is_leaf=is_variable)
        assert leaves and all(isinstance(x, jax.Array) and not is_variable(x) for x in leaves)
        assert "Variable" not in str(jax.tree.structure(tree))
    assert isinstance(full.params, dict)
    # one buffer per parameter group in the Adam moments, whatever the number of params
    assert len(jax.tree.leaves(state.params)) > 50
    assert len(jax.tree.leaves(state.opt_state)) <= 8
    assert int(full.step) == 1 and float(state.lr_scale) == float(full.lr_scale) == 1.0

    half, _ = step(with_lr_scale(state, 0.5), batch, key)
    frozen, _ = step(with_lr_scale(state, 0.0), batch, key)
    assert step._cache_size() == 1  # a new lr_scale is data: same placement, no new entry
    # new - old params: exact halving up to the round-off of params ~1 (ulp 1.2e-7)
    delta = lambda new: jax.tree.map(lambda a, b: a - b, new.params, state.params)
    jax.tree.map(lambda h, f: np.testing.assert_allclose(h, 0.5 * f, rtol=1e-3, atol=1.5e-7),
                 delta(half), delta(full))
    jax.tree.map(np.testing.assert_array_equal, frozen.params, state.params)
    assert int(frozen.step) == 1 and float(frozen.lr_scale) == 0.0  # carried, not reset
    rates = learning_rates(config.optim, 0, lr_scale=half.lr_scale)
    assert rates == pytest.approx({"dvae": config.optim.dvae_lr * 0.5,
                                   "main": config.optim.main_lr * 0.5})
    tx = make_optimizer(config.optim, param_labels(state.params, Slate.learning_rate_group))
    with pytest.raises(TypeError, match="lr_scale"):
        tx.update(state.params, tx.init(state.params), state.params)


def test_split_params_and_model_from_params_round_trip():
    from fixed_slots import models

    model = models.create(tiny_config(), rngs=nnx.Rngs(0))
    graphdef, params = split_params(model)
    assert isinstance(params, dict) and not any(
        is_variable(x) for x in jax.tree.leaves(params, is_leaf=is_variable))
    _, state = nnx.split(model, nnx.Param)
    assert jax.tree.structure(params) == jax.tree.structure(nnx.to_pure_dict(state))
    merged = model_from_params(graphdef, params)
    assert type(merged) is type(model)
    graphdef2, again = split_params(merged)
    assert graphdef2 == graphdef
    jax.tree.map(np.testing.assert_array_equal, again, params)


def optim_config(**overrides):
    c = ml_collections.ConfigDict(dict(
        dvae_lr=3e-4, main_lr=1e-4, use_warmup=True, warmup_steps=3, decay="none",
        decay_half_life=2, plateau_patience=1, plateau_factor=0.5,
        plateau_accumulation_steps=1, clip="none", clip_value=1.0, b1=0.9, b2=0.999, eps=1e-8))
    c.update(overrides)
    return c


def params_tree():
    rng = np.random.default_rng(0)
    shapes = {"dvae": {"conv": {"kernel": (3, 3, 2, 4), "bias": (4,)}, "out": {"kernel": (4, 3)}},
              "decoder": {"blocks": {0: {"w": (5, 6)}, 1: {"w": (6,)}}},
              "slots_mu": (1, 1, 6)}
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s), jnp.float32), shapes,
                        is_leaf=lambda x: isinstance(x, tuple))


@pytest.mark.parametrize("optim", [
    dict(clip="none", decay="none"),
    dict(clip="inf_norm", clip_value=0.5, decay="exponential"),
    dict(clip="global_norm", clip_value=0.5, decay="plateau", use_warmup=False),
    dict(clip="inf_norm", decay="validation_plateau"),
])
def test_flat_optimizer_equals_the_per_leaf_one(optim):
    config = optim_config(**optim)
    params = params_tree()
    labels = param_labels(params, Slate.learning_rate_group)
    flat, per_leaf = make_optimizer(config, labels), make_optimizer(config, labels, flat=False)
    states = {"flat": flat.init(params), "per_leaf": per_leaf.init(params)}
    # a few flat buffers instead of one moment pair per leaf
    assert len(jax.tree.leaves(states["flat"])) < len(jax.tree.leaves(states["per_leaf"]))
    updates_fns = {"flat": jax.jit(flat.update), "per_leaf": jax.jit(per_leaf.update)}
    rng = np.random.default_rng(1)
    for step in range(6):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * 3, jnp.float32),
                             params)
        extra = {"plateau": {"value": jnp.float32([1.0, 2.0, 2.0, 2.0, 0.5, 3.0][step])},
                 "validation_plateau": {"lr_scale": jnp.float32(0.5 ** (step // 2))}
                 }.get(config.decay, {})
        out = {}
        for name in ("flat", "per_leaf"):
            out[name], states[name] = updates_fns[name](grads, states[name], params, **extra)
        assert jax.tree.structure(out["flat"]) == jax.tree.structure(params)
        # Adam and the scalings are elementwise, the inf-norm a max: the same numbers up to
        # float32 round-off (the L2 clip sums in another order; XLA may contract differently).
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-12),
                     out["flat"], out["per_leaf"])
        params = optax.apply_updates(params, out["flat"])
    assert plateau_scale(states["flat"]) == plateau_scale(states["per_leaf"])
    if config.decay == "plateau":
        assert plateau_scale(states["flat"]) < 1.0  # the plateau fired inside the flat chain


def test_flat_optimizer_accepts_nnx_state_labels_for_pure_dict_params():
    class Model(nnx.Module):
        def __init__(self, rngs):
            self.dvae = nnx.Linear(2, 3, rngs=rngs)
            self.decoder = nnx.Linear(3, 2, rngs=rngs)

    model = Model(nnx.Rngs(0))
    _, state = nnx.split(model, nnx.Param)
    _, pure = split_params(model)
    # labelled from the nnx.State (its leaves sit under `.value`), applied to the pure dict
    tx = make_optimizer(optim_config(use_warmup=False),
                        param_labels(state, Slate.learning_rate_group))
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, pure), tx.init(pure), pure)
    np.testing.assert_allclose(updates["dvae"]["kernel"], -3e-4, rtol=1e-4)
    np.testing.assert_allclose(updates["decoder"]["bias"], -1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="no parameter-group label"):
        tx.init({"other": jnp.ones(2)})


def test_train_state_create_from_nnx_state_is_pure():
    from fixed_slots import models

    config = tiny_config()
    _, params = nnx.split(models.create(config, rngs=nnx.Rngs(0)), nnx.Param)
    labels = param_labels(params, Slate.learning_rate_group)
    state = TrainState.create(params, make_optimizer(config.optim, labels))
    assert isinstance(state.params, dict)
    assert not any(is_variable(x) for x in jax.tree.leaves(state, is_leaf=is_variable))


@pytest.mark.parametrize("name", ["default:tiny", "slot_autoencoder_synthetic:tiny"])
def test_step_builder_is_build_in_two_halves(name):
    """The trainer's StepBuilder: its abstract state is the initial state's shapes, dtypes and
    shardings (what the step compiles for before any parameter exists), and its initial state
    is `build`'s, bit for bit."""
    from fixed_slots.train.train_step import StepBuilder, build

    config = load_config(name)
    mesh = sharding.make_mesh(2)
    builder = StepBuilder(config, mesh)
    state = builder.initial_state()
    graphdef, reference, _ = build(config, mesh)
    assert builder.graphdef == graphdef
    assert jax.tree.structure(builder.abstract_state) == jax.tree.structure(state)
    for abstract, leaf, ref in zip(jax.tree.leaves(builder.abstract_state),
                                   jax.tree.leaves(state), jax.tree.leaves(reference)):
        assert (abstract.shape, abstract.dtype, abstract.weak_type) == (
            leaf.shape, leaf.dtype, leaf.weak_type)
        assert abstract.sharding == leaf.sharding
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(ref))


def test_apply_updates_takes_a_finite_step_and_refuses_any_that_would_overflow():
    params = {"a": jnp.array([1.0, -2.0], jnp.float32), "b": {"c": jnp.full((2, 2), 3.0)}}
    updates = {"a": jnp.array([0.5, 0.25], jnp.float32), "b": {"c": jnp.full((2, 2), -1.0)}}
    one, zero = jnp.float32(1.0), jnp.float32(0.0)
    new, finite = apply_updates(params, updates, one, one)
    assert bool(finite)
    jax.tree.map(lambda n, p, u: np.testing.assert_array_equal(n, p + u), new, params, updates)

    def refused(params, updates, loss=one, grad_norm=zero):
        new, finite = jax.jit(apply_updates)(params, updates, loss, grad_norm)
        jax.tree.map(np.testing.assert_array_equal, new, params)  # nothing changed
        return not bool(finite)

    big = jnp.float32(2e38)  # finite, but big + big overflows float32
    assert refused({"a": jnp.array([big, 0.0])}, {"a": jnp.array([big, 0.0])})
    assert refused({"a": jnp.array([-big])}, {"a": jnp.array([-big])})
    assert refused(params, {"a": jnp.array([jnp.nan, 0.0]), "b": updates["b"]})
    assert refused(params, updates, loss=jnp.float32(jnp.inf))
    assert refused(params, updates, grad_norm=jnp.float32(jnp.nan))
    # the largest steps that stay finite are taken
    new, finite = apply_updates({"a": jnp.array([1e38])}, {"a": jnp.array([2e38])}, one, one)
    assert bool(finite) and np.isfinite(np.asarray(new["a"])).all()
