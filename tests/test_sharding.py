"""Data parallel: the batch split over host CPU devices trains the model one device trains.

Each sharded run is a process of its own (tests/_sharded_worker.py), since host devices must
exist before jax starts, and every wait on one has a deadline, so a hung CPU collective fails
the test instead of hanging CI. The rest checks the pieces in this process.
"""

import jax
import numpy as np
import pytest
from _sharded_worker import assert_same_training, finish, reference_run, result, start, worker_env

from digitjax import distributed, records, registry, steps
from digitjax.config import ConfigError
from digitjax.train import resolve_execution, resolve_matmul_precision


def test_two_host_devices_train_the_model_one_device_trains(tmp_path, tmp_path_factory):
    reference, pending = reference_run(tmp_path_factory)
    run_dir = tmp_path / "run"
    finish(pending + [start("fit", run_dir, tmp_path / "two.json", "--data-parallel", "2",
                            env=worker_env())])
    two = result(tmp_path / "two.json")
    assert two["execution"]["data_parallel_devices"] == two["execution"]["device_count"] == 2
    recorded = records.read_json(run_dir / records.CONFIG)["execution"]
    assert recorded["data_parallel_devices"] == 2 and recorded["process_count"] == 1
    assert recorded["matmul_precision"] == "highest"
    one = records.read_json(reference / records.SUMMARY)
    assert one["status"] == two["summary"]["status"] == "completed"
    assert abs(one["test_accuracy"] - two["summary"]["test_accuracy"]) <= 0.004
    assert_same_training(reference, run_dir)

    # Run again: it resumes from the last checkpoint, restored onto both devices.
    finish([start("fit", run_dir, tmp_path / "again.json", "--data-parallel", "2",
                  env=worker_env())])
    again = result(tmp_path / "again.json")["summary"]
    assert records.read_json(run_dir / records.CONFIG)["resumed_from_step"] == 16
    assert again["final_param_hash"] == two["summary"]["final_param_hash"]


def test_batch_norm_and_dropout_span_the_global_batch_across_devices(tmp_path):
    # Per-device batch statistics or dropout masks would change the very first losses; the
    # order of float sums alone changes them by ~1e-7.
    out = tmp_path / "steps.json"
    finish([start("steps", out, "--set", "train.steps_per_call=2", "--set",
                  "train.log_every_steps=2", env=worker_env())])
    r = result(out)
    np.testing.assert_allclose(r["loss_2"], r["loss_1"], rtol=1e-6)
    assert r["max_param_diff"] < 1e-5


def test_batch_size_must_split_evenly_over_the_devices():
    config = registry.resolve("quick", ["train.batch_size=64"])
    with pytest.raises(ConfigError, match="batch_size=64 must be a multiple of the 3 "):
        resolve_execution(config, 10, data_parallel_devices=3)
    assert resolve_execution(config, 10, data_parallel_devices=4).data_parallel_devices == 4


def test_data_parallel_choice_is_auto_off_or_a_device_count():
    assert distributed.parse_choice("auto") == "auto"
    assert distributed.parse_choice("off") == "off"
    assert distributed.parse_choice("4") == 4
    for bad in ("0", "two", "-1"):
        with pytest.raises(ConfigError, match="--data-parallel"):
            distributed.parse_choice(bad)
    # auto stays off on CPU, whose host devices share the cores.
    assert distributed.data_parallel_devices("auto") == []
    assert distributed.data_parallel_devices("off") == []
    with pytest.raises(ConfigError, match="device"):
        distributed.data_parallel_devices(jax.device_count() + 1)


def test_a_single_process_is_primary_and_writes_records():
    assert distributed.process_index() == 0 and distributed.is_primary()
    assert distributed.process_count() == 1


def test_matmul_precision_defaults_to_highest_and_is_checked():
    assert resolve_matmul_precision(env={}) == "highest"
    assert resolve_matmul_precision(env={"DIGITJAX_MATMUL_PRECISION": "default"}) == "default"
    assert resolve_matmul_precision("tensorfloat32", env={}) == "tensorfloat32"
    with pytest.raises(ConfigError, match="matmul precision 'fast'"):
        resolve_matmul_precision("fast", env={})


def test_matmul_precision_is_in_the_traced_step():
    import jax.numpy as jnp

    def step(w, x):
        return jnp.tanh(x @ w).sum()

    x, w = jnp.ones((4, 3)), jnp.ones((3, 2))
    highest = jax.jit(steps.with_matmul_precision(step, "highest")).lower(w, x).as_text()
    plain = jax.jit(steps.with_matmul_precision(step, None)).lower(w, x).as_text()
    assert "HIGHEST" in highest and "HIGHEST" not in plain


def test_cli_rejects_a_bad_data_parallel_choice_in_one_line(capsys):
    from _cli import run_cli

    code, _, err = run_cli(capsys, "run", "quick", "--data-parallel", "two")
    assert code == 2 and err.count("\n") == 1
    assert "--data-parallel 'two': expected auto, off or a device count" in err


def test_only_the_primary_process_prints_run_lines(monkeypatch, capsys):
    from digitjax import cli

    cli._echo()("from process 0")
    monkeypatch.setattr(distributed, "process_index", lambda: 1)
    cli._echo()("from process 1")
    assert capsys.readouterr().out == "from process 0\n"
