"""The experiment registry: named, complete configs composed in `experiments/`.

`experiments/` (importable as `digitjax.experiments`) lists experiments as a base config
plus dotted overrides, the same overrides the CLI's `--set` applies, so every registered
config is type-checked exactly like a user's.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib

from .config import Config, ConfigError, apply_overrides, check_values, closest


@dataclasses.dataclass(frozen=True)
class Experiment:
    name: str
    description: str
    config: Config


def experiment(name: str, description: str, base: Config, overrides: dict | None = None,
               ) -> Experiment:
    """Compose an experiment from `base` and `{"dotted.key": value}` overrides."""
    text = {k: ",".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)
            for k, v in (overrides or {}).items()}
    config = apply_overrides(base, text)
    config = dataclasses.replace(config, name=name, description=description)
    return Experiment(name, description, config)


@functools.cache
def registry() -> dict[str, Experiment]:
    module = importlib.import_module("digitjax.experiments")
    found: dict[str, Experiment] = {}
    for exp in module.EXPERIMENTS:
        if exp.name in found:
            raise ValueError(f"experiment {exp.name!r} is registered twice")
        found[exp.name] = exp
    return found


def default_name() -> str:
    return importlib.import_module("digitjax.experiments").DEFAULT


def get(name: str) -> Experiment:
    experiments = registry()
    if name not in experiments:
        raise ConfigError(f"unknown experiment {name!r}{closest(name, experiments)}; "
                          f"known: {', '.join(experiments)} (see `digitjax list`)")
    return experiments[name]


def resolve(name: str, overrides: list[str] | None = None,
            seeds: tuple[int, ...] | None = None) -> Config:
    """The experiment's config with `--set` overrides and seeds applied and checked."""
    config = apply_overrides(get(name).config, overrides or [])
    if seeds is not None:
        config = dataclasses.replace(config, seeds=tuple(seeds))
    check_values(config)
    check_names(config)
    return config


def check_names(config: Config) -> None:
    """Unknown model, augmentation or data set names fail before any data is read."""
    from . import augment, data, models

    for kind, name, known in (("model", config.model.name, models.MODELS),
                              ("augmentation", config.augment.name, augment.AUGMENTATIONS),
                              ("data set", config.data.dataset, data.DATASETS)):
        if name not in known:
            raise ConfigError(f"unknown {kind} {name!r}{closest(name, known)}; "
                              f"known: {', '.join(sorted(known))}")


@dataclasses.dataclass(frozen=True)
class Study:
    name: str
    description: str
    experiments: tuple[str, ...]


@functools.cache
def studies() -> dict[str, Study]:
    module = importlib.import_module("digitjax.experiments")
    found: dict[str, Study] = {}
    for s in getattr(module, "STUDIES", []):
        if s.name in found:
            raise ValueError(f"study {s.name!r} is registered twice")
        missing = [e for e in s.experiments if e not in registry()]
        if missing:
            raise ValueError(f"study {s.name!r} names unknown experiments {missing}")
        found[s.name] = s
    return found


def get_study(name: str) -> Study:
    known = studies()
    if name not in known:
        raise ConfigError(f"unknown study {name!r}{closest(name, known)}; "
                          f"known: {', '.join(known) or 'none'}")
    return known[name]
