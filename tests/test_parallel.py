"""Seeds trained side by side on several devices equal seeds trained one after another."""

import os
import subprocess
import sys

import pytest

from digitjax import records, runner

SMALL = ["data.train_split=train[:2048]", "data.val_split=train[55000:56000]",
         "data.test_split=test[:1000]", "train.batch_size=64", "train.steps_per_call=4",
         "train.log_every_steps=8"]


def run(workdir, env, *extra):
    argv = [sys.executable, "-m", "digitjax", "run", "quick", "--seeds", "0-2", "--no-progress",
            "--wandb", "off", "--workdir", str(workdir), *extra]
    argv += [a for s in SMALL for a in ("--set", s)]
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_seeds_on_two_host_devices_match_sequential_runs(prepared_mnist, tmp_path):
    env = {**os.environ, "TFDS_DATA_DIR": str(prepared_mnist),
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    run(tmp_path / "parallel", env)
    run(tmp_path / "sequential", env, "--parallel", "off")
    trained_on = {records.read_json(d / records.CONFIG)["device"]
                  for d in (tmp_path / "parallel").glob("quick+*/seed*")}
    assert len(trained_on) == 2, trained_on  # 3 seeds shared out over the 2 devices
    for seed in range(3):
        a, b = (next((tmp_path / w).glob(f"quick+*/seed{seed}")) for w in ("parallel",
                                                                           "sequential"))
        sa, sb = (records.read_json(d / records.SUMMARY) for d in (a, b))
        assert sa["status"] == sb["status"] == "completed"
        assert sa["final_param_hash"] == sb["final_param_hash"]
        assert sa["test_accuracy"] == sb["test_accuracy"]
        ra = [{k: v for k, v in r.items() if k != "time"}
              for r in records.read_metrics(a / records.METRICS)]
        rb = [{k: v for k, v in r.items() if k != "time"}
              for r in records.read_metrics(b / records.METRICS)]
        assert ra == rb


def test_a_stop_between_two_seeds_on_devices_still_stops(monkeypatch):
    """A SIGTERM that lands while a seed's records are written (no seed between two compiled
    calls to save) must stop the process, not skip the queued seeds and exit 0."""
    import signal

    from digitjax.stop import StoppedBetweenRuns

    class OneTrainer:
        def on_device(self, device):
            return self

    trained = []

    def train_one(tr, seed, run_dir, state, stop, position):
        trained.append(seed)
        stop.requested = signal.SIGTERM  # as the handler does, during this seed's finish

    todo = [(s, None, "new") for s in range(5)]
    with pytest.raises(StoppedBetweenRuns):
        runner._run_on_devices(OneTrainer(), ["d0", "d1"], todo, train_one)
    assert len(trained) < 5  # the queued seeds were not started
