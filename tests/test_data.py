from __future__ import annotations

import gzip
import json
import shutil
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

from digitjax import data
from digitjax.idx import IMAGES_MAGIC, LABELS_MAGIC, DataError, read_idx, read_idx_pair, write_idx
from digitjax.tfds_builders import IDX_FILES, MnistIdx

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any connection attempt or DNS lookup fails the test instead of hanging offline."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"test tried to use the network: {args[1:] or kwargs}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def write_tiny_idx(folder: Path, n_train: int = 50, n_test: int = 20, seed: int = 0) -> dict:
    """Writes a tiny MNIST-shaped IDX folder; returns {split: (images, labels)}."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        images_name, labels_name = IDX_FILES[split]
        write_idx(folder / images_name, images)
        write_idx(folder / labels_name, labels)
        arrays[split] = (images, labels)
    return arrays


def as_multiset(images: np.ndarray, labels: np.ndarray) -> list[tuple[int, bytes]]:
    return sorted(
        (int(y), np.asarray(x, np.uint8).reshape(-1).tobytes())
        for x, y in zip(images, labels, strict=True)
    )


def read_data_source(dataset: str, split: str, data_dir: Path):
    """What stock TFDS (the catalog builder) returns for ``split``."""
    source = tfds.data_source(dataset, split=split, data_dir=str(data_dir), download=False)
    records = source.__getitems__(list(range(len(source))))
    images = np.stack([r["image"] for r in records]) if records else np.zeros((0, 28, 28, 1))
    return images, np.array([r["label"] for r in records], dtype=np.int64)


def assert_one_line_error(excinfo, *fragments: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


# --- IDX ---------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".gz", ""])
@pytest.mark.parametrize("shape", [(0,), (7,), (3, 28, 28), (2, 3, 4, 5)])
def test_idx_round_trip(tmp_path, suffix, shape):
    array = np.random.default_rng(1).integers(0, 256, size=shape, dtype=np.uint8)
    path = write_idx(tmp_path / f"a-idx{suffix}", array)
    back = read_idx(path)
    assert back.dtype == np.uint8 and back.shape == shape
    np.testing.assert_array_equal(back, array)


def test_idx_header_is_the_published_format(tmp_path):
    images = write_idx(tmp_path / "i", np.zeros((2, 28, 28), np.uint8)).read_bytes()
    labels = write_idx(tmp_path / "l", np.zeros(2, np.uint8)).read_bytes()
    assert images[:16] == bytes.fromhex("00000803000000020000001c0000001c")
    assert labels[:8] == bytes.fromhex("0000080100000002")
    assert read_idx(tmp_path / "i", magic=IMAGES_MAGIC).shape == (2, 28, 28)
    assert read_idx(tmp_path / "l", magic=LABELS_MAGIC).shape == (2,)


def test_real_mnist_idx_reads(shared_data):
    images, labels = read_idx_pair(
        shared_data / "mnist/t10k-images-idx3-ubyte.gz",
        shared_data / "mnist/t10k-labels-idx1-ubyte.gz",
    )
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    assert np.bincount(labels).tolist() == MNIST_TEST_COUNTS


@pytest.mark.parametrize("gz", [True, False])
def test_truncated_idx_is_a_data_error(tmp_path, gz):
    path = tmp_path / ("x.gz" if gz else "x")
    write_idx(tmp_path / "x", np.ones((4, 28, 28), np.uint8))
    raw = (tmp_path / "x").read_bytes()[:-100]
    path.write_bytes(gzip.compress(raw) if gz else raw)
    with pytest.raises(DataError) as e:
        read_idx(path)
    assert_one_line_error(e, str(path), "truncated")


def test_truncated_gzip_stream_is_a_data_error(tmp_path):
    path = write_idx(tmp_path / "x.gz", np.ones((40, 28, 28), np.uint8))
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(DataError) as e:
        read_idx(path)
    assert_one_line_error(e, str(path), "gzip")


def test_bad_magic_is_a_data_error(tmp_path):
    labels = write_idx(tmp_path / "labels.gz", np.zeros(5, np.uint8))
    with pytest.raises(DataError) as e:
        read_idx(labels, magic=IMAGES_MAGIC)
    assert_one_line_error(e, str(labels), "magic 0x00000801", "0x00000803")

    not_idx = tmp_path / "notes.txt"
    not_idx.write_text("hello, world")
    with pytest.raises(DataError) as e:
        read_idx(not_idx)
    assert_one_line_error(e, str(not_idx), "not a uint8 IDX file")


def test_trailing_bytes_and_count_mismatch_are_data_errors(tmp_path):
    path = write_idx(tmp_path / "x", np.zeros((2, 3), np.uint8))
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(DataError, match="trailing"):
        read_idx(path)

    images = write_idx(tmp_path / "i.gz", np.zeros((3, 28, 28), np.uint8))
    labels = write_idx(tmp_path / "l.gz", np.zeros(4, np.uint8))
    with pytest.raises(DataError) as e:
        read_idx_pair(images, labels)
    assert_one_line_error(e, "3 images", "4 labels")


def test_missing_idx_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError) as e:
        read_idx(tmp_path / "nope.gz")
    assert_one_line_error(e, "nope.gz", "not found")


# --- registry ------------------------------------------------------------------------------


def test_registry_matches_the_shared_idx_files(shared_data):
    # The registry digests are the order-independent digests of the original files.
    for name, info in data.DATASETS.items():
        assert info.image_shape == (28, 28, 1) and len(info.class_names) == info.num_classes
        for split, expected in info.splits.items():
            images_name, labels_name = IDX_FILES[split]
            images, labels = read_idx_pair(
                shared_data / name / images_name, shared_data / name / labels_name
            )
            assert len(labels) == expected.num_examples
            assert data.examples_digest(images, labels) == expected.digest, (name, split)


def test_examples_digest_ignores_order_but_binds_labels():
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, size=(30, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=30, dtype=np.uint8)
    digest = data.examples_digest(images, labels)
    perm = rng.permutation(30)
    assert data.examples_digest(images[perm], labels[perm]) == digest
    assert data.examples_digest(images[..., None], labels.astype(np.int32)) == digest
    swapped = labels.copy()
    swapped[[0, 1]] = (labels[0] + 1) % 10, labels[1]
    assert data.examples_digest(images, swapped) != digest


def test_unknown_dataset_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="unknown dataset 'kmnist'"):
        data.load_split("kmnist", "train", data_dir=tmp_path)


# --- TFDS builder on a tiny fixture -------------------------------------------------------


@pytest.fixture
def tiny(tmp_path):
    """A tiny IDX folder (50 train, 20 test) prepared as "mnist" in its own data dir."""
    arrays = write_tiny_idx(tmp_path / "idx")
    data_dir = tmp_path / "tfds"
    path = data.prepare(
        "mnist", data_dir=data_dir, idx_dir=tmp_path / "idx", verify=False, progress=False
    )
    assert path == data_dir / "mnist" / "3.0.1"
    return data_dir, arrays


def test_tiny_prepare_round_trips_the_examples(tiny):
    data_dir, arrays = tiny
    for split, (images, labels) in arrays.items():
        got_images, got_labels = data.load_split("mnist", split, data_dir=data_dir, verify=False)
        assert got_images.shape == (len(labels), 28, 28, 1) and got_images.dtype == np.uint8
        assert got_labels.dtype == np.int32
        assert as_multiset(got_images, got_labels) == as_multiset(images, labels)


def test_tiny_prepared_folder_is_stock_tfds_compatible(tiny):
    data_dir, _ = tiny
    info = json.loads((data_dir / "mnist/3.0.1/dataset_info.json").read_text())
    assert info["name"] == "mnist" and info["version"] == "3.0.1"
    assert info["fileFormat"] == "array_record"
    # The catalog builder (what tfds.data_source uses) reads our folder, with the same result.
    for split in ["train", "test", "train[10:30]", "train[:10%]+test[-5:]"]:
        images, labels = data.load_split("mnist", split, data_dir=data_dir, verify=False)
        ref_images, ref_labels = read_data_source("mnist", split, data_dir)
        np.testing.assert_array_equal(images, ref_images)
        np.testing.assert_array_equal(labels, ref_labels)


def test_tiny_data_fails_verification_against_the_registry(tiny):
    data_dir, _ = tiny
    with pytest.raises(DataError) as e:
        data.load_split("mnist", "test", data_dir=data_dir)
    assert_one_line_error(e, "mnist", "has 20 examples, expected 10000")


def test_load_reads_only_the_named_splits(tmp_path):
    write_tiny_idx(tmp_path / "idx")
    data.load_split(
        "mnist", "train[:10]", data_dir=tmp_path, idx_dir=tmp_path / "idx", verify=False
    )
    cache = tmp_path / "mnist/3.0.1" / data.CACHE_DIRNAME
    assert sorted(p.name for p in cache.iterdir()) == ["train.npz"]


def test_unchecked_idx_data_is_refused_before_writing(tmp_path):
    write_tiny_idx(tmp_path / "idx")
    with pytest.raises(DataError) as e:
        data.prepare("mnist", data_dir=tmp_path / "tfds", idx_dir=tmp_path / "idx")
    assert_one_line_error(e, "train data from", "has 50 examples, expected 60000")
    assert not (tmp_path / "tfds/mnist/3.0.1").exists()


def test_bad_idx_folder_is_a_data_error(tmp_path):
    write_tiny_idx(tmp_path / "idx")
    (tmp_path / "idx" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError) as e:
        data.prepare("mnist", data_dir=tmp_path / "tfds", idx_dir=tmp_path / "idx")
    assert_one_line_error(e, "missing IDX file(s) t10k-labels-idx1-ubyte.gz")

    corrupt = tmp_path / "idx2"
    write_tiny_idx(corrupt)
    images_file = corrupt / "train-images-idx3-ubyte.gz"
    images_file.write_bytes(images_file.read_bytes()[:-20])
    with pytest.raises(DataError) as e:
        data.prepare("mnist", data_dir=tmp_path / "tfds", idx_dir=corrupt, verify=False)
    assert_one_line_error(e, str(images_file))


def test_folder_prepared_as_tfrecord_is_a_clear_error(tiny, tmp_path):
    data_dir, _ = tiny
    stock = tmp_path / "stock"
    shutil.copytree(data_dir / "mnist", stock / "mnist")
    info_path = stock / "mnist/3.0.1/dataset_info.json"
    info = json.loads(info_path.read_text())
    info["fileFormat"] = "tfrecord"
    info_path.write_text(json.dumps(info))
    with pytest.raises(DataError) as e:
        data.load_split("mnist", "train", data_dir=stock, verify=False)
    assert_one_line_error(e, "tfrecord", "without TensorFlow")


def test_corrupt_prepared_data_is_a_data_error(tiny):
    data_dir, _ = tiny
    version_dir = data_dir / "mnist/3.0.1"
    shutil.rmtree(version_dir / data.CACHE_DIRNAME)
    (record_file,) = version_dir.glob("mnist-train.array_record-*")
    record_file.write_bytes(record_file.read_bytes()[:-200])
    with pytest.raises(DataError) as e:
        data.load_split("mnist", "train", data_dir=data_dir, verify=False)
    assert_one_line_error(e, str(version_dir), "cannot read the prepared mnist")


def test_download_path_uses_the_catalog_urls(tmp_path):
    # Only way to exercise the online branch offline: a stand-in download manager.
    write_tiny_idx(tmp_path / "idx")

    class FakeDownloadManager:
        requested: dict = {}

        def download(self, urls):
            self.requested = dict(urls)
            return {k: tmp_path / "idx" / url.rsplit("/", 1)[1] for k, url in urls.items()}

    builder = MnistIdx(
        data_dir=str(tmp_path / "tfds"), file_format="array_record", allow_download=True
    )
    dl = FakeDownloadManager()
    generators = builder._split_generators(dl)
    assert sorted(dl.requested.values()) == sorted(
        "https://storage.googleapis.com/cvdf-datasets/mnist/" + name
        for names in IDX_FILES.values()
        for name in names
    )
    assert sum(1 for _ in generators["train"]) == 50


def test_builders_keep_the_catalog_names_without_registering():
    from digitjax.tfds_builders import FashionMnistIdx

    assert MnistIdx.name == "mnist" and FashionMnistIdx.name == "fashion_mnist"
    # tfds.builder("mnist") still means the catalog builder.
    assert tfds.builder_cls("mnist") is not MnistIdx
    assert tfds.builder_cls("fashion_mnist") is not FashionMnistIdx


# --- real MNIST (embedded), prepared once per session --------------------------------------


def test_mnist_has_the_published_class_counts(prepared_mnist):
    train_images, train_labels = data.load_split("mnist", "train")
    test_images, test_labels = data.load_split("mnist", "test")
    assert train_images.shape == (60000, 28, 28, 1) and train_images.dtype == np.uint8
    assert test_images.shape == (10000, 28, 28, 1)
    assert train_labels.dtype == np.int32
    assert np.bincount(train_labels).tolist() == MNIST_TRAIN_COUNTS
    assert np.bincount(test_labels).tolist() == MNIST_TEST_COUNTS


def test_prepared_mnist_loads_from_the_cache_without_decoding_tfds_records(
        prepared_mnist, monkeypatch):
    # The cache is what makes a load ~0.2 s (benchmarks/startup.py); here: it is used.
    expected = {s: data.load_split("mnist", s) for s in ("train[:55000]", "test")}

    def decode(*args):
        raise AssertionError("the TFDS records were decoded again")

    monkeypatch.setattr(data, "_read_tfds_split", decode)
    for split, (images, labels) in expected.items():
        again = data.load_split("mnist", split)
        np.testing.assert_array_equal(again[0], images)
        np.testing.assert_array_equal(again[1], labels)


def test_cached_slices_equal_tfds_data_source(prepared_mnist):
    for split in ["train[55000:]", "train[:1%]", "test[:500]", "train[-3%:]+test[10:20]"]:
        images, labels = data.load_split("mnist", split)
        ref_images, ref_labels = read_data_source("mnist", split, prepared_mnist)
        np.testing.assert_array_equal(images, ref_images, err_msg=split)
        np.testing.assert_array_equal(labels, ref_labels, err_msg=split)
    # The slices partition the split, in TFDS order.
    full = data.load_split("mnist", "train")
    head, tail = (
        data.load_split("mnist", "train[:55000]"),
        data.load_split("mnist", "train[55000:]"),
    )
    np.testing.assert_array_equal(np.concatenate([head[0], tail[0]]), full[0])
    np.testing.assert_array_equal(np.concatenate([head[1], tail[1]]), full[1])


def test_bad_split_is_a_data_error(prepared_mnist):
    for split, fragment in [
        ("validation", "Unknown split 'validation'"),
        ("train[:70000]", "incompatible with 60000 examples"),
        ("train[", "Unrecognized split format"),
    ]:
        with pytest.raises(DataError) as e:
            data.load_split("mnist", split)
        assert_one_line_error(e, f"mnist: bad split {split!r}", fragment)


def test_corrupt_cache_is_rebuilt(prepared_mnist):
    cache = prepared_mnist / "mnist/3.0.1" / data.CACHE_DIRNAME / "test.npz"
    good_images, good_labels = data.load_split("mnist", "test")
    raw = bytearray(cache.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one pixel byte in the middle of the images array
    cache.write_bytes(bytes(raw))
    images, labels = data.load_split("mnist", "test")
    np.testing.assert_array_equal(images, good_images)
    np.testing.assert_array_equal(labels, good_labels)
    assert cache.read_bytes() != bytes(raw)  # rewritten


@pytest.mark.parametrize("stale", ["fingerprint", "content"])
def test_a_well_formed_but_stale_cache_is_rebuilt(prepared_mnist, stale):
    """A readable cache that no longer matches its source (other record files, or arrays
    changed without their hash) is decoded again, not served."""
    cache = prepared_mnist / "mnist/3.0.1" / data.CACHE_DIRNAME / "test.npz"
    good_images, good_labels = data.load_split("mnist", "test")
    with np.load(cache) as f:
        fields = dict(f)
    if stale == "fingerprint":
        fields["fingerprint"] = np.array("10000:1:[10000]")
    else:
        fields["images"] = fields["images"][::-1].copy()  # same examples, another order
    with open(cache, "wb") as f:
        np.savez(f, **fields)
    images, labels = data.load_split("mnist", "test")
    np.testing.assert_array_equal(images, good_images)
    np.testing.assert_array_equal(labels, good_labels)
    with np.load(cache) as f:  # rewritten from the records
        np.testing.assert_array_equal(f["images"], good_images)
        assert str(f["fingerprint"]) != "10000:1:[10000]"


def test_leftovers_of_killed_writers_are_removed_once_stale(prepared_mnist, tmp_path):
    import os
    import time

    def leftover(path: Path, age_s: float) -> Path:
        if "incomplete" in path.name:
            path.mkdir(parents=True)
        else:
            path.write_bytes(b"x")
        os.utime(path, (time.time() - age_s, time.time() - age_s))
        return path

    # A killed preparation's TFDS folder: removed by the next preparation if over an hour old.
    write_tiny_idx(tmp_path / "idx")
    old = leftover(tmp_path / "tfds" / "mnist" / "incomplete.AAAAAA_3.0.1", 7200)
    young = leftover(tmp_path / "tfds" / "mnist" / "incomplete.BBBBBB_3.0.1", 60)
    data.prepare("mnist", data_dir=tmp_path / "tfds", idx_dir=tmp_path / "idx", verify=False,
                 progress=False)
    assert not old.exists() and young.exists()  # a young one may be another writer's
    # A killed cache writer's temp file: removed by the next cache write.
    cache = prepared_mnist / "mnist/3.0.1" / data.CACHE_DIRNAME
    old = leftover(cache / ".test.npz.123.deadbeef.tmp", 7200)
    young = leftover(cache / ".test.npz.456.cafecafe.tmp", 60)
    (cache / "test.npz").unlink()
    data.load_split("mnist", "test")
    assert not old.exists() and young.exists() and (cache / "test.npz").exists()
    young.unlink()


PREPARE_SLOWLY = """
import sys, time
import digitjax
from digitjax import data, tfds_builders
generate = tfds_builders._IdxSourceMixin._split_generators
def slow(self, dl_manager):  # both processes are inside a preparation at once
    time.sleep(4)
    return generate(self, dl_manager)
tfds_builders._IdxSourceMixin._split_generators = slow
data.prepare("mnist", data_dir=sys.argv[1], idx_dir=sys.argv[2], verify=False, progress=False)
print(len(data.load_split("mnist", "train", data_dir=sys.argv[1], verify=False)[1]))
"""


def test_processes_preparing_one_data_dir_at_once_all_succeed(tmp_path):
    """Sweep shards or seeds started together on a fresh machine: one prepares, the others
    wait and use it (before, the second one failed renaming TFDS's folder)."""
    import subprocess

    write_tiny_idx(tmp_path / "idx")
    argv = [sys.executable, "-c", PREPARE_SLOWLY, str(tmp_path / "tfds"), str(tmp_path / "idx")]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err[-2000:]
        assert out.split() == ["50"]


# --- other data sets ------------------------------------------------------------------------


def test_offline_fashion_mnist_without_files_fails_at_once(tmp_path, monkeypatch):
    # Without local files and without --download, nothing may try the network (no retries).
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("tried to reach the network")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(DataError) as e:
        data.load_split("fashion_mnist", "train", data_dir=tmp_path)
    assert_one_line_error(
        e,
        f"fashion_mnist is not prepared in {tmp_path}",
        "--data-idx DIR",
        "DIGITJAX_IDX_DIR_FASHION_MNIST=DIR",
        "train-images-idx3-ubyte.gz",
        "--download",
    )


def test_idx_dir_resolution(monkeypatch, shared_data, tmp_path):
    assert data.resolve_idx_dir("mnist") == (data.EMBEDDED_MNIST_DIR, "embedded copy")
    assert data.resolve_idx_dir("fashion_mnist") is None
    # Generic variable pointing at the parent of per-dataset folders.
    monkeypatch.setenv("DIGITJAX_IDX_DIR", str(shared_data))
    assert data.resolve_idx_dir("fashion_mnist") == (
        shared_data / "fashion_mnist",
        "DIGITJAX_IDX_DIR",
    )
    # ... or at a folder holding the four files.
    monkeypatch.setenv("DIGITJAX_IDX_DIR", str(shared_data / "fashion_mnist"))
    assert data.resolve_idx_dir("fashion_mnist")[0] == shared_data / "fashion_mnist"
    # The per-dataset variable wins over the generic one; the argument over both.
    monkeypatch.setenv("DIGITJAX_IDX_DIR_FASHION_MNIST", str(tmp_path))
    assert data.resolve_idx_dir("fashion_mnist") == (tmp_path, "DIGITJAX_IDX_DIR_FASHION_MNIST")
    assert data.resolve_idx_dir("fashion_mnist", "/x")[0] == Path("/x")


def test_wrong_dataset_files_are_refused(shared_data, tmp_path):
    with pytest.raises(DataError) as e:
        data.prepare("fashion_mnist", data_dir=tmp_path, idx_dir=shared_data / "mnist")
    assert_one_line_error(e, "is not the published fashion_mnist train split")


def test_fashion_mnist_from_env_var(monkeypatch, shared_data, tmp_path):
    monkeypatch.setenv("DIGITJAX_IDX_DIR_FASHION_MNIST", str(shared_data / "fashion_mnist"))
    data.prepare("fashion_mnist", data_dir=tmp_path, progress=False)
    monkeypatch.delenv("DIGITJAX_IDX_DIR_FASHION_MNIST")  # prepared now: no source needed
    images, labels = data.load_split("fashion_mnist", "train", data_dir=tmp_path)
    assert images.shape == (60000, 28, 28, 1)
    assert np.bincount(labels).tolist() == [6000] * 10
    _, test_labels = data.load_split("fashion_mnist", "test", data_dir=tmp_path)
    assert np.bincount(test_labels).tolist() == [1000] * 10
    assert data.describe_source("fashion_mnist", data_dir=tmp_path).startswith(
        "fashion_mnist: prepared in"
    )
