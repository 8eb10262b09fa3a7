"""Dataset access for digitjax: MNIST-style datasets as numpy arrays, without TensorFlow.

Data flow::

    IDX gzip files (local folder / embedded MNIST / download)
      -> TFDS builder (digitjax.tfds_builders) -> <data_dir>/<name>/3.0.1/*.array_record
      -> decoded full splits cached as <data_dir>/<name>/3.0.1/digitjax_cache/<split>.npz
      -> load_split(): TFDS split syntax ("train[:55000]") applied to the cached arrays

The array_record files are the source of truth and define the example order (TFDS
shuffles by example key when preparing, so it is not the IDX order); the cache only
saves decoding 70k PNGs on every run.

Checks: every full split is checked against ``DATASETS`` (count and a content digest) when
the IDX files are decoded before preparing, when the array_record data is read back, and
(through a stored digest) every time the cache is read. The digest is order-independent
(see ``examples_digest``) so one value covers the IDX order and the TFDS order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import logging
import os
import re
import sys
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core.utils import tqdm_utils

from digitjax.idx import DataError
from digitjax.tfds_builders import BUILDERS, IDX_FILES, find_idx_files

__all__ = [
    "DATASETS",
    "DataError",
    "DatasetInfo",
    "SplitInfo",
    "default_data_dir",
    "describe_source",
    "examples_digest",
    "load_split",
    "prepare",
    "resolve_idx_dir",
]

log = logging.getLogger(__name__)

EMBEDDED_MNIST_DIR = Path(__file__).resolve().parent / "mnist_data"
IDX_DIR_ENV = "DIGITJAX_IDX_DIR"
CACHE_DIRNAME = "digitjax_cache"
_CACHE_FORMAT = "digitjax-split-cache-1"


@dataclasses.dataclass(frozen=True)
class SplitInfo:
    """A published split: its size and ``examples_digest`` of its decoded content."""

    num_examples: int
    digest: str


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    class_names: tuple[str, ...]
    image_shape: tuple[int, int, int]
    splits: Mapping[str, SplitInfo]
    homepage: str

    @property
    def idx_env_var(self) -> str:
        return f"{IDX_DIR_ENV}_{self.name.upper()}"


# Digests computed from the original IDX files (../shared/data/<name>/); class counts of the
# MNIST splits are the published ones (train 5923 6742 ..., test 980 1135 ...).
DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo(
        name="mnist",
        num_classes=10,
        class_names=tuple(str(d) for d in range(10)),
        image_shape=(28, 28, 1),
        splits={
            "train": SplitInfo(
                60000, "3655811c0e1223700a4714a92a51f55bd215ed7dc1fa2baa4326a2b58042d82d"
            ),
            "test": SplitInfo(
                10000, "634538fb34c5277fce98470b8b285d1e8419eb87f328da42ef1faf690d2c3911"
            ),
        },
        homepage="http://yann.lecun.com/exdb/mnist/",
    ),
    "fashion_mnist": DatasetInfo(
        name="fashion_mnist",
        num_classes=10,
        class_names=(
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
        image_shape=(28, 28, 1),
        splits={
            "train": SplitInfo(
                60000, "0c69d5cdeb902b69084012f812f066de080317bb3c64f43ca87f910d8ec86906"
            ),
            "test": SplitInfo(
                10000, "90c92c0507755a7d443edde8297ce4d0f131e42884e2e87e7fc9b81ffe215258"
            ),
        },
        homepage="https://github.com/zalandoresearch/fashion-mnist",
    ),
    # Kaggle's Digit Recognizer train.csv (42,000 MNIST digits), read from $DIGITJAX_KAGGLE_CSV
    # by digitjax.kaggle, not through TFDS; its only split is "train" (no published digest).
    "kaggle": DatasetInfo(
        name="kaggle",
        num_classes=10,
        class_names=tuple(str(d) for d in range(10)),
        image_shape=(28, 28, 1),
        splits={},
        homepage="https://www.kaggle.com/c/digit-recognizer",
    ),
}


def examples_digest(images: np.ndarray, labels: np.ndarray) -> str:
    """Order-independent sha256 of a set of (image, label) examples.

    sha256 over the sorted sha256 digests of each example's bytes (label as one byte, then
    the uint8 pixels row-major). Independent of example order, so it checks the IDX files
    and the TFDS-shuffled data against the same value; it still binds every image to its
    label and counts duplicates. ~0.25 s for 60k examples.
    """
    n = len(labels)
    records = np.concatenate(
        [np.asarray(labels).astype(np.uint8).reshape(n, 1), np.asarray(images).reshape(n, -1)],
        axis=1,
    )
    if records.dtype != np.uint8:
        raise TypeError(f"images must be uint8, got {np.asarray(images).dtype}")
    width = records.shape[1]
    flat = memoryview(records.tobytes())
    per_example = sorted(
        hashlib.sha256(flat[i * width : (i + 1) * width]).digest() for i in range(n)
    )
    return hashlib.sha256(b"".join(per_example)).hexdigest()


def default_data_dir() -> Path:
    """``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets`` (TFDS's own default)."""
    return Path(os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets").expanduser()


def _dataset(name: str) -> DatasetInfo:
    try:
        return DATASETS[name]
    except KeyError:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}") from None


def _has_idx_files(folder: Path) -> bool:
    return all(
        (folder / n).is_file() or (folder / n.removesuffix(".gz")).is_file()
        for names in IDX_FILES.values()
        for n in names
    )


def resolve_idx_dir(
    dataset: str, idx_dir: str | os.PathLike | None = None
) -> tuple[Path, str] | None:
    """Returns (folder of IDX files, where it came from) for preparing ``dataset``, or None.

    Order: ``idx_dir``; ``$DIGITJAX_IDX_DIR_<NAME>``; ``$DIGITJAX_IDX_DIR`` (either
    ``<it>/<name>/`` or, if it holds the four files itself, that folder); for mnist the
    embedded copy. The folder's content is checked later, when it is read.
    """
    info = _dataset(dataset)
    if idx_dir is not None:
        return Path(idx_dir).expanduser(), "idx_dir"
    if os.environ.get(info.idx_env_var):
        return Path(os.environ[info.idx_env_var]).expanduser(), info.idx_env_var
    generic = os.environ.get(IDX_DIR_ENV)
    if generic:
        root = Path(generic).expanduser()
        if (root / dataset).is_dir():
            return root / dataset, IDX_DIR_ENV
        if _has_idx_files(root):
            # A flat folder may hold another dataset's files: the digest check catches that.
            return root, IDX_DIR_ENV
    if dataset == "mnist":
        return EMBEDDED_MNIST_DIR, "embedded copy"
    return None


def _version_dir(dataset: str, data_dir: Path) -> Path:
    # Same layout TFDS uses (<data_dir>/<name>/<version>), so stock TFDS data is found too.
    return data_dir / dataset / str(BUILDERS[dataset].VERSION)


def _is_prepared(version_dir: Path) -> bool:
    # The condition DatasetBuilder.is_prepared() tests, without constructing a builder (whose
    # constructor rejects a folder prepared in another file format).
    return (version_dir / "dataset_info.json").is_file()


@contextlib.contextmanager
def _tfds_output(progress: bool) -> Iterator[None]:
    """TFDS prints status lines to stdout and draws tqdm bars; keep stdout for results."""
    was_active = getattr(tqdm_utils, "_active", True)
    tqdm_utils.display_progress_bar(progress)
    try:
        with contextlib.redirect_stdout(sys.stderr if progress else io.StringIO()):
            yield
    finally:
        tqdm_utils.display_progress_bar(was_active)


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    """Hides TFDS's "OpenCV is not installed" warning: PIL decodes the PNGs fine, once."""
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl_logger.setLevel(level)


def _check_split(info: DatasetInfo, split: str, images, labels, source: str) -> str:
    """Checks one full split against the registry; returns its digest."""
    expected = info.splits.get(split)
    if expected is None:
        raise DataError(f"{info.name}: unexpected split {split!r} in {source}")
    if len(labels) != expected.num_examples:
        raise DataError(
            f"{info.name}: {split} data from {source} has {len(labels)} examples, "
            f"expected {expected.num_examples}"
        )
    digest = examples_digest(images, labels)
    if digest != expected.digest:
        raise DataError(
            f"{info.name}: {split} data from {source} is not the published {info.name} {split} "
            f"split (digest {digest[:12]}..., expected {expected.digest[:12]}...)"
        )
    return digest


@contextlib.contextmanager
def _remove_new_empty_folders(folders: list[Path]) -> Iterator[None]:
    """On failure, removes those of `folders` that did not exist before and hold no file
    (a failed TFDS preparation leaves its empty folders behind)."""
    new = [f for f in folders if not f.exists()]
    try:
        yield
    except BaseException:
        for top in new:
            for parent, _, _ in sorted(os.walk(top), key=lambda w: -len(w[0])):
                with contextlib.suppress(OSError):  # not empty: keep it
                    os.rmdir(parent)
        raise


def _prepare_tfds(
    info: DatasetInfo,
    data_dir: Path,
    idx_dir: str | os.PathLike | None,
    download: bool,
    verify: bool,
    progress: bool,
) -> None:
    """Writes <data_dir>/<name>/3.0.1 in array_record from local IDX files or a download."""
    resolved = resolve_idx_dir(info.name, idx_dir)
    if resolved is None and not download:
        # Fail now: nothing local, and TFDS would spend minutes retrying an offline download.
        files = ", ".join(n for names in IDX_FILES.values() for n in names)
        generic = os.environ.get(IDX_DIR_ENV)
        note = f" ({IDX_DIR_ENV}={generic} has no {info.name}/ subfolder)" if generic else ""
        raise DataError(
            f"{info.name} is not prepared in {data_dir} and no local IDX files were given{note}: "
            f"pass --data-idx DIR or set {info.idx_env_var}=DIR (a folder with {files}), "
            "or run with --download when online"
        )
    folder, origin = resolved if resolved is not None else (None, "download")
    if folder is not None:
        find_idx_files(folder)  # a one-line DataError for a bad folder, before TFDS starts

    def check(split, images, labels, source):
        if verify:
            _check_split(info, split, images, labels, f"{source} ({origin})")

    builder = BUILDERS[info.name](
        data_dir=os.fspath(data_dir),
        file_format="array_record",
        idx_dir=folder,
        allow_download=folder is None,
        check=check,
    )
    log.info("preparing %s in %s from %s (%s)", info.name, builder.data_dir, folder, origin)
    with _tfds_output(progress), _remove_new_empty_folders(
            [data_dir / "downloads", data_dir / info.name, data_dir]):
        builder.download_and_prepare(
            # No GCS probe: it is a network call, and the bucket holds TFDS's own encoding.
            download_config=tfds.download.DownloadConfig(try_download_gcs=False),
        )
    if not builder.is_prepared():
        raise DataError(f"{info.name}: preparing in {builder.data_dir} left no dataset_info.json")


def _unreadable(dataset: str, version_dir, error: Exception) -> DataError:
    reason = re.sub(r"\s+", " ", str(error)).strip()[:300]
    return DataError(
        f"{version_dir}: cannot read the prepared {dataset} ({type(error).__name__}: {reason}); "
        "remove that folder to prepare it again"
    )


def _open_prepared(info: DatasetInfo, data_dir: Path):
    version_dir = _version_dir(info.name, data_dir)
    # From the folder (features.json) rather than our builder class: decodes whatever
    # features a stock-TFDS-prepared folder was written with.
    try:
        reader = tfds.builder_from_directory(os.fspath(version_dir))
    except Exception as e:  # TFDS raises protobuf/json/OS errors here
        raise _unreadable(info.name, version_dir, e) from e
    file_format = reader.info.file_format
    if file_format is None or file_format.value != "array_record":
        fmt = file_format.value if file_format is not None else "unknown"
        raise DataError(
            f"{version_dir} holds {info.name} as {fmt} (prepared by stock TFDS?), which cannot "
            "be read without TensorFlow; use another data dir (TFDS_DATA_DIR) or remove it"
        )
    return reader


def _ensure(
    dataset: str,
    data_dir: str | os.PathLike | None,
    idx_dir: str | os.PathLike | None,
    download: bool,
    verify: bool,
    progress: bool,
):
    info = _dataset(dataset)
    data_dir = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    version_dir = _version_dir(dataset, data_dir)
    if not _is_prepared(version_dir):
        # Processes starting together (sweep shards, seeds on several devices) prepare
        # once: the others wait, then find it prepared.
        with _prepare_lock(data_dir, dataset):
            if not _is_prepared(version_dir):
                # What killed preparations left (TFDS never reads or removes it).
                _remove_stale((data_dir / dataset).glob("incomplete.*"))
                _prepare_tfds(info, data_dir, idx_dir, download, verify, progress)
    return info, _open_prepared(info, data_dir)


@contextlib.contextmanager
def _prepare_lock(data_dir: Path, dataset: str) -> Iterator[None]:
    """An exclusive lock per (data dir, data set), held while preparing it.

    The lock file lives in the temp folder, not the data dir, so a failed preparation
    still leaves the data dir as it found it.
    """
    import fcntl
    import tempfile

    key = hashlib.sha256(f"{data_dir.resolve()}|{dataset}".encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"digitjax-prepare-{key}.lock"
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_stale(paths, min_age_s: float = 3600.0) -> None:
    """Remove leftovers of killed writers: files or folders untouched for `min_age_s` (a
    younger one may belong to a process still writing it). Never fatal."""
    import shutil
    import time

    for p in paths:
        with contextlib.suppress(OSError):
            if time.time() - p.stat().st_mtime <= min_age_s:
                continue
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()


# --- cache of decoded full splits ------------------------------------------------------


def _fingerprint(split_info) -> str:
    # Ties a cache file to the array_record files it was decoded from.
    return f"{split_info.num_examples}:{split_info.num_bytes}:{list(split_info.shard_lengths)}"


def _content_sha256(images: np.ndarray, labels: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(images))
    h.update(np.ascontiguousarray(labels))
    return h.hexdigest()


def _read_cache(path: Path, info: DatasetInfo, num_examples: int, fingerprint: str):
    """Returns (images, labels, digest) from a valid cache file, else None."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            if str(f["format"]) != _CACHE_FORMAT or str(f["fingerprint"]) != fingerprint:
                raise ValueError("stale")
            images, labels = f["images"], f["labels"]
            sha, digest = str(f["sha256"]), str(f["digest"])
        if images.shape != (num_examples, *info.image_shape) or images.dtype != np.uint8:
            raise ValueError(f"images {images.shape} {images.dtype}")
        if labels.shape != (num_examples,) or labels.dtype != np.int32:
            raise ValueError(f"labels {labels.shape} {labels.dtype}")
        if _content_sha256(images, labels) != sha:
            raise ValueError("content sha256 mismatch")
    except Exception as e:  # any unreadable cache is rebuilt from the source
        log.warning("ignoring cache %s (%s); rebuilding it", path, e)
        return None
    return images, labels, digest


def _write_cache(path: Path, images, labels, digest: str, fingerprint: str) -> None:
    # Temp file + os.replace: a concurrent reader sees the old file or the whole new one.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(exist_ok=True)
        try:
            with open(tmp, "xb") as f:  # plain open: permissions follow the umask
                np.savez(
                    f,
                    images=images,
                    labels=labels,
                    format=np.array(_CACHE_FORMAT),
                    fingerprint=np.array(fingerprint),
                    sha256=np.array(_content_sha256(images, labels)),
                    digest=np.array(digest),
                )
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _remove_stale(path.parent.glob(f".{path.name}.*.tmp"))  # left by killed writers
    except OSError as e:
        # A read-only shared data dir still works, just without the speed-up.
        log.warning("cannot write cache %s (%s); continuing without it", path, e)


def _read_tfds_split(reader, split: str, info: DatasetInfo) -> tuple[np.ndarray, np.ndarray]:
    source = reader.as_data_source(split=split)
    records = source.__getitems__(list(range(len(source))))  # batched read: one call
    n = len(records)
    images = np.empty((n, *info.image_shape), np.uint8)
    for i, r in enumerate(records):
        images[i] = r["image"]
    labels = np.fromiter((r["label"] for r in records), dtype=np.int32, count=n)
    return images, labels


def _full_split(reader, info: DatasetInfo, split: str, verify: bool, progress: bool):
    """A full split (TFDS order) from the cache, rebuilding the cache when needed."""
    split_info = reader.info.splits[split]
    n = split_info.num_examples
    fingerprint = _fingerprint(split_info)
    expected = info.splits.get(split)
    path = Path(reader.data_dir) / CACHE_DIRNAME / f"{split}.npz"
    cached = _read_cache(path, info, n, fingerprint)
    if cached is not None:
        images, labels, digest = cached
        if not verify or (expected is not None and digest == expected.digest):
            return images, labels
        # Else fall through: re-reading the source gives the precise error (or heals a cache
        # left by a verify=False run on the same, standard data).
    try:
        with _tfds_output(progress), _quiet_absl():
            images, labels = _read_tfds_split(reader, split, info)
    except Exception as e:  # array_record raises RuntimeError on corrupt files
        raise _unreadable(info.name, reader.data_dir, e) from e
    if len(labels) != n:
        raise DataError(f"{reader.data_dir}: {split} has {len(labels)} records, info says {n}")
    if verify:
        digest = _check_split(info, split, images, labels, str(reader.data_dir))
    else:
        digest = examples_digest(images, labels)
    _write_cache(path, images, labels, digest, fingerprint)
    return images, labels


# --- public API --------------------------------------------------------------------------


def prepare(
    dataset: str,
    *,
    data_dir: str | os.PathLike | None = None,
    idx_dir: str | os.PathLike | None = None,
    download: bool = False,
    verify: bool = True,
    progress: bool = True,
) -> Path:
    """Prepares ``dataset`` in ``data_dir`` (array_record) and its cache, if not yet done.

    Returns the dataset folder (``<data_dir>/<name>/3.0.1``). Sources, when not prepared:
    see ``resolve_idx_dir``; ``download=True`` lets TFDS download from the dataset's site
    when there is no local folder. ``verify=False`` skips the registry checks (only for
    non-standard data such as test fixtures). Already-prepared data is used as is;
    ``idx_dir`` then is not read.
    """
    if dataset == "kaggle":
        from digitjax.kaggle import kaggle_csv_path, load_kaggle_train

        load_kaggle_train(kaggle_csv_path())  # parses and checks the whole file
        return kaggle_csv_path()
    info, reader = _ensure(dataset, data_dir, idx_dir, download, verify, progress)
    for split in reader.info.splits:
        _full_split(reader, info, split, verify, progress)
    return Path(reader.data_dir)


def load_split(
    dataset: str,
    split: str,
    *,
    data_dir: str | os.PathLike | None = None,
    idx_dir: str | os.PathLike | None = None,
    download: bool = False,
    verify: bool = True,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Returns (images uint8 [N, 28, 28, 1], labels int32 [N]) for a TFDS split spec.

    ``split`` is TFDS split syntax ("train", "train[:55000]", "train[90%:]", "test", ...),
    resolved by TFDS itself against the prepared split sizes; examples come in TFDS order,
    the same as ``tfds.data_source(dataset, split=split)``. Only the named splits are read.
    Prepares first if needed (see ``prepare``). Returned arrays are fresh copies.
    """
    if dataset == "kaggle":
        from digitjax.kaggle import load_kaggle_split

        return load_kaggle_split(split)
    info, reader = _ensure(dataset, data_dir, idx_dir, download, verify, progress)
    full: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    images, labels = [], []
    for name, start, stop in _ranges(dataset, split, reader.info.splits):
        if name not in full:
            full[name] = _full_split(reader, info, name, verify, progress)
        split_images, split_labels = full[name]
        images.append(split_images[start:stop])
        labels.append(split_labels[start:stop])
    return np.concatenate(images), np.concatenate(labels)


def split_ranges(
    dataset: str,
    split: str,
    *,
    data_dir: str | os.PathLike | None = None,
    idx_dir: str | os.PathLike | None = None,
    download: bool = False,
    progress: bool = True,
) -> list[tuple[str, int, int]]:
    """The (split name, start, stop) example ranges a TFDS split spec selects."""
    if dataset == "kaggle":
        from digitjax.kaggle import kaggle_split_ranges

        return kaggle_split_ranges(split)
    _, reader = _ensure(dataset, data_dir, idx_dir, download, True, progress)
    return _ranges(dataset, split, reader.info.splits)


def _ranges(dataset: str, split: str, sizes, hint: str = "") -> list[tuple[str, int, int]]:
    """(split name, start, stop) per part of a TFDS split spec, resolved by TFDS against
    `sizes`; open ends and reversed bounds made explicit, so ranges can be compared."""
    try:
        instructions = tfds.core.ReadInstruction.from_spec(split).to_absolute(sizes)
    except (ValueError, KeyError, NotImplementedError) as e:
        reason = re.sub(r"\s+", " ", str(e)).strip()
        raise DataError(f"{dataset}: bad split {split!r}: {reason}{hint}") from None
    out = []
    for ins in instructions:
        start = ins.from_ or 0
        stop = sizes[ins.splitname].num_examples if ins.to is None else ins.to
        out.append((ins.splitname, start, max(start, stop)))
    return out


def describe_source(
    dataset: str,
    *,
    data_dir: str | os.PathLike | None = None,
    idx_dir: str | os.PathLike | None = None,
) -> str:
    """One line saying where ``dataset`` would be loaded from; reads no data."""
    _dataset(dataset)
    if dataset == "kaggle":
        from digitjax.kaggle import CSV_ENV

        return f"kaggle: Kaggle's train.csv from ${CSV_ENV} ({os.environ.get(CSV_ENV, 'unset')})"
    data_dir = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    version_dir = _version_dir(dataset, data_dir)
    if _is_prepared(version_dir):
        return f"{dataset}: prepared in {version_dir}"
    resolved = resolve_idx_dir(dataset, idx_dir)
    if resolved is None:
        return f"{dataset}: not prepared in {data_dir}, no local IDX files (download needed)"
    return (
        f"{dataset}: not prepared in {data_dir}; would prepare from {resolved[0]} ({resolved[1]})"
    )
