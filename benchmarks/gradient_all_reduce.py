"""The data-parallel gradient's all-reduce on a CPU host: per leaf (what the train step does), as
one flat buffer (JAX's reduced/unreduced shardings, checked leaf by leaf) and in shard_map.

Under the automatic (GSPMD/Shardy) partitioner the train step all-reduces every gradient leaf: one
tuple all-reduce of ~120 operands for the default SLATE, which XLA's CPU runtime executes as one
rendezvous of the devices per operand (`profile_step.py`: `Rendezvous` 4 x 120 calls a step). The
other form marks the parameters `reduced` over the data axis with the axis explicit, runs the
model with it automatic (`jax.sharding.auto_axes`), ravels the unreduced gradients into one buffer
and all-reduces that once. A third form runs the gradient in `shard_map`, each device on its own
examples, and sums the raveled gradients in one psum: exact by construction for a loss that is a
mean over examples, except for the random draws, which each shard makes for its own shape (the
model's noise then differs from the global batch's), so it is timed, not compared. This script
computes the model's loss gradient each way on the same batch and key (no optimizer), times each
(interleaved, median and min), counts the all-reduce operands of each compiled program, and
compares every leaf of the one-buffer form with the per-leaf one:

  python benchmarks/gradient_all_reduce.py --config=configs/default.py --set=slate.dvae_hidden=64

It prints the leaves whose one-buffer gradient differs (relative L2 above --tolerance) with the
ratio of norms, then the same comparison on a few one-line losses (MINIMAL_CASES) that isolate
what goes wrong: the one-buffer form is a candidate for the train step only on a jax where
nothing differs. (jax 0.10.2: a gradient the partitioner has already all-reduced inside the
automatic region, or one that never depended on the sharded batch, is taken for a partial sum
and summed again, multiplied by the device count: a bias added with rank promotion (`x + b`),
a positional embedding, an L2 term on a parameter; BENCHMARKS.md.)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from fixed_slots import configlib, models, sharding
from fixed_slots.models import split_params
from fixed_slots.train import trainer
from fixed_slots.train.train_step import model_from_params

AXIS = sharding.DATA_AXIS


def has_reduced_api() -> bool:
    """Whether this jax has reduced/unreduced PartitionSpecs and auto/explicit axes."""
    if not all(hasattr(jax.sharding, n) for n in ("auto_axes", "reshard", "set_mesh")):
        return False
    try:
        P(reduced={AXIS}), P(unreduced={AXIS})
    except TypeError:
        return False
    return True


def all_reduce_operands(hlo_text: str) -> list[int]:
    """The operand count of each all-reduce in a compiled module's text (a tuple counts each)."""
    counts = []
    for line in hlo_text.splitlines():
        match = re.search(r"= (\(.*?\)|\S+) all-reduce(?:-start)?\(", line)
        if match:
            shape = match.group(1)
            counts.append(shape.count("[") if shape.startswith("(") else 1)
    return counts


def reduced_grad(loss, params, *args):
    """The gradient of `loss` w.r.t. `params`, left unreduced over the data axis: the parameters
    marked `reduced`, the loss run with the axis automatic. Inside `jax.set_mesh(explicit)`."""
    params = jax.tree.map(lambda p: jax.sharding.reshard(p, P(reduced={AXIS})), params)
    return jax.grad(jax.sharding.auto_axes(loss, out_sharding=P()))(params, *args)


# name -> loss(params, x) with x [16, 5, 8] sharded over the batch; params W [8, 8], b [8],
# pe [5, 8]. The one-buffer gradient of each parameter should equal the per-leaf one.
MINIMAL_CASES = {
    "x @ W + b (b rank-promoted)": lambda p, x: jnp.sum(jnp.tanh(x @ p["W"] + p["b"])),
    "x @ W + b.reshape(1, 1, -1)": lambda p, x: jnp.sum(jnp.tanh(
        x @ p["W"] + p["b"].reshape(1, 1, -1))),
    "x + pe[None]": lambda p, x: jnp.sum(jnp.tanh(x + p["pe"][None])),
    "x + broadcast_to(pe, x.shape)": lambda p, x: jnp.sum(jnp.tanh(
        x + jnp.broadcast_to(p["pe"], x.shape))),
    "tanh(x @ W) + sum(W ** 2)": lambda p, x: (jnp.sum(jnp.tanh(x @ p["W"]))
                                               + jnp.sum(p["W"] ** 2)),
}


def minimal_cases(mesh: jax.sharding.Mesh) -> dict[str, dict[str, float]]:
    """case -> {parameter: ||one-buffer grad|| / ||per-leaf grad||} (1.0 where they agree)."""
    keys = jax.random.split(jax.random.key(0), 4)
    params = {"W": jax.random.normal(keys[0], (8, 8)), "b": jax.random.normal(keys[1], (8,)),
              "pe": jax.random.normal(keys[2], (5, 8))}
    x = jax.random.normal(keys[3], (16, 5, 8))
    repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P(AXIS))
    out = {}
    for name, loss in MINIMAL_CASES.items():
        reference = jax.grad(loss)(params, x)

        def one_buffer(params, x, loss=loss):
            return jax.tree.map(lambda g: jax.sharding.reshard(g, P()),
                                reduced_grad(loss, params, x))

        with jax.set_mesh(mesh):
            got = jax.jit(one_buffer)(jax.device_put(params, repl), jax.device_put(x, data))
        out[name] = {k: float(jnp.linalg.norm(got[k]) / jnp.linalg.norm(reference[k]))
                     for k in params if float(jnp.linalg.norm(reference[k])) > 0}
    return out


def _call_ms(fn, args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return (time.perf_counter() - start) * 1e3


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/default.py")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override (repeatable)")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls of each, interleaved"
                        " in rounds of one")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="relative L2 difference of a leaf counted as different")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    config = configlib.from_file(args.config, args.set)
    sharding.split_cpu(config)  # the trainer's split of a CPU host into devices
    trainer.check_config(config)
    if not has_reduced_api():
        print(f"jax {jax.__version__} has no reduced/unreduced shardings: nothing to compare")
        return {}
    mesh = sharding.make_mesh(config.train.num_devices)
    if mesh.size < 2:
        print("one device: no all-reduce to compare (a CPU host splits for batch >= 8)")
        return {}

    model = models.create(config, rngs=nnx.Rngs(config.seed))
    graphdef, params = split_params(model)

    def loss(params, batch, key, step):
        return model_from_params(graphdef, params)(batch, key, step, train=True).loss

    def per_leaf(params, batch, key, step):  # [N]: every leaf all-reduced on its own
        grads = jax.grad(loss)(params, batch, key, step)
        return jnp.concatenate([g.ravel() for g in jax.tree.leaves(grads)])

    def per_shard(params, batch, key, step):  # [N], in shard_map: each device's own gradient
        grads = jax.grad(loss)(params, batch, key, step)
        flat = jnp.concatenate([g.ravel() for g in jax.tree.leaves(grads)])
        return jax.lax.psum(flat, AXIS) / mesh.size  # the mean of the shards' mean losses

    # check_vma=False: the dVAE's 1x1 convolutions' custom gradient returns a per-device weight
    # gradient for a replicated weight, which the typed check refuses.
    shard_mapped = jax.shard_map(per_shard, mesh=mesh, in_specs=(P(), P(AXIS), P(), P()),
                                 out_specs=P(), check_vma=False)

    def one_buffer(params, batch, key, step):  # [N]: one all-reduce of the raveled partials
        grads = reduced_grad(loss, params, batch, key, step)
        flat = jnp.concatenate([jax.lax.reshape(g, (g.size,), out_sharding=P(unreduced={AXIS}))
                                for g in jax.tree.leaves(grads)])
        return jax.sharding.reshard(flat, P())

    size, batch_size = config.data.image_size, config.train.batch_size
    images = np.random.default_rng(0).random((batch_size, size, size, 3), np.float32)
    key, step = jax.random.key(0), jnp.zeros((), jnp.int32)
    auto_repl, auto_data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    explicit = jax.make_mesh((mesh.size,), (AXIS,), devices=mesh.devices.ravel().tolist(),
                             axis_types=(jax.sharding.AxisType.Explicit,))
    repl, data = NamedSharding(explicit, P()), NamedSharding(explicit, P(AXIS))
    inputs = (params, {"image": images}, key, step)
    auto_shardings = (auto_repl, auto_data, auto_repl, auto_repl)
    explicit_shardings = (repl, data, repl, repl)
    auto_inputs = jax.device_put(inputs, auto_shardings)
    forms = {  # name -> (jitted, its inputs, the mesh to trace it under)
        "per leaf (the train step)": (
            jax.jit(per_leaf, in_shardings=auto_shardings), auto_inputs, None),
        "one buffer (reduced/unreduced)": (
            jax.jit(one_buffer, in_shardings=explicit_shardings),
            jax.device_put(inputs, explicit_shardings), explicit),
        "shard_map, one psum (draws per shard)": (
            jax.jit(shard_mapped, in_shardings=auto_shardings), auto_inputs, None),
    }
    results, outputs = {}, {}
    for name, (fn, fn_args, context) in forms.items():
        with jax.set_mesh(context) if context is not None else contextlib.nullcontext():
            start = time.perf_counter()
            compiled = fn.lower(*fn_args).compile()
            results[name] = {"compile_s": time.perf_counter() - start,
                             "all_reduce_operands": all_reduce_operands(compiled.as_text()),
                             "ms": []}
            outputs[name] = np.asarray(jax.block_until_ready(compiled(*fn_args)))
    for _ in range(args.repeats):  # interleaved: the machine's drift falls on both alike
        for name, (fn, fn_args, context) in forms.items():
            with jax.set_mesh(context) if context is not None else contextlib.nullcontext():
                results[name]["ms"].append(_call_ms(fn, fn_args))

    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    reference, candidate, shard_mapped_out = outputs.values()
    differing, offset = [], 0
    for path, leaf in leaves:
        n = int(np.size(leaf))
        ref, got = reference[offset:offset + n], candidate[offset:offset + n]
        offset += n
        ref_norm, diff = float(np.linalg.norm(ref)), float(np.linalg.norm(got - ref))
        if diff > args.tolerance * max(ref_norm, 1e-12):
            differing.append({"leaf": jax.tree_util.keystr(path), "shape": list(np.shape(leaf)),
                              "norm_ratio": float(np.linalg.norm(got)) / max(ref_norm, 1e-30)})

    device = jax.devices()[0]
    out = {"device": f"{device.device_kind} ({jax.default_backend()})", "jax": jax.__version__,
           "devices": mesh.size, "config": args.config, "overrides": args.set,
           "batch": batch_size, "leaves": len(leaves), "date": time.strftime("%Y-%m-%d"),
           "forms": results, "differing_leaves": differing,
           "shard_map_relative_difference": float(np.linalg.norm(shard_mapped_out - reference)
                                                  / np.linalg.norm(reference))}
    print(f"# {out['device']}, jax {out['jax']}, {mesh.size} devices, {args.config}"
          f"{''.join(' --set=' + x for x in args.set)}, batch {batch_size}, {len(leaves)} "
          f"leaves, {out['date']}")
    print("| gradient all-reduce | all-reduces (operands) | compile s | median ms | min ms |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        ops = r["all_reduce_operands"]
        print(f"| {name} | {len(ops)} ({sum(ops)}) | {r['compile_s']:.1f} | "
              f"{np.median(r['ms']):.1f} | {min(r['ms']):.1f} |")
    print(f"leaves whose one-buffer gradient differs (relative L2 > {args.tolerance:g}): "
          f"{len(differing)} of {len(leaves)}")
    for d in differing:
        print(f"  {d['leaf']} {tuple(d['shape'])}: norm ratio {d['norm_ratio']:.3f}")
    print("shard_map form against the per-leaf gradient, relative L2: "
          f"{out['shard_map_relative_difference']:.2g} (each shard draws its own noise for its "
          "own shape, so this is a timing of the exact form that would need per-example draws, "
          "not a gradient to compare)")
    out["minimal_cases"] = minimal_cases(explicit)
    print("one-line losses, ||one-buffer grad|| / ||per-leaf grad|| per parameter:")
    for name, ratios in out["minimal_cases"].items():
        print(f"  {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
