"""Training and evaluation of one experiment: `Trainer(config, data).fit(seed, run_dir)`.

The loop is thin: an epoch's permutation is drawn on device, compiled chunks of steps run
back to back, and the host only fetches metrics at the log cadence. Timing separates
compilation, training and evaluation so images/s means training images per second of the
training loop alone.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import hashlib
import math
import os
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import augment, distributed, models, optim, records, steps
from .config import Config, ConfigError, config_hash, to_dict
from .data_device import DeviceData

# Steps per compiled call and loop form per backend. Measured on a 2-core XLA:CPU (jax
# 0.10.2): a ~12-step unrolled chunk beats a per-step loop by ~1.1-1.2x while a scanned
# epoch is ~6x slower; on GPU/TPU a scan is the fast form.
BACKEND_DEFAULTS = {
    "cpu": {"steps_per_call": 12, "loop": "unroll"},
    "gpu": {"steps_per_call": 100, "loop": "scan"},
    "tpu": {"steps_per_call": 100, "loop": "scan"},
}
LOG_EVERY_AT_LEAST = 50  # steps; the default log cadence rounds this up
# Matmul/conv precision policy. TPUs and recent GPUs run float32 matmuls in bf16/tf32 passes
# by default; "highest" keeps float32 runs reproducible across backends (on CPU it is what
# XLA does anyway). $DIGITJAX_MATMUL_PRECISION or Trainer(matmul_precision=) changes it.
DEFAULT_MATMUL_PRECISION = "highest"
MATMUL_PRECISIONS = ("default", "high", "highest", "bfloat16", "tensorfloat32", "float32")
# Data-parallel programs queued at once. XLA:CPU runs at most 32 programs in flight per
# device, and its client launches a multi-device program and runs it on one thread pool of
# max(cores, devices) threads: with more queued, launches waiting for a free slot hold the
# threads the running program needs, and one device waits at the all-reduce for the other
# until XLA aborts ("Expected 2 threads to join the rendezvous"). Measured on 2 cores, 2 host
# devices: 5 of 5 runs with 40 or more steps queued hung, 0 of 5 with 31 or fewer. A chunk or two
# queued behind the running one is all the loop needs to keep the devices busy.
MAX_PROGRAMS_IN_FLIGHT = 4


class Diverged(RuntimeError):
    """Loss or parameters became NaN/inf."""


@dataclasses.dataclass(frozen=True)
class Execution:
    """The numerical execution mode of a run, recorded in config.json."""

    backend: str
    device_count: int
    device_kind: str
    steps_per_call: int
    loop: str
    log_every_steps: int
    checkpoint_every_steps: int  # 0 = at epoch ends
    # Seeds trained together by one vmapped program (see group.py); vmapped convolutions
    # are grouped ones, so numbers match a seed trained alone only within float tolerance.
    seeds_per_program: int = 1
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    matmul_precision: str = DEFAULT_MATMUL_PRECISION
    # Devices one step's batch is split over (data parallel, see distributed.py), and the
    # processes they belong to; the global batch is train.batch_size either way.
    data_parallel_devices: int = 1
    process_count: int = 1


def resolve_matmul_precision(precision: str | None = None, env=None) -> str:
    """The run's matmul precision: `precision`, else $DIGITJAX_MATMUL_PRECISION, else highest."""
    env = os.environ if env is None else env
    precision = precision or env.get("DIGITJAX_MATMUL_PRECISION") or DEFAULT_MATMUL_PRECISION
    if precision not in MATMUL_PRECISIONS:
        raise ConfigError(f"matmul precision {precision!r}: expected one of "
                          f"{', '.join(MATMUL_PRECISIONS)}")
    return precision


def resolve_execution(config: Config, steps_per_epoch: int, *, data_parallel_devices: int = 1,
                      matmul_precision: str = DEFAULT_MATMUL_PRECISION) -> Execution:
    """Fill backend defaults and check the cadences against the steps per call."""
    backend = jax.default_backend()
    defaults = BACKEND_DEFAULTS.get(backend, BACKEND_DEFAULTS["gpu"])
    t = config.train
    spc = t.steps_per_call or defaults["steps_per_call"]
    spc = min(spc, steps_per_epoch)
    loop = defaults["loop"] if t.loop == "auto" else t.loop
    log_every = t.log_every_steps or spc * math.ceil(LOG_EVERY_AT_LEAST / spc)
    ckpt_every = config.checkpoint.every_steps
    if log_every % spc:
        raise ConfigError(f"train.log_every_steps={log_every} must be a multiple of "
                          f"train.steps_per_call={spc}")
    if ckpt_every and ckpt_every % log_every:
        raise ConfigError(f"checkpoint.every_steps={ckpt_every} must be a multiple of "
                          f"train.log_every_steps={log_every}")
    if t.batch_size % data_parallel_devices:
        raise ConfigError(f"train.batch_size={t.batch_size} must be a multiple of the "
                          f"{data_parallel_devices} data-parallel devices")
    return Execution(backend=backend, device_count=jax.device_count(),
                     device_kind=jax.local_devices()[0].device_kind, steps_per_call=spc,
                     loop=loop, log_every_steps=log_every, checkpoint_every_steps=ckpt_every,
                     matmul_precision=matmul_precision,
                     data_parallel_devices=data_parallel_devices,
                     process_count=jax.process_count())


def chunk_sizes(steps_per_epoch: int, steps_per_call: int) -> list[int]:
    """The compiled calls of one epoch: full chunks, then the remainder."""
    full, tail = divmod(steps_per_epoch, steps_per_call)
    return [steps_per_call] * full + ([tail] if tail else [])


def crossed(prev_step: int, step: int, every: int) -> bool:
    return every > 0 and step // every > prev_step // every


def param_hash(params) -> str:
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(params):
        h.update(np.ascontiguousarray(jax.device_get(leaf)).tobytes())
    return h.hexdigest()[:16]


def build_model(config: Config, num_classes: int, in_channels: int, num_steps: int,
                steps_per_epoch: int):
    """graphdef, abstract params, optimizer, schedule and `init(key) -> TrainState`."""

    def make_model(key):
        return models.create(config.model.name, num_classes=num_classes,
                             in_channels=in_channels, rngs=nnx.Rngs(key))

    graphdef, abs_params, _ = steps.split_model(
        nnx.eval_shape(lambda: make_model(jax.random.key(0))))
    schedule = optim.make_schedule(config.schedule, config.optimizer.learning_rate,
                                   num_steps, steps_per_epoch)
    tx = optim.make_optimizer(config.optimizer, schedule)

    def init(key) -> steps.TrainState:
        _, params, rest = steps.split_model(make_model(key))
        t = config.train
        ema = steps.init_ema(params, rest, t.ema_decay, t.ema_batch_stats)
        return steps.TrainState(jnp.zeros((), jnp.int32), params, rest, tx.init(params), ema)

    return graphdef, abs_params, tx, schedule, init


def seed_keys(seed: int) -> dict[str, jax.Array]:
    """Named keys, split once from the seed."""
    init, data, aug, dropout = jax.random.split(jax.random.key(seed), 4)
    return {"init": init, "data": data, "augment": aug, "dropout": dropout}


class Trainer:
    """Compiled programs of one config, reused across its seeds.

    `data_parallel`: "off" (one device), "auto" or a device count: each step's batch is
    split over a mesh of devices while the state is replicated (see distributed.py).
    `matmul_precision`: see resolve_matmul_precision.
    """

    def __init__(self, config: Config, data: DeviceData, *, data_parallel: str | int = "off",
                 matmul_precision: str | None = None):
        self.config = config
        t = config.train
        self.steps_per_epoch = data.num_train // t.batch_size
        if self.steps_per_epoch < 1:
            raise ConfigError(f"train.batch_size={t.batch_size} is larger than the training "
                              f"split ({data.num_train} images)")
        self.num_steps = self.steps_per_epoch * t.epochs
        precision = resolve_matmul_precision(matmul_precision)
        devices = distributed.data_parallel_devices(data_parallel)
        self.execution = resolve_execution(config, self.steps_per_epoch,
                                           data_parallel_devices=max(len(devices), 1),
                                           matmul_precision=precision)
        # The mesh of a data-parallel run (None: the plain single-device programs).
        self.mesh = distributed.make_mesh(devices) if devices else None
        replicated, batch = distributed.shardings(self.mesh) if self.mesh else (None, None)
        self._replicated = replicated
        self.data = data.replicate(replicated) if self.mesh else data

        self.graphdef, abs_params, self.tx, self.schedule, init = build_model(
            config, data.num_classes, data.image_shape[-1], self.num_steps, self.steps_per_epoch)
        # One compiled init: eager jax.random init costs seconds of op-by-op compilation.
        self._init = jax.jit(init, out_shardings=replicated) if self.mesh else jax.jit(init)
        self.num_params = models.count_params(abs_params)
        train_step = steps.make_train_step(
            self.graphdef, self.tx, augment.get(config.augment.name),
            batch_size=t.batch_size, num_classes=data.num_classes,
            label_smoothing=t.label_smoothing, ema_decay=t.ema_decay,
            ema_warmup=t.ema_warmup, ema_batch_stats=t.ema_batch_stats,
            matmul_precision=precision, batch_sharding=batch, state_sharding=replicated)
        self.train_step = train_step
        self._chunk_step = train_step  # what a chunk repeats (a seed group: vmapped)
        self._compiled: dict = {}  # chunk programs by number of steps, eval ones by shape
        n = self.execution.data_parallel_devices
        self._eval_batch = steps.make_eval_batch(
            self.graphdef, num_classes=data.num_classes, augment=augment.get(config.augment.name),
            tta_views=t.tta_views, matmul_precision=precision,
            # An eval batch that does not split evenly is evaluated whole on every device.
            batch_sharding=batch if t.eval_batch_size % n == 0 else None)
        self.compile_seconds = 0.0
        self.device = None  # None: jax's default device
        self._in_flight: collections.deque = collections.deque()

    @property
    def config_hash(self) -> str:
        return config_hash(self.config)

    def keys(self, seed: int) -> dict[str, jax.Array]:
        return self.place(seed_keys(seed))

    def on_device(self, device) -> Trainer:
        """A copy whose data and compiled programs live on `device`.

        Seeds train in parallel one per device (on CPU, one per core), each with the plain
        single-seed program: vmapping seeds would turn convolutions into slow grouped ones.
        """
        if self.mesh is not None:
            raise ConfigError("seeds on separate devices and data parallel exclude each other")
        other = copy.copy(self)
        other.device = device
        other.data = self.data.to(device)
        other._compiled = {}
        return other

    def place(self, tree):
        """Put keys or a restored state on this trainer's device (every device of its mesh)."""
        if self.mesh is not None:
            return distributed.replicate(tree, self._replicated)
        return jax.device_put(tree, self.device) if self.device is not None else tree

    def abstract_state(self) -> steps.TrainState:
        abstract = jax.eval_shape(self._init, jax.random.key(0))
        if self.mesh is None:
            return abstract
        # Orbax restores each array onto the sharding its abstract value names.
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                           sharding=self._replicated), abstract)

    def init_state(self, seed: int) -> steps.TrainState:
        return self._init(self.keys(seed)["init"])

    def compile(self, state: steps.TrainState, keys: dict) -> None:
        """Compile every program the loop runs ahead of time, timing it apart from training."""
        t0 = time.perf_counter()
        perm = self.permutation(keys, 0)
        jax.block_until_ready((perm, self.schedule(0)))
        self.compile_seconds += time.perf_counter() - t0
        for n in set(chunk_sizes(self.steps_per_epoch, self.execution.steps_per_call)):
            self._program(n, state, perm, keys)

    def _program(self, n: int, state, perm, keys: dict):
        """The compiled n-step chunk, compiled on first use (counted in compile_seconds).

        `compile` makes the epoch's chunk sizes ahead of time; another size is only needed
        to finish a chunk that a checkpoint fell inside (saved with another steps_per_call);
        that compile then also falls in the run's train time, a rare and small cost.
        """
        def lower():
            d = self.data
            fn = steps.make_train_chunk(self._chunk_step, num_steps=n,
                                        batch_size=self.config.train.batch_size,
                                        loop=self.execution.loop)
            return fn.lower(state, d.train_images, d.train_labels, perm, np.int32(0),
                            keys["augment"], keys["dropout"])

        return self._compile_once(n, lower)

    def _eval_program(self, args: tuple):
        """The compiled eval batch, compiled on first use (so a run's eval_seconds time
        evaluation alone)."""
        # Splits are padded: one shape per eval batch size.
        return self._compile_once(("eval", args[2].shape), lambda: self._eval_batch.lower(*args))

    def _compile_once(self, key, lower):
        """The program `lower()` compiles, compiled once per key; counted in compile_seconds."""
        if key not in self._compiled:
            t0 = time.perf_counter()
            self._compiled[key] = lower().compile()
            self.compile_seconds += time.perf_counter() - t0
        return self._compiled[key]

    def permutation(self, keys: dict, epoch: int) -> jax.Array:
        return steps.epoch_permutation(keys["data"], epoch, self.data.num_train)

    def run_chunk(self, state, n: int, perm, offset: int, keys: dict):
        d = self.data
        state, metrics = self._program(n, state, perm, keys)(
            state, d.train_images, d.train_labels, perm, np.int32(offset), keys["augment"],
            keys["dropout"])
        self._throttle(metrics)
        return state, metrics

    def _throttle(self, output) -> None:
        """Wait for older data-parallel programs so few stay queued (see above)."""
        if self.mesh is None:
            return
        self._in_flight.append(output)
        while len(self._in_flight) > MAX_PROGRAMS_IN_FLIGHT:
            jax.block_until_ready(self._in_flight.popleft())

    def evaluate(self, state: steps.TrainState, split: str) -> dict:
        """Loss, accuracy and per-class accuracy on a whole split (one host fetch)."""
        images, labels, mask = self.data.eval_split(split)
        b = self.config.train.eval_batch_size
        params, rest = steps.eval_variables(state, self.config.train.ema_batch_stats)
        sums = []
        for i in range(0, images.shape[0], b):
            args = (params, rest, images[i:i + b], labels[i:i + b], mask[i:i + b], np.int32(i))
            sums.append(self._eval_program(args)(*args))
            self._throttle(sums[-1])
        sums = jax.device_get(sums)
        total = {k: np.sum([s[k] for s in sums], axis=0) for k in sums[0]}
        count = float(total["count"])
        class_count = np.maximum(total["class_count"], 1)
        return {"loss": float(total["loss_sum"]) / count,
                "accuracy": float(total["correct"]) / count,
                "per_class_accuracy": [float(x) for x in total["class_correct"] / class_count]}

    def fit(self, seed: int, run_dir: Path | str, *, progress: bool = True,
            extra_config: dict | None = None, loggers: list | None = None,
            resume: bool = True, stop=None, position: int = 0, plots: bool = False) -> dict:
        """Train one seed into `run_dir`, resuming from its latest checkpoint if any."""
        from . import checkpoint
        from .loop import TrainingLoop

        run_dir = Path(run_dir)
        if distributed.process_count() > 1:
            # Every process trains; process 0 decides, writes the records and the mirrors.
            resume = distributed.broadcast(resume)
            primary = distributed.is_primary()
            if not resume and primary:
                shutil.rmtree(run_dir / checkpoint.CHECKPOINTS, ignore_errors=True)
            distributed.barrier(f"digitjax fit {run_dir.name}")
            resume = True  # an emptied checkpoint folder: every process starts fresh
            if not primary:
                progress, plots, loggers = False, False, []
        return TrainingLoop(self, seed, run_dir, progress=progress,
                            extra_config=extra_config or {}, loggers=loggers, stop=stop,
                            position=position, plots=plots).run(resume=resume)

    def config_record(self, seed: int, extra: dict) -> dict:
        return {
            "config": to_dict(self.config),
            "seed": seed,
            "config_hash": self.config_hash,
            "execution": dataclasses.asdict(self.execution),
            # The device it trained on when seeds run one per device (None: the default).
            "device": None if self.device is None else str(self.device),
            "num_params": self.num_params,
            "steps_per_epoch": self.steps_per_epoch,
            "num_steps": self.num_steps,
            "num_train": self.data.num_train,
            "environment": records.environment(),
            **extra,
        }
