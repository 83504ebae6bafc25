"""fixed_point_layer against optimistix and jaxopt: gradient time and memory on the same problems.

Each method runs T forward iterations of the same map from the same start (a fixed count: our
default; optimistix with rtol = atol = 0 and throw=False; jaxopt with tol=0) and differentiates
loss = sum(w * z_T) w.r.t. the map's parameters. Per-example problems: ours with batch_axis=0,
the others under jax.vmap. For each method the script compiles `jit(value_and_grad(loss))` and
prints XLA's compiled temporary memory, the wall time of the compiled call (median, min and
max over --repeats rounds in which every method is timed in turn: one interleaved run), and the
relative difference of its gradient from ours with an exact adjoint (GMRES), so that methods
computing the same estimator can be seen to agree.

Problems: "tanh" (a DEQ layer z = tanh(W z + U x + b), 256-d state, batch 64, T=10 and T=60)
and, when flax is installed, "slot attention" (the model's refinement step, batch 32, 7 slots, 64-d,
256 inputs, T=7 and T=50; its weights scaled by 0.1 so that the step contracts). optimistix
and jaxopt are optional: methods of a library that is not installed are skipped with a note
(neither is a dependency of this project).

  pip install optimistix jaxopt       # in a scratch environment
  python benchmarks/fixed_point_compare.py [--repeats=20] [--problems=tanh,slot_attention]
  python benchmarks/fixed_point_compare.py --tiny          # seconds: a smoke run
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import statistics
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from fixed_slots.fixed_point import (
    GMRES,
    Implicit,
    Iterate,
    Neumann,
    Unroll,
    fixed_point_layer,
)

PyTree = Any


class Problem(NamedTuple):
    name: str
    f: Callable[[PyTree, PyTree, PyTree], PyTree]  # f(params, z, x) for ONE example
    params: PyTree
    z0: PyTree  # [batch, ...]
    x: PyTree  # [batch, ...]
    weights: jax.Array  # like z0: loss = sum(weights * z_T)
    iterations: int


def tanh_problem(batch: int, dim: int, iterations: int) -> Problem:
    kw, ku, kb, kx, kl = jax.random.split(jax.random.key(0), 5)
    W = jax.random.normal(kw, (dim, dim))
    params = {"W": 0.9 * W / jnp.linalg.norm(W, 2),
              "U": jax.random.normal(ku, (dim, dim)) / dim ** 0.5,
              "b": 0.1 * jax.random.normal(kb, (dim,))}

    def f(p, z, x):
        return jnp.tanh(p["W"] @ z + p["U"] @ x + p["b"])

    return Problem("tanh", f, params, jnp.zeros((batch, dim)),
                   jax.random.normal(kx, (batch, dim)), jax.random.normal(kl, (batch, dim)),
                   iterations)


def slot_attention_problem(batch: int, num_inputs: int, slots: int, dim: int,
                           iterations: int) -> Problem:
    from flax import nnx

    from fixed_slots.modules.slot_attention import SlotAttention

    model = SlotAttention(dim, dim, 2 * dim, num_slots=slots, num_iterations=iterations,
                          rngs=nnx.Rngs(0))
    # At initialisation the step is not a contraction (||J|| ~ 2.1 at z_7 here), where the
    # implicit gradients disagree and iterative adjoints diverge; weights scaled by 0.1 make it
    # one (||J|| ~ 0.67), so that the gradient column compares like with like.
    for param in jax.tree.leaves(nnx.state(model.step, nnx.Param),
                                 is_leaf=lambda x: isinstance(x, nnx.Variable)):
        param[...] = 0.1 * param[...]
    inputs = jax.random.normal(jax.random.key(1), (batch, num_inputs, dim))
    step, params, (k, v) = model.step_function(inputs)

    def f(p, z, kv):  # one example: z [S, D], k and v [N, H, D/H]
        return step(p, z[None], kv[0][None], kv[1][None])[0][0]

    z0 = model.initial_slots(jax.random.key(2), batch)
    weights = jax.random.normal(jax.random.key(3), z0.shape)
    return Problem("slot attention", f, params, z0, (k, v), weights, iterations)


# --------------------------------------------------------------------------- methods
# A method maps a problem to loss(params) -> scalar.

def ours(solver, grad) -> Callable[[Problem], Callable]:
    def make(pb: Problem):
        batched = jax.vmap(pb.f, in_axes=(None, 0, 0))

        def loss(params):
            z, _ = fixed_point_layer(batched, params, pb.z0, pb.x, solver=solver(pb.iterations),
                                     grad=grad, batch_axis=0)
            return jnp.sum(pb.weights * z)
        return loss
    return make


def ours_neumann1() -> Callable[[Problem], Callable]:
    """Neumann(1) after T - 1 updates without gradient: T updates in all, the last one taped."""
    return ours(lambda t: Iterate(max_iter=t - 1), Neumann(order=1))


def ours_implicit_iterate() -> Callable[[Problem], Callable]:
    """The iterative adjoint with the forward solve's budget (the default before GMRES became it)."""
    return lambda pb: ours(Iterate, Implicit(Iterate(pb.iterations)))(pb)


def optimistix(adjoint: str, gmres_steps: int = 0) -> Callable[[Problem], Callable]:
    def make(pb: Problem):
        import lineax as lx
        import optimistix as optx

        solver = optx.FixedPointIteration(rtol=0.0, atol=0.0)  # never converged: T steps
        if adjoint == "dense":
            adj = optx.ImplicitAdjoint()  # the default: lineax.AutoLinearSolver(well_posed=None)
        elif adjoint == "gmres":
            adj = optx.ImplicitAdjoint(linear_solver=lx.GMRES(rtol=1e-6, atol=1e-6, restart=20,
                                                              max_steps=gmres_steps))
        else:
            adj = optx.RecursiveCheckpointAdjoint()

        def one(params, z0, x):
            fn = lambda z, args: pb.f(args[0], z, args[1])
            if adjoint == "neumann1":  # one line: T - 1 steps, stop_gradient, one step
                z = optx.fixed_point(fn, solver, z0, (params, x), max_steps=pb.iterations - 1,
                                     throw=False, adjoint=optx.RecursiveCheckpointAdjoint()).value
                return pb.f(params, jax.lax.stop_gradient(z), x)
            return optx.fixed_point(fn, solver, z0, (params, x), max_steps=pb.iterations,
                                    throw=False, adjoint=adj).value

        def loss(params):
            z = jax.vmap(one, in_axes=(None, 0, 0))(params, pb.z0, pb.x)
            return jnp.sum(pb.weights * z)
        return loss
    return make


def jaxopt(solve: str) -> Callable[[Problem], Callable]:
    def make(pb: Problem):
        import jaxopt as jo

        kwargs = {"implicit_diff": solve != "unroll"}
        if solve == "gmres":
            kwargs["implicit_diff_solve"] = lambda matvec, b: jo.linear_solve.solve_gmres(
                matvec, b, tol=1e-6)
        # jaxopt differentiates only explicit run() arguments: params and x are passed in.
        solver = jo.FixedPointIteration(fixed_point_fun=lambda z, p, x: pb.f(p, z, x),
                                        maxiter=pb.iterations, tol=0.0, **kwargs)

        def loss(params):
            z = jax.vmap(lambda z0, x: solver.run(z0, params, x).params)(pb.z0, pb.x)
            return jnp.sum(pb.weights * z)
        return loss
    return make


def methods(gmres_steps: int) -> list[tuple[str, str, Callable]]:
    """(library, label, make) for every row."""
    return [
        ("ours", "Neumann(1) (paper's IN)", ours_neumann1()),
        ("ours", "Implicit(Iterate(T))", ours_implicit_iterate()),
        ("ours", "Implicit(GMRES)", ours(Iterate, Implicit(GMRES(max_iter=4, tol=1e-6)))),
        ("ours", "Unroll()", ours(Iterate, Unroll())),
        ("ours", "Unroll(checkpoint=True)", ours(Iterate, Unroll(checkpoint=True))),
        ("optimistix", "Neumann-1 in one line", optimistix("neumann1")),
        ("optimistix", "ImplicitAdjoint() (default: dense)", optimistix("dense")),
        ("optimistix", "ImplicitAdjoint(lx.GMRES)", optimistix("gmres", gmres_steps)),
        ("optimistix", "RecursiveCheckpointAdjoint()", optimistix("checkpoint")),
        ("jaxopt", "implicit_diff (default normal CG)", jaxopt("normal_cg")),
        ("jaxopt", "implicit_diff, solve_gmres", jaxopt("gmres")),
        ("jaxopt", "implicit_diff=False (unroll)", jaxopt("unroll")),
    ]


REFERENCE = "Implicit(GMRES)"


class Compiled(NamedTuple):
    lib: str
    label: str
    call: Callable  # compiled value_and_grad: params -> (value, grads)
    temp_mib: float
    grads: PyTree
    inner: int  # calls per timed sample, so that one sample lasts >= MIN_SAMPLE_S


MIN_SAMPLE_S = 0.02


def compile_method(lib: str, label: str, loss: Callable, params: PyTree) -> Compiled:
    compiled = jax.jit(jax.value_and_grad(loss)).lower(params).compile()
    temp_mib = compiled.memory_analysis().temp_size_in_bytes / 2**20
    _, grads = jax.block_until_ready(compiled(params))  # warm-up
    start = time.perf_counter()
    jax.block_until_ready(compiled(params))
    once = time.perf_counter() - start
    return Compiled(lib, label, compiled, temp_mib, grads,
                    inner=max(1, min(50, int(MIN_SAMPLE_S / max(once, 1e-6)))))


def interleaved_times(methods: list[Compiled], params: PyTree, rounds: int) -> list[list[float]]:
    """ms per call of each method: `rounds` samples each, taken in turn.

    Round r times every method once, starting at method r mod n, so that a slow spell of a
    shared machine (or a warm cache) falls on all methods alike rather than on whichever ran
    then; a sample is the mean of `inner` back-to-back calls (short calls are timed in blocks).
    """
    samples: list[list[float]] = [[] for _ in methods]
    for r in range(rounds):
        for k in range(len(methods)):
            i = (r + k) % len(methods)
            m = methods[i]
            start = time.perf_counter()
            for _ in range(m.inner):
                out = m.call(params)
            jax.block_until_ready(out)
            samples[i].append(1e3 * (time.perf_counter() - start) / m.inner)
    return samples


def spread(ms: list[float]) -> str:
    """median (min-max) in ms."""
    fmt = lambda t: f"{t:.0f}" if t >= 100 else f"{t:.1f}" if t >= 10 else f"{t:.2f}"
    return f"{fmt(statistics.median(ms))} ({fmt(min(ms))}-{fmt(max(ms))})"


def relative_difference(a: PyTree, b: PyTree) -> float:
    num = sum(float(jnp.sum((x - y) ** 2)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    den = sum(float(jnp.sum(y ** 2)) for y in jax.tree.leaves(b))
    return (num / max(den, 1e-30)) ** 0.5


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", default="tanh,slot_attention")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--tiny", action="store_true", help="small shapes: a smoke run")
    parser.add_argument("--only", default="", help="comma-separated libraries to run")
    parser.add_argument("--skip", default="", help="semicolon-separated row labels to skip")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(";")))

    available = {"ours": True,
                 "optimistix": importlib.util.find_spec("optimistix") is not None,
                 "jaxopt": importlib.util.find_spec("jaxopt") is not None}
    libraries = set(args.only.split(",")) if args.only else set(available)
    print(f"# {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
          f"optimistix {version('optimistix') or 'not installed'}, lineax "
          f"{version('lineax') or '-'}, jaxopt {version('jaxopt') or 'not installed'}")
    for lib in ("optimistix", "jaxopt"):
        if not available[lib]:
            print(f"# {lib} is not installed: its rows are skipped (pip install {lib})")

    problems = []
    for name in args.problems.split(","):
        if name == "tanh":
            # T=10 leaves the solve unconverged (||W|| = 0.9); at T=60 it is (0.9^60 ~ 2e-3 of
            # the start), the DEQ regime, where a GMRES adjoint needs few Krylov vectors.
            for t in ((10,) if args.tiny else (10, 60)):
                problems.append(tanh_problem(*((4, 16) if args.tiny else (64, 256)), t))
        elif name == "slot_attention":
            if importlib.util.find_spec("flax") is None:
                print("# flax is not installed: the slot-attention problem is skipped")
                continue
            shapes = (2, 16, 3, 8) if args.tiny else (32, 256, 7, 64)
            for t in ((3,) if args.tiny else (7, 50)):
                problems.append(slot_attention_problem(*shapes, t))
        else:
            raise SystemExit(f"unknown problem {name!r}; valid: tanh, slot_attention")

    for pb in problems:
        print(f"\n## {pb.name}, T={pb.iterations}, state {jax.tree.map(jnp.shape, pb.z0)}\n",
              flush=True)
        all_methods = methods(gmres_steps=4 * 20)
        # The reference first: every other row's gradient is compared with it.
        all_methods.sort(key=lambda m: not (m[0] == "ours" and m[1] == REFERENCE))
        compiled, failures = [], []
        for lib, label, make in all_methods:
            if lib not in libraries or not available[lib] or label in skip:
                continue
            try:
                compiled.append(compile_method(lib, label, make(pb), pb.params))
            except Exception as e:  # a method that fails on a problem is a finding, not a crash
                failures.append(f"| {lib} | {label} | | | fails: {type(e).__name__}: "
                                f"{str(e).splitlines()[0][:80]} |")
        times = interleaved_times(compiled, pb.params, args.repeats)
        reference = next((m.grads for m in compiled
                          if m.lib == "ours" and m.label == REFERENCE), None)
        print(f"{args.repeats} interleaved rounds; ms per call: median (min-max)\n")
        print("| library | gradient | compiled temp memory | time per value_and_grad | "
              f"grad. rel. diff. vs ours {REFERENCE} |")
        print("|---|---|---|---|---|")
        for m, ms in zip(compiled, times):
            diff = (f"{relative_difference(m.grads, reference):.1e}" if reference is not None
                    else "-")
            print(f"| {m.lib} | {m.label} | {m.temp_mib:.2f} MiB | {spread(ms)} | {diff} |")
        for row in failures:
            print(row)
        print(flush=True)

if __name__ == "__main__":
    main()
