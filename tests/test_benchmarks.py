"""The benchmark scripts run on CPU at tiny shapes, so they cannot rot."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import ROOT, load_config


def run(args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    result = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_fixed_point_memory_benchmark_runs():
    out = run(["benchmarks/fixed_point_memory.py", "--batch=2", "--inputs=16", "--dim=8",
               "--iters=1,3", "--repeats=1"])
    assert "| unroll |" in out and "| neumann1 |" in out and "| implicit |" in out
    assert "peak temp memory T=3 / T=1" in out


def test_dvae_pointwise_benchmark_times_both_paths_and_checks_they_agree():
    out = run(["benchmarks/dvae_pointwise.py", "--image_size=8", "--batch=1", "--hidden=8",
               "--vocab=4", "--repeats=1"])
    assert "| conv |" in out and "| matmul |" in out
    worst = float(out.rsplit("gradients: ", 1)[1].split()[0])
    assert worst < 1e-5


def test_argmax_cpu_benchmark_times_both_and_checks_the_indices():
    out = run(["benchmarks/argmax_cpu.py", "--shape=2,3,3,8", "--repeats=2"])
    assert "same indices: True" in out
    assert "| `jnp.argmax` |" in out and "| `dvae.argmax` |" in out


def test_train_step_benchmark_runs():
    out = run(["benchmarks/train_step.py", "--config=configs/default.py:tiny", "--iters=1",
               "--grads=neumann1", "--steps=1", "--decode_repeats=1"])
    assert "| neumann1 | 1 |" in out and "| KV cache |" in out


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_train_step_benchmark_json_rows_and_isolation(tmp_path):
    path = tmp_path / "figures.json"
    run(["benchmarks/train_step.py", "--config=configs/default.py:tiny", "--iters=2", "--grads=unroll",
         "--steps=1", "--warmup=1", "--decode_repeats=1", "--decode_batch=3",
         "--decode_variants=kv_cache", "--loop_steps=4", f"--json={path}"])
    figures = json.loads(path.read_text())
    (row,) = figures["rows"]
    assert (row["grad"], row["iters"]) == ("unroll", 2)
    assert row["ms"] > 0 and row["images_per_s"] > 0 and row["compiled_mib"] > 0
    assert np.isfinite(row["loss"]) and row["mfu"] is None  # no peak FLOP/s known for CPU
    assert figures["decode"]["batch"] == 3 and figures["decode"]["kv_cache"] > 0
    assert "full_recompute" not in figures["decode"]
    assert figures["header"]["batch_size"] == 8
    # the config's own grad/T (neumann1, T=2) is not among the rows, so its bare step was timed
    assert figures["loop"]["grad"] == "neumann1" and figures["loop"]["iters"] == 2
    assert figures["loop"]["loop_ms"] > 0 and figures["loop"]["bare_ms"] > 0


def test_side_by_side_derives_the_papers_official_arguments():
    """configs/slate_clevr.py must give exactly the official harness defaults (the paper's
    setting), so the two sides are timed at the same shapes."""
    side_by_side, official = _load("side_by_side"), _load("official_slate")
    derived = official.parse_args(["--slate_dir=x"] + side_by_side.official_args_from_config(
        load_config("slate_clevr")))
    defaults = official.parse_args(["--slate_dir=x"])
    assert vars(derived) == vars(defaults)
    assert (defaults.image_size, defaults.batch_size, defaults.num_iterations) == (96, 50, 7)


def test_side_by_side_refuses_configs_the_official_model_cannot_match():
    side_by_side = _load("side_by_side")
    config = load_config("slate_clevr")
    config.slate.dvae_hidden = 32
    with pytest.raises(ValueError, match="dvae_hidden=32"):
        side_by_side.official_args_from_config(config)
    with pytest.raises(ValueError, match="SLATE config"):
        side_by_side.official_args_from_config(load_config("slot_autoencoder_synthetic"))


def test_side_by_side_table_ratios():
    side_by_side = _load("side_by_side")
    official = {
        "unroll": {"num_iterations": 7, "ms": 300.0, "peak_mib": 9000.0, "max_rss_mib": 900.0},
        "implicit": {"num_iterations": 7, "ms": 200.0, "peak_mib": 6000.0},
        "decode": {"batch_size": 50, "tokens": 576, "decode_images_per_s": 2.0},
    }
    ours = {"rows": [{"grad": "unroll", "iters": 7, "ms": 100.0, "peak_mib": 4500.0,
                      "max_rss_mib": 1500.0, "warm_max_rss_mib": 800.0, "warm_ms": 99.0},
                     {"grad": "neumann1", "iters": 7, "ms": 50.0, "peak_mib": 0.0}],
            "decode": {"kv_cache": 50.0}}
    lines = side_by_side.side_by_side_table(official, ours)
    vanilla, implicit = lines[2].split(" | "), lines[3].split(" | ")
    assert vanilla[1:] == ["300.0", "100.0", "3.00x", "9000", "4500", "2.00x |"]
    # a backend without a peak counter (0) prints n/a, not a ratio against zero
    assert implicit[1:] == ["200.0", "50.0", "4.00x", "6000", "n/a", "n/a |"]
    assert lines[-1].endswith("| 2 | 50 | 25.0x |")
    rss = next(line for line in lines if line.startswith("process peak RSS"))
    assert ("unroll 1500 (second run, compilation cached: 800, 99.0 ms/step) vs official "
            "unroll 900" in rss), rss
    assert "neumann1 n/a vs official implicit n/a" in rss  # no RSS in these records



def test_side_by_side_rounds_take_each_sides_median_and_list_every_round():
    side_by_side = _load("side_by_side")
    official = [{"unroll": {"ms": ms, "max_rss_mib": 900.0 + i},
                 "implicit": {"ms": ms - 10}} for i, ms in enumerate([150.0, 100.0, 120.0])]
    ours = [{"header": {"round": i},
             "rows": [{"grad": "unroll", "iters": 5, "ms": ms},
                      {"grad": "neumann1", "iters": 5, "ms": ms / 2}]}
            for i, ms in enumerate([90.0, 60.0, 80.0])]
    theirs, mine = side_by_side._median_rounds(official, ours)
    assert theirs["unroll"]["ms"] == 120.0 and theirs["implicit"]["ms"] == 110.0
    assert [r["ms"] for r in mine["rows"]] == [80.0, 40.0]
    # memory and headers are the first round's; the rounds' own records are left as they were
    assert theirs["unroll"]["max_rss_mib"] == 900.0 and mine["header"] == {"round": 0}
    assert official[0]["unroll"]["ms"] == 150.0 and ours[0]["rows"][0]["ms"] == 90.0
    lines = side_by_side.rounds_lines(official, ours)
    assert "| unroll vs official unroll | 2 | 100.0 | 60.0 | 1.67x |" in lines
    assert "| neumann1 vs official implicit | 3 | 110.0 | 40.0 | 2.75x |" in lines
    assert len([line for line in lines if " vs official " in line]) == 6


def test_side_by_side_bad_arguments_are_usage_errors(tmp_path, capsys):
    side_by_side = _load("side_by_side")
    with pytest.raises(SystemExit) as e:
        side_by_side.main([f"--slate_dir={tmp_path}"])
    assert e.value.code == 2 and "has no slate.py" in capsys.readouterr().err
    (tmp_path / "slate.py").write_text("")
    with pytest.raises(SystemExit) as e:
        side_by_side.main([f"--slate_dir={tmp_path}", "--rounds=0"])
    assert e.value.code == 2 and "--rounds=0: give at least 1" in capsys.readouterr().err

def test_mixed_precision_benchmark_runs(tmp_path):
    path, plot = tmp_path / "curves.json", tmp_path / "curves.png"
    out = run(["benchmarks/mixed_precision.py", "--config=configs/default.py:tiny", "--steps=4",
               "--log_every=2", "--noise_floor", f"--json={path}", f"--plot={plot}"])
    figures = json.loads(path.read_text())
    rows = figures["rows"]
    assert [r["step"] for r in rows] == [2, 4]
    for name in ("float32", "bfloat16", "float32_seed+1"):
        assert all(np.isfinite(r[f"{name}/loss"]) for r in rows)
    # the reseeded float32 run really is another run (the noise floor is not zero by construction)
    assert rows[-1]["float32_seed+1/loss"] != rows[-1]["float32/loss"]
    assert set(figures["max_second_half"]) == {"bfloat16", "float32_seed+1"}
    assert "max |loss rel. diff from float32|" in out and plot.stat().st_size > 0


def test_train_step_benchmark_reports_blocking_and_pipelined(tmp_path):
    path = tmp_path / "rows.json"
    out = run(["benchmarks/train_step.py", "--config=configs/default.py:tiny", "--iters=1",
               "--grads=neumann1", "--steps=2", "--warmup=1", "--decode_repeats=0",
               "--no-isolate", f"--json={path}"])
    (row,) = json.loads(path.read_text())["rows"]
    assert row["ms"] > 0 and row["pipelined_ms"] > 0
    assert "| ms/step | pipelined ms/step |" in out


def test_dispatch_benchmark_compares_state_layouts(tmp_path):
    path = tmp_path / "dispatch.json"
    out = run(["benchmarks/dispatch.py", "--config=configs/default.py:tiny", "--calls=10",
               "--repeats=10", "--variants=nnx_state,pure,flat_params", f"--json={path}"])
    rows = {r["variant"]: r for r in json.loads(path.read_text())["rows"]}
    assert "| pure |" in out and "| nnx_state |" in out
    # same params, fewer buffers: the flat optimizer state replaces the per-leaf Adam moments
    assert rows["pure"]["params_leaves"] == rows["nnx_state"]["params_leaves"] > 50
    assert rows["pure"]["leaves"] < rows["nnx_state"]["leaves"] / 2
    assert rows["flat_params"]["leaves"] < 25
    for r in rows.values():
        assert r["flatten_us"] > 0 and r["unflatten_us"] > 0 and r["trivial_call_us"] > 0
        assert r["busy_enqueue_us"] is None  # --busy_steps=0


def test_gradient_all_reduce_compares_both_forms_leaf_by_leaf(tmp_path):
    path = tmp_path / "figures.json"
    out = run(["benchmarks/gradient_all_reduce.py", "--config=configs/default.py:tiny",
               "--repeats=1", f"--json={path}"])
    assert "| per leaf (the train step) |" in out and "| one buffer (reduced/unreduced) |" in out
    figures = json.loads(path.read_text())
    assert figures["devices"] >= 2 and figures["leaves"] > 50
    per_leaf, one_buffer, shard_mapped = figures["forms"].values()
    # The train step's form all-reduces (about) every leaf; the others a few buffers.
    assert sum(per_leaf["all_reduce_operands"]) > 50 > sum(one_buffer["all_reduce_operands"])
    assert 0 < sum(shard_mapped["all_reduce_operands"]) < 10
    # Its draws are the shards' own, so its gradient is close to, not equal to, the others'.
    assert 0 < figures["shard_map_relative_difference"] < 1
    for d in figures["differing_leaves"]:  # what differs is named with its ratio
        assert d["leaf"].startswith("[") and d["norm_ratio"] > 0
    # The rank-matched bias is the case the one-buffer form gets right on every jax seen.
    assert figures["minimal_cases"]["x @ W + b.reshape(1, 1, -1)"] == pytest.approx(
        {"W": 1.0, "b": 1.0}, rel=1e-4)


def test_gradient_all_reduce_counts_each_operand_of_a_tuple_all_reduce():
    module = _load("gradient_all_reduce")
    text = ("  %all-reduce.1 = (f32[3]{0}, f32[64,2]{1,0}, f32[]) all-reduce(%a, %b, %c), "
            "channel_id=1\n  %all-reduce.2 = f32[7]{0} all-reduce(%d), channel_id=2\n"
            "  %add = f32[7]{0} add(%all-reduce.2, %all-reduce.2)\n")
    assert module.all_reduce_operands(text) == [3, 1]


def test_hlo_op_counts_walk_loop_bodies_once_and_skip_fusion_bodies():
    import jax
    import jax.numpy as jnp

    profile_step = _load("profile_step")

    def f(x):
        y = jax.lax.fori_loop(0, jnp.int32(x.shape[0]) + jnp.int32(x[0, 0] > 0),
                              lambda i, c: jnp.tanh(c @ c) + i, x)
        return jnp.sum(jnp.exp(y) * 2.0)

    text = jax.jit(f).lower(jnp.ones((8, 8))).compile().as_text()
    counts = profile_step.hlo_op_counts(text)
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total") > 0
    assert "while" not in counts and "parameter" not in counts  # control flow and bookkeeping
    # the loop body's matmul is counted (once), whatever the backend fused it into
    assert counts.get("dot", 0) + counts.get("fusion", 0) + counts.get("custom-call", 0) >= 2
    with pytest.raises(ValueError, match="ENTRY"):
        profile_step.hlo_op_counts("HloModule m\n")


def test_flat_optimizer_compiles_to_fewer_ops_than_the_per_leaf_one():
    """Issue 10's 'fewer kernels', measured the way BENCHMARKS.md does: compiled HLO op counts."""
    import jax
    import jax.numpy as jnp
    import ml_collections

    from fixed_slots.train.optim import make_optimizer, param_labels

    profile_step = _load("profile_step")
    config = ml_collections.ConfigDict(dict(
        dvae_lr=3e-4, main_lr=1e-4, use_warmup=True, warmup_steps=10, decay="none",
        decay_half_life=1, plateau_patience=1, plateau_factor=0.5, plateau_accumulation_steps=1,
        clip="inf_norm", clip_value=1.0, b1=0.9, b2=0.999, eps=1e-8))
    params = {f"{'dvae' if i % 3 == 0 else 'block'}_{i}": {"w": jnp.ones((i + 2, 3)),
                                                           "b": jnp.ones((3,))}
              for i in range(30)}
    labels = param_labels(params, lambda path: "dvae" if path[0].startswith("dvae") else "main")
    counts = {}
    for flat in (False, True):
        tx = make_optimizer(config, labels, flat=flat)
        update = jax.jit(lambda g, s, p: tx.update(g, s, p))
        text = update.lower(params, tx.init(params), params).compile().as_text()
        counts[flat] = profile_step.hlo_op_counts(text)["total"]
    assert counts[True] < counts[False] / 2, counts


def test_profile_step_reads_its_trace_on_the_cpu(tmp_path):
    path = tmp_path / "profile.json"
    out = run(["benchmarks/profile_step.py", "--config=configs/default.py:tiny", "--steps=2",
               "--warmup=1", "--top=5", f"--json={path}"])
    figures = json.loads(path.read_text())
    trace = figures["trace"]
    assert trace["read"].startswith("CPU thunks")
    assert 0 < trace["busy_ms_per_step"] and 0 < trace["busy_fraction"] <= 1.0
    assert trace["kernels_per_step"] > 10 and len(trace["top"]) == 5
    assert trace["host_call_us"] > 0
    assert figures["hlo_ops"]["total"] > 100 and "fusion" in figures["hlo_ops"]
    assert "kernels/step" in out and "| kernel | ms/step |" in out


_HLO_WITH_FRAMES = """HloModule m

FileNames
1 "/site-packages/jax/_src/numpy.py"
2 "/repo/fixed_slots/modules/dvae.py"
3 "/repo/fixed_slots/train/train_step.py"

FunctionNames
1 "where"
2 "Conv2dBlock.__call__"
3 "train_step"

FileLocations
1 {file_name_id=1 function_name_id=1 line=5 end_line=5 column=0 end_column=0}
2 {file_name_id=2 function_name_id=2 line=9 end_line=9 column=0 end_column=0}
3 {file_name_id=3 function_name_id=3 line=7 end_line=7 column=0 end_column=0}

StackFrames
1 {file_location_id=3 parent_frame_id=1}
2 {file_location_id=2 parent_frame_id=1}
3 {file_location_id=1 parent_frame_id=2}
4 {file_location_id=1 parent_frame_id=4}

%fused_computation (p: f32[2]) -> f32[2] {
  %p = f32[2]{0} parameter(0)
  ROOT %n = f32[2]{0} negate(%p), metadata={op_name="x" stack_frame_id=1}
}

ENTRY %main (a: f32[2]) -> f32[2] {
  %a = f32[2]{0} parameter(0)
  %f = f32[2]{0} fusion(%a), kind=kLoop, calls=%fused_computation, metadata={stack_frame_id=3}
  %g = f32[2]{0} fusion(%f), kind=kLoop, calls=%fused_computation, metadata={stack_frame_id=1}
  %c = f32[2]{0} copy(%g), metadata={stack_frame_id=4}
  %b = f32[2]{0} bitcast(%c), metadata={stack_frame_id=3}
  ROOT %d = f32[2]{0} fusion(%b), kind=kLoop, calls=%fused_computation
}
"""


def test_compile_phases_counts_kernels_by_the_innermost_function_of_ours():
    compile_phases = _load("compile_phases")
    counts = compile_phases.kernels_by_function(_HLO_WITH_FRAMES)
    # frame 3 is jax's `where` called from dvae.py: the dVAE's; the bitcast is no kernel and
    # the fused computation's negate (not in the entry) is not counted
    assert counts == {"modules/dvae.py:Conv2dBlock.__call__": 1,
                      "train/train_step.py:train_step": 1, "(outside package)": 1,
                      "(no stack)": 1}


def test_compile_phases_traces_one_compilation_on_the_cpu(tmp_path):
    path = tmp_path / "phases.json"
    out = run(["benchmarks/compile_phases.py", "--config=configs/default.py:tiny", "--top=3",
               "--min_ms=0", f"--json={path}"])
    figures = json.loads(path.read_text())
    assert figures["compile_s"] > 0 and figures["lower_s"] > 0
    assert figures["kernels"] > 100
    assert sum(figures["kernels_by_function"].values()) == figures["kernels"]
    assert any(k.startswith("modules/dvae.py:") for k in figures["kernels_by_function"])
    busy = [t["busy_ms"] for t in figures["threads"].values()]
    assert busy and max(busy) <= figures["compile_s"] * 1e3 * 1.05
    assert any(e["ms"] > 0.5 * figures["compile_s"] * 1e3 for e in figures["timeline"])
    assert "| kernels | innermost function of ours |" in out and "compile " in out


def test_gpu_suite_dry_run_writes_one_report(tmp_path):
    # one real step (the cheapest: one process, one compilation) and one that cannot run here
    out = run(["benchmarks/gpu_suite.py", "--dry_run", f"--out={tmp_path}",
               "--slate_dir=/nonexistent", "--only=official_implicit,profile_f32"])
    report = (tmp_path / "report.md").read_text()
    assert report.strip() == out.strip()
    assert "DRY RUN" in report and "## Targets (benchmarks/gpu_targets.json)" in report
    assert "| profile_f32 | ok |" in report
    assert "| official_implicit | skipped: no official checkout" in report
    assert "## Profile, float32 neumann1" in report and "kernels/step" in report
    assert "| kernels per bf16 step <= 500 | n/a | **n/a** |" in report  # its step did not run
    assert (tmp_path / "profile_f32.json").exists()
    assert (tmp_path / "logs" / "profile_f32.log").read_text().startswith("$ ")


def test_gpu_suite_plan_and_targets():
    gpu_suite = _load("gpu_suite")
    import argparse

    a = argparse.Namespace(config="configs/slate_clevr.py", set=[], slate_dir="/nonexistent",
                           official_python=sys.executable, steps=20, warmup=3, dry_run=False,
                           xla_flag_variants=list(gpu_suite.DEFAULT_FLAG_VARIANTS))
    steps = {s.name: s for s in gpu_suite.plan(a, "/tmp/out")}
    assert "--set=slate.attention_impl=cudnn" in steps["ours_bf16"].cmd
    assert steps["official_compile_f32"].skip.startswith("no official checkout")
    assert "--compile" in steps["official_compile_f32"].cmd
    assert steps["xla_flags_no_command_buffers"].env == {
        "XLA_FLAGS": "--xla_gpu_enable_command_buffer="}
    # the paper's shapes reach the official harness
    assert "--batch_size=50" in steps["official_implicit"].cmd

    def row(grad, ms, pipe, peak):
        return {"grad": grad, "iters": 7, "ms": ms, "pipelined_ms": pipe, "peak_mib": peak,
                "compiled_mib": 1.0}

    R = gpu_suite.Result
    results = {
        "ours_f32": R("ok", data={"rows": [row("unroll", 20, 18, 4000),
                                           row("neumann1", 18, 16.0, 4700)],
                                  "decode": {"kv_cache": 900.0}}),
        "ours_bf16": R("ok", data={"rows": [row("neumann1", 9, 7.5, 1500)],
                                   "decode": {"kv_cache": 1100.0}}),
        "official_implicit": R("ok", data={"ms": 48.0, "peak_mib": 5700, "digest": "abc",
                                           "torch": "2.11"}),
        "official_compile_f32": R("ok", data={"ms": 35.0, "peak_mib": 5300}),
        "official_decode": R("ok", data={"decode_images_per_s": 17.0}),
        "profile_bf16": R("ok", data={"hlo_ops": {"fusion": 300, "total": 400}, "trace": {
            "read": "device kernels", "wall_ms_per_step": 7.5, "busy_ms_per_step": 6.0,
            "busy_fraction": 0.8, "kernels_per_step": 450, "host_call_us": 300.0, "top": []}}),
        "profile_f32": R("timeout (90 s)", log="killed"),
    }
    header = {"device": "NVIDIA H200 (gpu)", "date": "2026-11-27", "jax": "0.11.2",
              "commit": "abc", "config": "configs/slate_clevr.py", "set": [], "iters": 7,
              "dry_run": False, "shape": "96x96", "decode": "50 images x 576 tokens"}
    text = gpu_suite.report(results, list(steps.values()), header)
    targets = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines()
               if line.endswith("** |")}
    assert targets["bf16 + cuDNN neumann1 <= 8 ms/step pipelined"].endswith("**met** |")
    assert targets[">= 4.4x the torch.compile peer"].endswith("**met** |")  # 35 / 7.5 = 4.67
    assert targets["GPU busy >= 85% of the bf16 step"].endswith("**missed** |")
    assert targets["kernels per bf16 step <= 500"].endswith("**met** |")
    assert targets["float32 >= 2.8x plain official implicit"].endswith("**met** |")  # 3.0x
    assert targets["float32 >= 2x the torch.compile peer"].endswith("**met** |")  # 2.19x
    assert targets["decode bf16 >= 58x official"].endswith("**met** |")  # 64.7x
    assert targets["peak float32 <= 4638 MiB"].endswith("**missed** |")
    assert "### profile_f32: timeout (90 s)" in text and "| official_unroll | not reached |" in text


def test_official_parity_parses_its_flags_and_refuses_a_missing_checkout(capsys):
    """The parity harness (torch + the official code, neither installed for tests) parses its
    flags, and without an official checkout stops with the message, before torch is imported."""
    official_parity = _load("official_parity")
    a = official_parity.parse_args(["--slate_dir=/x", "--grads=unroll,IN", "--dtype=float64",
                                    "--set=slot_attention.num_heads=2", "--step=5"])
    assert (a.grads, a.dtype, a.set, a.step, a.tol, a.seed) == (
        "unroll,IN", "float64", ["slot_attention.num_heads=2"], 5, 1e-5, 1)
    for bad in ([], ["--slate_dir=/x", "--grads=unroll,implicit"],
                ["--slate_dir=/x", "--dtype=bf16"]):
        with pytest.raises(SystemExit) as exit_info:
            official_parity.parse_args(bad)
        assert exit_info.value.code == 2, bad
    assert "--grads: ['implicit']" in capsys.readouterr().err
    torch_loaded = "torch" in sys.modules
    with pytest.raises(SystemExit, match="does not contain slate.py"):
        official_parity.main(["--slate_dir=/nonexistent/slate"])
    assert ("torch" in sys.modules) == torch_loaded


def test_official_parity_maps_every_official_parameter_name():
    """The name -> (our path, layout) rules on the official model's parameter names (listed
    here, no torch): conv kernels OIHW -> HWIO, Linear and GRU weights transposed, norms'
    weight -> scale, the positional table's leading 1 dropped."""
    official_parity = _load("official_parity")
    names = {"dvae.encoder.0.m.weight": 4, "dvae.encoder.0.weight": 1, "dvae.encoder.0.bias": 1,
             "dvae.encoder.7.weight": 4, "dvae.encoder.7.bias": 1,
             "positional_encoder.pe": 3, "slot_attn.slot_mu": 3,
             "slot_attn.mlp.2.weight": 2, "slot_attn.layer_norm.weight": 1,
             "slot_attn.slot_attention.gru.weight_hh": 2,
             "slot_attn.slot_attention.gru.bias_ih": 1,
             "slot_attn.slot_attention.mlp.0.bias": 1,
             "slot_attn.slot_attention.norm_slots.weight": 1,
             "slot_attn.slot_attention.project_k.weight": 2,
             "dictionary.dictionary.weight": 2, "slot_proj.weight": 2, "out.weight": 2,
             "tf_dec.blocks.1.ffn.0.weight": 2, "tf_dec.blocks.0.self_attn.proj_o.weight": 2,
             "tf_dec.blocks.0.encoder_decoder_attn_layer_norm.bias": 1,
             "tf_dec.layer_norm.weight": 1}
    got = {n: official_parity.our_path(n, ndim, set(names)) for n, ndim in names.items()}
    assert got == {
        "dvae.encoder.0.m.weight": (("dvae", "encoder", "layers", 0, "conv", "kernel"), "conv"),
        "dvae.encoder.0.weight": (("dvae", "encoder", "layers", 0, "norm", "scale"), "same"),
        "dvae.encoder.0.bias": (("dvae", "encoder", "layers", 0, "norm", "bias"), "same"),
        "dvae.encoder.7.weight": (("dvae", "encoder", "layers", 7, "kernel"), "conv"),
        "dvae.encoder.7.bias": (("dvae", "encoder", "layers", 7, "bias"), "same"),
        "positional_encoder.pe": (("positions", "pe"), "squeeze0"),
        "slot_attn.slot_mu": (("encoder", "slot_attention", "slots_mu"), "same"),
        "slot_attn.mlp.2.weight": (("encoder", "mlp_out", "kernel"), "transpose"),
        "slot_attn.layer_norm.weight": (("encoder", "norm", "scale"), "same"),
        "slot_attn.slot_attention.gru.weight_hh": (
            ("encoder", "slot_attention", "step", "gru", "w_hh"), "transpose"),
        "slot_attn.slot_attention.gru.bias_ih": (
            ("encoder", "slot_attention", "step", "gru", "b_ih"), "same"),
        "slot_attn.slot_attention.mlp.0.bias": (
            ("encoder", "slot_attention", "step", "mlp_in", "bias"), "same"),
        "slot_attn.slot_attention.norm_slots.weight": (
            ("encoder", "slot_attention", "step", "norm_slots", "scale"), "same"),
        "slot_attn.slot_attention.project_k.weight": (
            ("encoder", "slot_attention", "project_k", "kernel"), "transpose"),
        "dictionary.dictionary.weight": (("dictionary", "embed", "embedding"), "same"),
        "slot_proj.weight": (("slot_proj", "kernel"), "transpose"),
        "out.weight": (("head", "kernel"), "transpose"),
        "tf_dec.blocks.1.ffn.0.weight": (("decoder", "blocks", 1, "ffn_in", "kernel"),
                                         "transpose"),
        "tf_dec.blocks.0.self_attn.proj_o.weight": (
            ("decoder", "blocks", 0, "self_attn", "proj_o", "kernel"), "transpose"),
        "tf_dec.blocks.0.encoder_decoder_attn_layer_norm.bias": (
            ("decoder", "blocks", 0, "encoder_decoder_attn_layer_norm", "bias"), "same"),
        "tf_dec.layer_norm.weight": (("decoder", "layer_norm", "scale"), "same"),
    }
    conv = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)  # OIHW
    assert official_parity.convert(conv, "conv").shape == (4, 5, 3, 2)
    assert official_parity.convert(conv, "conv")[1, 2, 0, 1] == conv[1, 0, 1, 2]


def test_token_ceiling_majority_and_ceiling_masks_on_a_known_mask(tmp_path):
    """Two objects on an 8x8 mask of 2x2 tokens (4x4 pixels): the majority map and both FG-ARIs
    against sklearn on the map written out by hand; then the script on the tiny config."""
    import jax.numpy as jnp
    from sklearn.metrics import adjusted_rand_score

    from fixed_slots.models.segmentation import adjusted_rand_index, token_resolution_ceiling

    token_ceiling = _load("token_ceiling")
    mask = np.zeros((1, 8, 8), np.int32)
    mask[0, 0:4, 0:4] = 1  # token (0, 0): all object 1
    mask[0, 0:2, 4:8] = 2  # token (0, 1): 8 pixels of object 2, 8 of background: a tie -> 0
    mask[0, 4:7, 4:7] = 2  # token (1, 1): 9 pixels of object 2
    expected = np.zeros((8, 8), np.int32)
    expected[0:4, 0:4], expected[4:8, 4:8] = 1, 2
    majority = np.asarray(token_ceiling.majority_tokens(jnp.asarray(mask), 4, 3))
    np.testing.assert_array_equal(majority[0], expected)
    fg = mask[0] > 0
    fg_ari = float(adjusted_rand_index(jnp.asarray(mask), jnp.asarray(majority), 3, 3,
                                       ignore_background=True)[0])
    assert abs(fg_ari - adjusted_rand_score(mask[0][fg], expected[fg])) < 1e-6
    assert fg_ari < 0.9  # object 2 split between background and itself
    assert float(token_resolution_ceiling(jnp.asarray(mask), 4, 3)[0]) == 1.0

    path = tmp_path / "ceiling.json"
    out = run(["benchmarks/token_ceiling.py", "--config=configs/default.py:tiny",
               f"--json={path}"])
    figures = json.loads(path.read_text())
    assert figures["num_scenes"] == 8 and "| 16 | 16 |" in out  # eval.batch_size x num_batches
    assert 0.0 <= figures["majority"] <= figures["ceiling"] <= 1.0
