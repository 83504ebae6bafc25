"""Sweeps and the report: every sweep file is valid; a tiny sweep produces a real report."""
import glob
import json
import os
import pathlib

import pytest

from fixed_slots.experiments import report, sweep
from helpers import ROOT, load_config

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
    text = report.write_report(str(workdir), str(tmp_path / "report"))
    table_rows = [l for l in text.splitlines() if l.startswith("| vanilla") or
                  l.startswith("| implicit")]
    assert len(table_rows) == 2
    header = next(l for l in text.splitlines() if l.startswith("| run"))
    for column in ("final loss", "ari", "fg_ari", "mse_slot_recon"):
        assert column in header
    assert "—" not in table_rows[0]  # every cell filled from the real runs
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
    rows = {l.split(" | ")[0][2:]: l.split(" | ") for l in text.splitlines()
            if l.startswith("| ") and not l.startswith("| run")}
    header = next(l for l in text.splitlines() if l.startswith("| run")).split(" | ")
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
