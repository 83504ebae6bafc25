"""Shared test helpers: loading config files the way main.py does."""
import pathlib

from fixed_slots import configlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_config(name: str):
    """configs/<name>.py -> its get_config() (unlocked, as tests override freely); "name:variant"
    (e.g. "default:tiny") -> get_config("variant"), as main.py's --config=FILE:VARIANT."""
    name, sep, variant = name.partition(":")
    return configlib.from_file(str(ROOT / "configs" / f"{name}.py") + sep + variant)


def adam_losses(model, batch, steps: int = 25, learning_rate: float = 3e-3) -> list[float]:
    """Losses of `steps` jitted Adam steps of an NNX model on one fixed batch."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.adam(learning_rate)
    key = jax.random.key(0)

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(
            lambda p: nnx.merge(graphdef, p)(batch, key, jnp.int32(0)).loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = tx.init(params)
    losses = []
    for _ in range(steps):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    return losses


def synthetic_scenes(config, n: int = 4):
    """(images float32 [n, H, W, 3] in [0, 1], the generator's raw dict) for config.data."""
    import jax.numpy as jnp

    from fixed_slots.data.synthetic import generate_batch

    d = config.data
    raw = generate_batch(range(n), seed=0, image_size=d.image_size, min_objects=d.min_objects,
                         max_objects=d.max_objects)
    return jnp.asarray(raw["image"], jnp.float32) / 255.0, raw
