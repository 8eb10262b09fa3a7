"""Kaggle's Digit Recognizer: its CSV format, submissions, and train.csv as a data set.

train.csv is `label,pixel0,...,pixel783` (42,000 rows), test.csv `pixel0,...,pixel783`
(28,000 rows), one 28x28 uint8 image per row, row-major; a submission is `ImageId,Label`
with ImageId counted from 1. Kaggle's images are drawn from MNIST's 70,000, so a model
trained on MNIST has seen most of Kaggle's test digits: its Kaggle score is not a test
score. Only a run trained on Kaggle's own train.csv (data set `kaggle`) gives one.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import numpy as np

from .config import ConfigError
from .idx import DataError

SIDE = 28
PIXELS = [f"pixel{i}" for i in range(SIDE * SIDE)]
TEST_HEADER = PIXELS
TRAIN_HEADER = ["label", *PIXELS]
SUBMISSION_HEADER = "ImageId,Label"
CSV_ENV = "DIGITJAX_KAGGLE_CSV"  # the train.csv that data set `kaggle` reads
KAGGLE_DATASET = "kaggle"


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: Excel writes a byte-order mark
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a text CSV file") from None
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise DataError(f"{path}: empty file (expected Kaggle's header "
                        f"'pixel0,...,pixel783' or 'label,pixel0,...,pixel783')")
    return lines


def _check_header(path: Path, line: str, labelled: bool | None) -> bool:
    fields = [f.strip().strip('"') for f in line.split(",")]
    if fields == TRAIN_HEADER:
        found = True
    elif fields == TEST_HEADER:
        found = False
    else:
        what = "no header" if fields[0].lstrip("+-").isdigit() else f"header {line[:40]!r}..."
        raise DataError(f"{path}: line 1: {what}; expected Kaggle's 'pixel0,...,pixel783' "
                        "(test.csv) or 'label,pixel0,...,pixel783' (train.csv)")
    if labelled is not None and found != labelled:
        want = "train.csv (label,pixel0,...)" if labelled else "test.csv (pixel0,...)"
        raise DataError(f"{path}: line 1: expected the header of Kaggle's {want}")
    return found


def read_kaggle_csv(path: str | os.PathLike, *, labelled: bool | None = None):
    """(images uint8 [N, 28, 28, 1], labels int32 [N] or None) of a Kaggle CSV.

    `labelled=None` accepts either format (told apart by the header). Any malformed row is
    a DataError naming its line number (the header is line 1).
    """
    path = Path(path)
    lines = _read_lines(path)
    has_label = _check_header(path, lines[0], labelled)
    columns = TRAIN_HEADER if has_label else TEST_HEADER
    body = lines[1:]
    for i, line in enumerate(body):
        n = line.count(",") + 1 if line.strip() else 0
        if n != len(columns):
            raise DataError(f"{path}: line {i + 2}: {n} values, expected {len(columns)}")
    if not body:
        raise DataError(f"{path}: no rows after the header")
    try:
        values = np.loadtxt(body, delimiter=",", dtype=np.int64, ndmin=2)
    except ValueError as e:
        raise _bad_value(path, body, columns, e) from None
    bad = (values < 0) | (values > 255)
    if has_label:
        bad[:, 0] = (values[:, 0] < 0) | (values[:, 0] > 9)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        allowed = "0..9" if has_label and col == 0 else "0..255"
        raise DataError(f"{path}: line {row + 2}, column {columns[col]}: {values[row, col]} "
                        f"is outside {allowed}")
    images = values[:, int(has_label):].astype(np.uint8).reshape(-1, SIDE, SIDE, 1)
    labels = values[:, 0].astype(np.int32) if has_label else None
    return images, labels


def _bad_value(path: Path, body: list[str], columns: list[str], error: ValueError) -> DataError:
    # numpy's message names the row and column ("... at row 3, column 17.").
    m = re.search(r"at row (\d+), column (\d+)", str(error))
    if not m:
        return DataError(f"{path}: a value is not an integer ({error})")
    row, col = int(m.group(1)), int(m.group(2)) - 1
    value = body[row].split(",")[col].strip()
    return DataError(f"{path}: line {row + 2}, column {columns[col]}: {value!r} is not an "
                     "integer")


def write_kaggle_csv(path: str | os.PathLike, images: np.ndarray,
                     labels: np.ndarray | None = None) -> Path:
    """Write images uint8 [N, 28, 28(, 1)] (and labels) in Kaggle's train/test.csv format."""
    path = Path(path)
    flat = np.asarray(images, np.uint8).reshape(len(images), -1).astype(np.int64)
    header = TEST_HEADER
    if labels is not None:
        flat = np.concatenate([np.asarray(labels, np.int64)[:, None], flat], axis=1)
        header = TRAIN_HEADER
    np.savetxt(path, flat, fmt="%d", delimiter=",", header=",".join(header), comments="")
    return path


def write_submission(path: str | os.PathLike, labels) -> Path:
    """`ImageId,Label` rows, ImageId from 1 in the order of test.csv."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [SUBMISSION_HEADER, *(f"{i},{int(y)}" for i, y in enumerate(labels, start=1))]
    text = "\n".join(rows) + "\n"
    if path.exists() and not path.is_file():  # e.g. -o /dev/stdout
        path.write_text(text)
        return path
    # Written beside, then renamed: a failed write never leaves a cut-off submission.
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_submission(path: str | os.PathLike) -> np.ndarray:
    """The labels of a submission file, checking its header and ImageIds."""
    lines = Path(path).read_text().splitlines()
    if not lines or lines[0] != SUBMISSION_HEADER:
        raise DataError(f"{path}: line 1: expected the header {SUBMISSION_HEADER!r}")
    ids, labels = zip(*(map(int, line.split(",")) for line in lines[1:]), strict=True)
    if list(ids) != list(range(1, len(ids) + 1)):
        raise DataError(f"{path}: ImageIds are not 1..{len(ids)}")
    return np.asarray(labels, np.int32)


def leakage_warning(config_record: dict) -> str | None:
    """The warning for a submission from this run, or None when it is an honest score."""
    dataset = config_record["config"]["data"]["dataset"]
    if dataset == KAGGLE_DATASET:
        return None
    return (f"this run trained on {dataset}; Kaggle's Digit Recognizer images are drawn from "
            "MNIST's 70,000, so the model has seen most of Kaggle's test digits and its "
            "Kaggle score overstates its accuracy (train on Kaggle's train.csv: "
            f"--set data.dataset={KAGGLE_DATASET} with {CSV_ENV}=train.csv)")


def make_submission(predictor, test_images: np.ndarray, out_csv: str | os.PathLike, *,
                    progress: bool = False) -> dict:
    """Predict the images of Kaggle's test.csv (`read_kaggle_csv(path, labelled=False)`)
    and write the submission; returns a report with the leakage flag."""
    dataset = predictor.dataset
    if dataset not in ("mnist", KAGGLE_DATASET):
        raise ConfigError(f"the run trained on {dataset}, not on digits; Kaggle's Digit "
                          "Recognizer needs a run trained on mnist or kaggle")
    labels = predictor.probabilities(test_images, progress=progress).argmax(axis=1)
    out = write_submission(out_csv, labels)
    warning = leakage_warning(predictor.config_record)
    return {"submission": str(out), "images": len(labels), "trained_on": dataset,
            "checkpoint_step": predictor.checkpoint_step, "leakage": warning is not None,
            "warning": warning,
            "label_counts": np.bincount(labels, minlength=10).tolist()}


# --- train.csv as the data set `kaggle` ------------------------------------------------


def load_kaggle_train(csv: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28, 1], labels int32 [N]) of a Kaggle train.csv."""
    return _load_train_cached(*_file_key(csv))


def _file_key(csv) -> tuple[str, int, int]:
    path = Path(csv).expanduser().resolve()
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    st = path.stat()
    return str(path), st.st_mtime_ns, st.st_size


@functools.lru_cache(maxsize=1)
def _load_train_cached(path: str, mtime_ns: int, size: int):
    # One parse (~2 s for 42,000 rows) serves the train, val and test slices of one run;
    # the key changes when the file does.
    del mtime_ns, size
    images, labels = read_kaggle_csv(path, labelled=True)
    images.flags.writeable = labels.flags.writeable = False
    return images, labels


def kaggle_csv_path(csv: str | os.PathLike | None = None) -> Path:
    if csv is None:
        csv = os.environ.get(CSV_ENV)
    if not csv:
        raise DataError(f"data set {KAGGLE_DATASET!r} reads Kaggle's train.csv: set "
                        f"{CSV_ENV}=/path/to/train.csv")
    return Path(csv).expanduser()


def load_kaggle_split(split: str, csv: str | os.PathLike | None = None):
    """A TFDS-style slice ("train[:38000]", "train[90%:]") of Kaggle's train.csv.

    train.csv is the only labelled split Kaggle gives, so validation and test are slices
    of it too (see experiments: `data.test_split=train[40000:]`).
    """
    images, labels = load_kaggle_train(kaggle_csv_path(csv))
    parts = [(images[a:b], labels[a:b]) for _, a, b in _ranges(split, len(labels))]
    return (np.concatenate([p[0] for p in parts]),
            np.concatenate([p[1] for p in parts]))


def kaggle_split_ranges(split: str, csv: str | os.PathLike | None = None):
    """The (split name, start, stop) rows of train.csv a split spec selects."""
    return _ranges(split, len(load_kaggle_train(kaggle_csv_path(csv))[1]))


def _ranges(split: str, n: int) -> list[tuple[str, int, int]]:
    from .data import _ranges

    return _ranges(KAGGLE_DATASET, split, {"train": _Size(n)},
                   hint="; train.csv is the only split, e.g. train[:38000], "
                        "train[38000:40000], train[40000:]")


class _Size:
    # What tfds's split resolution reads from a split's info: train.csv is one shard.
    def __init__(self, num_examples: int):
        self.num_examples = num_examples
        self.shard_lengths = [num_examples]
