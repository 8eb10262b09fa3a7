"""Read and write IDX files (the MNIST file format), gzip-compressed or plain.

Format: a big-endian int32 magic ``0x0000TTNN`` (TT = 0x08 for uint8 data, NN = number of
dimensions), then NN big-endian int32 dimension sizes, then the data, row-major.
MNIST-style datasets use ndim 3 for images (magic 0x00000803) and ndim 1 for labels
(0x00000801).
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np

__all__ = [
    "DataError",
    "IMAGES_MAGIC",
    "LABELS_MAGIC",
    "read_idx",
    "read_idx_pair",
    "write_idx",
]

IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
_UINT8_TYPE = 0x08
_GZIP_MAGIC = b"\x1f\x8b"


class DataError(ValueError):
    """Bad or missing dataset files; the message is one line naming the file and the problem."""


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    # Sniff the gzip magic rather than trusting the suffix: people gunzip files in place.
    if raw[:2] != _GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as e:
        raise DataError(f"{path}: corrupt or truncated gzip data ({e})") from None


def read_idx(path: str | os.PathLike, *, magic: int | None = None) -> np.ndarray:
    """Returns the uint8 array stored in the IDX file at ``path`` (read-only view).

    ``magic`` (e.g. ``IMAGES_MAGIC``) makes any other magic number an error. Raises
    ``DataError`` on a bad header or when the data size does not match the dimensions.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise DataError(f"{path}: too short for an IDX header ({len(raw)} bytes)")
    found = int.from_bytes(raw[:4], "big")
    if raw[0] != 0 or raw[1] != 0 or raw[2] != _UINT8_TYPE or raw[3] == 0:
        raise DataError(f"{path}: not a uint8 IDX file (magic 0x{found:08x})")
    if magic is not None and found != magic:
        raise DataError(f"{path}: bad magic 0x{found:08x}, expected 0x{magic:08x}")
    ndim = raw[3]
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise DataError(f"{path}: truncated header ({len(raw)} of {header_size} bytes)")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    if any(d < 0 for d in dims):
        raise DataError(f"{path}: negative dimension in {dims}")
    # Exact integers: an int64 product of corrupt dimensions can wrap around to the
    # file's size (e.g. 65536**4 == 0), and the reshape below would then fail.
    expected = math.prod(dims)
    found_size = len(raw) - header_size
    if found_size < expected:
        raise DataError(
            f"{path}: truncated: {found_size} data bytes, expected {expected} for shape {dims}"
        )
    if found_size > expected:
        raise DataError(
            f"{path}: {found_size - expected} unexpected trailing bytes after shape {dims}"
        )
    try:
        return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(dims)
    except ValueError:  # numpy refuses e.g. (0, 2**31 - 1, 2**31 - 1, 2**31 - 1)
        raise DataError(f"{path}: impossible shape {dims}") from None


def read_idx_pair(
    images_path: str | os.PathLike, labels_path: str | os.PathLike
) -> tuple[np.ndarray, np.ndarray]:
    """Reads an images file (N, H, W) and its labels file (N,), checking that the counts agree."""
    images = read_idx(images_path, magic=IMAGES_MAGIC)
    labels = read_idx(labels_path, magic=LABELS_MAGIC)
    if len(images) != len(labels):
        raise DataError(
            f"{images_path}: {len(images)} images but {labels_path} has {len(labels)} labels"
        )
    return images, labels


def write_idx(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Writes a uint8 array as IDX; gzip-compressed when ``path`` ends in ``.gz``."""
    path = Path(path)
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"IDX data must be uint8, got {array.dtype}")
    if not 1 <= array.ndim <= 255:
        raise ValueError(f"IDX data must have 1 to 255 dimensions, got {array.ndim}")
    header = bytes([0, 0, _UINT8_TYPE, array.ndim]) + np.asarray(array.shape, ">i4").tobytes()
    data = header + np.ascontiguousarray(array).tobytes()
    if path.suffix == ".gz":
        # mtime=0 keeps the bytes reproducible for fixtures.
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)
    return path
