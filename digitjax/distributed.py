"""Data parallel and multi-process runs: the device mesh, and which process writes records.

Data parallel is an execution mode, not part of a config (a config key would change every
config hash): the train state is replicated, each step's batch is split over the `data` axis
of a mesh of devices, and XLA's partitioner adds the gradient all-reduce. The global batch
stays the config's `train.batch_size`, so a run trains the same model on 1 or N devices up
to the order of float sums. `--data-parallel auto` uses every device on GPU/TPU (and across
processes); on CPU it stays off unless asked for (`--data-parallel 2` makes 2 host devices,
which share the cores). A data-parallel Trainer keeps few programs queued: XLA:CPU hangs a
multi-device program once more than 32 are queued (train.MAX_PROGRAMS_IN_FLIGHT).

Multi-process (multi-host): every process runs the same command with `--distributed`, which
calls `jax.distributed.initialize` from $DIGITJAX_COORDINATOR (host:port of process 0),
$DIGITJAX_NUM_PROCESSES and $DIGITJAX_PROCESS_ID, or from a cluster JAX detects (Slurm,
Open MPI, Cloud TPU) when they are unset. Every process trains and saves checkpoints
(Orbax coordinates the writes); only process 0 writes run records, mirrors to W&B and takes
the run lock (records.py, wandb_log.py). On CPU the processes' collectives go over gloo.
"""

from __future__ import annotations

import os
import sys

from .config import ConfigError

DATA_AXIS = "data"
ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID = (
    "DIGITJAX_COORDINATOR", "DIGITJAX_NUM_PROCESSES", "DIGITJAX_PROCESS_ID")
# How long a process waits for the others at start-up (s); jax's default is 300.
INIT_TIMEOUT_S = 120


def initialize(*, env=None) -> None:
    """Join the processes of a multi-process run (before anything starts a jax backend)."""
    import jax

    env = os.environ if env is None else env
    kwargs = {}
    if env.get(ENV_COORDINATOR):
        try:
            kwargs = {"coordinator_address": env[ENV_COORDINATOR],
                      "num_processes": int(env[ENV_NUM_PROCESSES]),
                      "process_id": int(env[ENV_PROCESS_ID])}
        except (KeyError, ValueError):
            raise ConfigError(f"--distributed with ${ENV_COORDINATOR} needs integer "
                              f"${ENV_NUM_PROCESSES} and ${ENV_PROCESS_ID}") from None
    if not jax.distributed.is_initialized():
        try:
            jax.distributed.initialize(initialization_timeout=INIT_TIMEOUT_S, **kwargs)
        except ValueError as e:  # no coordinator given and no cluster detected
            raise ConfigError(f"--distributed: {e} (set ${ENV_COORDINATOR}, "
                              f"${ENV_NUM_PROCESSES} and ${ENV_PROCESS_ID})") from None


def process_index() -> int:
    """This process's index: 0 unless jax.distributed is running (never starts a backend)."""
    jax = sys.modules.get("jax")
    if jax is None or not jax.distributed.is_initialized():
        return 0
    return jax.process_index()


def is_primary() -> bool:
    """Whether this process writes run records (process 0, or the only process)."""
    return process_index() == 0


def process_count() -> int:
    jax = sys.modules.get("jax")
    if jax is None or not jax.distributed.is_initialized():
        return 1
    return jax.process_count()


def cpu_devices(n: int) -> None:
    """Ask XLA:CPU for `n` host devices; only possible before jax starts its backend.

    The host devices share the machine's cores: XLA:CPU runs every device's programs, and
    their intra-op work, on thread pools of max(cores, devices) threads.
    """
    import jax

    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # the backend is up: the device count is what it is
        pass


def parse_choice(choice: str | int | None) -> str | int:
    """`auto`, `off` or a device count (int >= 1); one-line ConfigError otherwise."""
    if choice is None:
        return "off"
    if isinstance(choice, int) or (isinstance(choice, str) and choice.isdigit()):
        n = int(choice)
        if n < 1:
            raise ConfigError(f"--data-parallel {choice}: expected auto, off or a device "
                              "count >= 1")
        return n
    if choice not in ("auto", "off"):
        raise ConfigError(f"--data-parallel {choice!r}: expected auto, off or a device count")
    return choice


def data_parallel_devices(choice: str | int | None) -> list:
    """The devices a data-parallel run spans ([] = one device, the plain program).

    `auto`: every device when the backend is an accelerator or the run spans processes;
    `off`: none; N: the first N devices (all of them when the run spans processes).
    """
    import jax

    choice = parse_choice(choice)
    devices = jax.devices()
    multi_process = jax.process_count() > 1
    if choice == "off":
        if multi_process:
            raise ConfigError("--data-parallel off: a multi-process run trains one model "
                              "over every process's devices")
        return []
    if choice == "auto":
        n = len(devices) if multi_process or jax.default_backend() != "cpu" else 1
    else:
        n = choice
    if n > len(devices):
        raise ConfigError(f"--data-parallel {n}: only {len(devices)} {jax.default_backend()} "
                          f"device(s) (host CPU devices: distributed.cpu_devices({n}) before "
                          "jax starts, as `digitjax run --data-parallel N` does)")
    if multi_process and n != len(devices):
        raise ConfigError(f"--data-parallel {n}: a multi-process run spans all "
                          f"{len(devices)} devices")
    return devices[:n] if n > 1 else []


def make_mesh(devices: list):
    """A 1-D mesh over `devices` whose axis `data` splits the batch."""
    import numpy as np
    from jax.sharding import Mesh

    return Mesh(np.asarray(devices), (DATA_AXIS,))


def shardings(mesh):
    """(replicated, batch-split) NamedShardings of `mesh`."""
    from jax.sharding import NamedSharding, PartitionSpec

    return NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicate(tree, sharding):
    """`tree` on every device of a replicated `sharding`, PRNG keys included.

    Typed keys go through their raw data: device_put cannot send them to devices of other
    processes.
    """
    import jax

    def put(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(put(jax.random.key_data(x)),
                                            impl=jax.random.key_impl(x))
        return jax.device_put(x, sharding)

    return jax.tree.map(put, tree)


def broadcast(value):
    """Process 0's `value` (a bool, int or float) in every process."""
    import jax

    if jax.process_count() == 1:
        return value
    import numpy as np
    from jax.experimental import multihost_utils

    out = multihost_utils.broadcast_one_to_all(np.asarray(value))
    return type(value)(np.asarray(out).item())


def agree(value: int) -> int:
    """The largest of every process's `value` (e.g. a stop request), the same in each."""
    import jax

    if jax.process_count() == 1:
        return value
    import numpy as np
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.int32(value))))


def barrier(name: str) -> None:
    """Wait until every process gets here (no-op in a single process)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
