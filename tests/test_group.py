"""Seeds trained together by one vmapped program: same results as alone, own records."""

import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from digitjax import checkpoint, data_device, records, registry, runner
from digitjax.group import fit_group
from digitjax.train import Trainer

# 2,048 training images at batch 64: 32 steps per epoch, 2 epochs, chunks of 4 steps.
SMALL = ["train.epochs=2", "train.batch_size=64", "train.steps_per_call=4",
         "train.log_every_steps=8", "checkpoint.every_steps=8"]
TIMING = {"time", "train_seconds", "compile_seconds", "eval_seconds", "total_seconds",
          "images_per_second"}


@pytest.fixture(scope="module")
def alone_and_grouped(mnist_idx, tmp_path_factory):
    (x, y), (tx, ty) = mnist_idx
    # The whole test set, so 0.05 points of accuracy are 5 images.
    data = data_device.from_arrays((x[:2048], y[:2048]), (x[55000:56000], y[55000:56000]),
                                   (tx, ty), num_classes=10, eval_batch_size=1000)
    trainer = Trainer(registry.resolve("quick", SMALL), data)
    tmp = tmp_path_factory.mktemp("group")
    alone = {s: trainer.fit(s, tmp / f"alone{s}", progress=False) for s in (0, 1)}
    grouped = fit_group(trainer, [(s, tmp / f"group{s}", False, []) for s in (0, 1)],
                        progress=False)
    return tmp, alone, dict(zip((0, 1), grouped, strict=True)), trainer


@pytest.mark.parametrize("seed", [0, 1])
def test_a_vmapped_seed_matches_the_seed_trained_alone(alone_and_grouped, seed):
    tmp, alone, grouped, _ = alone_and_grouped
    a, g = alone[seed], grouped[seed]
    assert a["status"] == g["status"] == "completed"
    assert a["steps"] == g["steps"] == 64
    assert abs(a["test_accuracy"] - g["test_accuracy"]) <= 0.0005  # 0.05 points
    # Grouped convolutions round differently: close, but not bit-identical.
    _, _, _, sa, _ = checkpoint.restore_state(tmp / f"alone{seed}", "latest")
    _, _, _, sg, _ = checkpoint.restore_state(tmp / f"group{seed}", "latest")
    for pa, pg in zip(jax.tree.leaves(sa.params), jax.tree.leaves(sg.params), strict=True):
        np.testing.assert_allclose(np.asarray(pg), np.asarray(pa), rtol=0, atol=1e-2)
    rows_a = records.read_metrics(tmp / f"alone{seed}" / records.METRICS)
    rows_g = records.read_metrics(tmp / f"group{seed}" / records.METRICS)
    assert [(r["step"], r["split"]) for r in rows_a] == [(r["step"], r["split"]) for r in rows_g]
    np.testing.assert_allclose([r["loss"] for r in rows_g], [r["loss"] for r in rows_a],
                               rtol=2e-2)


def test_each_grouped_seed_keeps_its_own_records_and_checkpoints(alone_and_grouped):
    tmp, _, grouped, _ = alone_and_grouped
    hashes = set()
    for seed in (0, 1):
        run = tmp / f"group{seed}"
        record = records.read_json(run / records.CONFIG)
        assert record["seed"] == seed and record["execution"]["seeds_per_program"] == 2
        assert records.read_json(run / records.SUMMARY) == grouped[seed]
        # Saved at every 8 steps, only the latest and the best are kept.
        steps = checkpoint.RunCheckpoints(run, keep=2, save_steps=set()).all_steps()
        assert steps and max(steps) == 64
        hashes.add(grouped[seed]["final_param_hash"])
    assert len(hashes) == 2  # two different seeds, not one model twice


def test_auto_vmaps_seeds_on_accelerators_and_spreads_them_over_cpu_devices(monkeypatch):
    assert runner._parallel_mode("auto", 5)[0] in ("off", "devices")  # this CPU
    assert runner._parallel_mode("vmap", 5)[0] == "vmap"
    assert runner._parallel_mode("vmap", 1)[0] == "off"  # one seed: nothing to group
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert runner._parallel_mode("auto", 5)[0] == "vmap"
    assert runner._parallel_mode("off", 5)[0] == "off"


def _group_run(workdir, env, fault=None):
    argv = [sys.executable, "-m", "digitjax", "run", "quick", "--seeds", "0-1", "--parallel",
            "vmap", "--no-progress", "--no-plots", "--workdir", str(workdir),
            "--set", "data.train_split=train[:2048]",
            "--set", "data.val_split=train[55000:56000]", "--set", "data.test_split=test[:1000]"]
    argv += [a for s in SMALL + ["checkpoint.keep=1"] for a in ("--set", s)]
    env = {k: v for k, v in env.items() if k != "DIGITJAX_FAULT"}
    if fault:
        env["DIGITJAX_FAULT"] = fault
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


def _final(workdir):
    (folder,) = [p for p in workdir.iterdir() if p.name.startswith("quick+")]
    out = []
    for seed in (0, 1):
        run = folder / f"seed{seed}"
        summary = records.read_json(run / records.SUMMARY)
        rows = records.read_metrics(run / records.METRICS)
        out.append(({k: v for k, v in summary.items() if k not in TIMING},
                    [{k: v for k, v in r.items() if k not in TIMING} for r in rows]))
    return out


def test_a_killed_seed_group_resumes_to_the_uninterrupted_groups_records(
        prepared_mnist, tmp_path):
    env = {**os.environ, "TFDS_DATA_DIR": str(prepared_mnist),
           "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache")}
    code, err = _group_run(tmp_path / "whole", env)
    assert code == 0, err
    # Killed mid-epoch 2, between checkpoints (a chunk is 4 steps, a checkpoint every 8).
    code, err = _group_run(tmp_path / "killed", env, fault="kill@chunk:11")
    assert code == -signal.SIGKILL, err
    code, out = _group_run(tmp_path / "killed", env)
    assert code == 0, out
    assert out.count("resuming from the latest checkpoint") == 2
    assert _final(tmp_path / "killed") == _final(tmp_path / "whole")


class _StopAfter:
    """A stop request seen at the (n+1)-th chunk boundary, as Ctrl-C would be."""

    def __init__(self, n: int):
        self.n = n

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @property
    def requested(self):
        self.n -= 1
        return signal.SIGTERM if self.n < 0 else 0


def test_seeds_resumed_at_different_steps_train_in_subgroups(alone_and_grouped, tmp_path,
                                                              capsys):
    from digitjax.loop import Interrupted

    _, alone, _, trainer = alone_and_grouped
    with pytest.raises(Interrupted):  # seed 0 stops after 4 chunks of 4 steps, saved
        trainer.fit(0, tmp_path / "s0", progress=False, stop=_StopAfter(3))
    capsys.readouterr()
    done = fit_group(trainer, [(0, tmp_path / "s0", True, []), (1, tmp_path / "s1", False, [])],
                     progress=False)
    for seed, summary in zip((0, 1), done, strict=True):
        assert summary["status"] == "completed" and summary["steps"] == 64
        record = records.read_json(tmp_path / f"s{seed}" / records.CONFIG)
        assert record["execution"]["seeds_per_program"] == 1  # each trained in its own group
        assert abs(summary["test_accuracy"] - alone[seed]["test_accuracy"]) <= 0.0005
    record = records.read_json(tmp_path / "s0" / records.CONFIG)
    assert record["resumed_from_step"] == 16
    # Seed 0 trained alone before and goes on alone: the same settings, nothing to warn of.
    assert "execution_before_resume" not in record
    assert "other settings" not in capsys.readouterr().err


def test_a_seed_resumed_into_a_group_records_the_settings_it_trained_under(
        alone_and_grouped, tmp_path, capsys):
    from digitjax.loop import Interrupted

    _, alone, _, trainer = alone_and_grouped
    for seed in (0, 1):  # both stop at step 16, trained alone (seeds_per_program 1)
        with pytest.raises(Interrupted):
            trainer.fit(seed, tmp_path / f"s{seed}", progress=False, stop=_StopAfter(3))
    capsys.readouterr()
    mirrors = {s: _StartedWith() for s in (0, 1)}
    fit_group(trainer, [(s, tmp_path / f"s{s}", True, [mirrors[s]]) for s in (0, 1)],
              progress=False)
    err = capsys.readouterr().err
    for seed in (0, 1):
        record = records.read_json(tmp_path / f"s{seed}" / records.CONFIG)
        assert record["execution"]["seeds_per_program"] == 2
        assert record["execution_before_resume"]["seeds_per_program"] == 1
        assert mirrors[seed].config == record  # W&B gets the record as written
        assert f"s{seed}: resuming step 16, trained before with other settings " \
               "(seeds_per_program 1 -> 2)" in err


class _StartedWith:
    """A run mirror that keeps the config record it was started with."""

    config = None

    def start(self, config_record, run_dir):
        self.config = config_record

    def log(self, rows):
        pass

    def finish(self, summary):
        pass


class SignalOnFinish:
    """A run mirror whose finish() gets a SIGTERM, as if it came while records are written."""

    def start(self, config_record, run_dir):
        pass

    def log(self, rows):
        pass

    def finish(self, summary):
        os.kill(os.getpid(), signal.SIGTERM)


def test_a_stop_while_the_group_writes_its_records_still_stops(alone_and_grouped):
    """After the last compiled call nothing is left to save, but the request must not be
    lost: a sweep would otherwise go on to its next experiment."""
    from digitjax.stop import StoppedBetweenRuns

    tmp, _, _, trainer = alone_and_grouped
    runs = [(s, tmp / f"stopped{s}", False, [SignalOnFinish()] if s == 0 else [])
            for s in (0, 1)]
    with pytest.raises(StoppedBetweenRuns):
        fit_group(trainer, runs, progress=False)
    for s in (0, 1):  # both finished before the stop was acted on
        assert records.read_json(tmp / f"stopped{s}" / records.SUMMARY)["status"] == "completed"
