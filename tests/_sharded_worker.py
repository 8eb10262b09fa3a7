"""Tiny training runs in processes of their own, for the data-parallel tests.

    python tests/_sharded_worker.py fit RUN_DIR RESULT_JSON [--data-parallel CHOICE]
        [--distributed] [--fresh] [--set KEY=VALUE ...]
    python tests/_sharded_worker.py steps RESULT_JSON [--set KEY=VALUE ...]

Data parallel needs its devices before jax starts (host devices on CPU, or the processes of
a jax.distributed run), hence a process per run. `fit` trains seed 0 of `quick` on the first
1,024 MNIST training digits (embedded IDX files, no TFDS) through the real Trainer and loop,
under the run lock as `digitjax run` does, and writes what this process saw to RESULT_JSON.
`steps` runs the first chunk of steps of a tiny batch-norm + dropout net on one device and
on 2 host devices from the same state and writes both losses and the largest parameter
difference.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import digitjax  # noqa: F401  (before jax: digitjax sets its XLA flags)
from digitjax import distributed

N_TRAIN, N_EVAL = 1024, 500
OVERRIDES = ["train.batch_size=64", "train.steps_per_call=2", "train.log_every_steps=4",
             "train.eval_batch_size=250"]


def tiny_data():
    from digitjax import data, data_device, idx

    d = data.EMBEDDED_MNIST_DIR
    x, y = idx.read_idx_pair(d / "train-images-idx3-ubyte.gz", d / "train-labels-idx1-ubyte.gz")
    x, y = x[..., None], y.astype("int32")
    return data_device.from_arrays((x[:N_TRAIN], y[:N_TRAIN]), (x[-N_EVAL:], y[-N_EVAL:]),
                                   (x[-2 * N_EVAL:-N_EVAL], y[-2 * N_EVAL:-N_EVAL]),
                                   num_classes=10, eval_batch_size=250)


def fit(args) -> dict:
    choice = distributed.parse_choice(args.data_parallel)
    if args.distributed:
        distributed.initialize()
    elif isinstance(choice, int):
        distributed.cpu_devices(choice)
    from digitjax import records, registry
    from digitjax.train import Trainer

    trainer = Trainer(registry.resolve("quick", OVERRIDES + args.set), tiny_data(),
                      data_parallel=choice)
    from digitjax.stop import Interrupted

    run_dir = Path(args.run_dir)
    out = {"process_index": distributed.process_index(),
           "execution": dataclasses.asdict(trainer.execution)}
    with records.run_lock(run_dir):
        try:
            out["summary"] = trainer.fit(0, run_dir, progress=False, resume=not args.fresh)
        except Interrupted as e:  # a stop request (a term@ fault): saved, resumable
            out["interrupted_at"] = e.step
    return out


def register_tiny_bn() -> str:
    """conv-BN-ReLU, dropout, dense: what data parallel must keep whole-batch, compiled fast."""
    from flax import nnx

    from digitjax import models

    class TinyBN(nnx.Module):
        def __init__(self, *, num_classes: int, in_channels: int, rngs: nnx.Rngs):
            self.conv = models.ConvBN(in_channels, 8, 3, stride=2, rngs=rngs)
            self.drop = nnx.Dropout(0.4)
            self.dense = nnx.Linear(14 * 14 * 8, num_classes, rngs=rngs)

        def __call__(self, x, *, train: bool = False, key=None):
            x = self.drop(nnx.relu(self.conv(x, train)), deterministic=not train, rngs=key)
            return self.dense(x.reshape(x.shape[0], -1))

    models.register("test_tiny_bn", "test only: conv-BN-ReLU, dropout, dense", TinyBN)
    return "test_tiny_bn"


def first_steps(args) -> dict:
    distributed.cpu_devices(2)
    import jax
    import numpy as np

    from digitjax import registry
    from digitjax.train import Trainer

    model = register_tiny_bn()
    config = registry.resolve("quick", [*OVERRIDES, f"model.name={model}", *args.set])
    data, out = tiny_data(), {}
    for choice in ("off", 2):
        tr = Trainer(config, data, data_parallel=choice)
        keys = tr.keys(0)
        state = tr.init_state(0)
        tr.compile(state, keys)
        state, metrics = tr.run_chunk(state, tr.execution.steps_per_call,
                                      tr.permutation(keys, 0), 0, keys)
        out[choice] = (np.asarray(metrics["loss"]), jax.tree.map(np.asarray, state.params))
    (loss_1, params_1), (loss_2, params_2) = out["off"], out[2]
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(
        jax.tree.leaves(params_1), jax.tree.leaves(params_2), strict=True))
    return {"loss_1": loss_1.tolist(), "loss_2": loss_2.tolist(), "max_param_diff": diff}


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="mode", required=True)
    f = sub.add_parser("fit")
    f.add_argument("run_dir")
    f.add_argument("result")
    f.add_argument("--data-parallel", default="off")
    f.add_argument("--distributed", action="store_true")
    f.add_argument("--fresh", action="store_true", help="resume=False, as for a new run")
    f.add_argument("--set", action="append", default=[])
    s = sub.add_parser("steps")
    s.add_argument("result")
    s.add_argument("--set", action="append", default=[])
    args = p.parse_args(argv)
    out = fit(args) if args.mode == "fit" else first_steps(args)
    Path(args.result).write_text(json.dumps(out))



# -- for the tests: start workers, wait for them with a deadline ----------------------------
WORKER = Path(__file__).resolve()
TIMEOUT_S = 180  # a hung collective (XLA:CPU aborts one after 40 s) must fail, not hang, CI
_reference: dict[str, Path] = {}


def start(*args: str | Path, env: dict | None = None):
    """Launch a worker with `args` as its command line; its output goes to the result JSON's
    name with .log, never to a pipe that a chatty process could fill."""
    import subprocess
    import sys

    result = Path(_result_arg(args))
    with open(result.with_suffix(".log"), "w") as log:
        return subprocess.Popen([sys.executable, str(WORKER), *map(str, args)], env=env,
                                stdout=log, stderr=subprocess.STDOUT, text=True)


def _result_arg(args) -> str:
    return str(args[2] if args[0] == "fit" else args[1])


def finish(procs: list, timeout_s: float = TIMEOUT_S) -> None:
    """Wait for every worker; one still running at the deadline is killed and fails the test."""
    import subprocess
    import time

    import pytest

    deadline = time.monotonic() + timeout_s
    logs = [Path(_result_arg(p.args[2:])).with_suffix(".log") for p in procs]
    try:
        for p in procs:
            p.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
            p.wait()
        pytest.fail(f"a data-parallel worker did not finish in {timeout_s:.0f} s (a hung "
                    f"collective?); logs: {', '.join(map(str, logs))}")
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log.read_text()[-4000:]


def result(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def worker_env(**extra: str) -> dict:
    """This environment without settings that change XLA:CPU's devices or threads."""
    import os

    drop = ("XLA_FLAGS", "PJRT_NPROC", "NPROC", "JAX_NUM_CPU_DEVICES")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **extra}


def reference_run(tmp_path_factory) -> tuple[Path, list]:
    """The single-device run the sharded ones are compared with, trained once per session:
    (its run folder, [its worker] the first time, to `finish` along with the caller's)."""
    if "run" in _reference:
        return _reference["run"], []
    folder = tmp_path_factory.mktemp("reference")
    proc = start("fit", folder / "run", folder / "result.json", "--data-parallel", "off",
                 env=worker_env())
    _reference["run"] = folder / "run"
    return folder / "run", [proc]


# Float sums run in another order over 2 devices; 16 SGD steps of the Flax-example CNN keep
# the drift far below this.
RTOL, ATOL = 1e-4, 1e-6


def assert_same_training(a: Path, b: Path) -> None:
    """Two runs of seed 0 of one config: same rows, losses and parameters up to floats."""
    import jax
    import numpy as np

    from digitjax import checkpoint, records

    ra, rb = (records.read_metrics(d / records.METRICS) for d in (a, b))
    assert [(r["step"], r["split"]) for r in ra] == [(r["step"], r["split"]) for r in rb]
    np.testing.assert_allclose([r["loss"] for r in ra], [r["loss"] for r in rb], rtol=RTOL)
    np.testing.assert_allclose([r["accuracy"] for r in ra], [r["accuracy"] for r in rb],
                               atol=0.005)
    *_, sa, _ = checkpoint.restore_state(a, "latest")
    *_, sb, _ = checkpoint.restore_state(b, "latest")
    for x, y in zip(jax.tree.leaves(sa.params), jax.tree.leaves(sb.params), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=RTOL, atol=ATOL)


if __name__ == "__main__":
    main()
