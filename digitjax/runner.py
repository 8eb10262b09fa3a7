"""Run an experiment's seeds into run folders and report them."""

from __future__ import annotations

import contextlib
import json
import queue
import signal
import tempfile
import threading
from pathlib import Path

from . import records
from .config import PARALLEL_MODES, Config, ConfigError, config_hash
from .loop import Interrupted, StopOnSignal, mean_std
from .stop import StoppedBetweenRuns


def _abstract_model(config: Config):
    import jax
    from flax import nnx

    from . import data, models, steps

    info = data.DATASETS[config.data.dataset]
    abstract = nnx.eval_shape(lambda: models.create(
        config.model.name, num_classes=info.num_classes, in_channels=info.image_shape[-1],
        rngs=nnx.Rngs(jax.random.key(0))))
    return (*steps.split_model(abstract), info.image_shape)


def model_flops(config: Config) -> int:
    """Forward FLOPs per image of the config's model."""
    from . import models

    graphdef, params, rest, shape = _abstract_model(config)
    return models.forward_flops(graphdef, params, rest, shape)


def model_summary(config: Config) -> str:
    """Parameter count and forward FLOPs of the config's model."""
    from . import models

    _, params, _, _ = _abstract_model(config)
    return (f"model {config.model.name}: {models.count_params(params):,} parameters, "
            f"{model_flops(config) / 1e6:.2f} MFLOP forward per image")


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
    if summary.exists():
        s = records.read_json(summary)
        if not isinstance(s, dict):
            raise ConfigError(f"{summary}: not a run summary (edit or delete it)")
        if s.get("status") in FINAL_STATUSES:
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
                   echo=print, make_loggers=None, parallel: str = "auto",
                   plots: bool = True, skip_locked: bool = False,
                   data_parallel: str | int = "off") -> list[dict]:
    """Train every seed of `config`; returns their summaries (finished runs are kept).

    `make_loggers(seed, run_dir)` returns the mirrors (e.g. W&B) of one seed's records.
    `parallel`: "auto" trains seeds side by side, one per local device, when there are
    several devices and seeds; "off" trains them one after another.
    `data_parallel` ("off", "auto" or a device count, see distributed.py) splits each step's
    batch over devices; its seeds then train one after another.
    """
    from . import data_device
    from .train import Trainer

    workdir = Path(workdir) if workdir else records.default_workdir()
    plan = []
    for seed in config.seeds:
        run_dir = records.run_dir(workdir, config.name, seed, overrides)
        state = check_run_dir(run_dir, config)
        plan.append((seed, run_dir, "new" if fresh else state))
    summaries: dict[int, dict] = {}
    todo = []
    for seed, run_dir, state in plan:
        if state == "finished":
            summaries[seed] = records.read_json(run_dir / records.SUMMARY)
            echo(f"{config.name} seed{seed}: already finished, not retrained "
                 f"(--fresh to start over) | {run_dir}")
        else:
            if state == "unfinished":
                with contextlib.ExitStack() as probe:  # fail fast, before loading any data
                    if not _lock(probe, config, seed, run_dir, skip_locked, echo):
                        continue
            todo.append((seed, run_dir, state))
    if todo:
        _check_writable(workdir)
        data = data_device.load(config, data_dir=data_dir, idx_dir=idx_dir,
                                download=download, progress=progress)
        trainer = Trainer(config, data, data_parallel=data_parallel)
        lock = threading.Lock()

        def train_one(tr, seed, run_dir, state, stop, position):
            with contextlib.ExitStack() as locks:
                state = _claim(locks, config, seed, run_dir, state, fresh=fresh,
                               skip_locked=skip_locked, echo=echo)
                if state is None:
                    return
                if state == "finished":
                    with lock:
                        summaries[seed] = records.read_json(run_dir / records.SUMMARY)
                    return
                loggers = make_loggers(seed, run_dir) if make_loggers else []
                try:
                    summary = tr.fit(seed, run_dir, progress=progress, loggers=loggers,
                                     extra_config={"overrides": overrides},
                                     resume=state != "new", stop=stop, position=position,
                                     plots=plots)
                except Interrupted as e:
                    echo(_resume_hint(config, seed, run_dir, e, overrides, workdir))
                    raise
            with lock:
                summaries[seed] = summary
                echo(format_summary(summary, run_dir))

        mode, devices = _parallel_mode(parallel, len(todo))
        if trainer.mesh is not None:  # data parallel: every device trains each seed
            if parallel in ("vmap", "devices") and mode != "off":
                echo(f"digitjax: note: --parallel {parallel} is not used: --data-parallel "
                     "spans the devices, so the seeds train one after another "
                     "(--data-parallel off to use it)")
            mode = "off"
        if mode == "vmap":
            def echo_summary(summary, run_dir):
                summaries[summary["seed"]] = summary
                echo(format_summary(summary, run_dir))

            _run_group(trainer, config, todo, fresh=fresh, skip_locked=skip_locked,
                       make_loggers=make_loggers, echo=echo, echo_summary=echo_summary,
                       progress=progress, overrides=overrides, workdir=workdir, plots=plots)
        elif mode == "devices":
            _run_on_devices(trainer, devices, todo, train_one)
        else:
            for seed, run_dir, state in todo:
                train_one(trainer, seed, run_dir, state, None, 0)
    ordered = [summaries[seed] for seed, _, _ in plan if seed in summaries]
    done = [s for s in ordered if s.get("status") == "completed"]
    if len(done) > 1:
        m, sd = mean_std([100 * s["test_accuracy"] for s in done])
        echo(f"{config.name}: test accuracy {m:.2f} +- {sd:.2f}% over {len(done)} seeds")
    return ordered


def _parallel_mode(parallel: str, num_seeds: int) -> tuple[str, list]:
    """How seeds share the hardware: ("vmap" | "devices" | "off", devices to use).

    auto: one vmapped program on a GPU/TPU (small steps leave the chip mostly idle);
    on CPU, where vmapped convolutions are slower per image, one seed per local device.
    """
    import jax

    if parallel not in PARALLEL_MODES:
        raise ConfigError(f"--parallel {parallel!r}: expected one of {', '.join(PARALLEL_MODES)}")
    devices = jax.local_devices()
    if parallel == "off" or num_seeds < 2:
        return "off", []
    if parallel == "vmap" or (parallel == "auto" and jax.default_backend() != "cpu"):
        return "vmap", []
    if len(devices) < 2:
        return "off", []
    return "devices", devices[:num_seeds]


def _resume_hint(config: Config, seed: int, run_dir: Path, e: Interrupted, overrides: dict,
                 workdir: Path) -> str:
    sets = "".join(f" --set {k}={v}" for k, v in overrides.items())
    return (f"{config.name} seed{seed}: {e}; checkpoint saved in {run_dir}. Resume "
            f"with: digitjax run {config.name} --seed {seed}{sets} --workdir {workdir}")


def _lock(locks: contextlib.ExitStack, config: Config, seed: int, run_dir: Path,
          skip_locked: bool, echo) -> bool:
    """Take `run_dir`'s lock, held until `locks` closes; False: skip it (another process
    holds it and `skip_locked`), else RunLocked is raised.

    Process 0 alone takes the lock; every process of a multi-process run makes its choice,
    or they would train different runs (or wait for each other's collectives forever).
    """
    from . import distributed

    locked = None
    try:
        locks.enter_context(records.run_lock(run_dir))
    except records.RunLocked as e:
        locked = e
    if not distributed.broadcast(locked is not None):
        return True
    locked = locked or records.RunLocked(f"{run_dir} is being trained by another process "
                                         "(process 0 could not take its lock)")
    if not skip_locked:
        raise locked
    echo(f"{config.name} seed{seed}: skipped, {locked}")
    return False


def _claim(locks: contextlib.ExitStack, config: Config, seed: int, run_dir: Path, state: str,
           *, fresh: bool, skip_locked: bool, echo) -> str | None:
    """Take `run_dir`'s lock (held until `locks` closes) and look at the folder again.

    Returns its state ("new", "unfinished" or "finished": another process may have run it
    since the plan was made), or None to skip it: another process holds its lock.
    """
    if not _lock(locks, config, seed, run_dir, skip_locked, echo):
        return None
    if not fresh:
        state = check_run_dir(run_dir, config)
    if state == "finished":
        echo(f"{config.name} seed{seed}: finished by another process")
    elif state == "unfinished":
        echo(f"{config.name} seed{seed}: resuming from the latest checkpoint in {run_dir}")
    return state


def _run_group(trainer, config: Config, todo: list, *, fresh: bool, skip_locked: bool,
               make_loggers, echo, echo_summary, progress: bool, overrides: dict,
               workdir: Path, plots: bool) -> None:
    """Train the `todo` seeds as one vmapped group, each holding its run folder's lock."""
    from .group import fit_group

    with contextlib.ExitStack() as locks:
        runs = []
        for seed, run_dir, state in todo:
            state = _claim(locks, config, seed, run_dir, state, fresh=fresh,
                           skip_locked=skip_locked, echo=echo)
            if state is None:
                continue
            if state == "finished":
                echo_summary(records.read_json(run_dir / records.SUMMARY), run_dir)
                continue
            loggers = make_loggers(seed, run_dir) if make_loggers else []
            runs.append((seed, run_dir, state != "new", loggers))
        if not runs:
            return
        try:
            done = fit_group(trainer, runs, progress=progress, plots=plots,
                             extra_config={"overrides": overrides})
        except Interrupted as e:
            for seed, run_dir, _, _ in runs:
                echo(_resume_hint(config, seed, run_dir, e, overrides, workdir))
            raise
        for summary, (_, run_dir, _, _) in zip(done, runs, strict=True):
            echo_summary(summary, run_dir)


def _run_on_devices(trainer, devices, todo, train_one) -> None:
    """One thread per device, each taking the next seed; Ctrl-C stops them all."""
    pending = queue.Queue()
    for item in todo:
        pending.put(item)
    errors: list[BaseException] = []
    stop = StopOnSignal()

    def worker(position, device):
        tr = trainer.on_device(device)
        while not errors and not stop.requested:
            try:
                seed, run_dir, state = pending.get_nowait()
            except queue.Empty:
                return
            try:
                train_one(tr, seed, run_dir, state, stop, position)
            except BaseException as e:  # re-raised in the main thread
                errors.append(e)
                stop.requested = stop.requested or signal.SIGTERM
                return

    with stop:
        threads = [threading.Thread(target=worker, args=(i, d), daemon=True)
                   for i, d in enumerate(devices)]
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(timeout=0.2)  # stay responsive to signals
    if errors:
        first = next((e for e in errors if not isinstance(e, Interrupted)), errors[0])
        raise first
    if stop.requested:  # it came while no seed was between two compiled calls
        raise StoppedBetweenRuns


def _check_writable(workdir: Path) -> None:
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        # A probe of its own: other processes (sweeps, jax.distributed peers) may probe the
        # same workdir at the same time.
        with tempfile.TemporaryFile(dir=workdir):
            pass
    except OSError as e:
        raise ConfigError(f"workdir {workdir} is not writable: {e.strerror}") from None


def evaluate_run(run_dir: Path | str, *, which: str = "best", split: str = "test",
                 tta_views: int = 0, tta_augment: str | None = None,
                 data_dir=None, idx_dir=None, download=False) -> dict:
    """Evaluate a saved checkpoint of a run on one split; writes eval-step<k>-<split>.json.

    `tta_views` > 0: test-time augmentation, the mean logits of each image and that many
    views drawn with the run's augmentation (or `tta_augment`), so a trained run can be
    scored with TTA without retraining (choose the number of views on val).
    """
    from . import checkpoint, data_device
    from .config import apply_overrides, check_values
    from .train import Trainer

    if split not in ("test", "val"):
        raise ConfigError(f"--split {split!r}: expected test or val")
    run_dir = Path(run_dir)
    config, record, step, state, _ = checkpoint.restore_state(run_dir, which)
    overrides = {"train.tta_views": str(tta_views)} if tta_views else {}
    if tta_augment:
        if not tta_views:
            raise ConfigError("--tta-augment needs --tta N (the number of views)")
        overrides["augment.name"] = tta_augment
    if overrides:
        config = apply_overrides(config, overrides)
        check_values(config)
    trainer = Trainer(config, data_device.load(config, data_dir=data_dir, idx_dir=idx_dir,
                                               download=download))
    metrics = trainer.evaluate(state, split)
    tta = f"-tta{tta_views}-{config.augment.name}" if tta_views else ""
    result = {"run_dir": str(run_dir), "checkpoint": which, "step": step, "split": split,
              "epoch": step / record["steps_per_epoch"], "tta_views": tta_views,
              "tta_augment": config.augment.name if tta_views else None, **metrics}
    records.write_json(run_dir / f"eval-step{step}-{split}{tta}.json", result)
    return result
