"""Reliability: divergence, shared workdirs, kills and a full disk (bad input and corrupt
files: tests/test_bad_input.py).

Every case is counted (tests/_faults.py) and the session prints the counts at its end.
The default run kills a few real runs and one sweep; `pytest --soak` adds 20+ SIGKILLs at
seeded random moments of runs and sweeps (`--fault-seed N` replays a soak's moments).
"""

import errno
import math
import os
import random
import re
import signal
import subprocess
import threading
import time

import jax
import numpy as np
import pytest
from _cli import run_cli
from _faults import (
    RUN_FLAGS,
    STUDY,
    TALLY,
    check_final_records,
    check_sweep_records,
    final_records,
    finish,
    kill_after,
    run_dir_of,
    start,
    start_sweep,
    sweep_records,
)

from digitjax import checkpoint, faults, records, study

# -- the test study (`fault_sweep` in conftest.py): a run that diverges, then two that do not

def test_a_diverged_run_names_its_step_keeps_its_last_good_checkpoint_and_the_sweep_moves_on(
        fault_sweep, fault_study, capsys):
    workdir, lines = fault_sweep
    run_dir = workdir / "fault_diverge" / "seed0"
    summary = records.read_json(run_dir / records.SUMMARY)
    assert summary["status"] == "diverged"
    found = re.fullmatch(r"loss became (nan|inf|-inf) at step (\d+)", summary["error"])
    assert found, summary["error"]
    step = int(found.group(2))
    assert any(line.startswith(f"fault_diverge seed0: diverged (loss became {found.group(1)} "
                               f"at step {step})") for line in lines), lines
    rows = records.read_metrics(run_dir / records.METRICS)
    assert rows and all(math.isfinite(r["loss"]) and r["step"] < step for r in rows)
    # The last good checkpoint is kept, holds finite weights and restores.
    _, _, kept, state, _ = checkpoint.restore_state(run_dir, "latest")
    assert 0 < kept < step
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(state.params))
    # The sweep went on to the next experiment.
    for seed in (0, 1):
        s = records.read_json(workdir / "fault_linear" / f"seed{seed}" / records.SUMMARY)
        assert s["status"] == "completed"
    # The table counts it apart and averages nothing for it.
    rows, envs = study.collect(STUDY, workdir)
    row = {r.experiment: r for r in rows}["fault_diverge"]
    assert (row.completed, row.diverged) == (0, 1) and math.isnan(row.test_mean)
    assert "| fault_diverge | linear | none | 0/1 (1 diverged) | - |" in study.render(
        STUDY, rows, envs)[0]
    # A diverged run is final: not retrained, and `digitjax run` exits 1 for it.
    code, out, _ = run_cli(capsys, "run", "fault_diverge", "--workdir", workdir, *RUN_FLAGS)
    assert code == 1 and "already finished" in out


def test_two_sweeps_sharing_a_workdir_split_the_runs_and_train_none_twice(
        fault_sweep, fault_study, tmp_path, monkeypatch):
    from digitjax.train import Trainer

    trained, errors = [], []
    fit = Trainer.fit

    def counting_fit(self, seed, run_dir, **kwargs):
        trained.append(str(run_dir))
        return fit(self, seed, run_dir, **kwargs)

    monkeypatch.setattr(Trainer, "fit", counting_fit)

    def sweep():
        try:
            study.sweep(STUDY, workdir=tmp_path, echo=lambda *_: None, progress=False,
                        plots=False, make_loggers=None, parallel="off")
        except BaseException as e:  # re-raised by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=sweep) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    assert sorted(trained) == sorted(set(trained)) and len(trained) == 3, trained
    check_sweep_records(tmp_path, sweep_records(fault_sweep[0]))


# -- SIGKILL of a sweep ------------------------------------------------------------------

def test_a_sweep_killed_at_a_fault_point_and_a_random_moment_resumes_to_the_same_records(
        fault_sweep, cli_env, fault_seed, tmp_path):
    # Saves: fault_diverge's at steps 8 and 16, then fault_linear seed0's: the 5th is its
    # step 24.
    code, _, err = finish(start_sweep(tmp_path, cli_env, "kill@save:5"))
    assert code == -signal.SIGKILL, err
    assert (tmp_path / "fault_diverge" / "seed0" / records.SUMMARY).exists()
    assert not (tmp_path / "fault_linear" / "seed0" / records.SUMMARY).exists()
    kill_after(start_sweep(tmp_path, cli_env), random.Random(fault_seed).uniform(3, 12),
               tmp_path)
    code, out, err = finish(start_sweep(tmp_path, cli_env))
    assert code == 1 and "faults: 1 of 3 finished runs diverged" in out, err  # fault_diverge
    check_sweep_records(tmp_path, sweep_records(fault_sweep[0]))


# -- a full disk -------------------------------------------------------------------------

FILLER = "filler"


def _fill(folder) -> None:
    """Write a file until the file system holding `folder` has no byte left."""
    fd = os.open(folder / FILLER, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for size in (1 << 20, 1 << 12, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
    finally:
        os.close(fd)


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MB tmpfs (needs root): a real file system that can be filled."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)],
                          capture_output=True)
    if done.returncode:
        pytest.skip("mounting a small tmpfs needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


@pytest.mark.parametrize("disk", ["simulated", "tmpfs"])
def test_a_record_write_on_a_full_disk_leaves_the_previous_record_intact(
        disk, tmp_path, monkeypatch, request):
    folder = request.getfixturevalue("small_disk") if disk == "tmpfs" else tmp_path
    path = folder / records.SUMMARY
    records.write_json(path, {"status": "completed", "test_accuracy": 0.9})
    before = path.read_bytes()
    if disk == "tmpfs":
        _fill(folder)
    else:  # no root: the file system reports the full disk when the data is flushed
        def full(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(os, "fsync", full)
    TALLY["full disk"] += 1
    with pytest.raises(OSError) as e:
        records.write_json(path, {"status": "completed", "pad": "x" * 100_000})
    assert e.value.errno == errno.ENOSPC
    assert path.read_bytes() == before
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]  # no temp left
    TALLY["full disk intact"] += 1


# Orbax's background threads hit their closed event loop after the failed save.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_checkpoint_on_a_full_disk_keeps_the_one_before_and_the_run_resumes(
        fault_sweep, fault_study, small_disk, capsys, monkeypatch):
    workdir = small_disk / "runs"
    run_dir = workdir / "fault_linear" / "seed0"
    chunks = []
    point = faults.point

    def fill_after_the_first_checkpoint(name):
        point(name)
        chunks.append(name)
        if name == "chunk" and chunks.count("chunk") == 3:  # step 12: save 8 is in flight
            deadline = time.time() + 60
            while not (run_dir / checkpoint.CHECKPOINTS / "8").is_dir():
                assert time.time() < deadline, "checkpoint 8 never committed"
                time.sleep(0.01)
            _fill(small_disk)  # so the save at step 16 finds no space

    monkeypatch.setattr(faults, "point", fill_after_the_first_checkpoint)
    argv = ["run", "fault_linear", "--seed", "0", "--workdir", workdir, *RUN_FLAGS]
    TALLY["full disk"] += 1
    code, _, err = run_cli(capsys, *argv)
    assert code == 1, err
    (line,) = [line for line in err.splitlines() if line.strip()]
    assert line.startswith("digitjax: error: ") and "No space left on device" in line, err
    ckpts = checkpoint.RunCheckpoints(run_dir, keep=1, read_only=True)
    assert ckpts.all_steps() == [8]
    ckpts.close()
    assert not (run_dir / records.SUMMARY).exists()
    TALLY["full disk intact"] += 1
    monkeypatch.setattr(faults, "point", point)
    (small_disk / FILLER).unlink()  # space freed: the same command resumes and finishes
    code, out, err = run_cli(capsys, *argv)
    assert code == 0 and "resuming" in out, err
    check_final_records(run_dir, final_records(fault_sweep[0] / "fault_linear" / "seed0"))


# -- the soak (pytest --soak): 20+ SIGKILLs at seeded random moments ----------------------

def _kill_until(target, starter, delays, check, tmp_path, exit_code=0) -> None:
    """Start, kill after the next delay, repeat; a process that finishes first has its
    records checked and the next one starts in a new folder. Stops after `target` kills."""
    kills, folder = 0, 0
    workdir = tmp_path / "w0"
    while kills < target:
        if kill_after(starter(workdir), next(delays), workdir):
            kills += 1
            continue
        check(workdir)
        folder += 1
        workdir = tmp_path / f"w{folder}"
    code, _, err = finish(starter(workdir))
    assert code == exit_code, err
    check(workdir)


def test_soak_random_kills_of_a_run(soak, fault_seed, cli_env, small_run_reference, tmp_path):
    rng = random.Random(fault_seed)
    _kill_until(12, lambda w: start(w, cli_env), iter(lambda: rng.uniform(3, 25), None),
                lambda w: check_final_records(run_dir_of(w), small_run_reference), tmp_path)


def test_soak_random_kills_of_a_sweep(soak, fault_seed, cli_env, fault_sweep, tmp_path):
    rng = random.Random(fault_seed + 1)
    reference = sweep_records(fault_sweep[0])
    _kill_until(10, lambda w: start_sweep(w, cli_env), iter(lambda: rng.uniform(3, 15), None),
                lambda w: check_sweep_records(w, reference), tmp_path, exit_code=1)


def test_soak_two_sweep_processes_share_a_workdir(soak, cli_env, fault_sweep, tmp_path):
    procs = [start_sweep(tmp_path, cli_env) for _ in range(2)]
    outputs = [finish(p) for p in procs]
    # Exit 1 for whichever sweep trained (or found finished) the run that diverges.
    assert {code for code, _, _ in outputs} <= {0, 1} and any(c for c, _, _ in outputs), outputs
    text = "".join(out for _, out, _ in outputs)
    for run in ("fault_diverge seed0", "fault_linear seed0", "fault_linear seed1"):
        trained = re.findall(rf"^{run}: (?:test accuracy|diverged)", text, re.MULTILINE)
        assert len(trained) == 1, text
    check_sweep_records(tmp_path, sweep_records(fault_sweep[0]))
