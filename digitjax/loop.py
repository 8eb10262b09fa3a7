"""The training loop of one seed: chunks, cadences, evaluation, run records."""

from __future__ import annotations

import dataclasses
import math
import shutil
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from . import checkpoint, distributed, faults, records
from .config import ConfigError
from .stop import Interrupted, StopOnSignal  # noqa: F401 (re-exported)
from .train import Diverged, Trainer, chunk_sizes, crossed, param_hash

_PLOT_LOCK = threading.Lock()


def _reason(e: Exception) -> str:
    """An exception in a few words: its type and the start of its first line."""
    first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


class TrainingLoop:
    def __init__(self, trainer: Trainer, seed: int, run_dir: Path, *, progress: bool,
                 extra_config: dict, loggers: list | None = None, stop=None,
                 position: int = 0, plots: bool = False):
        self.trainer, self.seed, self.run_dir = trainer, seed, run_dir
        # Mirrors of the run records (e.g. W&B): start(config_record, run_dir),
        # log(rows), finish(summary). The files stay the ground truth.
        self.loggers = loggers or []
        self.stop = stop  # a shared stop request (seeds in threads); None: handle signals here
        self.position = position  # progress bar row
        self.plots = plots  # write the run's PNGs when it completes
        self.progress, self.extra_config = progress, extra_config
        self.metrics_path = run_dir / records.METRICS
        self.t_start = time.perf_counter()
        self.train_seconds = 0.0
        self.eval_seconds = 0.0
        self.last_saved_step: int | None = None
        self.best: dict | None = None  # the eval chosen on validation so far
        self.last_eval: dict | None = None
        self.resumed_execution: dict | None = None  # the resumed checkpoint's settings
        self.earlier_execution: dict | None = None  # the same, when they differ from ours

    # -- records -------------------------------------------------------------------------
    def _row(self, step: int, epoch: float, split: str, metrics: dict) -> dict:
        return {"step": step, "epoch": round(epoch, 6), "split": split,
                "time": round(time.perf_counter() - self.t_start, 3), **metrics}

    def _write_rows(self, rows: list[dict]) -> None:
        records.append_metrics(self.metrics_path, rows)
        for logger in self.loggers:
            logger.log(rows)

    def log_train(self, step: int, window: list) -> dict:
        """Mean train metrics over the steps since the last log line (one host fetch)."""
        fetched = jax.device_get(window)
        loss = np.concatenate([np.atleast_1d(m["loss"]) for m in fetched])
        acc = np.concatenate([np.atleast_1d(m["accuracy"]) for m in fetched])
        if not np.all(np.isfinite(loss)):
            bad = step - len(loss) + int(np.argmax(~np.isfinite(loss))) + 1
            raise Diverged(f"loss became {loss[~np.isfinite(loss)][0]} at step {bad}")
        row = self._row(step, step / self.trainer.steps_per_epoch, "train",
                        {"loss": float(loss.mean()), "accuracy": float(acc.mean()),
                         "learning_rate": float(self.trainer.schedule(step - 1))})
        self._write_rows([row])
        return row

    def evaluate(self, state, step: int, epoch: int) -> dict:
        t0, compile_before = time.perf_counter(), self.trainer.compile_seconds
        result = {"step": step, "epoch": epoch}
        rows = []
        try:
            for split in ("val", "test"):
                m = self.trainer.evaluate(state, split)
                if not math.isfinite(m["loss"]):  # training may look fine while this is inf
                    raise Diverged(f"{split} loss became {m['loss']} at step {step}")
                result[split] = m
                rows.append(self._row(step, epoch, split, {"loss": m["loss"],
                                                            "accuracy": m["accuracy"]}))
            self._write_rows(rows)
        finally:
            # The first evaluation compiles its program: that time is compile time.
            compiled = self.trainer.compile_seconds - compile_before
            self.compile_seconds += compiled
            self.eval_seconds += time.perf_counter() - t0 - compiled
        # Selection looks at validation only; test rides along to be reported.
        if self.best is None or result["val"]["accuracy"] > self.best["val"]["accuracy"]:
            self.best = result
        self.last_eval = result
        return result

    # -- checkpoints -----------------------------------------------------------------------
    def _save_steps(self) -> set[int]:
        """Every step the run checkpoints at: the cadence's chunk ends and epoch ends."""
        tr = self.trainer
        out, step = set(), 0
        sizes = chunk_sizes(tr.steps_per_epoch, tr.execution.steps_per_call)
        for _ in range(tr.config.train.epochs):
            for n in sizes:
                if crossed(step, step + n, tr.execution.checkpoint_every_steps):
                    out.add(step + n)
                step += n
            out.add(step)
        return out

    def save(self, state, step: int, window: list, *, val_accuracy=None,
             force: bool = False) -> None:
        if step != self.last_saved_step:
            self.ckpts.save(state, self._meta(step, window), val_accuracy=val_accuracy, force=force)
            self.last_saved_step = step

    def _meta(self, step: int, window: list) -> dict:
        tr = self.trainer
        return {
            "step": step,
            "epoch": step // tr.steps_per_epoch,
            "offset": (step % tr.steps_per_epoch) * tr.config.train.batch_size,
            "seed": self.seed,
            "config_hash": tr.config_hash,
            "key_data": {k: np.asarray(jax.random.key_data(v)).tolist()
                         for k, v in tr.keys(self.seed).items()},
            "best": self.best,
            "last_eval": self.last_eval,
            "window": checkpoint.to_json_floats(window),
            "train_seconds": self.train_seconds,
            "eval_seconds": self.eval_seconds,
            "wall_seconds": time.perf_counter() - self.t_start,
            "execution": dataclasses.asdict(tr.execution),
        }

    def _readable(self, ckpts: checkpoint.RunCheckpoints):
        """(step, state, meta) of the newest readable checkpoint, or None.

        A checkpoint whose files are damaged (not just cut off: those Orbax never lists) is
        set aside with a warning (by process 0), and the one before it is tried.
        """
        for step in reversed(ckpts.all_steps()):
            try:
                state, meta = ckpts.restore(step, self.trainer.abstract_state())
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint
                where = "set aside by process 0"
                if distributed.is_primary():
                    try:
                        where = f"moved to {ckpts.set_aside(step)}"
                    except OSError as moved:
                        where = f"could not be moved aside: {moved}"
                print(f"digitjax: warning: checkpoint {step} in {ckpts.directory} is "
                      f"unreadable ({_reason(e)}; {where}); trying an earlier one",
                      file=sys.stderr)
                continue
            return step, state, meta
        return None

    def _resume(self, ckpts: checkpoint.RunCheckpoints):
        """(state, step, window) from the newest readable checkpoint, or None to start fresh."""
        tr = self.trainer
        found = self._readable(ckpts)
        if distributed.process_count() > 1:  # every process must resume from one step
            # Process 0 may have set checkpoints aside: every manager must see that, or
            # the others would skip saves process 0 waits for.
            distributed.barrier(f"digitjax resume {self.run_dir.name}")
            ckpts.manager.reload()
            mine = found[0] if found else -1
            if distributed.agree(mine) != -distributed.agree(-mine):
                raise ConfigError(f"{ckpts.directory}: the processes found different "
                                  "checkpoints to resume from (unreadable on some?)")
        if found is None:
            return None
        step, state, meta = found
        state = tr.place(state)
        self.last_saved_step = step
        if meta["config_hash"] != tr.config_hash:
            raise ConfigError(f"checkpoint {step} in {ckpts.directory} was made by another "
                              f"config ({meta['config_hash']}, this is {tr.config_hash}); "
                              "use --fresh or another --workdir")
        self.best, self.last_eval = meta["best"], meta["last_eval"]
        self.resumed_execution = meta.get("execution")  # older checkpoints did not record it
        self.train_seconds, self.eval_seconds = meta["train_seconds"], meta["eval_seconds"]
        # Row times and total_seconds go on from the earlier attempts' wall (up to this
        # checkpoint), as train_seconds does; older checkpoints did not record it.
        self.t_start -= meta.get("wall_seconds", 0.0)
        records.truncate_metrics(self.metrics_path, step)
        return state, step, checkpoint.from_json_floats(meta["window"])

    def check_execution(self) -> bool:
        """Warn when the resumed checkpoint was trained under other execution settings.

        Another backend, precision or chunking trains the same steps but may round
        differently: the record then keeps both, so the numbers can be read right. Called
        once the trainer that goes on is final (a seed group may regroup after `open`).
        Returns whether it differs.
        """
        before, now = self.resumed_execution, dataclasses.asdict(self.trainer.execution)
        if before is None or before == now:
            self.earlier_execution = None
            return False
        self.earlier_execution = before
        changed = ", ".join(f"{k} {before.get(k)} -> {v}" for k, v in now.items()
                            if before.get(k) != v)
        print(f"digitjax: warning: {self.run_dir}: resuming step {self.last_saved_step}, "
              f"trained before with other settings ({changed}); the results may differ from "
              "an uninterrupted run's in the last digits", file=sys.stderr)
        return True

    # -- the loop --------------------------------------------------------------------------
    def open(self, *, resume: bool = True, publish: bool = True):
        """Prepare the run folder; returns the (state, step, window) training goes on from."""
        tr = self.trainer
        cfg = tr.config
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.save_steps = self._save_steps()
        ckpt_dir = self.run_dir / checkpoint.CHECKPOINTS
        if not resume:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
        self.ckpts = checkpoint.RunCheckpoints(self.run_dir, keep=cfg.checkpoint.keep,
                                               save_steps=self.save_steps)
        resumed = self._resume(self.ckpts) if resume else None
        if resumed is None:
            if distributed.is_primary():  # process 0 owns the records
                self.metrics_path.unlink(missing_ok=True)
                (self.run_dir / records.SUMMARY).unlink(missing_ok=True)
            state, step, window = tr.init_state(self.seed), 0, []
        else:
            state, step, window = resumed
        extra = {**self.extra_config, "resumed_from_step": step if resumed else None}
        config_record = tr.config_record(self.seed, extra)
        if publish:
            self.publish(config_record)
        else:  # the caller settles the trainer, then publishes (a seed group)
            records.write_json(self.run_dir / records.CONFIG, config_record)
        return state, step, window

    def publish(self, config_record: dict) -> None:
        """Write config.json, with the settings a resumed checkpoint was trained under when
        they differ from the trainer's, and start the mirrors with it."""
        config_record = {**config_record, "execution": dataclasses.asdict(self.trainer.execution)}
        config_record.pop("execution_before_resume", None)
        if self.check_execution():
            config_record["execution_before_resume"] = self.earlier_execution
        records.write_json(self.run_dir / records.CONFIG, config_record)
        for logger in self.loggers:
            logger.start(config_record, self.run_dir)

    def run(self, *, resume: bool = True) -> dict:
        tr = self.trainer
        state, step, window = self.open(resume=resume)
        keys = tr.keys(self.seed)
        compile_before = tr.compile_seconds
        tr.compile(state, keys)
        self.compile_seconds = tr.compile_seconds - compile_before
        with (self.stop or StopOnSignal()) as stop, self.progress_bar(step) as bar:
            try:
                state, step = train_lockstep(tr, [self], state, step, window, keys, bar, stop)
            finally:
                self.ckpts.wait()
                self.ckpts.close()
        if self.status == "diverged":
            return self.summary
        return self._finish(state, step, "completed", None, self.compile_seconds)

    def progress_bar(self, step: int, desc: str | None = None):
        tr = self.trainer
        return tqdm(total=tr.num_steps, initial=step, disable=not self.progress, unit="step",
                    leave=False, desc=desc or f"{tr.config.name} seed{self.seed}",
                    dynamic_ncols=True, position=self.position)

    status = "running"
    summary: dict | None = None
    compile_seconds = 0.0

    def diverged(self, state, step: int, error: Diverged) -> None:
        """Stop this seed: the summary says so; checkpoints before the step are kept."""
        self.status = "diverged"
        self.summary = self._finish(state, step, "diverged", str(error), self.compile_seconds)

    def _finish(self, state, step: int, status: str, error: str | None,
                compile_seconds: float) -> dict:
        tr = self.trainer
        cfg = tr.config
        images = step * cfg.train.batch_size
        summary = {
            "status": status,
            "experiment": cfg.name,
            "seed": self.seed,
            "config_hash": tr.config_hash,
            "steps": step,
            "epochs": step / tr.steps_per_epoch,
            "num_params": tr.num_params,
            "train_images": images,
            "train_seconds": round(self.train_seconds, 3),
            "compile_seconds": round(compile_seconds, 3),
            "eval_seconds": round(self.eval_seconds, 3),
            "total_seconds": round(time.perf_counter() - self.t_start, 3),
            "images_per_second": round(images / self.train_seconds, 1)
            if self.train_seconds else None,
            "final_param_hash": param_hash(state.params),
        }
        if error:
            summary["error"] = error
        chosen = self.best if cfg.train.select == "best_val" else self.last_eval
        if chosen is not None:
            summary.update({
                "selected_by": cfg.train.select,
                "selected_step": chosen["step"],
                "selected_epoch": chosen["epoch"],
                "val_accuracy": chosen["val"]["accuracy"],
                "val_loss": chosen["val"]["loss"],
                "test_accuracy": chosen["test"]["accuracy"],
                "test_loss": chosen["test"]["loss"],
                "per_class_test_accuracy": chosen["test"]["per_class_accuracy"],
                "best_val_accuracy": self.best["val"]["accuracy"],
                "final_val_accuracy": self.last_eval["val"]["accuracy"],
                "final_test_accuracy": self.last_eval["test"]["accuracy"],
            })
        records.write_json(self.run_dir / records.SUMMARY, summary)
        if self.plots and status == "completed":
            paths = self._plots()
            for logger in self.loggers:
                logger.log_images(list(paths.values()))
        for logger in self.loggers:
            logger.finish(summary)
        return summary

    def _plots(self) -> dict:
        """The run's PNGs (learning curves, confusion matrix, mistakes); never fatal."""
        from . import plots

        images, labels, mask = jax.device_get(self.trainer.data.eval_split("test"))
        try:
            with _PLOT_LOCK:  # pyplot is not thread-safe (seeds may train in threads)
                return plots.make_run_plots(self.run_dir, test_data=(images[mask],
                                                                     labels[mask]))
        except Exception as e:  # a plot must never cost a finished run
            print(f"digitjax: warning: plots of {self.run_dir} failed: {e}", file=sys.stderr)
            return {}


def train_lockstep(tr: Trainer, members: list[TrainingLoop], state, step: int, window: list,
                   keys: dict, bar, stop, take=None):
    """The epochs and chunks of one seed, or of a seed group trained by one vmapped program.

    `state`, `keys` and each chunk's metrics hold every member's part; `take(tree, i, axis)`
    gives member i's part (None: a single member, whose part is the whole). Each member
    keeps its own records, cadences and checkpoints; the host fetches every member's
    metrics at once, at the log cadence only. Returns the final state and step.
    """
    cfg, ex = tr.config, tr.execution
    take = take or (lambda tree, i, axis=0: tree)
    batch = cfg.train.batch_size
    sizes = chunk_sizes(tr.steps_per_epoch, ex.steps_per_call)
    first_epoch, start_offset = divmod(step, tr.steps_per_epoch)
    start_offset *= batch
    live = list(range(len(members)))
    # The processes of a multi-process run must stop together (a checkpoint save waits for
    # all of them): they act on a stop request where they all are, at log steps and epoch
    # ends, once they agree on it. A single process reads it after every chunk.
    multi = distributed.process_count() > 1

    def windows() -> dict[int, list]:  # one host fetch for every member's pending metrics
        fetched = jax.device_get(window)
        return {i: [take(m, i, 1) for m in fetched] for i in live}

    def save_all(*, force: bool = False) -> None:
        for i, w in windows().items():
            members[i].save(take(state, i), step, w, force=force)

    def count_train_time(t0: float) -> float:
        now = time.perf_counter()
        for i in live:
            members[i].train_seconds += now - t0
        return now

    for epoch in range(first_epoch, cfg.train.epochs):
        t0 = time.perf_counter()
        perm = tr.permutation(keys, epoch)
        offset = 0
        for n in sizes:
            if epoch == first_epoch and offset < start_offset:
                if offset + n * batch <= start_offset:
                    offset += n * batch  # done before the checkpoint we resumed from
                    continue
                # The checkpoint fell inside this chunk (it was saved with another
                # steps_per_call, e.g. on another backend): train the chunk's rest only.
                n -= (start_offset - offset) // batch
                offset = start_offset
            state, metrics = tr.run_chunk(state, n, perm, offset, keys)
            faults.point("chunk")
            window.append(metrics)
            prev, step, offset = step, step + n, offset + n * batch
            at_epoch_end = offset == tr.steps_per_epoch * batch
            logged = crossed(prev, step, ex.log_every_steps) or at_epoch_end
            if logged:
                for i, w in windows().items():
                    try:
                        row = members[i].log_train(step, w)
                    except Diverged as e:
                        members[i].diverged(take(state, i), step, e)
                        live.remove(i)
                window = []
                if not live:
                    return state, step
                bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['accuracy']:.4f}")
            bar.update(n)
            if at_epoch_end:
                break  # evaluated and saved below, and stopped there if asked to
            # Read once: a signal may arrive at any moment.
            requested = (distributed.agree(stop.requested) if logged else 0) if multi \
                else stop.requested
            if step in members[0].save_steps or requested:
                t0 = count_train_time(t0)  # a checkpoint carries the time trained so far
                save_all(force=bool(requested))
            if requested:
                for i in live:
                    members[i].ckpts.wait()
                raise Interrupted(step, requested)
        jax.block_until_ready(state)
        count_train_time(t0)
        last = epoch + 1 == cfg.train.epochs
        for i in live:
            member, val = members[i], None
            if (epoch + 1) % cfg.train.eval_every_epochs == 0 or last:
                try:
                    result = member.evaluate(take(state, i), step, epoch + 1)
                except Diverged as e:
                    member.diverged(take(state, i), step, e)
                    continue
                val = result["val"]["accuracy"]
                bar.set_postfix(loss=f"{row['loss']:.4f}", val=f"{val:.4f}")
                faults.point("eval")
            member.save(take(state, i), step, [], val_accuracy=val)
        live = [i for i in live if members[i].status != "diverged"]
        if not live:
            return state, step
        requested = distributed.agree(stop.requested) if multi else stop.requested
        if requested:
            for i in live:
                members[i].ckpts.wait()
            raise Interrupted(step, requested)
    return state, step


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    if not values:
        return math.nan, math.nan
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
