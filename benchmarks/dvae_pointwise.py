"""The dVAE's forward + backward with its 1x1 convolutions as convolutions vs as matmuls.

`fixed_slots.modules.dvae.Conv2d` runs a 1x1, stride-1 convolution as a dot over the channels
(same parameters, same function). This times one jitted value-and-grad of the dVAE (encoder,
softmax, decoder, MSE) both ways in one process, interleaved call by call so that machine noise
falls on both alike, and checks the two gradients agree.

  python benchmarks/dvae_pointwise.py                         # the README's default: 48x48, batch 16
  python benchmarks/dvae_pointwise.py --image_size=96 --batch=50 --repeats=10   # the paper's setting
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from fixed_slots.modules import dvae


def make_step(model: dvae.DVAE, pointwise_as_matmul: bool):
    graphdef, params = nnx.split(model)
    call = dvae.Conv2d.__call__ if pointwise_as_matmul else nnx.Conv.__call__

    def loss(params, x):
        saved = dvae.Conv2d.__call__
        dvae.Conv2d.__call__ = call  # only while tracing: the compiled step keeps the choice
        try:
            m = nnx.merge(graphdef, params)
            rec = m.decoder(jax.nn.softmax(m.encoder(x)))
        finally:
            dvae.Conv2d.__call__ = saved
        return jnp.mean((rec - x) ** 2)

    return jax.jit(jax.value_and_grad(loss)), params


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image_size", type=int, default=48)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)

    model = dvae.DVAE(args.vocab, 3, args.hidden, rngs=nnx.Rngs(0))
    x = jax.random.uniform(jax.random.key(0), (args.batch, args.image_size, args.image_size, 3))
    steps = {name: make_step(model, flag) for name, flag in (("conv", False), ("matmul", True))}
    outputs = {name: jax.block_until_ready(step(params, x)) for name, (step, params) in
               steps.items()}
    worst = max(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30)) for a, b in
                zip(jax.tree.leaves(outputs["matmul"]), jax.tree.leaves(outputs["conv"])))
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, (step, params) in steps.items():
            start = time.perf_counter()
            jax.block_until_ready(step(params, x))
            times[name].append(1e3 * (time.perf_counter() - start))
    device = jax.devices()[0]
    print(f"# dVAE fwd+bwd, {args.image_size}x{args.image_size}, batch {args.batch}, hidden "
          f"{args.hidden}, vocab {args.vocab}; {device.device_kind} ({jax.default_backend()}), "
          f"jax {jax.__version__}, {time.strftime('%Y-%m-%d')}; {args.repeats} interleaved calls")
    print("| 1x1 convolutions as | median ms | min ms |\n|---|---|---|")
    for name, t in times.items():
        print(f"| {name} | {statistics.median(t):.1f} | {min(t):.1f} |")
    print(f"worst relative difference of the loss and gradients: {worst:.1e}")
    return {"times_ms": times, "worst_relative_difference": worst}


if __name__ == "__main__":
    main()
