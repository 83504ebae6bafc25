"""Sweeps and the report: every sweep file is valid; a tiny sweep produces a real report."""
import glob
import json
import os
import pathlib

import numpy as np
import pytest

from fixed_slots.experiments import baselines, report, sweep
from helpers import ROOT, load_config


def _table(text, header_start="| run |"):
    """(header cells, rows of cells) of the first markdown table whose header starts so."""
    lines = text.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith(header_start))
    cells = lambda line: [c.strip() for c in line.strip().strip("|").split(" | ")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("| "):
            break
        rows.append(cells(line))
    return cells(lines[start]), rows

SWEEPS = sorted(glob.glob(str(ROOT / "configs" / "sweeps" / "*.py")))


@pytest.mark.parametrize("path", SWEEPS, ids=os.path.basename)
def test_every_sweep_file_names_existing_config_keys(path):
    module = sweep.load_sweep(path)
    base = load_config(pathlib.Path(module.BASE).stem)
    runs = module.get_runs()
    assert len({name for name, _ in runs}) == len(runs), "run names must be unique"
    for _, overrides in runs:
        for key in {**getattr(module, "COMMON", {}), **overrides}:
            node = base
            *parents, leaf = key.split(".")
            for p in parents:
                node = node[p]
            assert leaf in node, f"{path}: unknown config key {key}"


def test_tiny_sweep_then_report(tmp_path):
    sweep_file = tmp_path / "tiny_sweep.py"
    sweep_file.write_text(
        'BASE = "configs/default.py:tiny"\n'
        'COMMON = {"train.num_steps": 2, "train.log_every_steps": 1,\n'
        '          "train.image_every_steps": 0, "train.jacobian_every_steps": 2}\n'
        'def get_runs():\n'
        '    return [("vanilla", {"grad": "unroll"}), ("implicit", {"grad": "neumann1"})]\n')
    workdir = tmp_path / "sweep"
    assert sweep.main([f"--sweep={sweep_file}", f"--workdir={workdir}", "--seeds=0"]) == 0
    assert (workdir / "vanilla" / "seed_0" / "command.txt").exists()
    # The evaluation saved its per-image values, in image order.
    per_image = json.loads((workdir / "vanilla" / "seed_0" / "eval" / "per_image.json").read_text())
    metrics = json.loads((workdir / "vanilla" / "seed_0" / "eval" / "metrics.json").read_text())
    assert len(per_image["fg_ari"]) == metrics["num_images"]
    assert sum(per_image["fg_ari"]) / metrics["num_images"] == pytest.approx(metrics["fg_ari"])
    # Baselines on the same scenes, in the sweep dir: the report puts them next to the runs.
    assert baselines.main(["--config=configs/default.py:tiny", f"--out={workdir}"]) == 0
    text = report.write_report(str(workdir), str(tmp_path / "report"),
                               pairs=[("implicit", "vanilla")])
    header, table_rows = _table(text)
    assert [r[0] for r in table_rows] == ["implicit", "vanilla"]
    for column in ("final loss", "ari", "fg_ari", "mse_slot_recon", "fg_ari eval SE"):
        assert column in header
    assert "—" not in table_rows[0]  # every cell filled from the real runs
    assert "**Main comparison implicit - vanilla on fg_ari** over 1 paired seeds" in text
    assert "**not decided** (1 seeds cannot reach p < 0.05" in text
    assert "| grid_2x2 (input-independent" not in text  # 3 slots: no quadrants
    assert "| stripes_v (input-independent: 3 vertical stripes)" in text
    assert "WARNING" not in text  # the same scenes (image count and token ceiling agree)
    seed_header, seed_rows = _table(text, "| run | seed |")
    assert [r[:3] for r in seed_rows] == [["implicit", "0", "done"], ["vanilla", "0", "done"]]
    assert " ± " in seed_rows[0][seed_header.index("fg_ari")]  # ± the SE over images
    assert (tmp_path / "report" / "loss.png").exists()
    assert (tmp_path / "report" / "report.md").exists()
    # Finished runs are skipped on a second invocation (resumable sweeps).
    assert sweep.main([f"--sweep={sweep_file}", f"--workdir={workdir}", "--seeds=0"]) == 0


def test_sweep_goes_seed_by_seed_and_only_keeps_named_runs(tmp_path):
    path = str(ROOT / "configs" / "sweeps" / "study_synthetic.py")
    commands = sweep.run_commands(path, str(tmp_path), [0, 1], {},
                                  only=["implicit_T15", "vanilla_T7"])
    train = [(os.path.relpath(d, tmp_path), argv) for d, argv in commands
             if argv[-1] != "--mode=eval"]
    # Sweep order within a seed, every run of seed 0 before seed 1.
    assert [d for d, _ in train] == [
        "vanilla_T7/seed_0", "implicit_T15/seed_0", "vanilla_T7/seed_1", "implicit_T15/seed_1"]
    assert "--config.grad=neumann1" in train[1][1]
    assert "--config.slot_attention.num_iterations=15" in train[1][1]
    assert "--config.seed=1" in train[2][1]
    # Evaluated once, by the sweep's own eval step (its own log), not also at the end of training.
    assert all("--config.train.evaluate_at_end=false" in argv for _, argv in train)
    with pytest.raises(SystemExit) as exit_info:
        sweep.main([f"--sweep={path}", f"--workdir={tmp_path}", "--only=vanilla_T8"])
    assert exit_info.value.code == 2


def test_failed_run_is_recorded_skipped_and_reported(tmp_path, capsys):
    """A run that fails does not stop the sweep: failed.txt names why, it is not evaluated,
    not retried, and the report counts it instead of averaging it in."""
    sweep_file = tmp_path / "failing_sweep.py"
    sweep_file.write_text(
        'BASE = "configs/default.py:tiny"\n'
        'def get_runs():\n'
        '    return [("broken", {"no_such_key": 1}), ("also_broken", {"grad": "nope"})]\n')
    workdir = tmp_path / "sweep"
    assert sweep.main([f"--sweep={sweep_file}", f"--workdir={workdir}", "--seeds=0"]) == 1
    for name in ("broken", "also_broken"):  # the sweep went on after the first failure
        failed = (workdir / name / "seed_0" / "failed.txt").read_text()
        assert failed.startswith("exit code ") and "--config." in failed
        assert not (workdir / name / "seed_0" / "eval").exists()
        assert (workdir / name / "seed_0" / "train.log").exists()
    capsys.readouterr()
    assert sweep.main([f"--sweep={sweep_file}", f"--workdir={workdir}", "--seeds=0"]) == 0
    assert "skip (failed; delete" in capsys.readouterr().out


def _fake_run(root, name, seed, flags, losses, norms, metrics=None, failed=None):
    """A seed directory as the sweep leaves it: event file, command.txt, metrics or failed.txt."""
    from tensorboardX import SummaryWriter

    run_dir = root / name / f"seed_{seed}"
    run_dir.mkdir(parents=True)
    writer = SummaryWriter(str(run_dir))
    for step, (loss, norm) in enumerate(zip(losses, norms), start=1):
        writer.add_scalar("loss", loss, step * 10)
        writer.add_scalar("jacobian_spectral_norm", norm, step * 10)
    writer.close()
    flag_text = " ".join(f"--config.{k}={v}" for k, v in {**flags, "seed": seed}.items())
    (run_dir / "command.txt").write_text(f"python main.py --config=c.py {flag_text} "
                                         f"--workdir={run_dir}\n")
    if metrics is not None:
        (run_dir / "eval").mkdir()
        (run_dir / "eval" / "metrics.json").write_text(json.dumps(metrics))
    if failed is not None:
        (run_dir / "failed.txt").write_text(failed)


def test_report_table_max_columns_failures_and_versus_plot(tmp_path):
    root = tmp_path / "sweep"
    for t in (3, 7):
        for seed in (0, 1):
            # vanilla's norm grows with T and seed; implicit's stays at 1.
            _fake_run(root, f"vanilla_T{t}", seed, {"grad": "unroll",
                      "slot_attention.num_iterations": t},
                      losses=[5.0, 4.0, 3.0 + t], norms=[1.0, 2.0 + seed, 1.5],
                      metrics={"fg_ari": 0.5 + 0.1 * seed, "mse_slot_recon": 10.0 * t,
                               "step": 30})
            _fake_run(root, f"implicit_T{t}", seed, {"grad": "neumann1",
                      "slot_attention.num_iterations": t},
                      losses=[5.0, 3.0, 2.0], norms=[1.0, 1.0, 1.0],
                      metrics={"fg_ari": 0.8, "mse_slot_recon": 5.0, "step": 30})
    _fake_run(root, "vanilla_T7", 2, {"grad": "unroll", "slot_attention.num_iterations": 7},
              losses=[5.0, 1e6], norms=[1.0, 50.0],
              failed="exit code 1: NonFiniteLossError: non-finite loss or gradient at step "
                     "17; training stopped.\n")
    text = report.write_report(str(root), str(tmp_path / "out"),
                               tags=("loss", "jacobian_spectral_norm"),
                               names=("vanilla_T3", "vanilla_T7", "implicit_T7"),
                               versus="slot_attention.num_iterations")
    header, body = _table(text)
    rows = {r[0]: r for r in body}
    assert list(rows) == ["vanilla_T3", "vanilla_T7", "implicit_T7"]  # --runs order
    col = {name: header.index(name) for name in
           ("failed", "final loss", "max jacobian_spectral_norm", "fg_ari")}
    assert rows["vanilla_T7"][col["failed"]] == "1/3 (seed 2: non-finite loss at step 17)"
    assert rows["implicit_T7"][col["failed"]] == "0"
    # The failed seed is not averaged in: loss 10 for both finished seeds, max norms 2 and 3.
    assert rows["vanilla_T7"][col["final loss"]] == "10 ± 0"
    assert rows["vanilla_T7"][col["max jacobian_spectral_norm"]] == "2.5 ± 0.71"
    assert rows["vanilla_T7"][col["fg_ari"]] == "0.55 ± 0.071"
    out = tmp_path / "out"
    for name in ("loss.png", "jacobian_spectral_norm.png",
                 "mse_slot_recon_vs_slot_attention_num_iterations.png"):
        assert (out / name).exists(), name
    # Versus: one line per grad, points at T=3 and 7 (implicit has only T=7 here: no line).
    runs = report.collect(str(root))
    assert report.plot_versus(runs, "slot_attention.num_iterations", "loss",
                              str(out / "v.png"))
    with pytest.raises(FileNotFoundError, match="named \\['vanilla_T9'\\]"):
        report.collect(str(root), ("vanilla_T9",))


def test_sweep_processes_share_a_sweep_through_run_locks(tmp_path, capsys):
    import subprocess
    import sys

    sweep_file = tmp_path / "sweep.py"
    sweep_file.write_text('BASE = "configs/default.py:tiny"\n'
                          'def get_runs():\n'
                          '    return [("held", {"no_such_key": 1}), ("stale", {"no_such_key": 2})]\n')
    workdir = tmp_path / "sweep"
    for name in ("held", "stale"):
        (workdir / name / "seed_0").mkdir(parents=True)
    # "held" is locked by a live process (this one); "stale" by one that has exited.
    (workdir / "held" / "seed_0" / "sweep.lock").write_text(f"{os.getpid()}\n")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (workdir / "stale" / "seed_0" / "sweep.lock").write_text(f"{gone}\n")
    assert sweep.main([f"--sweep={sweep_file}", f"--workdir={workdir}", "--seeds=0"]) == 1
    out = capsys.readouterr().out
    assert f"skip (another sweep process is running it): {workdir}/held/seed_0" in out
    assert not (workdir / "held" / "seed_0" / "train.log").exists()
    assert (workdir / "held" / "seed_0" / "sweep.lock").exists()  # not ours to remove
    # The stale lock was taken over: the run ran (and failed on its bad key), lock released.
    assert (workdir / "stale" / "seed_0" / "failed.txt").exists()
    assert not (workdir / "stale" / "seed_0" / "sweep.lock").exists()


def test_sign_flip_and_paired_t_p_values():
    # d = (1, 2, 3): only the observed signs reach its mean: p = 1/8.
    assert report.sign_flip_p([1.0, 2.0, 3.0]) == 1 / 8
    # d = (1, -1, 2), mean 2/3: sums >= 2 for (+,+,+), (+,-,+), (-,+,+): p = 3/8.
    assert report.sign_flip_p([1.0, -1.0, 2.0]) == 3 / 8
    # Lower is better (direction -1): the same differences are evidence against.
    assert report.sign_flip_p([1.0, 2.0, 3.0], direction=-1) == 1.0
    assert report.sign_flip_p([0.1] * 6) == 1 / 64  # the floor of 6 seeds: 2^-6
    from scipy import stats

    a, b = np.array([0.5, 0.6, 0.55, 0.7]), np.array([0.45, 0.5, 0.56, 0.6])
    assert report.paired_t_p(a - b) == pytest.approx(
        stats.ttest_rel(a, b, alternative="greater").pvalue)
    assert report.paired_t_p(b - a, direction=-1) == pytest.approx(report.paired_t_p(a - b))
    assert report.paired_t_p([0.1]) is None


def _per_image_run(root, name, seed, fg_ari, mse, images, failed=None):
    _fake_run(root, name, seed, {}, losses=[3.0, 2.0], norms=[1.0, 1.0],
              metrics=None if failed else {"fg_ari": float(np.mean(images)), "mse_slot_recon": mse,
                                           "num_images": len(images),
                                           "fg_ari_token_ceiling": 0.9},
              failed=failed)
    if not failed:
        (root / name / f"seed_{seed}" / "eval" / "per_image.json").write_text(
            json.dumps({"fg_ari": list(images)}))


def test_paired_comparison_verdict_and_baselines(tmp_path):
    root = tmp_path / "sweep"
    for seed in range(6):
        base = np.linspace(0.1, 0.3, 8) + 0.01 * seed  # vanilla's FG-ARI 0.2 + 0.01 seed
        _per_image_run(root, "vanilla", seed, None, 100.0 + seed, base)
        # IN better by 0.1 on every image, and lower MSE at every seed but one.
        _per_image_run(root, "IN", seed, None, 90.0 + seed + (20.0 if seed == 5 else 0.0),
                       base + 0.1)
    _per_image_run(root, "IB", 0, None, 95.0, np.full(8, 0.7))
    _per_image_run(root, "IB", 1, None, 0, [], failed="exit code 1: boom\n")
    runs = report.collect(str(root))
    c = report.paired_comparison(runs, "IN", "vanilla", "fg_ari")
    assert c["seeds"] == list(range(6)) and c["better"] == 6
    assert c["mean"] == pytest.approx(0.1) and c["p_sign_flip"] == 1 / 64
    assert c["eval_se"] == pytest.approx(0.0, abs=1e-9)  # the same images, shifted by 0.1
    m = report.paired_comparison(runs, "IN", "vanilla", "mse_slot_recon")
    assert m["direction"] == -1 and m["better"] == 5  # lower MSE is better
    assert m["differences"] == pytest.approx([-10, -10, -10, -10, -10, 10])
    # Only the seeds both finished pair up (IB: seed 0 only; seed 1 failed).
    assert report.paired_comparison(runs, "IB", "vanilla", "fg_ari")["seeds"] == [0]
    text = report.write_report(str(root), str(tmp_path / "out"), tags=("loss",),
                               pairs=report.parse_pairs("IN-vanilla,IB-vanilla"))
    assert "**Main comparison IN - vanilla on fg_ari** over 6 paired seeds" in text
    assert "**decided** (IN higher than vanilla, p < 0.05)" in text
    _, rows = _table(text, "| A - B |")
    assert [r[:2] for r in rows] == [["IN - vanilla", "fg_ari"], ["IN - vanilla", "mse_slot_recon"],
                                     ["IN - vanilla", "loss"], ["IB - vanilla", "fg_ari"],
                                     ["IB - vanilla", "mse_slot_recon"], ["IB - vanilla", "loss"]]
    assert rows[1][7] == "5/6"
    # Three seeds can never decide: the report says so and why.
    short = report.write_report(str(root), str(tmp_path / "out3"), tags=("loss",),
                                names=("IN", "vanilla"), pairs=[("IN", "vanilla")])
    assert "**decided**" in short  # still 6 seeds
    three = report.verdict(dict(c, seeds=[0, 1, 2], p_sign_flip=1 / 8), "IN", "vanilla", "fg_ari")
    assert "**not decided** (3 seeds cannot reach p < 0.05 (the smallest exact p is 2^-3" in three
    with pytest.raises(FileNotFoundError, match="BB"):
        report.write_report(str(root), str(tmp_path / "x"), pairs=[("BB", "vanilla")])
    with pytest.raises(ValueError):
        report.parse_pairs("IN")
    # Baselines next to the runs; a baseline file from other scenes is flagged.
    result = {"num_images": 8, "num_slots": 4, "baselines": {
        "grid_2x2": {"description": "2x2 blocks", "input_independent": True, "fg_ari": 0.3,
                     "fg_ari_se": 0.02, "ari": 0.1, "ari_se": 0.01},
        "kmeans_rgb": {"description": "k-means", "input_independent": False, "fg_ari": 0.6,
                       "fg_ari_se": 0.02},
        "token_ceiling": {"description": "bound", "upper_bound": True, "fg_ari": 0.9,
                          "fg_ari_se": 0.01}}}
    (root / "baselines.json").write_text(json.dumps(result))
    text = report.write_report(str(root), str(tmp_path / "out4"), tags=("loss",))
    assert "| grid_2x2 (input-independent: 2x2 blocks) | 0.3 ± 0.02 | 0.1 ± 0.01 |" in text
    assert "above the best input-independent baseline (grid_2x2, 0.300): IB, IN." in text
    assert "above the best baseline (kmeans_rgb, 0.600): IB." in text
    assert "WARNING" not in text
    result["baselines"]["token_ceiling"]["fg_ari"] = 0.8
    (root / "baselines.json").write_text(json.dumps(result))
    text = report.write_report(str(root), str(tmp_path / "out5"), tags=("loss",))
    assert "WARNING: IB seed 0: token ceiling 0.9000 != the baselines' 0.8000" in text


def test_study_clevr_mirror_config_is_the_papers_64x64_experiment_and_its_arms():
    from fixed_slots.train.trainer import check_config

    config = load_config("study_clevr_mirror")
    assert (config.data.name, config.data.image_size) == ("clevr_mirror", 64)
    assert (config.slot_attention.num_slots, config.slot_attention.num_iterations) == (7, 7)
    assert config.data.max_objects == 6  # mask ids 0..6: none dropped from FG-ARI
    assert (config.optim.clip, config.optim.clip_value) == ("inf_norm", 1.0)
    assert config.optim.use_warmup and config.optim.warmup_steps > 0
    assert (config.slate.d_model, config.slate.num_decoder_blocks, config.train.batch_size) == (
        64, 2, 16)
    # The whole validation split (455 scenes) is evaluated: 13 batches of 35.
    assert (config.eval.batch_size, config.eval.num_batches) == (35, 0)
    assert load_config("slate_clevr").data.max_objects == 6
    tiny = load_config("study_clevr_mirror:tiny")
    tiny.train.num_devices = 1
    check_config(tiny)
    module = sweep.load_sweep(str(ROOT / "configs" / "sweeps" / "study_clevr_mirror.py"))
    runs = dict(module.get_runs())
    assert set(runs) == {"vanilla", "vanilla_T8", "IN", "IB", "BN", "BB"}
    assert runs["vanilla_T8"] == {"grad": "unroll", "slot_attention.num_iterations": 8}
    assert all(r["slot_attention.num_iterations"] == 7
               for name, r in runs.items() if name != "vanilla_T8")
    assert dict(sweep.load_sweep(str(ROOT / "configs" / "sweeps" / "table2.py")).get_runs()) == runs
