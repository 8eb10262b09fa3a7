"""Two jax.distributed processes on localhost train one run like a single process does.

Each process has one host CPU device; `--data-parallel auto` spans both, the collectives go
over gloo. Both train and checkpoint; only process 0 writes the run records and holds the run
lock. A deadline on every process turns a hang into a failure.
"""

import socket

import numpy as np
from _sharded_worker import assert_same_training, finish, reference_run, result, start, worker_env

from digitjax import checkpoint, distributed, records


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_one_run_and_only_process_0_writes_records(tmp_path,
                                                                        tmp_path_factory):
    reference, pending = reference_run(tmp_path_factory)
    run_dir = tmp_path / "run"  # the same folder for both, as on a shared file system
    env = worker_env(JAX_NUM_CPU_DEVICES="1", **{
        distributed.ENV_COORDINATOR: f"127.0.0.1:{free_port()}",
        distributed.ENV_NUM_PROCESSES: "2"})
    # --fresh: a new run as `digitjax run` starts it (process 0 clears the checkpoints).
    procs = [start("fit", run_dir, tmp_path / f"p{i}.json", "--data-parallel", "auto",
                   "--distributed", "--fresh", env={**env, distributed.ENV_PROCESS_ID: str(i)})
             for i in range(2)]
    finish(pending + procs)

    p0, p1 = (result(tmp_path / f"p{i}.json") for i in range(2))
    assert (p0["process_index"], p1["process_index"]) == (0, 1)
    for p in (p0, p1):
        assert p["execution"]["process_count"] == 2
        assert p["execution"]["data_parallel_devices"] == p["execution"]["device_count"] == 2
    # The state is replicated: both processes end with the very same parameters.
    assert p0["summary"]["final_param_hash"] == p1["summary"]["final_param_hash"]

    # Records: written once, by process 0 (its pid holds the lock file).
    assert records.read_json(run_dir / records.CONFIG)["execution"]["process_count"] == 2
    assert records.read_json(run_dir / records.SUMMARY)["status"] == "completed"
    rows = [(r["step"], r["split"]) for r in records.read_metrics(run_dir / records.METRICS)]
    assert len(rows) == len(set(rows))
    assert (run_dir / ".lock").read_text() == str(procs[0].pid)
    ckpts = checkpoint.RunCheckpoints(run_dir, keep=1, read_only=True)
    try:
        assert ckpts.all_steps() == [16]
    finally:
        ckpts.close()
    assert_same_training(reference, run_dir)
    np.testing.assert_allclose(p0["summary"]["test_loss"],
                               records.read_json(reference / records.SUMMARY)["test_loss"],
                               rtol=1e-4)


def test_a_stop_in_one_process_stops_both_at_the_same_step(tmp_path, tmp_path_factory):
    """SIGTERM reaches process 0 only (its terminal's Ctrl-C), after its 3rd compiled call
    of 2 steps: both processes stop together at the next log step (4 steps), save there and
    resume from it. Acting alone, process 0 waited in its checkpoint save for a process that
    had moved on to its next collective: a hang."""
    reference, pending = reference_run(tmp_path_factory)
    run_dir = tmp_path / "run"
    env = worker_env(JAX_NUM_CPU_DEVICES="1", **{
        distributed.ENV_COORDINATOR: f"127.0.0.1:{free_port()}",
        distributed.ENV_NUM_PROCESSES: "2"})
    faults = {0: {"DIGITJAX_FAULT": "term@chunk:3"}, 1: {}}
    procs = [start("fit", run_dir, tmp_path / f"p{i}.json", "--data-parallel", "auto",
                   "--distributed", "--fresh",
                   env={**env, **faults[i], distributed.ENV_PROCESS_ID: str(i)})
             for i in range(2)]
    finish(pending + procs)
    assert [result(tmp_path / f"p{i}.json").get("interrupted_at") for i in range(2)] == [8, 8]
    assert not (run_dir / records.SUMMARY).exists()
    env[distributed.ENV_COORDINATOR] = f"127.0.0.1:{free_port()}"
    procs = [start("fit", run_dir, tmp_path / f"q{i}.json", "--data-parallel", "auto",
                   "--distributed", env={**env, distributed.ENV_PROCESS_ID: str(i)})
             for i in range(2)]
    finish(procs)
    assert records.read_json(run_dir / records.CONFIG)["resumed_from_step"] == 8
    assert records.read_json(run_dir / records.SUMMARY)["status"] == "completed"
    assert_same_training(reference, run_dir)
