"""Kaggle's Digit Recognizer: CSV round trip, submissions, leakage flag, train.csv as data."""

import json

import numpy as np
import pytest
from _cli import run_cli

from digitjax import data, data_device, kaggle, registry
from digitjax.idx import DataError
from digitjax.predict import Predictor

HEADER = ",".join(kaggle.TEST_HEADER)
ROW = ",".join(["0"] * 784)




def test_csv_round_trip_in_kaggle_format(mnist_idx, tmp_path):
    (x, y), (tx, _) = mnist_idx
    train = kaggle.write_kaggle_csv(tmp_path / "train.csv", x[:300], y[:300])
    test = kaggle.write_kaggle_csv(tmp_path / "test.csv", tx[:200])
    lines = train.read_text().splitlines()
    assert lines[0].startswith("label,pixel0,pixel1,") and lines[0].endswith(",pixel783")
    assert len(lines) == 301 and len(lines[1].split(",")) == 785
    assert test.read_text().splitlines()[0] == HEADER
    images, labels = kaggle.read_kaggle_csv(train)
    np.testing.assert_array_equal(images, x[:300])
    np.testing.assert_array_equal(labels, y[:300])
    assert images.dtype == np.uint8 and labels.dtype == np.int32
    images, labels = kaggle.read_kaggle_csv(test)
    np.testing.assert_array_equal(images, tx[:200])
    assert labels is None


def test_submission_from_an_mnist_run_is_written_and_flagged(run_dir, mnist_idx, tmp_path,
                                                             capsys):
    _, (tx, ty) = mnist_idx
    test = kaggle.write_kaggle_csv(tmp_path / "test.csv", tx[:200])
    out = tmp_path / "sub" / "submission.csv"
    code, stdout, err = run_cli(capsys, "kaggle", run_dir, "--test", test, "-o", out, "--json",
                                "--no-progress")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["leakage"] is True and report["trained_on"] == "mnist"
    assert "digitjax: warning:" in err and "drawn from MNIST" in err
    lines = out.read_text().splitlines()
    assert lines[0] == "ImageId,Label" and lines[1].startswith("1,") and len(lines) == 201
    labels = kaggle.read_submission(out)  # also checks ImageIds are 1..200
    expected = Predictor.from_run(run_dir).probabilities(tx[:200]).argmax(1)
    np.testing.assert_array_equal(labels, expected)
    assert np.mean(labels == ty[:200]) >= 0.9
    assert sum(report["label_counts"]) == 200 and report["images"] == 200


def test_the_output_may_not_be_the_test_csv(run_dir, mnist_idx, tmp_path, capsys):
    _, (tx, _) = mnist_idx
    test = kaggle.write_kaggle_csv(tmp_path / "test.csv", tx[:20])
    before = test.read_bytes()
    code, _, err = run_cli(capsys, "kaggle", run_dir, "--test", test, "-o",
                           tmp_path / "." / "test.csv", "--no-progress")
    assert code == 2 and "is the --test file itself" in err
    assert test.read_bytes() == before


def test_only_a_run_trained_on_kaggle_train_csv_is_not_flagged():
    assert kaggle.leakage_warning({"config": {"data": {"dataset": "kaggle"}}}) is None
    assert "mnist" in kaggle.leakage_warning({"config": {"data": {"dataset": "mnist"}}})


@pytest.mark.parametrize("text,message", [
    ("", "empty file"),
    (ROW + "\n" + ROW + "\n", "line 1: no header"),
    ("id," + HEADER + "\n", "line 1: header"),
    (f"{HEADER}\n{ROW}\n{ROW[:-2]}\n", "line 3: 783 values, expected 784"),
    (f"{HEADER}\n{ROW},0\n", "line 2: 785 values, expected 784"),
    (f"{HEADER}\n{ROW}\n\n{ROW}\n", "line 3: 0 values"),
    (f"{HEADER}\n{ROW}\n{ROW[:-1]}x\n", "line 3, column pixel783: 'x' is not an integer"),
    (f"{HEADER}\n{ROW}\n{ROW[:-1]}1.5\n", "line 3, column pixel783: '1.5' is not an integer"),
    (f"{HEADER}\n{ROW}\n{ROW}\n300{ROW[1:]}\n", "line 4, column pixel0: 300 is outside 0..255"),
    (f"{HEADER}\n-1{ROW[1:]}\n", "line 2, column pixel0: -1 is outside 0..255"),
    (f"label,{HEADER}\n0,{ROW}\n", "expected the header of Kaggle's test.csv"),
    (f"{HEADER}\n", "no rows after the header"),
])
def test_bad_test_csv_is_one_line_with_the_line_number_and_exit_2(tmp_path, capsys, text,
                                                                   message):
    path = tmp_path / "test.csv"
    path.write_text(text)
    # The CSV is checked before the run is opened.
    code, out, err = run_cli(capsys, "kaggle", tmp_path / "no_run", "--test", path, "-o",
                             tmp_path / "sub.csv")
    assert code == 2 and out == ""
    assert err.startswith(f"digitjax: error: {path}: ") and message in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "sub.csv").exists()


def test_a_label_outside_0_to_9_is_rejected(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text(f"label,{HEADER}\n3,{ROW}\n10,{ROW}\n")
    with pytest.raises(DataError, match="line 3, column label: 10 is outside 0..9"):
        kaggle.read_kaggle_csv(path, labelled=True)


@pytest.fixture
def kaggle_train_csv(mnist_idx, tmp_path, monkeypatch):
    (x, y), _ = mnist_idx
    path = kaggle.write_kaggle_csv(tmp_path / "train.csv", x[:600], y[:600])
    monkeypatch.setenv(kaggle.CSV_ENV, str(path))
    return path


def test_kaggle_train_csv_is_a_data_set_with_split_syntax(kaggle_train_csv, mnist_idx):
    (x, y), _ = mnist_idx
    images, labels = data.load_split("kaggle", "train[:400]")
    np.testing.assert_array_equal(images, x[:400])
    np.testing.assert_array_equal(labels, y[:400])
    images, labels = data.load_split("kaggle", "train[90%:]")
    np.testing.assert_array_equal(labels, y[540:600])
    with pytest.raises(DataError, match="train.csv is the only split"):
        data.load_split("kaggle", "test")
    images, _ = data.load_split("kaggle", "train[:1shard]")  # train.csv is one shard
    np.testing.assert_array_equal(images, x[:600])
    config = registry.resolve("quick", ["data.dataset=kaggle", "data.train_split=train[:400]",
                                        "data.val_split=train[400:500]",
                                        "data.test_split=train[500:]"])
    loaded = data_device.load(config)
    assert loaded.num_train == 400 and loaded.image_shape == (28, 28, 1)


def test_kaggle_data_set_without_its_csv_says_how_to_point_at_it(monkeypatch):
    monkeypatch.delenv(kaggle.CSV_ENV, raising=False)
    with pytest.raises(DataError, match=f"set {kaggle.CSV_ENV}=/path/to/train.csv"):
        data.load_split("kaggle", "train")


def test_a_run_trained_on_kaggle_train_csv_submits_without_the_warning(
        kaggle_train_csv, mnist_idx, tmp_path, capsys):
    _, (tx, _) = mnist_idx
    splits = ["data.train_split=train[:512]", "data.val_split=train[512:556]",
              "data.test_split=train[556:]"]
    args = ["run", "quick", "--set", "data.dataset=kaggle", "--set", "model.name=linear",
            "--set", "train.batch_size=64", "--workdir", tmp_path / "runs", "--no-progress"]
    for s in splits:
        args += ["--set", s]
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    run = next((tmp_path / "runs").glob("quick+*/seed0"))
    test = kaggle.write_kaggle_csv(tmp_path / "test.csv", tx[:20])
    code, out, err = run_cli(capsys, "kaggle", run, "--test", test, "-o", tmp_path / "s.csv",
                             "--json", "--no-progress")
    assert code == 0, err
    assert json.loads(out)["leakage"] is False and "warning" not in err
    assert len(kaggle.read_submission(tmp_path / "s.csv")) == 20
