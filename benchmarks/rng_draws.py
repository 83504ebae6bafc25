"""The random draws of one train step of the README's default, with JAX's CPU lowering of
threefry2x32 and with ours (fixed_slots/modules/threefry_cpu.py): compile time and run time.

Each lowering runs in a fresh interpreter (a lowering is registered for the whole process):
`jax` alone, then `jax` + `threefry_cpu.install()`. The draws are the default SLATE step's
(batch 16, 4 slots, 144 tokens, d_model 64): dropout masks 2x[16,4,144,144], 7x[16,144,64],
2x[16,4,144,4] (bernoulli), Gumbel noise 2x[16,12,12,64] (exponential) and the slot noise
(normal), in one jitted function.

  python benchmarks/rng_draws.py --repeats=20
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

_CHILD = r"""
import json, statistics, sys, time
import jax, jax.numpy as jnp
if sys.argv[1] == "ours":
    from fixed_slots.modules import threefry_cpu
    threefry_cpu.install()

def draws(key):
    keys = iter(jax.random.split(key, 16))
    out = [jax.random.bernoulli(next(keys), 0.9, (16, 4, 144, 144)) for _ in range(2)]
    out += [jax.random.bernoulli(next(keys), 0.9, (16, 144, 64)) for _ in range(7)]
    out += [jax.random.bernoulli(next(keys), 0.9, (16, 4, 144, 4)) for _ in range(2)]
    out += [jax.random.exponential(next(keys), (16, 12, 12, 64)) for _ in range(2)]
    out.append(jax.random.normal(next(keys), (16, 4, 64)))
    return sum(jnp.sum(o.astype(jnp.float32)) for o in out)

key = jax.random.key(0)
start = time.perf_counter()
compiled = jax.jit(draws).lower(key).compile()
compile_s = time.perf_counter() - start
times = []
for i in range(int(sys.argv[2])):
    start = time.perf_counter()
    compiled(jax.random.fold_in(key, i)).block_until_ready()
    times.append(time.perf_counter() - start)
print(json.dumps({"compile_s": compile_s, "min_ms": 1e3 * min(times),
                  "median_ms": 1e3 * statistics.median(times),
                  "value": float(compiled(key))}))
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per lowering")
    args = parser.parse_args(argv)
    rows = {}
    for lowering in ("jax", "ours"):
        out = subprocess.run([sys.executable, "-c", _CHILD, lowering, str(args.repeats)],
                             capture_output=True, text=True, check=True)
        rows[lowering] = json.loads(out.stdout.strip().splitlines()[-1])
    same = rows["jax"]["value"] == rows["ours"]["value"]
    print("| threefry2x32 lowering on the CPU | compile s | min ms | median ms |")
    print("|---|---|---|---|")
    for lowering, label in (("jax", "JAX's (rolled loop)"), ("ours", "ours (straight-line)")):
        r = rows[lowering]
        print(f"| {label} | {r['compile_s']:.1f} | {r['min_ms']:.1f} | {r['median_ms']:.1f} |")
    print(f"same draws: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
