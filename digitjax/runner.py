"""Run an experiment's seeds into run folders and report them."""

from __future__ import annotations

import json
from pathlib import Path

from . import records
from .config import Config, ConfigError, config_hash
from .loop import Interrupted, mean_std


def model_summary(config: Config) -> str:
    """Parameter count and forward FLOPs of the config's model."""
    import jax
    from flax import nnx

    from . import data, models, steps

    info = data.DATASETS[config.data.dataset]
    shape = info.image_shape
    abstract = nnx.eval_shape(lambda: models.create(
        config.model.name, num_classes=info.num_classes, in_channels=shape[-1],
        rngs=nnx.Rngs(jax.random.key(0))))
    graphdef, params, rest = steps.split_model(abstract)
    flops = models.forward_flops(graphdef, params, rest, shape)
    return (f"model {config.model.name}: {models.count_params(params):,} parameters, "
            f"{flops / 1e6:.2f} MFLOP forward per image")


def check_run_dir(run_dir: Path, config: Config) -> str:
    """'new', 'finished' or 'unfinished'; refuses a folder made by another config."""
    cfg_path = run_dir / records.CONFIG
    if not cfg_path.exists():
        return "new"
    try:
        recorded = records.read_json(cfg_path).get("config_hash")
    except (OSError, json.JSONDecodeError):
        recorded = None
    if recorded is not None and recorded != config_hash(config):
        raise ConfigError(f"{run_dir} holds a run of another config (hash {recorded}, this one "
                          f"is {config_hash(config)}); use another --workdir")
    summary = run_dir / records.SUMMARY
    if summary.exists() and records.read_json(summary).get("status") in FINAL_STATUSES:
        return "finished"
    return "unfinished"


FINAL_STATUSES = ("completed", "diverged")


def format_summary(s: dict, run_dir: Path) -> str:
    if s.get("status") != "completed":
        return f"{s['experiment']} seed{s['seed']}: {s['status']} ({s.get('error', '')}) {run_dir}"
    return (f"{s['experiment']} seed{s['seed']}: test accuracy {100 * s['test_accuracy']:.2f}% "
            f"(val {100 * s['val_accuracy']:.2f}%, epoch {s['selected_epoch']}) | "
            f"wall {s['total_seconds']:.1f} s (train {s['train_seconds']:.1f} s, compile "
            f"{s['compile_seconds']:.1f} s, eval {s['eval_seconds']:.1f} s) | "
            f"{s['images_per_second']:,.0f} train images/s | {run_dir}")


def run_experiment(config: Config, *, overrides: dict[str, str], workdir=None, fresh=False,
                   progress=True, data_dir=None, idx_dir=None, download=False,
                   echo=print, make_loggers=None) -> list[dict]:
    """Train every seed of `config`; returns their summaries (finished runs are kept).

    `make_loggers(seed, run_dir)` returns the mirrors (e.g. W&B) of one seed's records.
    """
    from . import data_device
    from .train import Trainer

    workdir = Path(workdir) if workdir else records.default_workdir()
    plan = []
    for seed in config.seeds:
        run_dir = records.run_dir(workdir, config.name, seed, overrides)
        state = check_run_dir(run_dir, config)
        plan.append((seed, run_dir, "new" if fresh else state))
    summaries = []
    trainer = None
    for seed, run_dir, state in plan:
        if state == "finished":
            summary = records.read_json(run_dir / records.SUMMARY)
            echo(f"{config.name} seed{seed}: already finished, not retrained "
                 f"(--fresh to start over) | {run_dir}")
        else:
            if trainer is None:
                _check_writable(workdir)
                trainer = Trainer(config, data_device.load(
                    config, data_dir=data_dir, idx_dir=idx_dir, download=download))
            loggers = make_loggers(seed, run_dir) if make_loggers else []
            if state == "unfinished":
                echo(f"{config.name} seed{seed}: resuming from the latest checkpoint in "
                     f"{run_dir}")
            try:
                summary = trainer.fit(seed, run_dir, progress=progress, loggers=loggers,
                                      extra_config={"overrides": overrides},
                                      resume=state != "new")
            except Interrupted as e:
                seeds = f"--seed {seed}"
                sets = "".join(f" --set {k}={v}" for k, v in overrides.items())
                echo(f"{config.name} seed{seed}: {e}; checkpoint saved in {run_dir}. Resume "
                     f"with: digitjax run {config.name} {seeds}{sets} --workdir {workdir}")
                raise
            echo(format_summary(summary, run_dir))
        summaries.append(summary)
    done = [s for s in summaries if s.get("status") == "completed"]
    if len(done) > 1:
        m, sd = mean_std([100 * s["test_accuracy"] for s in done])
        echo(f"{config.name}: test accuracy {m:.2f} +- {sd:.2f}% over {len(done)} seeds")
    return summaries


def _check_writable(workdir: Path) -> None:
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / ".digitjax-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"workdir {workdir} is not writable: {e.strerror}") from None


def evaluate_run(run_dir: Path | str, *, which: str = "best", split: str = "test",
                 data_dir=None, idx_dir=None, download=False) -> dict:
    """Evaluate a saved checkpoint of a run on one split; writes eval-<step>-<split>.json."""
    from . import checkpoint, data_device
    from .train import Trainer

    if split not in ("test", "val"):
        raise ConfigError(f"--split {split!r}: expected test or val")
    run_dir = Path(run_dir)
    config, record, step, state, _ = checkpoint.restore_state(run_dir, which)
    trainer = Trainer(config, data_device.load(config, data_dir=data_dir, idx_dir=idx_dir,
                                               download=download))
    metrics = trainer.evaluate(state, split)
    result = {"run_dir": str(run_dir), "checkpoint": which, "step": step, "split": split,
              "epoch": step / record["steps_per_epoch"], **metrics}
    records.write_json(run_dir / f"eval-step{step}-{split}.json", result)
    return result
