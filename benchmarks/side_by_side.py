"""The side-by-side: the official PyTorch SLATE vs ours, same shapes, same device, one run.

Runs one after another, each in its own process (so every peak-memory figure is its own):
  official vanilla (backprop through T)          benchmarks/official_slate.py --grad=unroll
  official implicit (the paper's one-line change) benchmarks/official_slate.py --grad=implicit
  ours unroll and ours neumann1 at the same T    benchmarks/train_step.py
  ours again, the compilation cache warm         benchmarks/train_step.py --cache_dir=(the same)
and with --decode both autoregressive reconstructions of one batch (official
reconstruct_autoregressive vs our KV-cache decoder). Every shape and optimiser argument of the
official harness is derived from our config, so the two sides cannot drift apart. Prints one
markdown table with the ratios (official / ours) to paste into BENCHMARKS.md; --json writes every
figure (the medians, and each round's records under "rounds").

The official code is never part of this repository: --slate_dir is a checkout you obtain yourself
(benchmarks/README.md says how) and torch is installed by you; this script only runs the two
harnesses.

  # the paper's setting (configs/slate_clevr.py: 96x96, batch 50, 7 slots, T=7) on the GPU:
  python benchmarks/side_by_side.py --slate_dir=build/official_slate --decode
  # minutes on a CPU (tiny shapes):
  python benchmarks/side_by_side.py --slate_dir=build/official_slate --config=configs/default.py:tiny \\
      --set=slate.dvae_hidden=64 --steps=3 --device=cpu --decode
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from fixed_slots import configlib
from fixed_slots.train import trainer

HERE = os.path.dirname(os.path.abspath(__file__))


def official_args_from_config(config) -> list[str]:
    """official_slate.py arguments (official train.py names) for the model our config builds."""
    if config.model.name != "slate":
        raise ValueError(f"side-by-side needs a SLATE config, got model.name={config.model.name!r}")
    if config.slate.dvae_hidden != 64:
        raise ValueError(f"the official dVAE has 64 hidden channels built in; this config has "
                         f"slate.dvae_hidden={config.slate.dvae_hidden}")
    if config.optim.clip != "inf_norm":
        raise ValueError(f"the official step clips the inf-norm; this config has "
                         f"optim.clip={config.optim.clip!r}")
    s, sa = config.slate, config.slot_attention
    args = {
        "image_size": config.data.image_size, "batch_size": config.train.batch_size,
        "num_slots": sa.num_slots, "num_iterations": sa.num_iterations,
        "slot_size": sa.slot_size, "mlp_hidden_size": sa.mlp_hidden_size,
        "num_slot_heads": sa.num_heads, "vocab_size": s.vocab_size, "d_model": s.d_model,
        "num_heads": s.num_decoder_heads, "num_dec_blocks": s.num_decoder_blocks,
        "dropout": s.dropout, "lr_dvae": config.optim.dvae_lr, "lr_main": config.optim.main_lr,
        "clip": config.optim.clip_value, "tau": s.tau_start,
    }
    return [f"--{k}={v}" for k, v in args.items()] + (["--hard"] if s.hard else [])


def _ratio(official: float | None, ours: float | None) -> str:
    return f"{official / ours:.2f}x" if official and ours else "n/a"


def _num(x: float) -> str:
    """Three significant digits, without exponents (0.118, 6.26, 8870)."""
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def _mib(x: float | None) -> str:
    return f"{x:.0f}" if x else "n/a"


def side_by_side_table(official: dict, ours: dict) -> list[str]:
    """Markdown lines from the harnesses' JSON records.

    official: {"unroll": rec, "implicit": rec, "decode": rec?}
    ours: train_step.py's JSON ({"rows": [...], "decode": {...}}).
    Speed-up = official ms / ours ms (= ours images/s / official images/s); memory ratio =
    official peak / ours peak (above 1: ours uses less).
    """
    rows = {(r["grad"], r["iters"]): r for r in ours["rows"]}
    t = official["unroll"]["num_iterations"]
    lines = ["| variant | official ms/step | ours ms/step | speed-up | official peak MiB | "
             "ours peak MiB | memory ratio |", "|---|---|---|---|---|---|---|"]
    pairs = [(f"vanilla, T={t}: official backprop through T vs ours unroll", "unroll", "unroll"),
             (f"implicit, T={t}: official one-line change vs ours neumann1 (both {t}+1 "
              f"updates)", "implicit", "neumann1")]
    rss = []
    for label, theirs_key, ours_grad in pairs:
        theirs, mine = official[theirs_key], rows[(ours_grad, t)]
        mine_peak = mine["peak_mib"] or None  # 0 where the backend reports no peak (CPU)
        lines.append(f"| {label} | {theirs['ms']:.1f} | {mine['ms']:.1f} | "
                     f"{_ratio(theirs['ms'], mine['ms'])} | {_mib(theirs['peak_mib'])} | "
                     f"{_mib(mine_peak)} | {_ratio(theirs['peak_mib'], mine_peak)} |")
        warm = (f" (second run, compilation cached: {_mib(mine['warm_max_rss_mib'])}, "
                f"{mine['warm_ms']:.1f} ms/step)" if mine.get("warm_max_rss_mib") else "")
        rss.append(f"{ours_grad} {_mib(mine.get('max_rss_mib'))}{warm} vs official "
                   f"{theirs_key} {_mib(theirs.get('max_rss_mib'))}")
    # Where no device allocator peak exists (CPU), the processes' peak resident memory is the
    # same-method comparison left; it includes each framework's own footprint (XLA compilation).
    lines += ["", "process peak RSS, MiB (ours vs official): " + "; ".join(rss)]
    if "decode" in official and ours.get("decode"):
        theirs, mine = official["decode"], ours["decode"]
        lines += ["", f"| decode, {theirs['batch_size']} images x {theirs['tokens']} tokens | "
                  "official images/s | ours images/s | speed-up |", "|---|---|---|---|",
                  f"| official reconstruct_autoregressive (full recompute per token) vs ours KV "
                  f"cache | {_num(theirs['decode_images_per_s'])} | {_num(mine['kv_cache'])} | "
                  f"{mine['kv_cache'] / theirs['decode_images_per_s']:.1f}x |"]
    return lines


def _with_flag(cmd: list[str], name: str, value) -> list[str]:
    """`cmd` with its --name=... replaced by --name=value."""
    return [x for x in cmd if not x.startswith(f"--{name}=")] + [f"--{name}={value}"]


def _run_json(cmd: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "figures.json")
        print("$", " ".join(cmd[1:]), file=sys.stderr, flush=True)
        subprocess.run(cmd + [f"--json={path}"], check=True, stdout=sys.stderr)
        with open(path) as f:
            return json.load(f)


def _official_round(theirs: list[str], decode_cmd: list[str] | None) -> dict:
    record = {"unroll": _run_json(theirs + ["--grad=unroll"]),
              "implicit": _run_json(theirs + ["--grad=implicit"])}
    if decode_cmd:
        record["decode"] = _run_json(decode_cmd)
    return record


def _ours_round(ours_cmd: list[str], warm: bool) -> dict:
    if not warm:
        return _run_json(ours_cmd)
    # One fresh compilation cache for both runs: the first compiles (and fills it), the
    # second starts as main.py's second run of a config does (the cache warm).
    with tempfile.TemporaryDirectory() as cache:
        ours = _run_json(ours_cmd + [f"--cache_dir={cache}"])
        again = _run_json(ours_cmd + [f"--cache_dir={cache}"])
    for row, second in zip(ours["rows"], again["rows"]):
        row["warm_max_rss_mib"] = second.get("max_rss_mib")
        row["warm_ms"] = second["ms"]
    return ours


def _median_rounds(official_rounds: list[dict], ours_rounds: list[dict]) -> tuple[dict, dict]:
    """One record per side, as one round writes it, with ms/step the median over the rounds
    (everything else, memory included, from the first round)."""
    official = {k: dict(v) for k, v in official_rounds[0].items()}
    for key in ("unroll", "implicit"):
        official[key]["ms"] = statistics.median(r[key]["ms"] for r in official_rounds)
    ours = dict(ours_rounds[0])
    ours["rows"] = [dict(row) for row in ours_rounds[0]["rows"]]
    for i, row in enumerate(ours["rows"]):
        row["ms"] = statistics.median(r["rows"][i]["ms"] for r in ours_rounds)
    return official, ours


def rounds_lines(official_rounds: list[dict], ours_rounds: list[dict]) -> list[str]:
    """Every round's ms/step and speed-up, per variant: the spread the median hides."""
    lines = ["", "| variant | round | official ms/step | ours ms/step | speed-up |",
             "|---|---|---|---|---|"]
    for theirs_key, ours_grad in (("unroll", "unroll"), ("implicit", "neumann1")):
        for i, (theirs, mine) in enumerate(zip(official_rounds, ours_rounds), 1):
            row = next(r for r in mine["rows"] if r["grad"] == ours_grad)
            lines.append(f"| {ours_grad} vs official {theirs_key} | {i} | "
                         f"{theirs[theirs_key]['ms']:.1f} | {row['ms']:.1f} | "
                         f"{_ratio(theirs[theirs_key]['ms'], row['ms'])} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slate_dir", required=True, help="checkout of the official SLATE (not ours)")
    p.add_argument("--config", default="configs/slate_clevr.py")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. --set=slate.attention_impl=cudnn (repeatable)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default=None, choices=("cuda", "cpu"),
                   help="the official side's device (ours uses JAX's default backend)")
    p.add_argument("--compute_dtype", default="float32", choices=("float32", "bfloat16"),
                   help="bfloat16: ours mixed precision, official torch.autocast(bf16)")
    p.add_argument("--decode", action="store_true", help="also time autoregressive decoding")
    p.add_argument("--decode_repeats", type=int, default=1)
    p.add_argument("--decode_batch", type=int, default=None,
                   help="images per decode batch (default: the config's batch size)")
    p.add_argument("--official_python", default=sys.executable,
                   help="interpreter with torch for the official harness")
    p.add_argument("--warm", action=argparse.BooleanOptionalAction, default=True,
                   help="run ours a second time with the compilation cache the first filled, "
                        "for its peak memory without XLA's compilation (--no-warm: once)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the official and our harness this many times, alternating, and "
                        "report the median of each side with every round's speed-up (this "
                        "machine's load drifts by tens of percent within an hour: one round "
                        "cannot separate 1.3x from 1.5x)")
    p.add_argument("--json", default=None, help="also write every figure here")
    a = p.parse_args(argv)
    if not os.path.isfile(os.path.join(a.slate_dir, "slate.py")):
        p.error(f"--slate_dir={a.slate_dir} has no slate.py: get a checkout of "
                "github.com/singhgautam/slate (benchmarks/README.md says how)")
    if a.rounds < 1:
        p.error(f"--rounds={a.rounds}: give at least 1")
    config = configlib.from_file(a.config, a.set)
    config.train.compute_dtype = a.compute_dtype
    trainer.check_config(config)
    shape_args = official_args_from_config(config)
    t = config.slot_attention.num_iterations
    timing = [f"--steps={a.steps}", f"--warmup={a.warmup}"]
    theirs = [a.official_python, os.path.join(HERE, "official_slate.py"),
              f"--slate_dir={a.slate_dir}", *shape_args, *timing]
    if a.device:
        theirs.append(f"--device={a.device}")
    if a.compute_dtype == "bfloat16":
        theirs.append("--amp=bf16")

    ours_cmd = [sys.executable, os.path.join(HERE, "train_step.py"), f"--config={a.config}",
                "--grads=unroll,neumann1", f"--iters={t}", *timing,
                f"--compute_dtype={a.compute_dtype}", "--quiet", *(f"--set={x}" for x in a.set)]
    decode_batch = a.decode_batch or config.train.batch_size
    official_decode = None
    if a.decode:
        official_decode = (_with_flag(theirs, "batch_size", decode_batch)
                           + ["--decode", f"--decode_repeats={a.decode_repeats}"])
        ours_cmd += [f"--decode_repeats={a.decode_repeats}", f"--decode_batch={decode_batch}",
                     "--decode_variants=kv_cache"]
    else:
        ours_cmd.append("--decode_repeats=0")
    official_rounds, ours_rounds = [], []
    for round_index in range(a.rounds):
        # Alternate which side goes first, so a drift in the machine's load is not all on one.
        for side in ("ours", "official") if round_index % 2 else ("official", "ours"):
            if side == "official":
                official_rounds.append(_official_round(theirs, official_decode))
            else:
                ours_rounds.append(_ours_round(ours_cmd, warm=a.warm and round_index == 0))
    official, ours = _median_rounds(official_rounds, ours_rounds)

    u, h = official["unroll"], ours["header"]
    print(f"# side by side, {time.strftime('%Y-%m-%d')}: official SLATE (files sha256 "
          f"{u['digest']}) on {u['device']}, torch {u['torch']}; ours on {h['device']} as "
          f"{h.get('devices', 1)} device(s) (data-parallel), jax "
          f"{h['jax']}; {a.config}{''.join(' --set=' + x for x in a.set)}: "
          f"{h['image_size']}x{h['image_size']}, batch "
          f"{h['batch_size']}, {config.slot_attention.num_slots} slots, T={t}, "
          f"{a.compute_dtype}; median of {a.steps} steps after {a.warmup} warm-up"
          + (f"; {a.rounds} alternating rounds, their medians" if a.rounds > 1 else ""))
    print("\n".join(side_by_side_table(official, ours)))
    if a.rounds > 1:
        print("\n".join(rounds_lines(official_rounds, ours_rounds)))
    if a.json:
        with open(a.json, "w") as f:
            # The medians as the table shows them, and every round's own records beneath.
            json.dump({"official": official, "ours": ours,
                       "rounds": {"official": official_rounds, "ours": ours_rounds}}, f,
                      indent=1)


if __name__ == "__main__":
    main()
