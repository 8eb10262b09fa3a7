"""Read a W&B run's transaction log (`run-<id>.wandb`) back without a server.

wandb >= 0.2x no longer writes `config.yaml` or `wandb-summary.json` for offline runs: the
run exists only as this log, so `digitjax compare` and the tests read it here. The format
(checked against wandb 0.31, the version pinned in constraints.txt): a 7-byte file header
(b":W&B", magic 0xBEE1, version 0), then LevelDB-style log records in 32 KiB blocks, each
record a 7-byte header (CRC-32 of type byte + payload, length, type) and a serialized
`wandb_internal_pb2.Record`; a record that spans blocks is split FIRST/MIDDLE.../LAST.
"""

from __future__ import annotations

import dataclasses
import json
import re
import struct
import zlib
from pathlib import Path

_FILE_HEADER = struct.Struct("<4sHB")
_RECORD_HEADER = struct.Struct("<IHB")
_IDENT, _MAGIC, _VERSION = b":W&B", 0xBEE1, 0
_BLOCK = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


class FormatError(ValueError):
    """Not a W&B transaction log this reader understands."""


@dataclasses.dataclass
class OfflineRun:
    """What a run's log says: identity, config, history rows (in order) and summary."""

    path: Path
    run_id: str = ""
    project: str = ""
    entity: str = ""
    group: str = ""
    job_type: str = ""
    name: str = ""
    tags: list[str] = dataclasses.field(default_factory=list)
    config: dict = dataclasses.field(default_factory=dict)
    history: list[dict] = dataclasses.field(default_factory=list)
    summary: dict = dataclasses.field(default_factory=dict)
    metrics: list = dataclasses.field(default_factory=list)  # define_metric records
    exit_code: int | None = None  # None: the run never finished (killed, or still running)


def payloads(path: Path) -> list[bytes]:
    """The raw record payloads of a log; a tail cut off by a kill is dropped."""
    data = Path(path).read_bytes()
    if len(data) < _FILE_HEADER.size:
        raise FormatError(f"{path}: too short for a W&B log")
    ident, magic, version = _FILE_HEADER.unpack_from(data)
    if (ident, magic, version) != (_IDENT, _MAGIC, _VERSION):
        raise FormatError(f"{path}: not a W&B log of a known version "
                          f"(header {ident!r} {magic:#x} v{version})")
    out, parts, pos = [], None, _FILE_HEADER.size
    while pos + _RECORD_HEADER.size <= len(data):
        room = _BLOCK - pos % _BLOCK
        if room < _RECORD_HEADER.size:  # block trailer: zero padding
            pos += room
            continue
        crc, length, kind = _RECORD_HEADER.unpack_from(data, pos)
        body = data[pos + _RECORD_HEADER.size: pos + _RECORD_HEADER.size + length]
        if kind == 0 or len(body) < length:
            break  # preallocated zeros or a write cut off: the end of what was committed
        if zlib.crc32(body, zlib.crc32(bytes([kind]))) != crc:
            raise FormatError(f"{path}: checksum mismatch at byte {pos}")
        pos += _RECORD_HEADER.size + length
        if kind == _FULL:
            out.append(body)
        elif kind == _FIRST:
            parts = [body]
        elif kind in (_MIDDLE, _LAST) and parts is not None:
            parts.append(body)
            if kind == _LAST:
                out.append(b"".join(parts))
                parts = None
    return out


def _item_key(item) -> list[str]:
    return list(item.nested_key) or [item.key]


def _set_nested(d: dict, keys: list[str], value) -> None:
    for k in keys[:-1]:
        d = d.setdefault(k, {})
    d[keys[-1]] = value


def _pop_nested(d: dict, keys: list[str]) -> None:
    for k in keys[:-1]:
        d = d.get(k, {})
    d.pop(keys[-1], None)


def _history_value(item):
    kind = item.WhichOneof("value")
    if kind is None:
        return json.loads(item.value_json)
    return None if kind == "none" else getattr(item, kind)


def read_run(path: Path | str) -> OfflineRun:
    """Parse `run-<id>.wandb` (or the run folder holding it) into an OfflineRun."""
    from google.protobuf.message import DecodeError
    from wandb.proto import wandb_internal_pb2 as pb

    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("run-*.wandb"))
        if not found:
            raise FormatError(f"{path}: no run-*.wandb file")
        path = found[0]
    run = OfflineRun(path=path)
    for payload in payloads(path):
        rec = pb.Record()
        try:
            rec.ParseFromString(payload)
        except DecodeError as e:
            raise FormatError(f"{path}: unreadable record ({e})") from None
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            run.run_id, run.project, run.entity = r.run_id, r.project, r.entity
            run.group, run.job_type, run.name = r.run_group, r.job_type, r.display_name
            run.tags = list(r.tags)
            _apply(run.config, r.config)
            _apply(run.summary, r.summary)
        elif kind == "config":
            _apply(run.config, rec.config)
        elif kind == "summary":
            _apply(run.summary, rec.summary)
        elif kind == "history":
            row: dict = {}
            for item in rec.history.item:
                _set_nested(row, _item_key(item), _history_value(item))
            run.history.append(row)
        elif kind == "metric":
            run.metrics.append(rec.metric)
        elif kind == "exit":
            run.exit_code = rec.exit.exit_code
    run.config.pop("_wandb", None)
    return run


def _apply(target: dict, record) -> None:
    """Apply a ConfigRecord/SummaryRecord (updates, then removals) to `target`."""
    for item in record.update:
        _set_nested(target, _item_key(item), json.loads(item.value_json))
    for item in record.remove:
        _pop_nested(target, _item_key(item))


def find_runs(folder: Path | str) -> list[Path]:
    """W&B run folders (offline or synced) under `folder`, oldest first."""
    folder = Path(folder)
    dirs = [p.parent for p in folder.glob("*run-*/run-*.wandb")]

    def started(p: Path) -> str:  # `offline-run-20261127_201544-<id>`: the time it started
        m = re.search(r"run-(\d{8}_\d{6})", p.name)
        return m.group(1) if m else ""

    return sorted(dirs, key=lambda p: (started(p), p.name))
