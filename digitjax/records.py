"""Run records, the ground truth of a run: config.json, metrics.jsonl, summary.json.

`<workdir>/<experiment>/seed<k>/` for a registered config; a config changed by overrides
gets `<experiment>+<hash of the overrides>/seed<k>` so it never mixes with the registered
runs. Whole-file writes are atomic (temp file + rename), so a kill or a full disk leaves
the previous version intact.

In a multi-process run (distributed.py) every process trains the same run, and only process
0 writes these files and holds the run lock: on the others the writers here do nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path

from .distributed import is_primary

DEFAULT_WORKDIR = "runs"
CONFIG, METRICS, SUMMARY = "config.json", "metrics.jsonl", "summary.json"
VERSIONED = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "tensorflow-datasets",
             "wandb", "numpy")


def default_workdir() -> Path:
    return Path(os.environ.get("DIGITJAX_WORKDIR", DEFAULT_WORKDIR))


def overrides_tag(overrides: dict[str, str]) -> str:
    """Short stable hash of the overrides that change the config ('' when none)."""
    if not overrides:
        return ""
    text = json.dumps(sorted(overrides.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def run_dir(workdir: Path | str, experiment: str, seed: int, overrides: dict[str, str]) -> Path:
    tag = overrides_tag(overrides)
    folder = f"{experiment}+{tag}" if tag else experiment
    return Path(workdir) / folder / f"seed{seed}"


def write_json(path: Path, data) -> None:
    """Write JSON atomically: readers see the old file or the new one, never half."""
    if not is_primary():
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; records are for everyone to read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path):
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:  # name the damaged file in the one-line error
            raise json.JSONDecodeError(f"{path}: {e.msg}", e.doc, e.pos) from None


def append_metrics(path: Path, rows: list[dict]) -> None:
    if not rows or not is_primary():
        return
    with open(path, "a") as f:
        for row in rows:
            # Strict JSON: a NaN/inf stops the run as diverged before it gets here.
            f.write(json.dumps(row, sort_keys=True, allow_nan=False) + "\n")
        f.flush()


def read_metrics(path: Path) -> list[dict]:
    """All complete lines of metrics.jsonl (a line cut off by a kill is ignored)."""
    rows = []
    if not Path(path).exists():
        return rows
    with open(path) as f:
        for line in f:
            if line.endswith("\n"):
                rows.append(json.loads(line))
    return rows


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep only rows up to `last_step`, so a resumed run never doubles a line."""
    if not is_primary():
        return
    rows = [r for r in read_metrics(path) if r["step"] <= last_step]
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
    fd, tmp = tempfile.mkstemp(dir=Path(path).parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def git_commit() -> str | None:
    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                           capture_output=True, text=True, timeout=5).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    """Versions, platform and devices, recorded in config.json."""
    import jax

    versions = {}
    for name in VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    devices = jax.local_devices()
    return {
        "versions": versions,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": jax.device_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "git_commit": git_commit(),
    }


class RunLocked(RuntimeError):
    """Another live process is training this run folder."""


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """Hold `<run_dir>/.lock` while training: a second process on the folder is refused.

    An flock, so the kernel releases it when the holder dies (even by SIGKILL): a killed
    run never leaves the folder locked. Held by process 0 alone in a multi-process run.
    """
    if not is_primary():
        yield
        return
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise RunLocked(f"{run_dir} is being trained by another process (pid {holder})"
                            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
