"""Issue 10's GPU suite: every figure the issue asks for, in one device call, one markdown report.

Runs, each step in its own process, in priority order, under one time budget (default 450 s, so
the call stays under 8 minutes with the wheel install):

  ours_f32        train_step.py: unroll and neumann1 at the config's T, float32, blocking and
                  pipelined ms/step, peak memory; KV-cache decode in float32
  ours_bf16       the same for neumann1 in bf16 + cuDNN attention (no attention-prob dropout);
                  KV-cache decode in bf16
  official_f32    official_slate.py --grad=unroll and --grad=implicit (plain, as users run it)
  official_decode the official reconstruct_autoregressive on one batch
  profile_bf16    profile_step.py for the bf16 + cuDNN step: GPU busy %, kernels/step, top kernels,
                  host time per call, HLO op counts
  official_compile_f32   official implicit under torch.compile
  ours_bf16_xla   neumann1 bf16 with XLA attention (the cuDNN gain)
  official_bf16   official implicit under bf16 autocast
  memory_vs_t     train_step.py at T=1 and 15 (T=7 comes from ours_f32), unroll and neumann1
  xla_flags       the bf16 + cuDNN step under each --xla_flag_variants setting (command buffers)
  official_compile_bf16  official implicit, bf16 autocast + torch.compile
  profile_f32     profile_step.py for the float32 neumann1 step

A step that fails or runs out of time is recorded as such and the suite goes on; the report is
rewritten after every step, so a killed call still leaves the figures gathered so far. Targets
(issue 10) are marked met / missed / n/a with their figures.

  # on the GPU machine (benchmarks/README.md: wheels and the official checkout carried):
  bash benchmarks/gpu_suite.sh                       # writes $OUT/report.md and $OUT/*.json
  # dry run on a CPU with tiny shapes (the official steps run where torch and --slate_dir exist):
  python benchmarks/gpu_suite.py --dry_run --out=/tmp/suite
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# Issue 10's starting point: H200, jax 0.11.2, torch 2.11, main b30cb55, 2026-11-26.
BASELINE = {
    "official_unroll_ms": 50.6, "official_implicit_ms": 47.9, "official_compile_ms": 35.3,
    "ours_unroll_f32_ms": 25.2, "ours_neumann1_f32_ms": 27.9, "ours_bf16_xla_ms": 24.4,
    "ours_bf16_cudnn_ms": 16.1, "peak_bf16_mib": 1552, "peak_f32_mib": 4638,
    "decode_official": 17.2, "decode_f32": 393, "decode_bf16": 340,
}
BF16 = ["--compute_dtype=bfloat16"]
CUDNN = ["--set=slate.attention_impl=cudnn", "--set=slate.attn_prob_dropout=False"]
# Command buffers (CUDA graphs) off, and with loops and conditionals captured as well.
DEFAULT_FLAG_VARIANTS = (
    "no_command_buffers=--xla_gpu_enable_command_buffer=",
    "command_buffers_with_loops=--xla_gpu_enable_command_buffer="
    "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL",
)


@dataclasses.dataclass
class Step:
    name: str
    cmd: list[str]
    timeout_s: int
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    skip: str | None = None  # a reason not to run it at all


@dataclasses.dataclass
class Result:
    status: str  # ok | failed (rc N) | timeout | skipped: why
    wall_s: float = 0.0
    data: dict | None = None
    log: str = ""


def _official_available(slate_dir: str | None, python: str) -> str | None:
    """None if the official harness can run, else why not."""
    if not slate_dir or not os.path.isfile(os.path.join(slate_dir, "slate.py")):
        return f"no official checkout (--slate_dir={slate_dir})"
    probe = subprocess.run([python, "-c", "import torch"], capture_output=True)
    if probe.returncode:
        return f"no torch in {python}"
    return None


def suite_config(a: argparse.Namespace):
    """(config path, overrides, validated config): tiny shapes with --dry_run (and the dVAE
    width the official model has built in, so its harness can run them too)."""
    from fixed_slots import configlib
    from fixed_slots.train import trainer

    config_path, base_set = a.config, list(a.set)
    if a.dry_run:
        config_path, base_set = "configs/default.py:tiny", ["slate.dvae_hidden=64"] + base_set
    config = configlib.from_file(config_path, base_set)
    config.train.num_devices = 1  # one GPU; the scripts time one device too
    trainer.check_config(config)
    return config_path, base_set, config


def plan(a: argparse.Namespace, out: str) -> list[Step]:
    """The suite's steps, in the order they run."""
    sys.path.insert(0, HERE)
    from side_by_side import official_args_from_config

    py = sys.executable
    config_path, base_set, config = suite_config(a)
    if a.dry_run:
        timing = ["--steps=2", "--warmup=1"]
        iters_extra, decode = "1", ["--decode_repeats=1", "--decode_batch=2"]
        cudnn = []  # no cuDNN on a CPU: the bf16 rows run XLA attention
    else:
        timing = [f"--steps={a.steps}", f"--warmup={a.warmup}"]
        iters_extra, decode = "1,15", ["--decode_repeats=2"]
        cudnn = CUDNN
    t = config.slot_attention.num_iterations
    sets = [f"--set={x}" for x in base_set]
    j = lambda name: [f"--json={os.path.join(out, name + '.json')}"]
    ours = [py, os.path.join(HERE, "train_step.py"), f"--config={config_path}", *sets, *timing]
    prof = [py, os.path.join(HERE, "profile_step.py"), f"--config={config_path}", *sets,
            f"--steps={2 if a.dry_run else 10}", "--warmup=1"]
    official_skip = _official_available(a.slate_dir, a.official_python)
    official = [a.official_python, os.path.join(HERE, "official_slate.py"),
                f"--slate_dir={a.slate_dir}", *official_args_from_config(config), *timing]
    if a.dry_run:
        official += ["--device=cpu"]
    decode_batch = 2 if a.dry_run else config.train.batch_size
    official_decode = [x for x in official if not x.startswith("--batch_size=")] + [
        f"--batch_size={decode_batch}", "--decode", "--grad=implicit"]

    steps = [
        Step("ours_f32", ours + ["--grads=unroll,neumann1", f"--iters={t}", *decode,
                                 "--decode_variants=kv_cache"] + j("ours_f32"), 150),
        Step("ours_bf16", ours + ["--grads=neumann1", f"--iters={t}", *BF16, *cudnn, *decode,
                                  "--decode_variants=kv_cache"] + j("ours_bf16"), 100),
        Step("official_unroll", official + ["--grad=unroll"] + j("official_unroll"), 60,
             skip=official_skip),
        Step("official_implicit", official + ["--grad=implicit"] + j("official_implicit"), 60,
             skip=official_skip),
        Step("official_decode", official_decode + j("official_decode"), 60, skip=official_skip),
        Step("profile_bf16", prof + [*BF16, *cudnn] + j("profile_bf16"), 90),
        Step("official_compile_f32", official + ["--grad=implicit", "--compile"]
             + j("official_compile_f32"), 150, skip=official_skip),
        Step("ours_bf16_xla", ours + ["--grads=neumann1", f"--iters={t}", *BF16,
                                      "--decode_repeats=0"] + j("ours_bf16_xla"), 80),
        Step("official_bf16", official + ["--grad=implicit", "--amp=bf16"]
             + j("official_bf16"), 60, skip=official_skip),
        Step("memory_vs_t", ours + ["--grads=unroll,neumann1", f"--iters={iters_extra}",
                                    "--decode_repeats=0"] + j("memory_vs_t"), 150),
    ]
    for i, variant in enumerate(a.xla_flag_variants):
        name, _, flags = variant.partition("=")
        steps.append(Step(f"xla_flags_{name}", ours + [
            "--grads=neumann1", f"--iters={t}", *BF16, *cudnn, "--decode_repeats=0"]
            + j(f"xla_flags_{name}"), 80, env={"XLA_FLAGS": flags},
            skip="GPU-only XLA flags (dry run on a CPU)" if a.dry_run else None))
    steps += [
        Step("official_compile_bf16", official + ["--grad=implicit", "--amp=bf16", "--compile"]
             + j("official_compile_bf16"), 150, skip=official_skip),
        Step("profile_f32", prof + j("profile_f32"), 90),
    ]
    return steps


def run_step(step: Step, out: str, remaining_s: float, timeout_scale: float = 1.0) -> Result:
    if step.skip:
        return Result(f"skipped: {step.skip}")
    timeout = int(min(step.timeout_s * timeout_scale, remaining_s))
    if timeout < 20:
        return Result("skipped: suite time budget spent")
    env = dict(os.environ)
    for key, value in step.env.items():  # appended, so the caller's XLA_FLAGS stay in force
        env[key] = f"{env.get(key, '')} {value}".strip()
    # Our steps share one persistent compilation cache: a program compiled once (the profile
    # re-runs the bf16 step) is not compiled again.
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(out, "jax_cache"))
    log_path = os.path.join(out, "logs", f"{step.name}.log")
    start = time.perf_counter()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(shlex.quote(x) for x in step.cmd) + "\n")
        log.flush()
        # Its own process group: on a timeout the step's children (train_step.py runs each row
        # in a subprocess) go too, not only the process we started.
        proc = subprocess.Popen(step.cmd, cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
            status = "ok" if rc == 0 else f"failed (rc {rc})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            status = f"timeout ({timeout} s)"
    wall = time.perf_counter() - start
    with open(log_path) as f:
        text = f.read()
    data = None
    path = os.path.join(out, f"{step.name}.json")
    if status == "ok" and os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    return Result(status, wall, data, text[-1500:])


# --- the report ---------------------------------------------------------------------------

def _row(data: dict | None, grad: str, iters: int | None = None) -> dict | None:
    for r in (data or {}).get("rows", []):
        if r["grad"] == grad and (iters is None or r["iters"] == iters):
            return r
    return None


def _f(x: float | None, fmt: str = ".1f") -> str:
    return "n/a" if x is None else format(x, fmt)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _x(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.2f}x"


def _mib(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0f} MiB"


def _target(name: str, value: float | None, ok: bool | None, detail: str) -> str:
    mark = "n/a" if ok is None or value is None else ("met" if ok else "missed")
    return f"| {name} | {detail} | **{mark}** |"


def report(results: dict[str, Result], steps: list[Step], header: dict) -> str:
    d = {name: r.data for name, r in results.items()}
    f32 = d.get("ours_f32")
    t = header["iters"]
    unroll, neumann = _row(f32, "unroll", t), _row(f32, "neumann1", t)
    bf16 = _row(d.get("ours_bf16"), "neumann1", t)
    bf16_xla = _row(d.get("ours_bf16_xla"), "neumann1", t)
    off = {k: d.get(k) for k in ("official_unroll", "official_implicit", "official_compile_f32",
                                 "official_bf16", "official_compile_bf16")}
    ms = lambda rec: rec.get("ms") if rec else None
    peak = lambda rec: (rec.get("peak_mib") or None) if rec else None
    lines = [f"# Issue 10 GPU suite: {header['device']}, {header['date']}", "",
             f"jax {header['jax']}; ours at git {header['commit']}; config "
             f"{header['config']}{''.join(' --set=' + x for x in header['set'])}: "
             f"{header['shape']}; official files sha256 "
             f"{(off['official_implicit'] or off['official_unroll'] or {}).get('digest', 'n/a')}"
             f", torch {(off['official_implicit'] or off['official_unroll'] or {}).get('torch', 'n/a')}"
             + ("; DRY RUN (CPU, tiny shapes; the cuDNN rows run XLA attention): no figure "
                "here is a GPU figure"
                if header["dry_run"] else ""), "",
             "## Train step, side by side (ms/step: blocking median / pipelined)", "",
             "Speed-ups: official implicit ms/step (plain / torch.compile, float32) over ours "
             "pipelined. Baseline: issue 10's H200 figures (2026-11-26, main b30cb55).", "",
             "| variant | ms/step | pipelined ms/step | peak MiB | speed-up vs official "
             "implicit (plain / compile) | baseline ms/step |", "|---|---|---|---|---|---|"]
    plain, compiled = ms(off["official_implicit"]), ms(off["official_compile_f32"])
    b = BASELINE
    for label, rec, base in (
            ("official vanilla (unroll), float32", off["official_unroll"],
             b["official_unroll_ms"]),
            ("official implicit, float32", off["official_implicit"], b["official_implicit_ms"]),
            ("official implicit + torch.compile, float32", off["official_compile_f32"],
             b["official_compile_ms"]),
            ("official implicit, bf16 autocast", off["official_bf16"], None),
            ("official implicit, bf16 autocast + torch.compile", off["official_compile_bf16"],
             None)):
        lines.append(f"| {label} | {_f(ms(rec))} | n/a (syncs per step) | {_f(peak(rec), '.0f')}"
                     f" | | {_f(base)} |")
    for label, rec, base in (("ours unroll, float32", unroll, b["ours_unroll_f32_ms"]),
                             ("ours neumann1, float32", neumann, b["ours_neumann1_f32_ms"]),
                             ("ours neumann1, bf16, XLA attention", bf16_xla,
                              b["ours_bf16_xla_ms"]),
                             ("ours neumann1, bf16 + cuDNN attention", bf16,
                              b["ours_bf16_cudnn_ms"])):
        pipe = rec.get("pipelined_ms") if rec else None
        lines.append(f"| {label} | {_f(ms(rec))} | {_f(pipe)} | {_f(peak(rec), '.0f')} | "
                     f"{_x(_ratio(plain, pipe))} / {_x(_ratio(compiled, pipe))} | {_f(base)} |")
    dec_off = (d.get("official_decode") or {}).get("decode_images_per_s")
    dec_f32 = ((f32 or {}).get("decode") or {}).get("kv_cache")
    dec_bf16 = ((d.get("ours_bf16") or {}).get("decode") or {}).get("kv_cache")
    lines += ["", f"## Decode ({header['decode']})", "",
              "| decoder | images/s | vs official | baseline images/s |", "|---|---|---|---|",
              f"| official reconstruct_autoregressive | {_f(dec_off)} | 1x | "
              f"{b['decode_official']} |",
              f"| ours KV cache, float32 | {_f(dec_f32)} | {_x(_ratio(dec_f32, dec_off))} | "
              f"{b['decode_f32']} |",
              f"| ours KV cache, bf16 | {_f(dec_bf16)} | {_x(_ratio(dec_bf16, dec_off))} | "
              f"{b['decode_bf16']} |"]

    for name, title in (("profile_bf16", "bf16 + cuDNN neumann1"),
                        ("profile_f32", "float32 neumann1")):
        p = d.get(name)
        lines += ["", f"## Profile, {title} (`profile_step.py`)", ""]
        if not p or "trace" not in p:
            lines.append(f"n/a ({results[name].status if name in results else 'not reached'})")
            continue
        tr = p["trace"]
        lines += [f"read: {tr['read']}", "",
                  f"{_f(tr['wall_ms_per_step'], '.2f')} ms/step pipelined; busy "
                  f"{_f(tr['busy_ms_per_step'], '.2f')} ms ({tr['busy_fraction']:.0%}); "
                  f"{tr['kernels_per_step']:.0f} kernels/step; host time per call "
                  f"{_f(tr['host_call_us'], '.0f')} us; compiled HLO: "
                  + ", ".join(f"{k} {v}" for k, v in sorted(p["hlo_ops"].items(),
                                                            key=lambda kv: -kv[1])[:8]), "",
                  "| kernel | ms/step | calls/step | share |", "|---|---|---|---|"]
        lines += [f"| `{k['name'][:70]}` | {k['ms_per_step']:.3f} | {k['calls_per_step']:.1f} | "
                  f"{k['share']:.1%} |" for k in tr["top"][:12]]

    lines += ["", "## Memory and time vs T (`train_step.py`)", "",
              "| grad | T | ms/step | pipelined | peak MiB | compiled MiB |", "|---|---|---|---|---|---|"]
    rows = [r for src in (d.get("memory_vs_t"), f32) for r in (src or {}).get("rows", [])]
    for r in sorted(rows, key=lambda r: (r["grad"], r["iters"])):
        lines.append(f"| {r['grad']} | {r['iters']} | {r['ms']:.1f} | {r['pipelined_ms']:.1f} | "
                     f"{_f(r['peak_mib'] or None, '.0f')} | {r['compiled_mib']:.0f} |")

    flag_steps = [s for s in steps if s.name.startswith("xla_flags_")]
    if flag_steps:
        lines += ["", "## XLA flags, bf16 + cuDNN neumann1", "",
                  "| XLA_FLAGS | ms/step | pipelined | vs default |", "|---|---|---|---|",
                  f"| (default) | {_f(ms(bf16))} | {_f((bf16 or {}).get('pipelined_ms'))} | 1x |"]
        for s in flag_steps:
            r = _row(d.get(s.name), "neumann1", t)
            pipe = r.get("pipelined_ms") if r else None
            lines.append(f"| `{s.env.get('XLA_FLAGS', '')}` | {_f(ms(r))} | {_f(pipe)} | "
                         f"{_x(_ratio((bf16 or {}).get('pipelined_ms'), pipe))} |")

    prof = (d.get("profile_bf16") or {}).get("trace") or {}
    bf16_pipe = (bf16 or {}).get("pipelined_ms")
    f32_pipe = (neumann or {}).get("pipelined_ms")
    peer = min((x for x in (compiled, ms(off["official_compile_bf16"])) if x), default=None)
    busy, kernels = prof.get("busy_fraction"), prof.get("kernels_per_step")
    le = lambda x, y: None if x is None or y is None else x <= y
    ge = lambda x, y: None if x is None or y is None else x >= y
    lines += ["", "## Targets (issue 10)", "", "| target | figure | |", "|---|---|---|",
              _target("bf16 + cuDNN neumann1 <= 8 ms/step pipelined", bf16_pipe,
                      le(bf16_pipe, 8.0), f"{_f(bf16_pipe)} ms"),
              _target(">= 4.4x the torch.compile peer", bf16_pipe,
                      ge(_ratio(peer, bf16_pipe), 4.4),
                      f"{_x(_ratio(peer, bf16_pipe))} (peer {_f(peer)} ms)"),
              _target("GPU busy >= 85% of the bf16 step", busy, ge(busy, 0.85),
                      f"{_f(None if busy is None else 100 * busy, '.0f')}%"),
              _target("kernels per bf16 step <= 500", kernels, le(kernels, 500),
                      _f(kernels, ".0f")),
              _target("float32 neumann1 <= 17 ms/step pipelined", f32_pipe, le(f32_pipe, 17.0),
                      f"{_f(f32_pipe)} ms"),
              _target("float32 >= 2x the torch.compile peer", f32_pipe,
                      ge(_ratio(compiled, f32_pipe), 2.0),
                      _x(_ratio(compiled, f32_pipe))),
              _target("float32 >= 2.8x plain official implicit", f32_pipe,
                      ge(_ratio(plain, f32_pipe), 2.8), _x(_ratio(plain, f32_pipe))),
              _target("decode bf16 >= 1000 images/s", dec_bf16, ge(dec_bf16, 1000),
                      f"{_f(dec_bf16, '.0f')} images/s"),
              _target("decode bf16 >= 58x official", dec_bf16, ge(_ratio(dec_bf16, dec_off), 58),
                      _x(_ratio(dec_bf16, dec_off))),
              _target("decode bf16 not slower than float32", dec_bf16, ge(dec_bf16, dec_f32),
                      f"{_f(dec_bf16, '.0f')} vs {_f(dec_f32, '.0f')} images/s"),
              _target(f"peak bf16 <= {BASELINE['peak_bf16_mib']} MiB", peak(bf16),
                      le(peak(bf16), BASELINE["peak_bf16_mib"]), _mib(peak(bf16))),
              _target(f"peak float32 <= {BASELINE['peak_f32_mib']} MiB", peak(neumann),
                      le(peak(neumann), BASELINE["peak_f32_mib"]), _mib(peak(neumann)))]
    if header["dry_run"]:
        lines += ["", "(dry run: the marks above say nothing about a GPU)"]

    lines += ["", "## Steps", "", "| step | status | seconds |", "|---|---|---|"]
    for s in steps:
        r = results.get(s.name)
        lines.append(f"| {s.name} | {r.status if r else 'not reached'} | "
                     f"{_f(r.wall_s if r else None, '.0f')} |")
    for s in steps:
        r = results.get(s.name)
        if r and (r.status.startswith("failed") or r.status.startswith("timeout")):
            lines += ["", f"### {s.name}: {r.status}", "", "```", r.log.strip(), "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu_suite"),
                   help="report.md, every step's JSON and log go here (default $OUT)")
    p.add_argument("--config", default="configs/slate_clevr.py")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--slate_dir", default="build/official_slate",
                   help="checkout of the official SLATE (benchmarks/README.md says how)")
    p.add_argument("--official_python", default=sys.executable)
    p.add_argument("--steps", type=int, default=20, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--budget_s", type=float, default=None,
                   help="total seconds for the steps; the rest are skipped once it is spent "
                        "(default 450, so the call stays under 8 minutes; 7200 with --dry_run)")
    p.add_argument("--xla_flag_variants", action="append", default=None, metavar="NAME=FLAGS",
                   help="extra XLA_FLAGS settings timed on the bf16 step (repeatable; default: "
                        "command buffers off, and with WHILE,CONDITIONAL)")
    p.add_argument("--only", default=None, help="comma-separated step names to run")
    p.add_argument("--dry_run", action="store_true",
                   help="tiny shapes on whatever backend is there (a CPU): checks the suite")
    p.add_argument("--print_plan", action="store_true", help="print the commands and exit")
    a = p.parse_args(argv)
    if a.xla_flag_variants is None:
        a.xla_flag_variants = list(DEFAULT_FLAG_VARIANTS)
    out = os.path.abspath(a.out)
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    steps = plan(a, out)
    if a.only:
        wanted = set(a.only.split(","))
        unknown = wanted - {s.name for s in steps}
        if unknown:
            raise SystemExit(f"--only: unknown steps {sorted(unknown)}; the steps are "
                             f"{[s.name for s in steps]}")
        steps = [s for s in steps if s.name in wanted]
    if a.print_plan:
        for s in steps:
            env = "".join(f"{k}={shlex.quote(v)} " for k, v in s.env.items())
            print(f"{s.name}: {env}{' '.join(shlex.quote(x) for x in s.cmd)}"
                  + (f"   [skipped: {s.skip}]" if s.skip else ""))
        return ""

    import jax

    config_path, base_set, config = suite_config(a)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip() or "unknown"
    size = config.data.image_size
    header = {"device": f"{jax.devices()[0].device_kind} ({jax.default_backend()})",
              "jax": jax.__version__, "date": time.strftime("%Y-%m-%d"), "commit": commit,
              "config": config_path, "set": base_set,
              "iters": config.slot_attention.num_iterations, "dry_run": a.dry_run,
              "shape": f"{size}x{size}, batch {config.train.batch_size}, "
                       f"{config.slot_attention.num_slots} slots, "
                       f"T={config.slot_attention.num_iterations}",
              "decode": f"{2 if a.dry_run else config.train.batch_size} images x "
                        f"{(size // 4) ** 2} tokens"}
    results: dict[str, Result] = {}
    budget = a.budget_s if a.budget_s is not None else (7200.0 if a.dry_run else 450.0)
    deadline = time.perf_counter() + budget
    report_path = os.path.join(out, "report.md")
    for step in steps:
        print(f"[suite] {step.name} ...", file=sys.stderr, flush=True)
        # A CPU dry run is slower than the GPU at its tiny shapes (compilation dominates).
        results[step.name] = run_step(step, out, deadline - time.perf_counter(),
                                      timeout_scale=10.0 if a.dry_run else 1.0)
        r = results[step.name]
        print(f"[suite] {step.name}: {r.status} ({r.wall_s:.0f} s)", file=sys.stderr, flush=True)
        text = report(results, steps, header)
        with open(report_path, "w") as f:
            f.write(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
