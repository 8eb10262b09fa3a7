"""`digitjax compare`: mean +- std over seeds of experiments' summary metrics, one row each.

Runs are read from the files under a workdir: every `.../<experiment>[+<hash>]/seed<k>/`
with a `summary.json`, at any depth, so run folders copied from other machines count; a
W&B run folder (`offline-run-*`, e.g. copied without the rest) stands in for a run whose
files are missing. With `--wandb` the same table is built from the W&B API instead.
A config changed by `--set` (`NAME+<hash>`) is its own row; so is a recorded config hash
that differs from the others of the same name (the experiment's definition changed), and
so are runs made on another kind of device (CPU and GPU numbers differ, speed above all).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
from pathlib import Path

from . import records, wandb_offline
from .config import ConfigError
from .loop import mean_std
from .wandb_log import PROJECT, SUPERSEDED, api_key_available, base_url, group_name, reachable

# (summary key, column title, scale, decimals)
COLUMNS = (
    ("test_accuracy", "test acc %", 100.0, 2),
    ("val_accuracy", "val acc %", 100.0, 2),
    ("train_seconds", "train s", 1.0, 1),
    ("images_per_second", "images/s", 1.0, 0),
)


@dataclasses.dataclass(frozen=True)
class RunResult:
    group: str  # the experiment as its folder names it: NAME or NAME+<hash of --set>
    seed: int | None
    config_hash: str | None
    summary: dict
    source: str  # where it was read: a folder or a W&B run path
    device: str | None = None  # the device kind it trained on ("cpu", "NVIDIA H100 ...")

    @property
    def completed(self) -> bool:
        return self.summary.get("status") == "completed"


def _from_files(folder: Path) -> RunResult:
    summary = records.read_json(folder / records.SUMMARY)
    config_path = folder / records.CONFIG
    # config.json knows the overrides, so a renamed folder still lands in its row.
    record = records.read_json(config_path) if config_path.exists() else {}
    group = group_name(record) if record else folder.parent.name
    return RunResult(group, summary.get("seed"), summary.get("config_hash"), summary,
                     str(folder), _device(record))


def _device(record: dict) -> str | None:
    return (record.get("environment") or {}).get("device_kind")


def _from_wandb(folder: Path) -> RunResult:
    run = wandb_offline.read_run(folder)
    summary = {k: v for k, v in run.summary.items() if not k.startswith("_")}
    return RunResult(run.group, run.config.get("seed"), run.config.get("config_hash"),
                     summary, str(folder), _device(run.config))


def local_results(workdir: Path | str) -> tuple[list[RunResult], list[str]]:
    """Every run under `workdir` (files first, W&B runs where files are missing), and
    notes on folders that could not be read."""
    found, notes = [], []
    for dirpath, dirnames, filenames in os.walk(workdir):
        here = Path(dirpath)
        dirnames.sort()
        try:
            if records.SUMMARY in filenames:
                found.append(_from_files(here))
                dirnames[:] = []  # its wandb/ only mirrors the same run
            elif any(f.startswith("run-") and f.endswith(".wandb") for f in filenames):
                found.append(_from_wandb(here))
                dirnames[:] = []
            else:
                # Earlier attempts (superseded) and checkpoints hold no results.
                dirnames[:] = [d for d in dirnames if d not in (SUPERSEDED, "checkpoints")]
        except (OSError, ValueError, KeyError) as e:  # JSONDecodeError and FormatError too
            notes.append(f"skipped {here}: {e}")
            dirnames[:] = []
    return found, notes


def wandb_results(names: list[str], *, project: str | None = None,
                  entity: str | None = None) -> list[RunResult]:
    """The runs of these experiments' groups from the W&B API (needs network and a key)."""
    import wandb

    # Checked first: without a key wandb prompts on a terminal, without network it retries.
    if not api_key_available():
        raise ConfigError("--wandb needs W&B credentials: run `wandb login` or set "
                          "WANDB_API_KEY")
    url = base_url()
    if not reachable(url):
        raise ConfigError(f"--wandb: {url} is unreachable")
    project = project or os.environ.get("WANDB_PROJECT") or PROJECT
    entity = entity or os.environ.get("WANDB_ENTITY")
    api = wandb.Api(timeout=30)
    path = f"{entity}/{project}" if entity else project
    out = []
    for name in names:
        pattern = f"^{re.escape(name)}(\\+.*)?$"
        # Newest first: a seed retrained with --fresh is a new W&B run, and it counts.
        for run in api.runs(path, filters={"group": {"$regex": pattern}, "jobType": "train"},
                            order="-created_at"):
            summary = dict(run.summary_metrics)
            out.append(RunResult(run.group, run.config.get("seed"),
                                 run.config.get("config_hash"), summary, "/".join(run.path),
                                 _device(run.config)))
    return out


def _matches(group: str, name: str) -> bool:
    return group == name or group.startswith(name + "+")


def select(results: list[RunResult], names: list[str], where: str) -> dict[str, list]:
    """Rows of the table: label -> the distinct runs (one per seed) of that experiment."""
    missing = [n for n in names if not any(_matches(r.group, n) for r in results)]
    if missing:
        have = sorted({r.group for r in results})
        raise ConfigError(f"no runs of {', '.join(missing)} in {where}; runs there: "
                          f"{', '.join(have) if have else 'none'}")
    # One run per (experiment, config, device, seed): files before W&B, completed first.
    chosen: dict[tuple, RunResult] = {}
    for r in results:
        key = (r.group, r.config_hash, r.device, r.seed)
        if key not in chosen or (r.completed and not chosen[key].completed):
            chosen[key] = r
    hashes: dict[str, set] = {}
    for group, config_hash, _, _ in chosen:
        hashes.setdefault(group, set()).add(config_hash)
    mixed = len({device for _, _, device, _ in chosen}) > 1  # then every row names its own
    rows: dict[str, list] = {}
    for name in names:
        for (group, config_hash, device, _), r in sorted(chosen.items(),
                                                         key=lambda kv: str(kv[0])):
            if _matches(group, name):
                label = group
                if len(hashes[group]) > 1:
                    label += f" [{config_hash}]"
                if mixed:
                    label += f" [{device or 'device unknown'}]"
                rows.setdefault(label, []).append(r)
    return rows


def format_table(rows: dict[str, list]) -> str:
    """Mean +- sample std over completed seeds (one seed: its value alone); n counts them."""
    cells = [["experiment", "n"] + [title for _, title, _, _ in COLUMNS]]
    left_out = collections.Counter()
    for label, runs in rows.items():
        done = [r for r in runs if r.completed]
        left_out.update(r.summary.get("status") or "unfinished" for r in runs
                        if not r.completed)
        line = [label, str(len(done))]
        for key, _, scale, decimals in COLUMNS:
            values = [scale * r.summary[key] for r in done if r.summary.get(key) is not None]
            if len(values) > 1:
                m, sd = mean_std(values)
                line.append(f"{m:,.{decimals}f} +- {sd:,.{decimals}f}")
            elif values:  # no spread to show
                line.append(f"{values[0]:,.{decimals}f}")
            else:
                line.append("-")
        cells.append(line)
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = []
    for row in cells:
        padded = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:],
                                                                         strict=True)]
        lines.append("  ".join(padded).rstrip())
    text = "\n".join(lines)
    if left_out:
        text += "\n(not counted: " + ", ".join(
            f"{n} {status} run{'s' * (n > 1)}" for status, n in sorted(left_out.items())) + ")"
    return text


def compare(names: list[str], *, workdir: Path | str | None = None,
            use_wandb: bool = False) -> str:
    """The table for `digitjax compare NAMES`, from local records or (use_wandb) W&B."""
    if use_wandb:
        try:
            results = wandb_results(names)
        except ConfigError:
            raise
        except Exception as e:  # e.g. no such project: one line, not a traceback
            first_line = (str(e).strip().splitlines() or [""])[0][:200]
            raise ConfigError(f"could not read runs from W&B ({type(e).__name__}: "
                              f"{first_line})") from None
        return format_table(select(results, names, "W&B"))
    workdir = Path(workdir) if workdir else records.default_workdir()
    results, notes = local_results(workdir)
    table = format_table(select(results, names, str(workdir)))
    return "\n".join([table, *notes])

