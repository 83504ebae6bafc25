"""`jnp.argmax` against `fixed_slots.modules.dvae.argmax` (max + first-index min) on the CPU.

The Gumbel-max tokens of the README's default run: noise added to [16, 12, 12, 64]
log-probabilities, the index of the maximum over the vocabulary. Both jitted, the same indices
(checked), calls interleaved so that machine noise falls on both alike.

  python benchmarks/argmax_cpu.py
  python benchmarks/argmax_cpu.py --shape=50,24,24,1024   # the paper's setting
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

from fixed_slots.modules import dvae


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="16,12,12,64", help="logits shape, vocabulary last")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    shape = tuple(int(s) for s in args.shape.split(","))
    logits = jax.nn.log_softmax(jax.random.normal(jax.random.key(1), shape))
    key = jax.random.key(0)

    def tokens(index_of_max):
        def draw(key, logits):
            noisy = logits + dvae._gumbel_noise(key, logits.shape, logits.dtype)
            return index_of_max(noisy, axis=-1)
        return jax.jit(draw)

    variants = {"jnp.argmax": tokens(jnp.argmax), "dvae.argmax": tokens(dvae.argmax)}
    results = {name: jax.block_until_ready(f(key, logits)) for name, f in variants.items()}
    same = bool(jnp.all(results["jnp.argmax"] == results["dvae.argmax"]))
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, f in variants.items():
            start = time.perf_counter()
            jax.block_until_ready(f(key, logits))
            times[name].append(1e3 * (time.perf_counter() - start))
    print(f"# Gumbel-max tokens over {shape}: {jax.devices()[0].device_kind} "
          f"({jax.default_backend()}), jax {jax.__version__}, {time.strftime('%Y-%m-%d')}; "
          f"{args.repeats} interleaved calls; same indices: {same}")
    print("| index of the maximum | median ms | min ms |\n|---|---|---|")
    for name, t in times.items():
        print(f"| `{name}` | {statistics.median(t):.2f} | {min(t):.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": shape, "times_ms": times, "same": same}, f, indent=1)
    if not same:
        raise SystemExit("the two argmax give different indices")
    return {"times_ms": times, "same": same}


if __name__ == "__main__":
    main()
