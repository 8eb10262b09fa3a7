"""Studies: a named set of experiments x seeds that makes one comparison.

`sweep` runs every (experiment, seed) of a study into `<workdir>/<experiment>/seed<k>/`;
it is resumable and idempotent (finished runs are skipped, interrupted ones resume, runs
another process holds are left to it) and `--shard i/n` takes a deterministic slice.
`table` rebuilds `results/<study>.md` and `.csv` from the run records alone.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import io
import math
from pathlib import Path

from . import records, registry
from .config import ConfigError, config_hash
from .loop import mean_std

RESULTS = Path("results")
TIMING_UNITS = {"train_seconds": "s", "images_per_second": "img/s"}


def default_workdir(study: str) -> Path:
    return RESULTS / "runs" / study


def parse_shard(text: str | None) -> tuple[int, int]:
    if not text:
        return 0, 1
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {text!r}: expected i/n, e.g. 0/4") from None
    if not 0 <= i < n:
        raise ConfigError(f"--shard {text!r}: need 0 <= i < n")
    return i, n


def plan(study_name: str, shard: str | None = None) -> list[tuple[str, int]]:
    """The (experiment, seed) pairs of a study, in a fixed order; this shard's slice."""
    study = registry.get_study(study_name)
    pairs = [(name, seed) for name in study.experiments
             for seed in registry.get(name).config.seeds]
    i, n = parse_shard(shard)
    return pairs[i::n]


def sweep(study_name: str, *, workdir=None, shard=None, dry_run=False, echo=print,
          **run_kwargs) -> list[dict]:
    """Run this shard of a study; returns the summaries of the runs it finished or found."""
    from .ensemble import record_if_complete
    from .runner import run_experiment

    workdir = Path(workdir) if workdir else default_workdir(study_name)
    pairs = plan(study_name, shard)
    if dry_run:
        for name, seed in pairs:
            run_dir = records.run_dir(workdir, name, seed, {})
            echo(f"{name} seed{seed}  {_state(run_dir)}  {run_dir}")
        return []
    summaries = []
    by_experiment: dict[str, list[int]] = {}
    for name, seed in pairs:
        by_experiment.setdefault(name, []).append(seed)
    for name, seeds in by_experiment.items():
        config = registry.resolve(name, seeds=tuple(seeds))
        summaries += run_experiment(config, overrides={}, workdir=workdir, echo=echo,
                                    skip_locked=True, **run_kwargs)
        data = {k: run_kwargs[k] for k in ("data_dir", "idx_dir", "download") if k in run_kwargs}
        record_if_complete(name, workdir, echo, **data)
    return summaries


def _state(run_dir: Path) -> str:
    summary = run_dir / records.SUMMARY
    if summary.exists():
        return records.read_json(summary).get("status", "?")
    return "unfinished" if (run_dir / records.CONFIG).exists() else "to run"


@dataclasses.dataclass
class Row:
    experiment: str
    description: str
    model: str
    augmentation: str
    seeds: int
    completed: int
    diverged: int
    test_mean: float
    test_std: float
    test_min: float
    test_max: float
    test_ci95: float
    val_mean: float
    num_params: int | None
    mflops: float | None
    epochs: int
    train_seconds: float
    images_per_second: float
    ensemble: float | None  # test accuracy (%) of the seeds' averaged logits
    wall_seconds: float  # the finished runs' wall, start to finish (a vmapped group once)


def collect(study_name: str, workdir=None) -> tuple[list[Row], list[dict]]:
    """Table rows from the run records, and each finished run's machine and versions."""
    from .runner import model_flops

    workdir = Path(workdir) if workdir else default_workdir(study_name)
    study = registry.get_study(study_name)
    if not any((workdir / name).is_dir() for name in study.experiments):
        raise ConfigError(f"{workdir} holds no run of study {study_name!r} (expected folders "
                          f"{', '.join(study.experiments)}); check --workdir")
    rows, envs = [], []
    for name in study.experiments:
        config = registry.get(name).config
        expected = config_hash(config)
        summaries, wall = [], 0.0
        for seed in config.seeds:
            run_dir = records.run_dir(workdir, name, seed, {})
            if (run_dir / records.SUMMARY).exists():
                summaries.append(records.read_json(run_dir / records.SUMMARY))
                if summaries[-1].get("config_hash") != expected:
                    # A table describes the registered experiments: an older recipe's run
                    # would be averaged in under the current one's name.
                    raise ConfigError(
                        f"{run_dir} was made with another config "
                        f"({summaries[-1].get('config_hash')}; {name} is now {expected}): "
                        f"move that folder aside and rerun `digitjax sweep {study_name} "
                        f"--workdir {workdir}`, or restore the experiment's definition")
                record = records.read_json(run_dir / records.CONFIG)
                k = record.get("execution", {}).get("seeds_per_program", 1)
                envs.append({**record.get("environment", {}), "seeds_per_program": k})
                if summaries[-1].get("status") == "completed":
                    wall += summaries[-1].get("total_seconds", math.nan) / k
        done = [s for s in summaries if s.get("status") == "completed"]
        test = [100 * s["test_accuracy"] for s in done]
        m, sd = mean_std(test)
        rows.append(Row(
            experiment=name, description=config.description, model=config.model.name,
            augmentation=config.augment.name, seeds=len(config.seeds), completed=len(done),
            diverged=sum(s.get("status") == "diverged" for s in summaries),
            test_mean=m, test_std=sd, test_min=min(test, default=math.nan),
            test_max=max(test, default=math.nan), test_ci95=ci95(sd, len(test)),
            val_mean=mean_std([100 * s["val_accuracy"] for s in done])[0],
            num_params=done[0]["num_params"] if done else None,
            mflops=model_flops(config) / 1e6, epochs=config.train.epochs,
            train_seconds=mean_std([s["train_seconds"] for s in done])[0],
            images_per_second=mean_std([s["images_per_second"] for s in done])[0],
            ensemble=_ensemble_accuracy(workdir / name, done), wall_seconds=wall))
    return rows, envs


def _facts(envs: list[dict], describe) -> str:
    """One fact of the runs, e.g. their XLA flags: the value, or each value with its count
    when the runs differ (a study continued on another machine or with other versions)."""
    counts = collections.Counter(describe(e) for e in envs)
    if len(counts) <= 1:
        return next(iter(counts), describe({}))
    return "; ".join(f"{v} ({n} run{'s' * (n > 1)})" for v, n in sorted(counts.items()))


def _ensemble_accuracy(folder: Path, done: list[dict]) -> float | None:
    """The recorded ensemble's test accuracy (%), if it was made from exactly these runs
    (a seed retrained, diverged or missing since makes the record stale: not shown)."""
    from .ensemble import ENSEMBLE, _describes

    path = folder / ENSEMBLE
    if not path.exists():
        return None
    record = records.read_json(path)
    return 100 * record["accuracy"] if _describes(record, done) else None


def ci95(sd: float, n: int) -> float:
    """Half-width of the 95% confidence interval of a mean of n values (Student t, n - 1
    degrees of freedom)."""
    from scipy import stats  # a dependency of jax

    if n < 2 or math.isnan(sd):
        return math.nan
    return float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)


def _f(x, fmt: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def render(study_name: str, rows: list[Row], envs: list[dict], workdir: Path | None = None
           ) -> tuple[str, str]:
    """(markdown, csv) of a study; deterministic given the records."""
    study = registry.get_study(study_name)
    lines = [f"# Study `{study_name}`", "", study.description, "",
             "| experiment | model | augmentation | seeds | test acc % (mean +- std) | min | max "
             "| 95% CI +- | ensemble % | val acc % | params | MFLOP fwd | epochs | train s "
             "| images/s |", "|" + " --- |" * 15]
    for r in rows:
        seeds = f"{r.completed}/{r.seeds}" + (f" ({r.diverged} diverged)" if r.diverged else "")
        acc = _mean_std(r) if r.completed else "-"
        lines.append(
            f"| {r.experiment} | {r.model} | {r.augmentation} | {seeds} | {acc} | "
            f"{_f(r.test_min, '.2f')} | {_f(r.test_max, '.2f')} | {_f(r.test_ci95, '.2f')} | "
            f"{_f(r.ensemble, '.2f')} | "
            f"{_f(r.val_mean, '.2f')} | {_f(r.num_params, ',')} | {_f(r.mflops, '.2f')} | "
            f"{r.epochs} | {_f(r.train_seconds, '.1f')} | {_f(r.images_per_second, ',.0f')} |")
    where = f" --workdir {workdir.as_posix()}" if workdir else ""
    k = max((e.get("seeds_per_program", 1) for e in envs), default=1)
    group = (f" Seeds ran {k} at a time in one vmapped program: train s is the group's "
             "time, images/s per seed." if k > 1 else "")
    lines += ["", "Test accuracy is that of each run's checkpoint chosen on validation "
              "(a split carved from the training set, `data.val_split`); diverged runs are "
              "counted apart, never averaged in. The 95% CI is Student t's (n - 1 degrees of "
              "freedom). The ensemble averages the logits of the finished seeds' reported "
              "checkpoints. Train seconds and images/s are per seed (training loop only)."
              f"{group}", "",
              *_selected(rows),
              f"- Wall time: {_hours(sum(r.wall_seconds for r in rows))} for the "
              f"{sum(r.completed for r in rows)} finished runs (each run start to finish: "
              "data, compile, training, evaluation, checkpoints)",
              f"- Reproduce: `digitjax sweep {study_name}{where}` then "
              f"`digitjax table {study_name}{where}`",
              "- Hardware: " + _facts(envs, _hardware),
              "- Versions: " + _facts(envs, lambda e: ", ".join(
                  f"{k} {v}" for k, v in sorted(e.get("versions", {}).items()) if v)),
              "- XLA flags: " + _facts(envs, lambda e: f"`{e.get('xla_flags', '')}`"), ""]
    buf = io.StringIO()
    fields = [f.name for f in dataclasses.fields(Row)]
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (round(v, 4) if isinstance(v, float) else v)
                         for k, v in dataclasses.asdict(r).items()})
    return "\n".join(lines), buf.getvalue()


def _hours(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.0f} min"


def _hardware(env: dict) -> str:
    return (f"{env.get('cpu_model', '?')} ({env.get('cpu_count', '?')} cores); backend "
            f"{env.get('backend', '?')} ({env.get('device_kind', '?')}, "
            f"{env.get('device_count', '?')} device(s))")


def table(study_name: str, *, workdir=None, out_dir=RESULTS, check=False) -> list[str]:
    """Write results/<name>.md and .csv; with check, compare instead (returns differences).

    <name> is the study's, or the workdir's folder name when that is `<study>_<suffix>`:
    the same study run on a GPU into results/runs/best_h100 gives results/best_h100.md.
    """
    rows, envs = collect(study_name, workdir)
    stem = table_stem(study_name, workdir)
    md, csv_text = render(study_name, rows, envs, shown_workdir(study_name, workdir))
    out_dir = Path(out_dir)
    targets = {out_dir / f"{stem}.md": md, out_dir / f"{stem}.csv": csv_text}
    if check:
        return [str(p) for p, text in targets.items()
                if not p.exists() or p.read_text() != text]
    for path, text in targets.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return [str(p) for p in targets]


def table_stem(study_name: str, workdir=None) -> str:
    """The study's name, or the workdir's folder name when that is `<study>_<suffix>`."""
    name = Path(workdir).name if workdir else ""
    return name if name.startswith(f"{study_name}_") else study_name


def shown_workdir(study_name: str, workdir=None) -> Path | None:
    """The --workdir a reader must pass to redo a table (None: the default one).

    A `<study>_<suffix>` folder is shown as the conventional results/runs/<study>_<suffix>,
    wherever the records were read from.
    """
    stem = table_stem(study_name, workdir)
    if stem != study_name:
        return default_workdir(stem)
    if workdir and Path(workdir).name != study_name:  # .../runs/<study> is conventional
        return Path(workdir)
    return None


def _selected(rows: list[Row]) -> list[str]:
    """The experiment a reader would pick: the best mean validation accuracy (never test),
    among the experiments whose seeds all completed (a mean of fewer is not comparable)."""
    complete = [r for r in rows if r.completed == r.seeds]
    if len(complete) < 2:
        return []
    best = max(complete, key=lambda r: r.val_mean)
    among = "" if len(complete) == len(rows) else \
        f" among the {len(complete)} experiments with all their seeds"
    return [f"- Selected on validation{among}: `{best.experiment}` (mean val "
            f"{best.val_mean:.2f}%, test {_mean_std(best, '%')})"]


def _mean_std(r: Row, unit: str = "") -> str:
    """Mean +- std of test accuracy; a single seed has no spread to show."""
    if r.completed == 1:
        return f"{r.test_mean:.2f}{unit} (1 seed)"
    return f"{r.test_mean:.2f} +- {r.test_std:.2f}{unit}"


def wandb_sweep_config(study_name: str) -> str:
    """A W&B Sweeps config (grid over the study's experiments and seeds) as YAML text.

    Its project is the one `digitjax run` would log to now ($WANDB_PROJECT or digitjax): a
    sweep's runs go to the sweep's project, so `compare --wandb` finds them there.
    """
    import os

    study = registry.get_study(study_name)
    per_experiment = {n: tuple(registry.get(n).config.seeds) for n in study.experiments}
    if len({frozenset(s) for s in per_experiment.values()}) > 1:
        # A W&B grid crosses every value: it would train seeds an experiment does not have.
        listed = "; ".join(f"{n}: {','.join(map(str, s))}" for n, s in per_experiment.items())
        raise ConfigError(f"study {study_name!r}: its experiments have different seeds "
                          f"({listed}), which a W&B grid cannot express; use `digitjax "
                          f"sweep {study_name}` (with --shard i/n over machines)")
    seeds = sorted(next(iter(per_experiment.values()), ()))
    exps = ", ".join(study.experiments)
    return "\n".join([
        "# wandb sweep this file, then run `wandb agent <sweep id>` on each machine",
        f"name: digitjax-{study_name}",
        f"project: {os.environ.get('WANDB_PROJECT') or 'digitjax'}",
        "program: digitjax",
        "method: grid",
        "parameters:",
        f"  experiment:\n    values: [{exps}]",
        f"  seed:\n    values: [{', '.join(map(str, seeds))}]",
        "command:",
        "  - ${program}",
        "  - run",
        "  - ${args}",
        f"  - --workdir={default_workdir(study_name)}",
        "",
    ])
