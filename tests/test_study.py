"""Studies: deterministic shards, resumable sweeps, tables rebuilt from the records."""

import csv
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from digitjax import records, registry, study
from digitjax.config import ConfigError, config_hash

ROOT = Path(__file__).resolve().parents[1]
TIMING = {"time", "train_seconds", "compile_seconds", "eval_seconds", "total_seconds",
          "images_per_second"}


def test_every_study_names_registered_experiments():
    assert {"architectures", "augmentation", "best", "fashion", "smoke"} <= set(
        registry.studies())
    for s in registry.studies().values():
        for name in s.experiments:
            registry.resolve(name)  # valid values and known model/augmentation/data names


def test_shards_partition_the_plan_deterministically():
    full = study.plan("architectures")
    assert len(full) == len(set(full)) == 5 * len(registry.get_study("architectures").experiments)
    shards = [study.plan("architectures", f"{i}/3") for i in range(3)]
    assert sorted(p for s in shards for p in s) == sorted(full)
    assert shards[1] == study.plan("architectures", "1/3")
    for bad in ("3/3", "x", "1-2"):
        with pytest.raises(ConfigError):
            study.plan("architectures", bad)
    with pytest.raises(ConfigError, match="unknown study 'architecture'"):
        study.plan("architecture")


def test_ci95_uses_student_t():
    # t quantiles from tables of Student's t (two-sided 95%): 4, 11 and 40 degrees of freedom.
    for n, t in ((5, 2.776), (12, 2.201), (41, 2.021)):
        assert study.ci95(1.0, n) == pytest.approx(t / n ** 0.5, abs=1e-3), n
    assert study.ci95(1.0, 1) != study.ci95(1.0, 1)  # nan for one value


def test_a_single_finished_seed_shows_no_spread():
    row = study.Row(experiment="smoke_linear", description="", model="linear",
                    augmentation="none", seeds=2, completed=1, diverged=0, test_mean=83.5,
                    test_std=0.0, test_min=83.5, test_max=83.5, test_ci95=float("nan"),
                    val_mean=83.0, num_params=7850, mflops=0.02, epochs=2, train_seconds=0.1,
                    images_per_second=1e5, ensemble=None, wall_seconds=9.0)
    other = dataclasses.replace(row, experiment="smoke_lean_cnn", completed=2, test_std=0.1,
                                val_mean=84.0, test_mean=90.0)
    md = study.render("smoke", [row, other], [])[0]
    assert "| 1/2 | 83.50 (1 seed) |" in md and "| 2/2 | 90.00 +- 0.10 |" in md
    assert "Selected on validation" not in md  # one complete experiment: nothing to choose
    # An unfinished experiment is never chosen, even with the best validation mean so far.
    third = dataclasses.replace(other, experiment="smoke_third", val_mean=83.5, test_mean=91.0)
    md = study.render("smoke", [dataclasses.replace(row, val_mean=99.0), other, third], [])[0]
    assert ("- Selected on validation among the 2 experiments with all their seeds: "
            "`smoke_lean_cnn` (mean val 84.00%, test 90.00 +- 0.10%)") in md


def test_sweep_is_resumable_and_the_table_is_rebuilt_from_records(prepared_mnist, tmp_path):
    lines = []
    kwargs = {"workdir": tmp_path, "echo": lines.append, "progress": False, "plots": False,
              "make_loggers": None}
    study.sweep("smoke", shard="0/2", **kwargs)  # half the runs, as one machine of two
    assert len([line for line in lines if "test accuracy" in line and "seed" in line]) == 2
    study.sweep("smoke", dry_run=True, **kwargs)
    assert sum("to run" in line for line in lines) == 2
    lines.clear()
    study.sweep("smoke", **kwargs)  # finishes the rest, never redoes the first half
    assert sum("already finished" in line for line in lines) == 2
    ensembles = [line for line in lines if "ensemble of 2 seeds" in line]
    assert len(ensembles) == 2  # one per experiment, once all its seeds are done
    out = tmp_path / "tables"
    study.table("smoke", workdir=tmp_path, out_dir=out)
    md = (out / "smoke.md").read_text()
    assert "| smoke_lean_cnn | lean_cnn | none | 2/2 |" in md
    assert "- Wall time: " in md and "for the 4 finished runs" in md
    walls = [float(r["wall_seconds"]) for r in csv.DictReader(open(out / "smoke.csv"))]
    assert len(walls) == 2 and all(w > 0 for w in walls)
    ens = records.read_json(tmp_path / "smoke_lean_cnn" / "ensemble.json")
    assert len(ens["members"]) == 2 and 0.5 < ens["accuracy"] <= 1.0
    assert f"{100 * ens['accuracy']:.2f}" in md
    assert study.table("smoke", workdir=tmp_path, out_dir=out, check=True) == []
    summary = tmp_path / "smoke_linear" / "seed1" / records.SUMMARY
    s = records.read_json(summary)
    records.write_json(summary, {**s, "status": "diverged"})
    assert study.table("smoke", workdir=tmp_path, out_dir=out, check=True)
    study.table("smoke", workdir=tmp_path, out_dir=out)
    assert "1/2 (1 diverged)" in (out / "smoke.md").read_text()
    # Its ensemble record still describes 2 finished seeds: stale, no longer shown.
    ensembles = {r["experiment"]: r["ensemble"] for r in csv.DictReader(open(out / "smoke.csv"))}
    assert ensembles["smoke_linear"] == "" and float(ensembles["smoke_lean_cnn"]) > 50
    # A run made with another config (an older recipe) is refused, not averaged in.
    records.write_json(summary, {**s, "config_hash": "0123456789ab"})
    with pytest.raises(ConfigError, match="smoke_linear/seed1 was made with another config"):
        study.table("smoke", workdir=tmp_path, out_dir=out, check=True)
    records.write_json(summary, s)
    # A workdir with none of the study's runs (a typo) is an error, not an empty table.
    with pytest.raises(ConfigError, match="holds no run of study 'smoke'"):
        study.table("smoke", workdir=tmp_path / "smok", out_dir=out)
    # Runs made with other flags (a study continued elsewhere): the table says so, with counts.
    config = tmp_path / "smoke_lean_cnn" / "seed0" / records.CONFIG
    c = records.read_json(config)
    flags = c["environment"]["xla_flags"]
    records.write_json(config, {**c, "environment": {**c["environment"], "xla_flags": "--x=1"}})
    study.table("smoke", workdir=tmp_path, out_dir=out)
    facts = (out / "smoke.md").read_text().split("- XLA flags: ")[1].splitlines()[0]
    assert facts == f"`--x=1` (1 run); `{flags}` (3 runs)"


def test_wandb_sweep_config_is_a_grid_that_digitjax_run_accepts(monkeypatch):
    import yaml

    from digitjax import cli

    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    config = yaml.safe_load(study.wandb_sweep_config("smoke"))
    assert (config["program"], config["method"], config["project"]) == (
        "digitjax", "grid", "digitjax")
    assert config["parameters"]["experiment"]["values"] == ["smoke_linear", "smoke_lean_cnn"]
    assert config["parameters"]["seed"]["values"] == [0, 1]
    # What `wandb agent` runs: the command with ${args} as --name=value pairs.
    argv = [a for a in config["command"][1:] if a != "${args}"]
    args = cli._parser().parse_args([*argv, "--experiment=smoke_lean_cnn", "--seed=1"])
    assert (args.command, args.experiment, args.seed) == ("run", "smoke_lean_cnn", 1)
    assert args.workdir == "results/runs/smoke"
    monkeypatch.setenv("WANDB_PROJECT", "mine")
    assert yaml.safe_load(study.wandb_sweep_config("smoke"))["project"] == "mine"


def test_no_wandb_grid_for_experiments_with_different_seeds(monkeypatch):
    # quick has seed 0, fast seeds 0-4: a grid would train fast's seeds for quick too.
    mixed = registry.Study("mixed", "two seed lists", ("quick", "fast"))
    monkeypatch.setattr(registry, "get_study", lambda name: mixed)
    with pytest.raises(ConfigError, match=r"different seeds \(quick: 0; fast: 0,1,2,3,4\)"):
        study.wandb_sweep_config("mixed")


def test_committed_tables_match_their_committed_records():
    checked = 0
    for s in registry.studies():
        # A study's own table, and those of its runs on other machines (runs/<study>_<kind>).
        for workdir in sorted((ROOT / "results" / "runs").glob(f"{s}*")):
            if workdir.name != s and not workdir.name.startswith(f"{s}_"):
                continue
            if (ROOT / "results" / f"{workdir.name}.md").exists():
                assert study.table(s, workdir=workdir, out_dir=ROOT / "results",
                                   check=True) == [], workdir.name
                checked += 1
    assert checked >= 2  # smoke and architectures at least


def test_a_committed_run_is_reproduced_by_the_code(prepared_mnist, tmp_path):
    """The committed records came from this code: re-run one as a user would, compare rows."""
    run_dir = ROOT / "results" / "runs" / "smoke" / "smoke_lean_cnn" / "seed0"
    assert (run_dir / records.SUMMARY).exists(), "results/runs/smoke is not committed"
    committed = records.read_json(run_dir / records.CONFIG)
    assert committed["config_hash"] == config_hash(registry.resolve("smoke_lean_cnn"))
    env = {**os.environ, "TFDS_DATA_DIR": str(prepared_mnist)}
    out = subprocess.run([sys.executable, "-m", "digitjax", "run", "smoke_lean_cnn", "--seed",
                          "0", "--workdir", str(tmp_path), "--no-progress", "--no-plots",
                          "--wandb", "off"], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    new_dir = tmp_path / "smoke_lean_cnn" / "seed0"
    new = records.read_json(new_dir / records.CONFIG)
    assert new["environment"]["xla_flags"] == committed["environment"]["xla_flags"]
    summary = records.read_json(new_dir / records.SUMMARY)
    old = records.read_json(run_dir / records.SUMMARY)
    assert summary["final_param_hash"] == old["final_param_hash"]
    # What the table reads (accuracies, the checkpoint chosen) as well as the curves.
    assert {k: v for k, v in summary.items() if k not in TIMING} == {
        k: v for k, v in old.items() if k not in TIMING}
    strip = [{k: v for k, v in r.items() if k not in TIMING}
             for r in records.read_metrics(new_dir / records.METRICS)]
    assert strip == [{k: v for k, v in r.items() if k not in TIMING}
                     for r in records.read_metrics(run_dir / records.METRICS)]


def test_sweep_command_trains_data_parallel_when_asked(prepared_mnist, tmp_path):
    # `digitjax sweep` takes run's execution options; here 2 host devices (a process of its
    # own: host devices exist only if asked for before jax starts).
    (name, seed), = study.plan("smoke", "0/4")
    env = {**os.environ, "TFDS_DATA_DIR": str(prepared_mnist)}
    out = subprocess.run([sys.executable, "-m", "digitjax", "sweep", "smoke", "--shard", "0/4",
                          "--data-parallel", "2", "--workdir", str(tmp_path), "--no-progress",
                          "--no-plots", "--wandb", "off"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert f"{name} seed{seed}: test accuracy" in out.stdout
    record = records.read_json(tmp_path / name / f"seed{seed}" / records.CONFIG)
    assert record["execution"]["data_parallel_devices"] == 2


def test_a_table_from_another_workdir_says_how_to_redo_it(tmp_path):
    from pathlib import Path

    assert study.shown_workdir("best") is None
    assert study.shown_workdir("best", "results/runs/best") is None
    # The same study on a GPU: its own table name and the conventional folder.
    assert study.table_stem("best", tmp_path / "best_h200") == "best_h200"
    assert study.shown_workdir("best", tmp_path / "best_h200") == Path("results/runs/best_h200")
    # Any other folder: the default table name, but the commands to redo it name the folder.
    assert study.table_stem("smoke", tmp_path / "mine") == "smoke"
    assert study.shown_workdir("smoke", tmp_path / "mine") == tmp_path / "mine"
