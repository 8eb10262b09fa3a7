"""Orbax checkpoints of a run: periodic and best, restored for resume and evaluation.

A checkpoint is `<run_dir>/checkpoints/<step>/` holding the train state (model, optimizer,
step) and a JSON record of the loop (epoch, position in the data order, key data, the
best evaluation so far, pending log window, config hash). The latest `checkpoint.keep`
and the best by validation accuracy both survive: one preservation policy keeps either
(with `best_fn` plus `max_to_keep`, Orbax can evict the latest ones, orbax#526). A save
cut off before its commit leaves only a `*.orbax-checkpoint-tmp` folder, which Orbax
never restores and cleans at start-up.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging

from . import faults, records, steps
from .config import ConfigError, from_dict

# Orbax logs routine decisions (read-only options, saves without metrics) as warnings.
absl_logging.set_verbosity(absl_logging.ERROR)


def _not_an_os_error(record: logging.LogRecord) -> bool:
    """False for Orbax's logs of a failed write (a full disk: hundreds of lines from its
    threads). The error reaches the caller too, and `digitjax` reports it in one line."""
    if "orbax" not in record.pathname or record.levelno >= logging.CRITICAL:
        return True
    exc = record.exc_info[1] if record.exc_info else None
    try:
        text = f"{record.getMessage()} {exc or ''}"
    except Exception:  # noqa: BLE001 - a malformed record is not ours to drop
        return True
    return not (isinstance(exc, OSError) or "[os_error_code=" in text)


logging.getLogger("absl").addFilter(_not_an_os_error)

CHECKPOINTS = "checkpoints"
DAMAGED = "checkpoints-unreadable"  # beside CHECKPOINTS: what resume set aside
FORMAT = 1


_copy_tree = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))


def _rank(metrics: dict) -> tuple[float, int]:
    # Highest validation accuracy; the earliest step among equals (as the loop selects).
    return metrics["val_accuracy"], -metrics["step"]


class RunCheckpoints:
    """The checkpoint manager of one run folder."""

    def __init__(self, run_dir: Path, *, keep: int, save_steps=None, read_only=False):
        self.directory = (Path(run_dir) / CHECKPOINTS).absolute()
        policy = ocp.checkpoint_managers
        options = ocp.CheckpointManagerOptions(
            # best_fn makes Orbax write each checkpoint's metrics to disk, so the best one
            # is still known (and preserved) after a restart.
            best_fn=_rank,
            best_mode="max",
            save_decision_policy=policy.SpecificStepsPolicy(set(save_steps or ())),
            preservation_policy=policy.AnyPreservationPolicy([
                policy.LatestN(keep),
                policy.BestN(get_metric_fn=_rank, n=1, keep_checkpoints_without_metrics=False),
            ]),
            enable_async_checkpointing=not read_only,
            cleanup_tmp_directories=not read_only,
            read_only=read_only,
            create=not read_only,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def best_step(self) -> int | None:
        """The evaluated checkpoint with the best validation accuracy (None if none)."""
        ranked = [(_rank(m), s) for s in self.all_steps()
                  if (m := self.manager.metrics(s))]
        return max(ranked)[1] if ranked else None

    def save(self, state, meta: dict, *, val_accuracy: float | None = None,
             force: bool = False) -> bool:
        """Start an async save at `meta["step"]`; training goes on while it writes."""
        step = int(meta["step"])
        # A private copy: the next compiled call donates (reuses) the live state's buffers.
        # One program for the whole state: a copy per leaf queues dozens of programs, more
        # than a data-parallel run may have in flight on CPU (see train.py).
        state = _copy_tree(state)
        metrics = None if val_accuracy is None else {"val_accuracy": val_accuracy,
                                                       "step": step}
        saved = self.manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          meta=ocp.args.JsonSave({**meta, "format": FORMAT})),
            metrics=metrics, force=force)
        if saved:
            faults.point("save")  # a kill here interrupts the async write before its commit
        return saved

    def restore(self, step: int, abstract_state):
        # Leaves that name no sharding restore onto this process's first device, whatever
        # topology saved them: a data-parallel run's checkpoint opens on one device too.
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract_state = jax.tree.map(
            lambda a: a if a.sharding is not None else
            jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract_state)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return restored.state, restored.meta

    def set_aside(self, step: int) -> Path:
        """Move an unreadable checkpoint out of the manager's folder (kept for a look):
        left there, Orbax would refuse every later save up to its step."""
        target = self.directory.parent / DAMAGED / str(step)
        target.parent.mkdir(exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)  # an earlier one of the same step
        shutil.move(self.directory / str(step), target)
        self.manager.reload()
        return target

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def choose_step(ckpts: RunCheckpoints, which: str | int) -> int:
    """`best`, `latest` or a step number -> an existing step (ConfigError otherwise)."""
    steps = ckpts.all_steps()
    if not steps:
        raise ConfigError(f"no checkpoint in {ckpts.directory}")
    if which == "latest":
        return steps[-1]
    if which == "best":
        best = ckpts.best_step()
        if best is None:
            raise ConfigError(f"no evaluated checkpoint in {ckpts.directory}")
        return best
    try:
        step = int(which)
    except ValueError:
        raise ConfigError(f"--checkpoint {which!r}: expected best, latest or a step") from None
    if step not in steps:
        raise ConfigError(f"no checkpoint at step {step} in {ckpts.directory}; "
                          f"have {', '.join(map(str, steps))}")
    return step


def open_run(run_dir: Path | str):
    """The run's config (rebuilt from config.json) and its config record."""
    run_dir = Path(run_dir)
    path = run_dir / records.CONFIG
    if not path.exists():
        raise ConfigError(f"{run_dir} is not a run folder (no {records.CONFIG})")
    record = records.read_json(path)
    return from_dict(record["config"]), record


def restore_state(run_dir: Path | str, which: str | int = "best"):
    """(config, config record, step, TrainState, meta) of a saved checkpoint, no data needed."""
    from .train import build_model

    config, record = open_run(run_dir)
    from .data import DATASETS

    info = DATASETS[config.data.dataset]
    _, _, _, _, init = build_model(config, info.num_classes, info.image_shape[-1],
                                   record["num_steps"], record["steps_per_epoch"])
    ckpts = RunCheckpoints(Path(run_dir), keep=1, read_only=True)
    try:
        step = choose_step(ckpts, which)
        abstract = jax.eval_shape(init, jax.random.key(0))
        state, meta = ckpts.restore(step, abstract)
    finally:
        ckpts.close()
    if meta.get("config_hash") != record["config_hash"]:
        raise ConfigError(f"checkpoint {step} in {run_dir} was made by another config")
    return config, record, step, state, meta


def load_model(run_dir: Path | str, which: str | int = "best"):
    """(nnx model with the checkpoint's weights, config record) for inference."""
    from flax import nnx

    from .train import build_model

    config, record, step, state, _ = restore_state(run_dir, which)
    from .data import DATASETS

    info = DATASETS[config.data.dataset]
    graphdef, *_ = build_model(config, info.num_classes, info.image_shape[-1],
                               record["num_steps"], record["steps_per_epoch"])
    model = nnx.merge(graphdef, *steps.eval_variables(state, config.train.ema_batch_stats))
    return model, {**record, "checkpoint_step": step}


def to_json_floats(window: list[dict]) -> list[dict]:
    """Pending per-step train metrics, exact float32 values as JSON floats."""
    fetched = jax.device_get(window)
    return [{k: np.atleast_1d(v).astype(np.float32).tolist() for k, v in m.items()}
            for m in fetched]


def from_json_floats(window: list[dict]) -> list[dict]:
    return [{k: np.asarray(v, np.float32) for k, v in m.items()} for m in window]
