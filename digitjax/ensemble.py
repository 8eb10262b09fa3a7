"""The ensemble of an experiment's seeds: average their logits on the test split.

Each seed contributes the checkpoint it reports (chosen on validation), so the ensemble
involves no choice made on test. The result is written next to the seeds' folders as
`<workdir>/<experiment>/ensemble.json`, where tables pick it up; each member names its run
folder relative to that file (`seed0`), so a record stays valid wherever the workdir moves.
`run` and `sweep` record it once every seed of an experiment has finished
(`record_if_complete`).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import checkpoint, records, registry
from .config import ConfigError

ENSEMBLE = "ensemble.json"


def ensemble(experiment: str, workdir: Path | str, *, split: str = "test", data_dir=None,
             idx_dir=None, download=False) -> dict:
    from . import data_device, steps

    config = registry.get(experiment).config
    run_dirs = [records.run_dir(workdir, experiment, s, {}) for s in config.seeds]
    summaries = {d: records.read_json(d / records.SUMMARY) for d in run_dirs
                 if (d / records.SUMMARY).exists()}
    done = [d for d, s in summaries.items() if s.get("status") == "completed"]
    if len(done) < 2:
        raise ConfigError(f"{experiment}: an ensemble needs at least 2 finished seeds in "
                          f"{workdir}, found {len(done)}")
    data = data_device.load(config, data_dir=data_dir, idx_dir=idx_dir, download=download)
    images, labels, mask = data.eval_split(split)
    total, members, forward = None, [], None
    b = config.train.eval_batch_size
    for run_dir in done:
        which = "latest" if config.train.select == "final" else "best"
        model, record = checkpoint.load_model(run_dir, which)
        graphdef, state = nnx.split(model)
        if forward is None:  # one compiled program serves every seed (same config)
            forward = _forward(graphdef, steps.recorded_precision(record))
        logits = jnp.concatenate([forward(state, images[i:i + b])
                                  for i in range(0, images.shape[0], b)])
        total = logits if total is None else total + logits
        members.append({"run": run_dir.name, "step": record["checkpoint_step"],
                        "final_param_hash": summaries[run_dir].get("final_param_hash"),
                        "accuracy": _accuracy(logits, labels, mask)})
    result = {"experiment": experiment, "split": split, "seeds": len(done),
              "accuracy": _accuracy(total / len(done), labels, mask), "members": members}
    records.write_json(Path(workdir) / experiment / ENSEMBLE, result)
    return result


def record_if_complete(experiment: str, workdir: Path | str, echo=print,
                       **data_kwargs) -> dict | None:
    """Record the ensemble once every seed of `experiment` has finished in `workdir`.

    An existing record is kept while it describes the same runs; a seed retrained since
    (`--fresh`) makes it stale and it is rebuilt. Returns the new record, if any.
    """
    config = registry.get(experiment).config
    run_dirs = [records.run_dir(workdir, experiment, s, {}) for s in config.seeds]
    if len(run_dirs) < 2:
        return None
    summaries = []
    for run_dir in run_dirs:
        path = run_dir / records.SUMMARY
        if not path.exists():
            return None
        summaries.append(records.read_json(path))
        if summaries[-1].get("status") != "completed":
            return None
    path = Path(workdir) / experiment / ENSEMBLE
    if path.exists() and _describes(records.read_json(path), summaries):
        return None
    missing = [d.name for d in run_dirs if not (d / checkpoint.CHECKPOINTS).exists()]
    if missing:  # e.g. records committed or copied without their checkpoints
        echo(f"{experiment}: ensemble not recorded: {', '.join(missing)} finished but "
             f"{'has' if len(missing) == 1 else 'have'} no {checkpoint.CHECKPOINTS}/ "
             "(an ensemble reloads every seed's checkpoint)")
        return None
    result = ensemble(experiment, workdir, **data_kwargs)
    echo(f"{experiment}: ensemble of {result['seeds']} seeds: test accuracy "
         f"{100 * result['accuracy']:.2f}% | {path}")
    return result


def _describes(record: dict, summaries: list[dict]) -> bool:
    """Whether an ensemble record was made from these runs (older records lack the hash)."""
    members = record.get("members", [])
    return len(members) == len(summaries) and all(
        m.get("step") == s.get("selected_step")
        and m.get("final_param_hash", s.get("final_param_hash")) == s.get("final_param_hash")
        for m, s in zip(members, summaries, strict=True))


def _forward(graphdef, precision: str | None):
    """The jitted eval-mode forward pass (logits), at the run's recorded precision."""
    from .steps import to_float, with_matmul_precision

    def forward(state, x):
        return nnx.merge(graphdef, state)(to_float(x), train=False)

    return jax.jit(with_matmul_precision(forward, precision))


def _accuracy(logits, labels, mask) -> float:
    correct = np.asarray((jnp.argmax(logits, -1) == labels) & mask)
    return float(correct.sum() / np.asarray(mask).sum())
