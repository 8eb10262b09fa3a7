"""Bad input and corrupt files: one error line, exit code 2, nothing written or lost.

Every case is counted (tests/_faults.py) and the session prints the counts at its end.
"""

import gzip
import hashlib
import shutil
import subprocess
import sys

import pytest
from _cli import run_cli
from _faults import RUN_FLAGS, TALLY

from digitjax import faults, records
from digitjax.config import ConfigError

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
     "data.train_split='train[:0]' selects no mnist examples"),
    (["run", "quick", "--set", "data.val_split=validation"], "bad split 'validation'"),
    # Model selection must never see what it is judged on, nor what it trained on.
    (["run", "quick", "--set", "data.val_split=test"],
     "data.test_split='test' shares 10000 mnist examples with data.val_split='test'"),
    (["run", "quick", "--set", "data.val_split=train[50000:56000]"],
     "shares 5000 mnist examples with data.train_split='train[:55000]'"),
    (["run", "quick", "--set", "data.test_split=test[5%:1%]"],
     "data.test_split='test[5%:1%]' selects no mnist examples"),
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
    # Nothing is left behind, not even the empty folders TFDS made before it failed.
    assert not data_dir.exists(), sorted(data_dir.rglob("*"))


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
