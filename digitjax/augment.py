"""On-device, batched data augmentation, registered by name.

An augmentation is `fn(images, key) -> images` on float images [B, H, W, C] in [0, 1],
pure and deterministic per key, so it runs inside the compiled train step and a resumed
run draws the same augmentations. No horizontal flips: they change digits.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

from .config import ConfigError, closest

Augmentation = Callable[[jax.Array, jax.Array], jax.Array]
AUGMENTATIONS: dict[str, Augmentation] = {}
DESCRIPTIONS: dict[str, str] = {}


def register(name: str, description: str, fn: Augmentation) -> None:
    if name in AUGMENTATIONS:
        raise ValueError(f"augmentation {name!r} is registered twice")
    AUGMENTATIONS[name] = fn
    DESCRIPTIONS[name] = description


def get(name: str) -> Augmentation:
    if name not in AUGMENTATIONS:
        raise ConfigError(f"unknown augmentation {name!r}{closest(name, AUGMENTATIONS)}; "
                          f"known: {', '.join(sorted(AUGMENTATIONS))}")
    return AUGMENTATIONS[name]


def _identity(images: jax.Array, key: jax.Array) -> jax.Array:
    del key
    return images


register("none", "no augmentation", _identity)
