"""The training loop of one seed: chunks, cadences, evaluation, run records."""

from __future__ import annotations

import math
import time
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from . import records, steps
from .train import Diverged, Trainer, chunk_sizes, crossed, param_hash


class TrainingLoop:
    def __init__(self, trainer: Trainer, seed: int, run_dir: Path, *, progress: bool,
                 extra_config: dict, loggers: list | None = None):
        self.trainer, self.seed, self.run_dir = trainer, seed, run_dir
        # Mirrors of the run records (e.g. W&B): start(config_record, run_dir),
        # log(rows), finish(summary). The files stay the ground truth.
        self.loggers = loggers or []
        self.progress, self.extra_config = progress, extra_config
        self.metrics_path = run_dir / records.METRICS
        self.t_start = time.perf_counter()
        self.train_seconds = 0.0
        self.eval_seconds = 0.0
        self.best: dict | None = None  # the eval chosen on validation so far
        self.last_eval: dict | None = None

    # -- records -------------------------------------------------------------------------
    def _row(self, step: int, epoch: float, split: str, metrics: dict) -> dict:
        return {"step": step, "epoch": round(epoch, 6), "split": split,
                "time": round(time.perf_counter() - self.t_start, 3), **metrics}

    def _write_rows(self, rows: list[dict]) -> None:
        records.append_metrics(self.metrics_path, rows)
        for logger in self.loggers:
            logger.log(rows)

    def _log_train(self, step: int, window: list) -> dict:
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

    def _evaluate(self, state, step: int, epoch: int) -> dict:
        t0 = time.perf_counter()
        result = {"step": step, "epoch": epoch}
        rows = []
        for split in ("val", "test"):
            m = self.trainer.evaluate(state, split)
            result[split] = m
            rows.append(self._row(step, epoch, split, {"loss": m["loss"],
                                                        "accuracy": m["accuracy"]}))
        self._write_rows(rows)
        self.eval_seconds += time.perf_counter() - t0
        # Selection looks at validation only; test rides along to be reported.
        if self.best is None or result["val"]["accuracy"] > self.best["val"]["accuracy"]:
            self.best = result
        self.last_eval = result
        return result

    # -- the loop --------------------------------------------------------------------------
    def run(self) -> dict:
        tr = self.trainer
        cfg = tr.config
        self.run_dir.mkdir(parents=True, exist_ok=True)
        config_record = tr.config_record(self.seed, self.extra_config)
        records.write_json(self.run_dir / records.CONFIG, config_record)
        for logger in self.loggers:
            logger.start(config_record, self.run_dir)
        self.metrics_path.unlink(missing_ok=True)
        keys = tr.keys(self.seed)
        state = tr.init_state(self.seed)
        compile_before = tr.compile_seconds
        tr.compile(state, keys)
        compile_seconds = tr.compile_seconds - compile_before
        ex = tr.execution
        sizes = chunk_sizes(tr.steps_per_epoch, ex.steps_per_call)
        bar = tqdm(total=tr.num_steps, disable=not self.progress, unit="step", leave=False,
                   desc=f"{cfg.name} seed{self.seed}", dynamic_ncols=True)
        step, status, error = 0, "completed", None
        try:
            for epoch in range(cfg.train.epochs):
                t0 = time.perf_counter()
                perm = steps.epoch_permutation(keys["data"], epoch, tr.data.num_train)
                offset, window = 0, []
                for n in sizes:
                    state, metrics = tr.run_chunk(state, n, perm, offset, keys)
                    window.append(metrics)
                    prev, step, offset = step, step + n, offset + n * cfg.train.batch_size
                    at_epoch_end = offset == tr.steps_per_epoch * cfg.train.batch_size
                    if crossed(prev, step, ex.log_every_steps) or at_epoch_end:
                        row = self._log_train(step, window)
                        window = []
                        bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['accuracy']:.4f}")
                    bar.update(n)
                jax.block_until_ready(state)
                self.train_seconds += time.perf_counter() - t0
                last = epoch + 1 == cfg.train.epochs
                if (epoch + 1) % cfg.train.eval_every_epochs == 0 or last:
                    result = self._evaluate(state, step, epoch + 1)
                    bar.set_postfix(loss=f"{row['loss']:.4f}",
                                    val=f"{result['val']['accuracy']:.4f}")
        except Diverged as e:
            status, error = "diverged", str(e)
        finally:
            bar.close()
        return self._finish(state, step, status, error, compile_seconds)

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
        for logger in self.loggers:
            logger.finish(summary)
        return summary


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    if not values:
        return math.nan, math.nan
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
