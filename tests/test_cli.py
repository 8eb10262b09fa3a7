"""The command line: bad input is one line and exit 2; a real run end to end."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from _cli import run_cli

from digitjax import registry
from digitjax.config import config_hash


def test_list_shows_every_experiment_with_seeds(capsys):
    code, out, _ = run_cli(capsys, "list")
    assert code == 0
    assert "* quick" in out and "flax_cnn" in out and "fashion_flax_cnn" in out
    assert "seeds 0,1,2" in out
    studies = out.split("Studies (`digitjax sweep STUDY`")[1]
    assert "  architectures " in studies and "arch_bn_cnn" in studies and "  best " in studies


def test_show_prints_the_resolved_config_and_parameter_count(capsys):
    code, out, _ = run_cli(capsys, "show", "flax_cnn", "--set", "train.epochs=2")
    assert code == 0
    config = json.loads(out[: out.rindex("}") + 1])
    assert config["train"]["epochs"] == 2 and config["model"]["name"] == "flax_cnn"
    assert "824,458 parameters" in out


@pytest.mark.parametrize("argv,message", [
    (["run", "flax_cn"], "unknown experiment 'flax_cn' (did you mean flax_cnn"),
    (["show", "nope"], "unknown experiment 'nope'"),
    (["run", "quick", "--set", "train.epoch=2"], "unknown config key 'train.epoch'"),
    (["run", "quick", "--set", "train.epochs=two"], "train.epochs='two': expected int"),
    (["run", "quick", "--set", "optimizer.learning_rate=-1"], "learning_rate must be > 0"),
    (["run", "quick", "--set", "train.batch_size=0"], "batch_size must be >= 1"),
    (["run", "quick", "--seeds", "3-1"], "--seeds '3-1'"),
    (["run", "quick", "--set", "model.name=resnet9000"], "unknown model 'resnet9000'"),
    (["run", "quick", "--set", "data.dataset=mnistt"], "unknown data set 'mnistt'"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path, argv, message):
    code, out, err = run_cli(capsys, *argv, *(["--workdir", str(tmp_path)]
                                              if argv[0] == "run" else []))
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_unwritable_workdir_is_a_clear_error(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, _, err = run_cli(capsys, "run", "quick", "--workdir", str(blocker / "runs"))
    assert code == 2 and "not writable" in err
    assert blocker.read_text() == "not a folder"


def test_run_folder_of_another_config_is_refused(capsys, tmp_path):
    run_dir = tmp_path / "quick" / "seed0"
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"config_hash": "000000000000"}))
    code, _, err = run_cli(capsys, "run", "quick", "--workdir", str(tmp_path))
    assert code == 2 and "holds a run of another config" in err


def test_default_experiment_end_to_end_on_real_mnist(prepared_mnist, tmp_path):
    """`digitjax run` as a user types it: the console script, real MNIST, one epoch."""
    env = {**os.environ, "TFDS_DATA_DIR": str(prepared_mnist)}
    out = subprocess.run([sys.executable, "-m", "digitjax", "run", "--workdir", str(tmp_path),
                          "--no-progress"], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    assert "quick seed0: test accuracy" in out.stdout and "train images/s" in out.stdout
    summary = json.loads((tmp_path / "quick" / "seed0" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 429
    assert summary["test_accuracy"] >= 0.97
    # A finished run is not retrained.
    again = subprocess.run([sys.executable, "-m", "digitjax", "run", "--workdir", str(tmp_path)],
                           capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0 and "already finished" in again.stdout


def test_a_run_folder_in_training_is_refused_and_a_killed_holder_frees_it(capsys, tmp_path):
    from digitjax import records

    run_dir = tmp_path / "quick" / "seed0"
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"config_hash": config_hash(
        registry.get("quick").config)}))
    with records.run_lock(run_dir):
        code, _, err = run_cli(capsys, "run", "quick", "--workdir", str(tmp_path), "--no-plots")
        assert code == 2 and "is being trained by another process" in err
    # A holder killed with SIGKILL never leaves the folder locked.
    holder = subprocess.run([sys.executable, "-c", (
        "import os, signal; from digitjax import records\n"
        f"with records.run_lock({str(run_dir)!r}): os.kill(os.getpid(), signal.SIGKILL)")],
        timeout=60)
    assert holder.returncode == -9
    with records.run_lock(run_dir):
        pass


def test_output_piped_into_a_reader_that_stops_early_is_not_an_error():
    # As with `digitjax show NAME | head -1`; `true` leaves before digitjax (which imports
    # jax first) writes anything, so the write surely meets a closed pipe (EPIPE).
    proc = subprocess.run(f"{sys.executable} -m digitjax show best_bn_cnn | true",
                          shell=True, capture_output=True, text=True, timeout=120)
    assert "Traceback" not in proc.stderr and "error" not in proc.stderr, proc.stderr


def test_listing_experiments_does_not_load_jax():
    # `digitjax list` is what a user types first: it must answer at once, without jax.
    code = ("import sys; from digitjax import cli; assert cli.main(['list']) == 0; "
            "assert 'jax' not in sys.modules, 'jax was imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_no_progress_keeps_a_first_run_quiet_while_tfds_prepares(tmp_path):
    # A first run prepares MNIST with TFDS (whose bars and status lines go to stderr);
    # --no-progress, as in logs and CI, must silence that too.
    env = {**os.environ, "TFDS_DATA_DIR": str(tmp_path / "tfds")}
    proc = subprocess.run([sys.executable, "-m", "digitjax", "run", "smoke_linear", "--seed", "0",
                           "--no-progress", "--no-plots", "--wandb", "off", "--workdir",
                           str(tmp_path / "runs")], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "tfds" / "mnist").is_dir()  # it did prepare
    assert "smoke_linear seed0: test accuracy" in proc.stdout
    assert proc.stderr == ""


def test_run_records_the_ensemble_once_every_seed_has_finished(capsys, prepared_mnist, tmp_path):
    from digitjax import records

    flags = ("--workdir", tmp_path, "--no-progress", "--no-plots", "--wandb", "off")
    ensemble = tmp_path / "smoke_linear" / "ensemble.json"
    code, out, _ = run_cli(capsys, "run", "smoke_linear", "--seed", "0", *flags)
    assert code == 0 and not ensemble.exists()  # seed 1 of the experiment is still to run
    code, out, _ = run_cli(capsys, "run", "smoke_linear", "--seed", "1", *flags)
    assert code == 0 and "smoke_linear: ensemble of 2 seeds: test accuracy" in out
    record = records.read_json(ensemble)
    hashes = [records.read_json(tmp_path / "smoke_linear" / f"seed{s}" / "summary.json")
              ["final_param_hash"] for s in (0, 1)]
    assert [m["final_param_hash"] for m in record["members"]] == hashes
    # Checked independently: each member is its run's reported checkpoint, and the ensemble
    # is the argmax of the seeds' summed log-probabilities (= of their summed logits).
    from digitjax import data
    from digitjax.predict import Predictor

    images, labels = data.load_split("mnist", registry.get("smoke_linear").config.data.test_split)
    log_p = 0
    for seed, member in zip((0, 1), record["members"], strict=True):
        run = tmp_path / "smoke_linear" / f"seed{seed}"
        assert member["run"] == run.name  # relative: the record stays valid if moved
        assert member["accuracy"] == records.read_json(run / "summary.json")["test_accuracy"]
        log_p = log_p + np.log(Predictor.from_run(run).probabilities(images))
    assert record["accuracy"] == pytest.approx(np.mean(log_p.argmax(1) == labels), abs=1e-4)
    # Nothing retrained: the record still describes the runs and is kept as it is.
    code, out, _ = run_cli(capsys, "run", "smoke_linear", *flags)
    assert code == 0 and "ensemble of" not in out
    # A record made from other runs (a seed retrained since) is stale and is rebuilt.
    record["members"][0]["final_param_hash"] = "0" * 16
    records.write_json(ensemble, {**record, "accuracy": 0.0})
    code, out, _ = run_cli(capsys, "run", "smoke_linear", *flags)
    assert "ensemble of 2 seeds" in out
    assert records.read_json(ensemble)["accuracy"] > 0.5
    # A run with overrides is another config: no ensemble of it is recorded.
    code, out, _ = run_cli(capsys, "run", "smoke_linear", "--set", "train.epochs=1", *flags)
    assert code == 0 and "ensemble of" not in out
    # Records without their checkpoints (committed, copied): said, not silently skipped.
    ensemble.unlink()
    shutil.rmtree(tmp_path / "smoke_linear" / "seed0" / "checkpoints")
    code, out, _ = run_cli(capsys, "run", "smoke_linear", *flags)
    assert code == 0 and not ensemble.exists()
    assert ("smoke_linear: ensemble not recorded: seed0 finished but has no checkpoints/"
            in out)
