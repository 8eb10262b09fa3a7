"""Reliability: bad input, corrupt files, divergence, shared workdirs, kills and a full disk.

Every case is counted (tests/_faults.py) and the session prints the counts at its end.
The default run kills a few real runs and one sweep; `pytest --soak` adds 20+ SIGKILLs at
seeded random moments of runs and sweeps (`--fault-seed N` replays a soak's moments).
"""

import errno
import gzip
import hashlib
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from _cli import run_cli
from _faults import (
    STUDY,
    TALLY,
    check_final_records,
    check_sweep_records,
    final_records,
    finish,
    install_fault_study,
    kill_after,
    run_dir_of,
    start,
    start_sweep,
    sweep_records,
)

from digitjax import checkpoint, faults, records, study
from digitjax.config import ConfigError

RUN_FLAGS = ["--no-progress", "--no-plots", "--wandb", "off"]
CORRUPT = ("corrupt files", "corrupt files handled")  # tally keys
# TFDS announces a preparation on stderr before it reads the files; it is not an error line.
TFDS_STATUS = "Downloading and preparing dataset"


def snapshot(folder) -> dict:
    """Every path under `folder` with a hash of its bytes: equal snapshots = nothing
    written, created or overwritten."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            if p.is_file() else "folder" for p in sorted(folder.rglob("*"))}


def assert_refused(capsys, argv, fragment, watched, counts=("bad inputs", "bad inputs refused")
                   ) -> str:
    """`digitjax ARGV` fails with exit code 2 and one error line containing `fragment`,
    no traceback, and changes nothing under `watched`; returns the line. `counts`: the
    tally's (tried, refused) keys."""
    tried, refused = counts
    TALLY[tried] += 1
    before = snapshot(watched)
    code, out, err = run_cli(capsys, *argv)
    lines = [line for line in err.splitlines() if line.strip()
             and not line.startswith(TFDS_STATUS)]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("digitjax: error: "), err
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in out + err
    assert snapshot(watched) == before
    TALLY[refused] += 1
    return lines[0]


@pytest.fixture
def workdir(tmp_path):
    """A workdir that already holds a finished run's records, which must survive."""
    done = tmp_path / "work" / "other" / "seed0"
    done.mkdir(parents=True)
    records.write_json(done / records.SUMMARY, {"status": "completed"})
    return tmp_path / "work"


# -- bad input: one line, exit code 2, nothing written -----------------------------------

BAD_INPUTS = [
    (["run", "flax_cn"], "unknown experiment 'flax_cn' (did you mean flax_cnn"),
    (["show", "qiuck"], "unknown experiment 'qiuck' (did you mean quick"),
    (["sweep", "smok"], "unknown study 'smok' (did you mean smoke"),
    (["table", "architecture"], "unknown study 'architecture' (did you mean architectures"),
    (["run", "quick", "--set", "model.name=lenet"], "unknown model 'lenet' (did you mean lenet5"),
    (["run", "quick", "--set", "augment.name=afine"],
     "unknown augmentation 'afine' (did you mean affine"),
    (["run", "quick", "--set", "data.dataset=fashion"],
     "unknown data set 'fashion' (did you mean fashion_mnist"),
    (["run", "quick", "--set", "train.epoch=2"],
     "unknown config key 'train.epoch' (did you mean train.epochs"),
    (["run", "quick", "--set", "optimizer.lr=0.1"], "unknown config key 'optimizer.lr'"),
    (["run", "quick", "--set", "train.epochs"], "is not of the form key=value"),
    (["run", "quick", "--set", "train.epochs=two"], "train.epochs='two': expected int"),
    (["run", "quick", "--set", "train.epochs=1.5"], "train.epochs='1.5': expected int"),
    (["run", "quick", "--set", "optimizer.nesterov=maybe"], "expected bool"),
    (["run", "quick", "--set", "optimizer.learning_rate=fast"], "expected a finite float"),
    (["run", "quick", "--set", "optimizer.learning_rate=nan"], "expected a finite float"),
    (["run", "quick", "--set", "optimizer.learning_rate=inf"], "expected a finite float"),
    (["run", "quick", "--set", "optimizer.learning_rate=-0.1"], "learning_rate must be > 0"),
    (["run", "quick", "--set", "optimizer.learning_rate=0"], "learning_rate must be > 0"),
    (["run", "quick", "--set", "train.batch_size=0"], "train.batch_size must be >= 1"),
    (["run", "quick", "--set", "train.batch_size=-64"], "train.batch_size must be >= 1"),
    (["run", "quick", "--set", "train.batch_size=100000"],
     "train.batch_size=100000 is larger than the training split (55000 images)"),
    (["run", "quick", "--set", "data.train_split=train[:100]"],
     "is larger than the training split (100 images)"),
    (["run", "quick", "--set", "data.train_split=train[:0]"],
     "is larger than the training split (0 images)"),
    (["run", "quick", "--set", "data.val_split=validation"], "bad split 'validation'"),
    (["run", "quick", "--set", "train.epochs=0"], "train.epochs must be >= 1"),
    (["run", "quick", "--set", "train.epochs=-3"], "train.epochs must be >= 1"),
    (["run", "quick", "--set", "schedule.pct_start=1"], "schedule.pct_start must be in (0, 1)"),
    (["run", "quick", "--set", "train.log_every_steps=10"],
     "must be a multiple of train.steps_per_call"),
    (["run", "quick", "--seeds", "3-1"], "--seeds '3-1'"),
    (["run", "quick", "--seed", "-1"], "seeds must be >= 0"),
    (["run", "quick", "--set", "seeds=0,-2"], "seeds='0,-2'"),
    (["sweep", "smoke", "--shard", "2/2"], "--shard '2/2'"),
    (["plot", "--augment", "afine"], "unknown augmentation 'afine'"),
]


@pytest.mark.parametrize("argv,fragment", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(argv, fragment, capsys, workdir,
                                                         prepared_mnist):
    extra = ["--workdir", str(workdir)] if argv[0] in ("run", "sweep") else []
    assert_refused(capsys, [*argv, *extra, *(RUN_FLAGS if argv[0] == "run" else [])],
                   fragment, workdir.parent)


def test_bad_files_given_to_commands_are_one_line_errors(capsys, workdir, tmp_path):
    text = tmp_path / "digit.png"
    text.write_text("not an image")
    csv = tmp_path / "test.csv"
    csv.write_text(",".join(f"pixel{i}" for i in range(784)) + "\n" + "x" + ",0" * 783 + "\n")
    run = workdir / "other" / "seed0"
    for argv, fragment in [
            (["eval", str(tmp_path / "nowhere")], "is not a run folder"),
            (["eval", str(run)], "is not a run folder (no config.json)"),
            (["predict", str(run), str(text)], "not an image"),
            (["predict", str(run), str(tmp_path / "missing.png")], "no such file"),
            (["kaggle", str(run), "--test", str(csv), "-o", str(workdir / "s.csv")],
             "is not an integer")]:
        assert_refused(capsys, argv, fragment, tmp_path)


def test_an_unwritable_workdir_is_refused(capsys, tmp_path, prepared_mnist):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    for where in (blocker / "runs", "/proc/digitjax-runs"):
        assert_refused(capsys, ["run", "quick", "--workdir", str(where), *RUN_FLAGS],
                       "is not writable", tmp_path)


def test_a_run_folder_of_another_config_is_refused(capsys, workdir):
    run_dir = workdir / "quick" / "seed0"
    run_dir.mkdir(parents=True)
    records.write_json(run_dir / records.CONFIG, {"config_hash": "000000000000"})
    assert_refused(capsys, ["run", "quick", "--workdir", str(workdir), *RUN_FLAGS],
                   "holds a run of another config", workdir)


def test_a_second_process_on_a_run_folder_is_refused(capsys, workdir):
    from digitjax import registry
    from digitjax.config import config_hash

    run_dir = workdir / "quick" / "seed0"
    run_dir.mkdir(parents=True)
    records.write_json(run_dir / records.CONFIG,
                       {"config_hash": config_hash(registry.get("quick").config)})
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from digitjax import records\n"
         f"with records.run_lock({str(run_dir)!r}):\n    print('held', flush=True)\n"
         "    sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        line = assert_refused(capsys, ["run", "quick", "--workdir", str(workdir), *RUN_FLAGS],
                              "is being trained by another process", workdir)
        assert f"(pid {holder.pid})" in line
    finally:
        holder.communicate("", timeout=60)


def test_a_corrupt_summary_in_a_run_folder_is_one_line(capsys, workdir):
    from digitjax import registry
    from digitjax.config import config_hash

    run_dir = workdir / "quick" / "seed0"
    run_dir.mkdir(parents=True)
    records.write_json(run_dir / records.CONFIG,
                       {"config_hash": config_hash(registry.get("quick").config)})
    (run_dir / records.SUMMARY).write_text('{"status": "compl')  # cut off by hand
    assert_refused(capsys, ["run", "quick", "--workdir", str(workdir), *RUN_FLAGS],
                   "not valid JSON", workdir, CORRUPT)


def test_a_mistyped_fault_plan_fails_loudly(monkeypatch):
    monkeypatch.setenv("DIGITJAX_FAULT", "kill@chnk:2")
    with pytest.raises(ConfigError, match="kill@POINT"):
        faults.point("chunk")
    monkeypatch.setenv("DIGITJAX_FAULT", "kill@chunk:0")
    with pytest.raises(ConfigError, match="N >= 1"):
        faults.point("chunk")


# -- corrupt data files ------------------------------------------------------------------

def _edit_idx(path, edit):
    """Apply `edit` to the decompressed bytes of a .gz IDX file, keeping it gzipped."""
    raw = bytearray(gzip.decompress(path.read_bytes()))
    path.write_bytes(gzip.compress(bytes(edit(raw)), mtime=0))


def _flip(i):
    def edit(raw):
        raw[i] ^= 0xFF
        return raw
    return edit


IMAGES, LABELS = "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"
TEST_IMAGES, TEST_LABELS = "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"


def _truncate_gz(d):
    (d / IMAGES).write_bytes((d / IMAGES).read_bytes()[:100_000])


def _truncate_raw(d):
    raw = gzip.decompress((d / TEST_LABELS).read_bytes())
    (d / TEST_LABELS).unlink()  # people gunzip files in place
    (d / TEST_LABELS.removesuffix(".gz")).write_bytes(raw[:-10])


def _garbage_gz(d):
    data = bytearray((d / IMAGES).read_bytes())
    data[5000:5100] = bytes(100)
    (d / IMAGES).write_bytes(bytes(data))


def _swap_labels(d):
    a, b = (d / LABELS).read_bytes(), (d / TEST_LABELS).read_bytes()
    (d / LABELS).write_bytes(b)
    (d / TEST_LABELS).write_bytes(a)


def _mnist_instead(d):
    from digitjax import data

    for f in data.EMBEDDED_MNIST_DIR.glob("*.gz"):
        shutil.copy(f, d / f.name)


def _relabel(raw):
    raw[100] = (raw[100] + 1) % 10
    return raw


CORRUPT_IDX = {
    "a missing file": (lambda d: (d / TEST_LABELS).unlink(),
                       "missing IDX file(s) t10k-labels-idx1-ubyte.gz"),
    "a truncated gzip file": (_truncate_gz, f"{IMAGES}: corrupt or truncated gzip data"),
    "a truncated plain IDX file": (_truncate_raw, "t10k-labels-idx1-ubyte: truncated"),
    "garbage inside the gzip stream": (_garbage_gz, f"{IMAGES}: corrupt or truncated gzip"),
    "a bad magic number": (lambda d: _edit_idx(d / LABELS, _flip(3)),
                           f"{LABELS}: bad magic 0x000008fe, expected 0x00000801"),
    "a wrong dimension": (lambda d: _edit_idx(d / TEST_IMAGES, _flip(11)),
                          f"{TEST_IMAGES}: truncated"),
    "one pixel changed (checksum)": (lambda d: _edit_idx(d / TEST_IMAGES, _flip(5000)),
                                     "is not the published fashion_mnist test split"),
    "one label changed (checksum)": (lambda d: _edit_idx(d / TEST_LABELS, _relabel),
                                     "is not the published fashion_mnist test split"),
    "label files swapped": (_swap_labels, "60000 images but"),
    "another data set's files": (_mnist_instead,
                                 "is not the published fashion_mnist train split"),
}


@pytest.mark.parametrize("case", list(CORRUPT_IDX))
def test_corrupt_idx_files_are_one_line_and_prepare_nothing(case, capsys, shared_data,
                                                            tmp_path, workdir):
    corrupt, fragment = CORRUPT_IDX[case]
    idx_dir = tmp_path / "idx"
    shutil.copytree(shared_data / "fashion_mnist", idx_dir)
    corrupt(idx_dir)
    data_dir = tmp_path / "tfds"
    assert_refused(capsys, ["run", "fashion_flax_cnn", "--seed", "0", "--data-idx", str(idx_dir),
                            "--data-dir", str(data_dir), "--workdir", str(workdir), *RUN_FLAGS],
                   fragment, workdir, CORRUPT)
    # TFDS leaves empty folders behind (downloads/, fashion_mnist/), but no file.
    assert not [p for p in data_dir.rglob("*") if p.is_file()]


def _records_cut(version_dir):
    (f,) = version_dir.glob("mnist-test.array_record-*")
    f.write_bytes(f.read_bytes()[:-200])
    (version_dir / "digitjax_cache" / "test.npz").unlink()


def _records_flip(version_dir):
    (f,) = version_dir.glob("mnist-test.array_record-*")
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x55
    f.write_bytes(bytes(data))
    (version_dir / "digitjax_cache" / "test.npz").unlink()


CORRUPT_TFDS = {
    "truncated array_record": _records_cut,
    "a flipped byte in the array_record": _records_flip,
    "corrupt dataset_info.json": lambda v: (v / "dataset_info.json").write_text("{"),
    "a corrupt cache (rebuilt)": lambda v: (v / "digitjax_cache" / "test.npz").write_bytes(
        b"garbage"),
}


@pytest.mark.parametrize("case", list(CORRUPT_TFDS))
def test_corrupt_prepared_data_is_one_line_or_rebuilt(case, fault_sweep, prepared_mnist,
                                                      capsys, tmp_path):
    data_dir = tmp_path / "tfds"
    shutil.copytree(prepared_mnist / "mnist", data_dir / "mnist")
    (version_dir,) = (data_dir / "mnist").iterdir()
    CORRUPT_TFDS[case](version_dir)
    run_dir = tmp_path / "run"
    shutil.copytree(fault_sweep[0] / "fault_linear" / "seed0", run_dir)
    argv = ["eval", str(run_dir), "--data-dir", str(data_dir)]
    if "rebuilt" not in case:
        assert_refused(capsys, argv, f"{version_dir}: cannot read the prepared mnist", run_dir,
                       CORRUPT)
        return
    TALLY["corrupt files"] += 1
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    accuracy = records.read_json(run_dir / records.SUMMARY)["test_accuracy"]
    assert f"test accuracy {100 * accuracy:.2f}%" in out  # the same data as before
    assert (version_dir / "digitjax_cache" / "test.npz").stat().st_size > 1000  # rebuilt
    TALLY["corrupt files handled"] += 1


# -- the test study: a run that diverges, then two that do not ---------------------------

@pytest.fixture
def fault_study(monkeypatch):
    install_fault_study(monkeypatch.setattr)


@pytest.fixture(scope="module")
def fault_sweep(prepared_mnist, tmp_path_factory):
    """(workdir, echoed lines) of the uninterrupted sweep of the test study, in-process."""
    workdir = tmp_path_factory.mktemp("fault_sweep")
    lines = []
    with pytest.MonkeyPatch.context() as mp:
        install_fault_study(mp.setattr)
        study.sweep(STUDY, workdir=workdir, echo=lines.append, progress=False, plots=False,
                    make_loggers=None, parallel="off")
    return workdir, lines


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
    assert code == 0, err
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
    last = err.splitlines()[-1]
    assert last.startswith("digitjax: error: ") and "No space left on device" in last, err
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

def _kill_until(target, starter, delays, check, tmp_path) -> None:
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
    assert code == 0, err
    check(workdir)


def test_soak_random_kills_of_a_run(soak, fault_seed, cli_env, small_run_reference, tmp_path):
    rng = random.Random(fault_seed)
    _kill_until(12, lambda w: start(w, cli_env), iter(lambda: rng.uniform(3, 25), None),
                lambda w: check_final_records(run_dir_of(w), small_run_reference), tmp_path)


def test_soak_random_kills_of_a_sweep(soak, fault_seed, cli_env, fault_sweep, tmp_path):
    rng = random.Random(fault_seed + 1)
    reference = sweep_records(fault_sweep[0])
    _kill_until(10, lambda w: start_sweep(w, cli_env), iter(lambda: rng.uniform(3, 15), None),
                lambda w: check_sweep_records(w, reference), tmp_path)


def test_soak_two_sweep_processes_share_a_workdir(soak, cli_env, fault_sweep, tmp_path):
    procs = [start_sweep(tmp_path, cli_env) for _ in range(2)]
    outputs = [finish(p) for p in procs]
    assert all(code == 0 for code, _, _ in outputs), outputs
    text = "".join(out for _, out, _ in outputs)
    for run in ("fault_diverge seed0", "fault_linear seed0", "fault_linear seed1"):
        trained = re.findall(rf"^{run}: (?:test accuracy|diverged)", text, re.MULTILINE)
        assert len(trained) == 1, text
    check_sweep_records(tmp_path, sweep_records(fault_sweep[0]))
