"""The GPU suite: every GPU figure of BENCHMARKS.md, in one device call, one markdown report.

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
rewritten after every step, so a killed call still leaves the figures gathered so far. The
targets and the baseline figures are data (benchmarks/gpu_targets.json), each marked met /
missed / n/a with its figure.

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

# The baseline figures and the targets, as data: benchmarks/gpu_targets.json.
with open(os.path.join(HERE, "gpu_targets.json")) as _f_targets:
    TARGETS = json.load(_f_targets)
BASELINE = TARGETS["baseline"]
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


# Rows of the train-step table: (label, result name, the row's grad or None for official
# rows, its baseline key); the decode table: (label, figure key, baseline key).
TRAIN_ROWS = (
    ("official vanilla (unroll), float32", "official_unroll", None, "official_unroll_ms"),
    ("official implicit, float32", "official_implicit", None, "official_implicit_ms"),
    ("official implicit + torch.compile, float32", "official_compile_f32", None,
     "official_compile_ms"),
    ("official implicit, bf16 autocast", "official_bf16", None, None),
    ("official implicit, bf16 autocast + torch.compile", "official_compile_bf16", None, None),
    ("ours unroll, float32", "ours_f32", "unroll", "ours_unroll_f32_ms"),
    ("ours neumann1, float32", "ours_f32", "neumann1", "ours_neumann1_f32_ms"),
    ("ours neumann1, bf16, XLA attention", "ours_bf16_xla", "neumann1", "ours_bf16_xla_ms"),
    ("ours neumann1, bf16 + cuDNN attention", "ours_bf16", "neumann1", "ours_bf16_cudnn_ms"),
)
DECODE_ROWS = (
    ("official reconstruct_autoregressive", "decode_official", "decode_official"),
    ("ours KV cache, float32", "decode_f32", "decode_f32"),
    ("ours KV cache, bf16", "decode_bf16", "decode_bf16"),
)
PROFILES = (("profile_bf16", "bf16 + cuDNN neumann1"), ("profile_f32", "float32 neumann1"))
_FORMATS = {"ms": "{:.1f} ms", "x": "{:.2f}x", "%": "{:.0f}%", "images/s": "{:.0f} images/s",
            "MiB": "{:.0f} MiB", "": "{:.0f}"}


def _record(d: dict, name: str, grad: str | None, iters: int) -> dict | None:
    """A train-step row of ours (by grad at the config's T) or an official result."""
    return _row(d.get(name), grad, iters) if grad else d.get(name)


def figures(d: dict, iters: int) -> dict[str, float | None]:
    """Every named figure the tables and the targets read (None when its step gave none)."""
    def rec(name, grad=None):
        return _record(d, name, grad, iters) or {}

    ms = lambda r: r.get("ms")  # noqa: E731
    plain, compiled = ms(rec("official_implicit")), ms(rec("official_compile_f32"))
    peer = min((x for x in (compiled, ms(rec("official_compile_bf16"))) if x), default=None)
    bf16, f32 = rec("ours_bf16", "neumann1"), rec("ours_f32", "neumann1")
    prof = (d.get("profile_bf16") or {}).get("trace") or {}
    out = {
        "bf16_pipelined_ms": bf16.get("pipelined_ms"), "f32_pipelined_ms": f32.get("pipelined_ms"),
        "official_implicit_ms": plain, "official_compile_ms": compiled, "compile_peer_ms": peer,
        "bf16_busy_percent": None if prof.get("busy_fraction") is None
        else 100 * prof["busy_fraction"],
        "bf16_kernels_per_step": prof.get("kernels_per_step"),
        "peak_bf16_mib": bf16.get("peak_mib") or None, "peak_f32_mib": f32.get("peak_mib") or None,
        "decode_official": (d.get("official_decode") or {}).get("decode_images_per_s"),
        "decode_f32": ((d.get("ours_f32") or {}).get("decode") or {}).get("kv_cache"),
        "decode_bf16": ((d.get("ours_bf16") or {}).get("decode") or {}).get("kv_cache"),
    }
    out["bf16_vs_compile_peer"] = _ratio(peer, out["bf16_pipelined_ms"])
    out["f32_vs_official_compile"] = _ratio(compiled, out["f32_pipelined_ms"])
    out["f32_vs_official_implicit"] = _ratio(plain, out["f32_pipelined_ms"])
    out["decode_bf16_vs_official"] = _ratio(out["decode_bf16"], out["decode_official"])
    out["decode_bf16_vs_f32"] = _ratio(out["decode_bf16"], out["decode_f32"])
    return out


def target_rows(values: dict[str, float | None], targets: list[dict]) -> list[str]:
    """`| target | figure | met/missed/n/a |` for each target of gpu_targets.json."""
    rows = []
    for t in targets:
        value = values.get(t["figure"])
        ok = None if value is None else (value <= t["value"] if t["op"] == "<="
                                         else value >= t["value"])
        shown = "n/a" if value is None else _FORMATS[t["unit"]].format(value)
        rows.append(_target(t["target"], value, ok, shown))
    return rows


def report(results: dict[str, Result], steps: list[Step], header: dict) -> str:
    d = {name: r.data for name, r in results.items()}
    t = header["iters"]
    values = figures(d, t)
    official = d.get("official_implicit") or d.get("official_unroll") or {}
    lines = [f"# GPU suite: {header['device']}, {header['date']}", "",
             f"jax {header['jax']}; ours at git {header['commit']}; config "
             f"{header['config']}{''.join(' --set=' + x for x in header['set'])}: "
             f"{header['shape']}; official files sha256 {official.get('digest', 'n/a')}, "
             f"torch {official.get('torch', 'n/a')}"
             + ("; DRY RUN (CPU, tiny shapes; the cuDNN rows run XLA attention): no figure "
                "here is a GPU figure" if header["dry_run"] else ""), "",
             "## Train step, side by side (ms/step: blocking median / pipelined)", "",
             "Speed-ups: official implicit ms/step (plain / torch.compile, float32) over ours "
             f"pipelined. Baseline: {BASELINE['source']}.", "",
             "| variant | ms/step | pipelined ms/step | peak MiB | speed-up vs official "
             "implicit (plain / compile) | baseline ms/step |", "|---|---|---|---|---|---|"]
    for label, name, grad, base in TRAIN_ROWS:
        rec = _record(d, name, grad, t)
        ms, peak = (rec or {}).get("ms"), ((rec or {}).get("peak_mib") or None)
        if grad is None:
            pipe, speedup = "n/a (syncs per step)", ""
        else:
            p = (rec or {}).get("pipelined_ms")
            pipe = _f(p)
            speedup = (f"{_x(_ratio(values['official_implicit_ms'], p))} / "
                       f"{_x(_ratio(values['official_compile_ms'], p))}")
        lines.append(f"| {label} | {_f(ms)} | {pipe} | {_f(peak, '.0f')} | {speedup} | "
                     f"{_f(BASELINE.get(base) if base else None)} |")
    lines += ["", f"## Decode ({header['decode']})", "",
              "| decoder | images/s | vs official | baseline images/s |", "|---|---|---|---|"]
    for label, key, base in DECODE_ROWS:
        lines.append(f"| {label} | {_f(values[key])} | "
                     f"{_x(_ratio(values[key], values['decode_official']))} | "
                     f"{BASELINE[base]} |")

    for name, title in PROFILES:
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
              "| grad | T | ms/step | pipelined | peak MiB | compiled MiB |",
              "|---|---|---|---|---|---|"]
    rows = [r for src in (d.get("memory_vs_t"), d.get("ours_f32"))
            for r in (src or {}).get("rows", [])]
    for r in sorted(rows, key=lambda r: (r["grad"], r["iters"])):
        lines.append(f"| {r['grad']} | {r['iters']} | {r['ms']:.1f} | {r['pipelined_ms']:.1f} | "
                     f"{_f(r['peak_mib'] or None, '.0f')} | {r['compiled_mib']:.0f} |")

    flag_steps = [s for s in steps if s.name.startswith("xla_flags_")]
    if flag_steps:
        default = values["bf16_pipelined_ms"]
        lines += ["", "## XLA flags, bf16 + cuDNN neumann1", "",
                  "| XLA_FLAGS | pipelined ms/step | vs default |", "|---|---|---|",
                  f"| (default) | {_f(default)} | 1x |"]
        for s in flag_steps:
            pipe = (_row(d.get(s.name), "neumann1", t) or {}).get("pipelined_ms")
            lines.append(f"| `{s.env.get('XLA_FLAGS', '')}` | {_f(pipe)} | "
                         f"{_x(_ratio(default, pipe))} |")

    lines += ["", "## Targets (benchmarks/gpu_targets.json)", "", "| target | figure | |",
              "|---|---|---|", *target_rows(values, TARGETS["targets"])]
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
