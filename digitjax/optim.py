"""Learning-rate schedules and optax optimizers built from config."""

from __future__ import annotations

import optax

from .config import OptimizerConfig, ScheduleConfig


def make_schedule(cfg: ScheduleConfig, peak: float, total_steps: int,
                  steps_per_epoch: int) -> optax.Schedule:
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    if cfg.name == "constant":
        if warmup == 0:
            return optax.constant_schedule(peak)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [warmup])
    if cfg.name == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0 if warmup else peak, peak, warmup, max(total_steps, warmup + 1),
            end_value=peak * cfg.final_fraction)
    if cfg.name == "onecycle":
        return optax.cosine_onecycle_schedule(total_steps, peak, pct_start=cfg.pct_start)
    raise ValueError(f"unknown schedule {cfg.name!r}")


def make_optimizer(cfg: OptimizerConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    parts = []
    if cfg.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
    if cfg.name == "sgd":
        if cfg.weight_decay > 0:
            parts.append(optax.add_decayed_weights(cfg.weight_decay))
        parts.append(optax.sgd(schedule, momentum=cfg.momentum or None, nesterov=cfg.nesterov))
    elif cfg.name == "adam":
        if cfg.weight_decay > 0:
            parts.append(optax.add_decayed_weights(cfg.weight_decay))
        parts.append(optax.adam(schedule, b1=cfg.b1, b2=cfg.b2))
    elif cfg.name == "adamw":
        parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay))
    else:
        raise ValueError(f"unknown optimizer {cfg.name!r}")
    return optax.chain(*parts) if len(parts) > 1 else parts[0]
