"""Experiment configs as typed, frozen dataclasses, and dotted overrides (`a.b=v`).

A config is plain data: the registry composes experiments from a base config with the
same override mechanism the CLI uses, so every key is type-checked in one place.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A bad config key or value; its message is one line meant for the user."""


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "mnist"
    train_split: str = "train[:55000]"
    val_split: str = "train[55000:]"  # model selection uses this, never test
    test_split: str = "test"


@dataclass(frozen=True)
class ModelConfig:
    name: str = "flax_cnn"


@dataclass(frozen=True)
class AugmentConfig:
    name: str = "none"


@dataclass(frozen=True)
class OptimizerConfig:
    name: str = "sgd"  # sgd | adam | adamw
    learning_rate: float = 0.1  # peak learning rate of the schedule
    momentum: float = 0.9  # sgd only; 0 = plain SGD
    nesterov: bool = False
    b1: float = 0.9
    b2: float = 0.999
    weight_decay: float = 0.0  # decoupled (adamw) or added to the gradient (sgd, adam)
    grad_clip_norm: float = 0.0  # 0 = no clipping


@dataclass(frozen=True)
class ScheduleConfig:
    name: str = "constant"  # constant | cosine | onecycle
    warmup_epochs: float = 0.0  # linear warm-up (constant, cosine)
    final_fraction: float = 0.0  # cosine: final lr as a fraction of the peak
    pct_start: float = 0.25  # onecycle: share of training spent rising


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 1
    batch_size: int = 128
    eval_batch_size: int = 1000
    label_smoothing: float = 0.0
    ema_decay: float = 0.0  # > 0: evaluate an exponential moving average of the weights
    ema_warmup: bool = False  # decay min(ema_decay, (1 + t) / (10 + t)) at step t
    ema_batch_stats: bool = False  # average batch-norm statistics too, evaluated with the EMA
    tta_views: int = 0  # > 0: evaluate the mean logits of the image and this many augmented views
    # Steps run by one compiled call; 0 = the backend's default (see train.backend_defaults).
    steps_per_call: int = 0
    # "unroll" | "scan" | "auto": XLA:CPU is slow on backward convs inside a loop body
    # (jax-ml/jax#12868), so CPU unrolls; GPU/TPU scan.
    loop: str = "auto"
    log_every_steps: int = 0  # 0 = the smallest multiple of steps_per_call >= 50
    eval_every_epochs: int = 1
    select: str = "best_val"  # which checkpoint's test accuracy is reported: best_val | final


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 0  # 0 = at the end of every epoch
    keep: int = 2  # latest checkpoints kept, besides the best one


@dataclass(frozen=True)
class Config:
    name: str = "base"
    description: str = ""
    seeds: tuple[int, ...] = (0, 1, 2)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


# How seeds share the hardware (an execution choice, not part of a config): see runner.
PARALLEL_MODES = ("auto", "off", "devices", "vmap")

# Keys that name a run rather than change what it computes.
_NON_NUMERIC_KEYS = ("name", "description", "seeds")


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def from_dict(d: dict) -> Config:
    """Rebuild a Config from `to_dict` output (e.g. a run's config.json)."""
    flat = {k: v for k, v in flatten(d).items() if k in flat_keys()}
    return apply_overrides(Config(), {k: _to_text(v) for k, v in flat.items()})


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def flat_keys() -> list[str]:
    return list(_field_types(Config).keys())


# Keys added after run records were committed, with the value that keeps the behaviour from
# before them: left out of the hash at that value, so older configs keep their hash (and
# their run folders resume and reproduce).
_LATER_KEYS = {"train.ema_warmup": False, "train.ema_batch_stats": False}


def config_hash(config: Config) -> str:
    """Hash of everything that changes the numbers (not the name, description or seeds)."""
    d = flatten(to_dict(config))
    for k in _NON_NUMERIC_KEYS:
        d.pop(k)
    for k, old in _LATER_KEYS.items():
        if d[k] == old:
            d.pop(k)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def _field_types(cls, prefix: str = "") -> dict[str, object]:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            out.update(_field_types(t, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = t
    return out


def _to_text(v) -> str:
    if isinstance(v, (list, tuple)):
        return ",".join(str(x) for x in v)
    return str(v)


def parse_value(key: str, text: str, typ) -> object:
    """Parse `text` as `typ` (int, float, bool, str or tuple[int, ...])."""
    try:
        if typ is bool:
            low = text.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            return int(text)
        if typ is float:
            value = float(text)
            # nan passes no range check (every comparison is False) and inf passes "> 0".
            if not math.isfinite(value):
                raise ValueError
            return value
        if typing.get_origin(typ) is tuple:
            return parse_seeds(text)
        if typ is str:
            return text
    except ValueError:
        pass
    name = getattr(typ, "__name__", str(typ))
    if typ is float:
        name = "a finite float"
    if isinstance(typ, types.GenericAlias):
        name = "list of integers like 0,1,2 or 0-4"
    raise ConfigError(f"{key}={text!r}: expected {name}")


def parse_seeds(text: str) -> tuple[int, ...]:
    """'0-2' -> (0, 1, 2); '0,3,5' -> (0, 3, 5); '4' -> (4,)."""
    seeds: list[int] = []
    for part in str(text).replace(" ", "").split(","):
        if not part:
            continue
        if "-" in part[1:]:
            lo, hi = part.split("-", 1) if not part.startswith("-") else (part, "")
            lo_i, hi_i = int(lo), int(hi)
            if hi_i < lo_i:
                raise ValueError(part)
            seeds.extend(range(lo_i, hi_i + 1))
        else:
            seeds.append(int(part))
    if not seeds or any(s < 0 for s in seeds) or len(seeds) > MAX_SEEDS:
        raise ValueError(text)
    return tuple(dict.fromkeys(seeds))


MAX_SEEDS = 1000  # more is a typo (e.g. 0-100000000), not a study


def closest(name: str, options) -> str:
    near = difflib.get_close_matches(name, list(options), n=3, cutoff=0.5)
    return f" (did you mean {', '.join(near)}?)" if near else ""


def parse_override(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. train.epochs=2)")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


def apply_overrides(config: Config, overrides: dict[str, str] | list[str]) -> Config:
    """Apply `{"train.epochs": "2"}` (or ["train.epochs=2"]) to a config, type-checked."""
    if isinstance(overrides, list):
        overrides = dict(parse_override(o) for o in overrides)
    types_by_key = _field_types(Config)
    for key, text in overrides.items():
        if key not in types_by_key:
            raise ConfigError(f"unknown config key {key!r}{closest(key, types_by_key)}")
        value = parse_value(key, text, types_by_key[key])
        config = _replace_path(config, key.split("."), value)
    return config


def _replace_path(obj, path: list[str], value):
    if len(path) == 1:
        return dataclasses.replace(obj, **{path[0]: value})
    child = getattr(obj, path[0])
    return dataclasses.replace(obj, **{path[0]: _replace_path(child, path[1:], value)})


def check_values(config: Config) -> None:
    """Reject values that cannot train, with one line naming the key."""
    t, o, s = config.train, config.optimizer, config.schedule
    checks = [
        (t.epochs >= 1, "train.epochs must be >= 1"),
        (t.batch_size >= 1, "train.batch_size must be >= 1"),
        (t.eval_batch_size >= 1, "train.eval_batch_size must be >= 1"),
        (t.steps_per_call >= 0, "train.steps_per_call must be >= 0 (0 = backend default)"),
        (t.log_every_steps >= 0, "train.log_every_steps must be >= 0"),
        (t.eval_every_epochs >= 1, "train.eval_every_epochs must be >= 1"),
        (0.0 <= t.label_smoothing < 1.0, "train.label_smoothing must be in [0, 1)"),
        (0.0 <= t.ema_decay < 1.0, "train.ema_decay must be in [0, 1) (0 = off)"),
        (t.ema_decay > 0 or not (t.ema_warmup or t.ema_batch_stats),
         "train.ema_warmup and train.ema_batch_stats need a moving average (train.ema_decay > 0)"),
        (t.tta_views >= 0, "train.tta_views must be >= 0"),
        (t.tta_views == 0 or config.augment.name != "none",
         "train.tta_views needs an augmentation (augment.name) to draw views from"),
        (t.loop in ("auto", "unroll", "scan"), "train.loop must be auto, unroll or scan"),
        (t.select in ("best_val", "final"), "train.select must be best_val or final"),
        (o.learning_rate > 0, "optimizer.learning_rate must be > 0"),
        (o.name in ("sgd", "adam", "adamw"), "optimizer.name must be sgd, adam or adamw"),
        (0.0 <= o.momentum < 1.0, "optimizer.momentum must be in [0, 1)"),
        (0.0 <= o.b1 < 1.0 and 0.0 <= o.b2 < 1.0, "optimizer.b1/b2 must be in [0, 1)"),
        (o.weight_decay >= 0, "optimizer.weight_decay must be >= 0"),
        (o.grad_clip_norm >= 0, "optimizer.grad_clip_norm must be >= 0"),
        (s.name in ("constant", "cosine", "onecycle"),
         "schedule.name must be constant, cosine or onecycle"),
        (s.warmup_epochs >= 0, "schedule.warmup_epochs must be >= 0"),
        (0.0 < s.pct_start < 1.0, "schedule.pct_start must be in (0, 1)"),
        (0.0 <= s.final_fraction <= 1.0, "schedule.final_fraction must be in [0, 1]"),
        (config.checkpoint.every_steps >= 0, "checkpoint.every_steps must be >= 0"),
        (config.checkpoint.keep >= 1, "checkpoint.keep must be >= 1"),
        (len(config.seeds) >= 1, "seeds must list at least one seed"),
        (all(s >= 0 for s in config.seeds), "seeds must be >= 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
