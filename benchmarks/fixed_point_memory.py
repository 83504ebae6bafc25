"""Peak compiled memory and backward time of slot attention vs iterations (the paper's Table 1).

For T in {1, 3, 7, 15, 31} and grad in {unroll, unroll_ckpt, neumann1, implicit}, compiles
`grad(loss)` w.r.t. the parameters and inputs of a slot-attention layer (batch 64, 7 slots, 64-d,
1024 inputs by default) and prints XLA's `memory_analysis()` temporary bytes and the median wall
time of the compiled gradient call. T is the paper's: unroll differentiates T updates,
unroll_ckpt the same with `Unroll(checkpoint=True)` (each update rematerialised in the backward
pass), neumann1 runs T updates without gradient and one with it, implicit T + 1 updates and a
(T + 1)-step iterative adjoint (`parse_grad_mode(name).layer_options(T)`, what SlotAttention runs).

  python benchmarks/fixed_point_memory.py                   # the table in BENCHMARKS.md
  python benchmarks/fixed_point_memory.py --batch=4 --inputs=64 --iters=1,3   # seconds, on CPU
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from fixed_slots.fixed_point import Iterate, Unroll, fixed_point_layer, parse_grad_mode
from fixed_slots.modules.slot_attention import SlotAttention


def layer_options(grad: str, iterations: int) -> dict:
    """Solver and gradient objects of a row: a config string, or unroll_ckpt."""
    if grad == "unroll_ckpt":
        return {"solver": Iterate(max_iter=iterations), "grad": Unroll(checkpoint=True)}
    return parse_grad_mode(grad).layer_options(iterations)


def measure(grad: str, iterations: int, batch: int, num_inputs: int, slots: int, dim: int,
            repeats: int) -> tuple[float, float]:
    model = SlotAttention(dim, dim, 2 * dim, num_slots=slots, num_iterations=iterations,
                          rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    inputs = jax.random.normal(jax.random.key(1), (batch, num_inputs, dim))
    options = layer_options(grad, iterations)

    def loss(params, inputs):
        sa = nnx.merge(graphdef, params)
        f, step_state, (k, v) = sa.step_function(inputs)  # keys/values computed once
        slots0 = sa.initial_slots(jax.random.key(2), batch)
        (slots_out, _), _ = fixed_point_layer(f, step_state, slots0, k, v, batch_axis=0,
                                              has_aux=True, **options)
        return jnp.mean(slots_out ** 2)

    grad_fn = jax.jit(jax.grad(loss, argnums=(0, 1)))
    compiled = grad_fn.lower(params, inputs).compile()
    temp_mib = compiled.memory_analysis().temp_size_in_bytes / 2**20
    jax.block_until_ready(compiled(params, inputs))  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(params, inputs))
        times.append(time.perf_counter() - start)
    return temp_mib, 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--inputs", type=int, default=1024)
    parser.add_argument("--slots", type=int, default=7)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--iters", default="1,3,7,15,31")
    parser.add_argument("--grads", default="unroll,unroll_ckpt,neumann1,implicit")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    iters = [int(t) for t in args.iters.split(",")]
    grads = args.grads.split(",")
    print(f"# device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}; "
          f"batch {args.batch}, {args.slots} slots, {args.dim}-d, {args.inputs} inputs")
    print("| grad | " + " | ".join(f"T={t}" for t in iters) + " |")
    print("|---|" + "---|" * len(iters))
    results = {}
    for grad in grads:
        cells = []
        for t in iters:
            mib, ms = measure(grad, t, args.batch, args.inputs, args.slots, args.dim, args.repeats)
            results[grad, t] = mib
            cells.append(f"{mib:.1f} MiB / {ms:.1f} ms")
        print(f"| {grad} | " + " | ".join(cells) + " |", flush=True)
    for grad in grads:
        first, last = results[grad, iters[0]], results[grad, iters[-1]]
        print(f"# {grad}: peak temp memory T={iters[-1]} / T={iters[0]} = {last / first:.3f}")


if __name__ == "__main__":
    main()
