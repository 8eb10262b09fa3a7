"""The ensemble of an experiment's seeds: average their logits on the test split.

Each seed contributes the checkpoint it reports (chosen on validation), so the ensemble
involves no choice made on test. The result is written next to the seeds' folders as
`<workdir>/<experiment>/ensemble.json`, where tables pick it up.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from . import checkpoint, records, registry
from .config import ConfigError

ENSEMBLE = "ensemble.json"


def ensemble(experiment: str, workdir: Path | str, *, split: str = "test", data_dir=None,
             idx_dir=None, download=False) -> dict:
    from . import data_device, steps

    config = registry.get(experiment).config
    run_dirs = [records.run_dir(workdir, experiment, s, {}) for s in config.seeds]
    done = [d for d in run_dirs if (d / records.SUMMARY).exists()
            and records.read_json(d / records.SUMMARY).get("status") == "completed"]
    if len(done) < 2:
        raise ConfigError(f"{experiment}: an ensemble needs at least 2 finished seeds in "
                          f"{workdir}, found {len(done)}")
    data = data_device.load(config, data_dir=data_dir, idx_dir=idx_dir, download=download)
    images, labels, mask = data.eval_split(split)
    total, members = None, []
    for run_dir in done:
        which = "latest" if config.train.select == "final" else "best"
        model, record = checkpoint.load_model(run_dir, which)
        logits = _logits(model, images, config.train.eval_batch_size, steps.to_float)
        total = logits if total is None else total + logits
        members.append({"run_dir": str(run_dir), "step": record["checkpoint_step"],
                        "accuracy": _accuracy(logits, labels, mask)})
    result = {"experiment": experiment, "split": split, "seeds": len(done),
              "accuracy": _accuracy(total / len(done), labels, mask), "members": members}
    records.write_json(Path(workdir) / experiment / ENSEMBLE, result)
    return result


def _logits(model, images, batch: int, to_float) -> jax.Array:
    from flax import nnx

    graphdef, state = nnx.split(model)

    @jax.jit
    def fwd(state, x):
        return nnx.merge(graphdef, state)(to_float(x), train=False)

    return jnp.concatenate([fwd(state, images[i:i + batch])
                            for i in range(0, images.shape[0], batch)])


def _accuracy(logits, labels, mask) -> float:
    correct = np.asarray((jnp.argmax(logits, -1) == labels) & mask)
    return float(correct.sum() / np.asarray(mask).sum())
