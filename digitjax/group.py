"""Several seeds of one experiment trained at once by one vmapped program.

The train step is vmapped over the state, the keys and the data order, so K seeds cost
one compiled call per chunk: on a GPU/TPU, whose small-batch steps leave most of the chip
idle, that is close to the cost of one seed. Each seed keeps its own run folder, records,
checkpoints and loggers (a `TrainingLoop` per seed does that part), and a seed group
resumes from its members' checkpoints. Vmapped convolutions become grouped ones, which
round differently: a seed trained in a group matches the same seed trained alone within
float tolerance, not bit for bit, so the run records `execution.seeds_per_program`.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections import defaultdict
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from . import records, steps
from .loop import StopOnSignal, TrainingLoop, train_lockstep
from .stop import StoppedBetweenRuns
from .train import Trainer

# The train step's arguments: state, images, labels, perm, offset, augment key, dropout key.
_SEED_AXES = (0, None, None, 0, None, 0, 0)


def stack(trees: list):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def take(tree, i: int, axis: int = 0):
    """Member i's part of a stacked tree (metrics of a chunk stack steps first: axis 1)."""
    return jax.tree.map(lambda x: x[(slice(None),) * axis + (i,)], tree)


class GroupTrainer(Trainer):
    """A Trainer whose training programs take K stacked seeds; evaluation stays per seed."""

    @classmethod
    def of(cls, trainer: Trainer, k: int) -> GroupTrainer:
        g = copy.copy(trainer)
        g.__class__ = cls
        g.execution = dataclasses.replace(trainer.execution, seeds_per_program=k)
        g._chunk_step = jax.vmap(trainer.train_step, in_axes=_SEED_AXES)
        g._compiled = {}
        return g

    def group_keys(self, seeds: list[int]) -> dict:
        return stack([self.keys(s) for s in seeds])

    def permutation(self, keys: dict, epoch: int) -> jax.Array:
        n = self.data.num_train
        return jax.vmap(lambda k: steps.epoch_permutation(k, epoch, n))(keys["data"])


def fit_group(trainer: Trainer, runs: list[tuple[int, Path, bool, list]], *,
              progress: bool = True, extra_config: dict | None = None, stop=None,
              plots: bool = False) -> list[dict]:
    """Train `runs` = [(seed, run_dir, resume, loggers)] together; their summaries in order.

    Members resumed to different steps are grouped by step, each group trained in turn.
    """
    g = GroupTrainer.of(trainer, len(runs))
    members, opened = [], []
    for seed, run_dir, resume, loggers in runs:
        m = TrainingLoop(g, seed, Path(run_dir), progress=progress,
                         extra_config=extra_config or {}, loggers=loggers, stop=stop,
                         plots=plots)
        members.append(m)
        # Whether a resumed checkpoint's settings differ is known once subgroups are formed.
        opened.append(m.open(resume=resume, publish=False))
    by_step = defaultdict(list)
    for i, (_, step, _) in enumerate(opened):
        by_step[step].append(i)
    ready = time.perf_counter()
    own_stop = stop is None
    try:
        with (stop or StopOnSignal()) as stop:
            for step, idx in sorted(by_step.items()):
                # A later subgroup's clock skips the time it waited for the earlier ones.
                waited = time.perf_counter() - ready
                for i in idx:
                    members[i].t_start += waited
                _fit_lockstep(g, [members[i] for i in idx], [opened[i] for i in idx], step,
                              stop)
    finally:
        for m in members:
            m.ckpts.wait()
            m.ckpts.close()
    if own_stop and stop.requested:  # it came while the members' records were written
        raise StoppedBetweenRuns
    return [m.summary for m in members]


def _fit_lockstep(g: GroupTrainer, members: list[TrainingLoop], opened: list, step: int,
                  stop) -> None:
    if len(members) != g.execution.seeds_per_program:  # a program for this group's size
        g = GroupTrainer.of(g, len(members))
    for m in members:  # now each member's settings are final: record them, start mirrors
        m.trainer = g
        m.publish(records.read_json(m.run_dir / records.CONFIG))
    state = stack([s for s, _, _ in opened])
    # Pending (not yet logged) train metrics of each member, restored with its checkpoint.
    window = [jax.tree.map(lambda *xs: np.stack(xs, axis=1), *chunks)
              for chunks in zip(*[w for _, _, w in opened], strict=True)]
    keys = g.group_keys([m.seed for m in members])
    before = g.compile_seconds
    g.compile(state, keys)
    ahead = g.compile_seconds - before
    for m in members:
        m.compile_seconds = ahead
    desc = f"{g.config.name} seeds {','.join(str(m.seed) for m in members)}"
    with members[0].progress_bar(step, desc) as bar:
        state, step = train_lockstep(g, members, state, step, window, keys, bar, stop,
                                     take=take)
    # The members share every program: each reports all of its compile time (the
    # evaluation's was counted by whichever member evaluated first).
    compiled = ahead + sum(m.compile_seconds - ahead for m in members)
    for i, m in enumerate(members):
        m.compile_seconds = compiled
        if m.status != "diverged":
            m.summary = m._finish(take(state, i), step, "completed", None, m.compile_seconds)
