"""The SLATE optimiser: groups, warmup, decay, clipping (each switchable for Fig. 5)."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from fixed_slots.train.optim import (
    clip_by_inf_norm,
    global_norm,
    inf_norm,
    learning_rates,
    make_optimizer,
    param_labels,
    schedule,
)


def optim_config(**overrides) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(dict(
        dvae_lr=3e-4, main_lr=1e-4, use_warmup=True, warmup_steps=10, decay="none",
        decay_half_life=100, plateau_patience=2, plateau_factor=0.5,
        plateau_accumulation_steps=1, clip="none", clip_value=1.0, b1=0.9, b2=0.999, eps=1e-8))
    c.update(overrides)
    return c


def params():
    return {"dvae": {"w": jnp.ones(3)}, "decoder": {"w": jnp.ones(3)}}


def group_of(path):
    return "dvae" if path[0] == "dvae" else "main"


def first_updates(config, grads_value=2.0, **update_kw):
    p = params()
    tx = make_optimizer(config, param_labels(p, group_of))
    grads = jax.tree.map(lambda x: jnp.full_like(x, grads_value), p)
    updates, _ = tx.update(grads, tx.init(p), p, **update_kw)
    return updates


def test_labels_come_from_the_models_groups_on_dicts_and_nnx_state():
    assert param_labels(params(), group_of) == {"dvae": {"w": "dvae"}, "decoder": {"w": "main"}}

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.dvae = nnx.Linear(2, 3, rngs=rngs)
            self.decoder = nnx.Linear(3, 2, rngs=rngs)

    _, state = nnx.split(Model(nnx.Rngs(0)), nnx.Param)
    flat = dict(jax.tree_util.tree_flatten_with_path(param_labels(state, group_of))[0])
    by_module = {jax.tree_util.keystr(path[:1]): label for path, label in flat.items()}
    assert by_module == {"['dvae']": "dvae", "['decoder']": "main"}
    assert len(flat) == 4
    # The optimizer accepts a labels pytree or a labels function.
    for labels in (param_labels(state, group_of), lambda tree: param_labels(tree, group_of)):
        tx = make_optimizer(optim_config(use_warmup=False), labels)
        updates, _ = tx.update(jax.tree.map(jnp.ones_like, state), tx.init(state), state)
        np.testing.assert_allclose(updates["dvae"]["kernel"][...], -3e-4, rtol=1e-4)
        np.testing.assert_allclose(updates["decoder"]["kernel"][...], -1e-4, rtol=1e-4)


def test_dvae_group_is_never_warmed_up_and_main_warms_linearly():
    c = optim_config()
    assert learning_rates(c, 0) == pytest.approx({"dvae": 3e-4, "main": 1e-4 * 1 / 10})
    assert learning_rates(c, 4) == pytest.approx({"dvae": 3e-4, "main": 1e-4 * 5 / 10})
    assert learning_rates(c, 9) == pytest.approx({"dvae": 3e-4, "main": 1e-4})
    assert learning_rates(c, 50) == pytest.approx({"dvae": 3e-4, "main": 1e-4})
    assert learning_rates(optim_config(use_warmup=False), 0) == pytest.approx(
        {"dvae": 3e-4, "main": 1e-4})
    # Adam's first step is -lr * sign(g) (bias-corrected): the warmed-up rate, dVAE at full rate.
    updates = first_updates(c)
    np.testing.assert_allclose(updates["dvae"]["w"], -3e-4, rtol=1e-4)
    np.testing.assert_allclose(updates["decoder"]["w"], -1e-5, rtol=1e-4)


def test_exponential_decay_half_life_on_both_groups():
    c = optim_config(decay="exponential", decay_half_life=100, use_warmup=False)
    assert learning_rates(c, 0) == pytest.approx({"dvae": 3e-4, "main": 1e-4})
    assert learning_rates(c, 100) == pytest.approx({"dvae": 1.5e-4, "main": 0.5e-4})
    assert learning_rates(c, 250) == pytest.approx({"dvae": 3e-4 * 2 ** -2.5,
                                                    "main": 1e-4 * 2 ** -2.5})
    # Locatello's single-group setting: warmup 10k then 0.5 per 100k, from step 0.
    loc = optim_config(main_lr=4e-4, warmup_steps=10_000, decay="exponential",
                       decay_half_life=100_000)
    assert learning_rates(loc, 4_999)["main"] == pytest.approx(4e-4 * 0.5 * 0.5 ** 0.04999)
    assert learning_rates(loc, 200_000)["main"] == pytest.approx(1e-4)


def test_single_group_model_has_an_empty_dvae_group():
    p = {"encoder": {"w": jnp.ones(2)}, "slot_attention": {"mu": jnp.ones(4)}}
    tx = make_optimizer(optim_config(use_warmup=False, clip="global_norm"),
                        param_labels(p, lambda path: "main"))
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, p), tx.init(p), p)
    for leaf in jax.tree.leaves(updates):
        np.testing.assert_allclose(leaf, -1e-4, rtol=1e-4)


def test_inf_norm_clipping_matches_hand_computation():
    grads = {"a": jnp.array([3.0, -4.0]), "b": jnp.array([[0.5]])}
    assert float(inf_norm(grads)) == 4.0
    assert float(global_norm(grads)) == pytest.approx(np.sqrt(9 + 16 + 0.25))
    clipped, _ = clip_by_inf_norm(1.0).update(grads, optax.EmptyState())
    scale = 1.0 / (4.0 + 1e-6)
    np.testing.assert_allclose(clipped["a"], np.array([3.0, -4.0]) * scale, rtol=1e-6)
    np.testing.assert_allclose(clipped["b"], np.array([[0.5]]) * scale, rtol=1e-6)
    small = {"a": jnp.array([0.1, -0.2])}
    same, _ = clip_by_inf_norm(1.0).update(small, optax.EmptyState())
    np.testing.assert_array_equal(same["a"], small["a"])


def test_clipping_in_the_chain_and_off_leaves_grads_unchanged():
    # With b1=0, b2=0 and eps=0 Adam's update is -lr * g / |g|: clipping is invisible. With
    # lr=1 and b1=b2=0, eps large, the update is ~ -g / eps: it shows the clipped grads.
    base = dict(use_warmup=False, dvae_lr=1.0, main_lr=1.0, b1=0.0, b2=0.0, eps=1e6)
    p = params()
    grads = {"dvae": {"w": jnp.array([3.0, -4.0, 0.5])}, "decoder": {"w": jnp.array([0., 1., 2.])}}

    def effective_grads(**kw):
        tx = make_optimizer(optim_config(**base, **kw), param_labels(p, group_of))
        updates, _ = tx.update(grads, tx.init(p), p)
        return jax.tree.map(lambda u: -u * 1e6, updates)  # |g| << eps: update ~ -g / eps

    off = effective_grads(clip="none")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), off, grads)
    inf = effective_grads(clip="inf_norm", clip_value=1.0)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b / (4 + 1e-6), rtol=1e-5), inf, grads)
    l2 = effective_grads(clip="global_norm", clip_value=1.0)
    norm = float(global_norm(grads))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b / norm, rtol=1e-5), l2, grads)


def test_plateau_halves_after_patience_windows_of_no_improvement():
    c = optim_config(decay="plateau", plateau_patience=2, use_warmup=False)
    p = params()
    tx = make_optimizer(c, param_labels(p, group_of))
    state = tx.init(p)
    assert learning_rates(c, 0, opt_state=state) == pytest.approx({"dvae": 3e-4, "main": 1e-4})
    grads = jax.tree.map(jnp.ones_like, p)
    update = jax.jit(tx.update)
    scales = []
    for loss in (1.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.1):
        updates, state = update(grads, state, p, value=jnp.float32(loss))
        scales.append(learning_rates(c, 0, opt_state=state)["main"] / 1e-4)
    # Improvements at 1.0, 0.5 and 0.1; every 2 stalled windows halve (and restart the count).
    assert scales == pytest.approx([1.0, 1.0, 1.0, 0.5, 0.5, 0.25, 0.25])
    assert learning_rates(c, 0, opt_state=state)["dvae"] == pytest.approx(3e-4 / 4)
    np.testing.assert_allclose(updates["dvae"]["w"], -3e-4 / 4, rtol=1e-3)
    with pytest.raises(TypeError, match="value"):
        make_optimizer(c, param_labels(p, group_of)).update(grads, state, p)  # the monitored loss is required


def test_plateau_accumulates_windows():
    c = optim_config(decay="plateau", plateau_patience=1, plateau_accumulation_steps=3)
    p = params()
    tx = make_optimizer(c, param_labels(p, group_of))
    state = tx.init(p)
    grads = jax.tree.map(jnp.ones_like, p)
    scales = []
    for _ in range(6):
        _, state = tx.update(grads, state, p, value=jnp.float32(1.0))
        scales.append(learning_rates(c, 0, opt_state=state)["dvae"] / 3e-4)
    assert scales == pytest.approx([1, 1, 1, 1, 1, 0.5])  # windows end at updates 3 and 6


@pytest.mark.parametrize("key,value", [("clip", "l3"), ("decay", "cosine")])
def test_unknown_values_raise(key, value):
    with pytest.raises(ValueError, match=f"config.optim.{key}"):
        make_optimizer(optim_config(**{key: value}), param_labels(params(), group_of))


def _official_warmup(step, start_value, final_value, start_step, final_step):
    """singhgautam/slate train.py's linear_warmup, transcribed."""
    if step < start_step:
        return start_value
    if step >= final_step:
        return final_value
    progress = (step + 1 - start_step) / (final_step - start_step)
    return (final_value - start_value) * progress + start_value


@pytest.mark.parametrize("step", [0, 1, 100, 7500, 15000, 29999, 30000, 50000])
def test_main_group_warmup_is_the_official_factor_and_dvae_is_never_warmed(step):
    c = optim_config(warmup_steps=30_000)
    expected = 1e-4 * _official_warmup(step, 0.0, 1.0, 0, 30_000)
    assert float(schedule(c, "main")(step)) == pytest.approx(expected, rel=1e-6, abs=1e-15)
    assert float(schedule(c, "dvae")(step)) == pytest.approx(3e-4)
