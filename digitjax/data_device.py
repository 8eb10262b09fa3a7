"""A config's splits, loaded once and kept on the device as uint8."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from . import data as datasets
from .config import Config, ConfigError, closest


@dataclasses.dataclass
class DeviceData:
    train_images: jax.Array  # uint8 [N, H, W, C]
    train_labels: jax.Array  # int32 [N]
    evals: dict[str, tuple[jax.Array, jax.Array, jax.Array]]  # padded images, labels, mask
    num_classes: int
    image_shape: tuple[int, ...]

    @property
    def num_train(self) -> int:
        return int(self.train_images.shape[0])

    def eval_split(self, split: str):
        return self.evals[split]

    def to(self, device) -> DeviceData:
        return dataclasses.replace(self, train_images=jax.device_put(self.train_images, device),
                                   train_labels=jax.device_put(self.train_labels, device),
                                   evals=jax.device_put(self.evals, device))

    def replicate(self, sharding) -> DeviceData:
        """A whole copy on every device of a replicated `sharding` (data parallel).

        Each device then gathers its share of a batch locally. Built from this process's
        host copy, so it also works when the sharding spans processes (each loaded the same
        data set).
        """
        def put(x):
            host = np.asarray(x)
            return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

        return dataclasses.replace(self, train_images=put(self.train_images),
                                   train_labels=put(self.train_labels),
                                   evals=jax.tree.map(put, self.evals))


def pad_for_eval(images: np.ndarray, labels: np.ndarray, batch: int):
    """Pad to a multiple of the eval batch so one compiled program covers the split."""
    n = images.shape[0]
    padded = -(-n // batch) * batch
    pad = padded - n
    mask = np.concatenate([np.ones(n, bool), np.zeros(pad, bool)])
    images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
    labels = np.concatenate([labels, np.zeros(pad, labels.dtype)]).astype(np.int32)
    return jnp.asarray(images), jnp.asarray(labels), jnp.asarray(mask)


def load(config: Config, *, data_dir: str | None = None, idx_dir: str | None = None,
         download: bool = False, progress: bool = True) -> DeviceData:
    d = config.data
    if d.dataset not in datasets.DATASETS:
        raise ConfigError(f"unknown data set {d.dataset!r}{closest(d.dataset, datasets.DATASETS)};"
                          f" known: {', '.join(sorted(datasets.DATASETS))}")
    info = datasets.DATASETS[d.dataset]

    def split(name):
        return datasets.load_split(d.dataset, name, data_dir=data_dir, idx_dir=idx_dir,
                                   download=download, progress=progress)

    check_splits(d.dataset, {"train": d.train_split, "val": d.val_split,
                             "test": d.test_split},
                 lambda spec: datasets.split_ranges(d.dataset, spec, data_dir=data_dir,
                                                    idx_dir=idx_dir, download=download,
                                                    progress=progress))
    return from_arrays(split(d.train_split), split(d.val_split), split(d.test_split),
                       num_classes=info.num_classes, eval_batch_size=config.train.eval_batch_size)


def check_splits(dataset: str, specs: dict[str, str], ranges) -> None:
    """Every split selects examples, and validation and test are held out from training
    and from each other: model selection must never see the examples it is judged on."""
    resolved = {role: ranges(spec) for role, spec in specs.items()}
    for role, parts in resolved.items():
        if sum(stop - start for _, start, stop in parts) == 0:
            raise ConfigError(f"data.{role}_split={specs[role]!r} selects no {dataset} examples")
    roles = list(resolved)
    for i, a in enumerate(roles):
        for b in roles[i + 1:]:
            shared = sum(max(0, min(s1, s2) - max(a1, a2))
                         for n1, a1, s1 in resolved[a] for n2, a2, s2 in resolved[b] if n1 == n2)
            if shared:
                raise ConfigError(
                    f"data.{b}_split={specs[b]!r} shares {shared} {dataset} examples with "
                    f"data.{a}_split={specs[a]!r}; train, val and test must not overlap")


def from_arrays(train, val, test, *, num_classes: int, eval_batch_size: int) -> DeviceData:
    """Put (images uint8 [N, H, W, C], labels) pairs on the device."""
    train_images, train_labels = train
    evals = {"val": pad_for_eval(*val, eval_batch_size),
             "test": pad_for_eval(*test, eval_batch_size)}
    return DeviceData(train_images=jnp.asarray(train_images),
                      train_labels=jnp.asarray(np.asarray(train_labels, np.int32)),
                      evals=evals, num_classes=num_classes,
                      image_shape=tuple(train_images.shape[1:]))
