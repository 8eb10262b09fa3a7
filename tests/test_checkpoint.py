"""Checkpoints: kill a real run anywhere, resume, and get the uninterrupted run's records."""

import random
import re
import signal
import time

import pytest
from _faults import (
    SMALL,
    check_final_records,
    finish,
    kill_after,
    resumed_from,
    run_dir_of,
    start,
    strip,
)

from digitjax import checkpoint, data_device, records, registry, runner
from digitjax.config import ConfigError
from digitjax.train import Trainer, param_hash


@pytest.mark.parametrize("fault", ["kill@chunk:6", "kill@save:2", "kill@eval:1",
                                   "kill@chunk:13"])
def test_kill_at_a_named_point_then_resume_gives_the_same_final_records(
        fault, cli_env, small_run_reference, tmp_path):
    code, _, err = finish(start(tmp_path, cli_env, fault))
    assert code == -signal.SIGKILL, err
    run_dir = run_dir_of(tmp_path)
    assert not (run_dir / records.SUMMARY).exists()
    saved = checkpoint.RunCheckpoints(run_dir, keep=1, read_only=True).latest_step()
    assert saved  # every point named above comes after the first checkpoint (step 8)
    code, out, err = finish(start(tmp_path, cli_env))
    assert code == 0, err
    assert resumed_from(run_dir) == saved
    check_final_records(run_dir, small_run_reference)
    assert not list((run_dir / checkpoint.CHECKPOINTS).glob("*tmp*"))


def test_kills_at_seeded_random_moments_then_resume(cli_env, small_run_reference, tmp_path):
    rng = random.Random(1234)  # replayable: the same seed draws the same kill delays
    for _ in range(2):
        kill_after(start(tmp_path, cli_env), rng.uniform(4.0, 9.0), tmp_path)
    code, _, err = finish(start(tmp_path, cli_env))
    assert code == 0, err
    check_final_records(run_dir_of(tmp_path), small_run_reference)


def test_sigint_saves_a_checkpoint_exits_and_resumes(cli_env, small_run_reference, tmp_path):
    proc = start(tmp_path, cli_env)
    deadline = time.time() + 120
    metrics = None
    while time.time() < deadline and proc.poll() is None:
        found = list(tmp_path.glob("quick+*/seed0/metrics.jsonl"))
        if found and found[0].stat().st_size > 0:
            metrics = found[0]
            break
        time.sleep(0.05)
    assert metrics is not None, "training did not start"
    proc.send_signal(signal.SIGINT)
    code, out, err = finish(proc)
    run_dir = run_dir_of(tmp_path)
    assert code == 130, err
    assert "Resume with: digitjax run quick --seed 0" in out
    saved = checkpoint.RunCheckpoints(run_dir, keep=1, read_only=True).latest_step()
    code, out, err = finish(start(tmp_path, cli_env))
    assert code == 0 and "resuming" in out, err
    assert resumed_from(run_dir) == saved
    check_final_records(run_dir, small_run_reference)


# -- in-process checks on a small real slice of MNIST -----------------------------------

def small_trainer(mnist_idx, *extra):
    (x, y), (tx, ty) = mnist_idx
    data = data_device.from_arrays((x[:1024], y[:1024]), (x[-500:], y[-500:]),
                                   (tx[:500], ty[:500]), num_classes=10, eval_batch_size=250)
    return Trainer(registry.resolve("quick", [*SMALL[3:], *extra]), data)


def test_a_checkpoint_of_another_config_is_refused(mnist_idx, tmp_path):
    small_trainer(mnist_idx).fit(0, tmp_path, progress=False)
    (tmp_path / records.SUMMARY).unlink()  # make it look unfinished
    other = small_trainer(mnist_idx, "optimizer.learning_rate=0.05")
    with pytest.raises(ConfigError, match="made by another config"):
        other.fit(0, tmp_path, progress=False)


def test_a_partial_save_is_ignored_and_cleaned(mnist_idx, tmp_path):
    tr = small_trainer(mnist_idx, "train.epochs=1")
    reference = tr.fit(0, tmp_path / "ref", progress=False)
    run_dir = tmp_path / "run"
    tr.fit(0, run_dir, progress=False)
    (run_dir / records.SUMMARY).unlink()
    ckpt_dir = run_dir / checkpoint.CHECKPOINTS
    latest = max(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())
    # What a kill during a save leaves: a tmp folder of a later step, half written.
    partial = ckpt_dir / f"{latest + 8}.orbax-checkpoint-tmp-123"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "junk").write_bytes(b"\0" * 10)
    resumed = tr.fit(0, run_dir, progress=False)
    assert strip(resumed) == strip(reference)
    assert resumed_from(run_dir) == latest and not partial.exists()


def test_latest_and_best_checkpoints_both_survive_restarts(mnist_idx, tmp_path):
    tr = small_trainer(mnist_idx)
    state = tr.init_state(0)
    vals = {8: 0.90, 16: 0.95, 24: 0.91, 32: 0.95, 40: None, 48: 0.80}
    ckpts = checkpoint.RunCheckpoints(tmp_path, keep=1, save_steps=set(vals))
    for step in (8, 16, 24):
        ckpts.save(state, {"step": step}, val_accuracy=vals[step])
    ckpts.wait()
    ckpts.close()
    ckpts = checkpoint.RunCheckpoints(tmp_path, keep=1, save_steps=set(vals))  # a restart
    for step in (32, 40, 48):
        ckpts.save(state, {"step": step}, val_accuracy=vals[step])
    ckpts.wait()
    # Best: the earliest of the best validation accuracies (16, not 32); latest: 48.
    assert ckpts.all_steps() == [16, 48]
    assert ckpts.best_step() == 16 and ckpts.latest_step() == 48
    ckpts.close()


def test_eval_of_best_and_latest_checkpoints(mnist_idx, tmp_path, prepared_mnist):
    cfg = registry.resolve("quick", SMALL)
    summary = runner.run_experiment(cfg, overrides={}, workdir=tmp_path, progress=False,
                                    echo=lambda *_: None)[0]
    run_dir = tmp_path / "quick" / "seed0"
    best = runner.evaluate_run(run_dir, which="best", split="test")
    assert best["step"] == summary["selected_step"]
    assert best["accuracy"] == summary["test_accuracy"]
    latest = runner.evaluate_run(run_dir, which="latest", split="val")
    assert latest["step"] == summary["steps"]
    assert latest["accuracy"] == summary["final_val_accuracy"]
    assert (run_dir / f"eval-step{latest['step']}-val.json").exists()
    with pytest.raises(ConfigError, match="no checkpoint at step 5"):
        runner.evaluate_run(run_dir, which="5")
    # Test-time augmentation of the trained run, without retraining; deterministic views.
    with pytest.raises(ConfigError, match="needs an augmentation"):
        runner.evaluate_run(run_dir, split="val", tta_views=2)  # the run did not augment
    with pytest.raises(ConfigError, match="unknown augmentation 'shift'"):
        runner.evaluate_run(run_dir, split="val", tta_views=2, tta_augment="shift")
    tta = runner.evaluate_run(run_dir, split="val", tta_views=2, tta_augment="translate")
    assert (tta["tta_views"], tta["tta_augment"]) == (2, "translate")
    assert tta["loss"] != runner.evaluate_run(run_dir, split="val")["loss"]
    again = records.read_json(run_dir / f"eval-step{tta['step']}-val-tta2-translate.json")
    assert again == tta
    assert runner.evaluate_run(run_dir, split="val", tta_views=2,
                               tta_augment="translate") == tta
    with pytest.raises(ConfigError, match="not a run folder"):
        runner.evaluate_run(tmp_path)


def test_a_damaged_checkpoint_falls_back_to_the_one_before(mnist_idx, tmp_path, capsys):
    tr = small_trainer(mnist_idx, "checkpoint.keep=3")
    reference = tr.fit(0, tmp_path / "ref", progress=False)
    run_dir = tmp_path / "run"
    tr.fit(0, run_dir, progress=False)
    (run_dir / records.SUMMARY).unlink()
    steps = sorted(int(p.name) for p in (run_dir / checkpoint.CHECKPOINTS).iterdir()
                   if p.name.isdigit())
    for f in (run_dir / checkpoint.CHECKPOINTS / str(steps[-1]) / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    capsys.readouterr()
    resumed = tr.fit(0, run_dir, progress=False)
    assert strip(resumed) == strip(reference)
    # One warning line that says why, not just the exception's type.
    (warning,) = [line for line in capsys.readouterr().err.splitlines() if "unreadable" in line]
    assert warning.startswith(f"digitjax: warning: checkpoint {steps[-1]} ")
    assert re.search(r"unreadable \(\w+: .+; moved to .+\); trying an earlier one$", warning)
    # Set aside, not left in place: Orbax would have refused to save that step again, and
    # the finished run would have ended on the damaged checkpoint.
    assert (run_dir / checkpoint.DAMAGED / str(steps[-1]) / "state").is_dir()
    _, _, _, state, _ = checkpoint.restore_state(run_dir, "latest")
    assert param_hash(state.params) == reference["final_param_hash"]


def test_checkpoint_cadence_does_not_change_the_numbers(mnist_idx, tmp_path):
    often = small_trainer(mnist_idx, "checkpoint.every_steps=8").fit(0, tmp_path / "a",
                                                                     progress=False)
    rarely = small_trainer(mnist_idx, "checkpoint.every_steps=0").fit(0, tmp_path / "b",
                                                                      progress=False)
    assert often["final_param_hash"] == rarely["final_param_hash"]
    assert often["test_accuracy"] == rarely["test_accuracy"]


@pytest.mark.parametrize("ema", [
    ("train.ema_decay=0.9",),
    # warm-up, and batch-norm statistics averaged too (kept in the checkpoint with the weights)
    ("train.ema_decay=0.9", "train.ema_warmup=true", "train.ema_batch_stats=true",
     "model.name=bn_cnn_half")], ids=["weights", "weights+batch_stats"])
def test_resume_restores_the_weight_average(mnist_idx, tmp_path, ema):
    import shutil

    tr = small_trainer(mnist_idx, *ema, "checkpoint.keep=3")
    reference = tr.fit(0, tmp_path / "ref", progress=False)
    run_dir = tmp_path / "run"
    tr.fit(0, run_dir, progress=False)
    (run_dir / records.SUMMARY).unlink()
    ckpt_dir = run_dir / checkpoint.CHECKPOINTS
    steps = sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())
    shutil.rmtree(ckpt_dir / str(steps[-1]))  # resume from an earlier checkpoint
    assert strip(tr.fit(0, run_dir, progress=False)) == strip(reference)
    assert resumed_from(run_dir) == steps[-2]


def test_a_resumed_run_counts_the_wall_time_of_earlier_attempts(mnist_idx, tmp_path):
    import shutil

    tr = small_trainer(mnist_idx, "checkpoint.keep=3")
    first = tr.fit(0, tmp_path, progress=False)
    (tmp_path / records.SUMMARY).unlink()
    ckpt_dir = tmp_path / checkpoint.CHECKPOINTS
    steps = sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())
    shutil.rmtree(ckpt_dir / str(steps[-1]))  # resume from an earlier checkpoint
    resumed = tr.fit(0, tmp_path, progress=False)
    rows = records.read_metrics(tmp_path / records.METRICS)
    times = [r["time"] for r in rows]
    # The second attempt's rows go on from the first attempt's clock (compiled programs are
    # cached in this process, so without that they would start again near zero).
    assert times == sorted(times) and any(r["step"] > steps[-2] for r in rows)
    assert resumed["total_seconds"] > max(r["time"] for r in rows if r["step"] <= steps[-2])
    assert resumed["final_param_hash"] == first["final_param_hash"]


def test_a_failed_checkpoint_write_is_one_line_naming_the_checkpoint(caplog):
    """TensorStore reports a full disk as a ValueError; Orbax logs it from each thread."""
    import logging

    from digitjax.cli import _storage_error

    tensorstore = ValueError(
        'RESOURCE_EXHAUSTED: Error writing "params.w/0.0" in OCDBT database at local file '
        '"/w/quick/seed0/checkpoints/16.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp/'
        'ocdbt.process_0/": Failed to write 2032345 bytes to file 5: No space left on device '
        "[os_error_code='28']")
    assert _storage_error(tensorstore) == ("/w/quick/seed0/checkpoints/16: "
                                           "No space left on device")
    assert _storage_error(OSError(28, "No space left on device", "/w/x.json")) == (
        "/w/x.json: No space left on device")
    assert _storage_error(ValueError("a bug")) is None  # not a storage error: a traceback
    absl = logging.getLogger("absl")

    def log(message, exc=None, where="site-packages/orbax/checkpoint/_src/futures/future.py"):
        absl.handle(absl.makeRecord("absl", logging.ERROR, where, 1, message, (),
                                    (type(exc), exc, None) if exc else None))

    with caplog.at_level(logging.ERROR, logger="absl"):
        log(f"save thread raised an exception: {tensorstore}")
        log("commit failed", OSError(28, "No space left on device"))
        log("something else broke")
        log(f"not Orbax: {tensorstore}", where="site-packages/tensorflow_datasets/core/x.py")
    assert [r.getMessage() for r in caplog.records] == ["something else broke",
                                                         f"not Orbax: {tensorstore}"]


def test_a_stop_after_any_chunk_resumes_to_the_uninterrupted_records(mnist_idx, tmp_path):
    """Ctrl-C/SIGTERM lands between two compiled calls: whichever call it follows (mid-epoch,
    or an epoch's last, whose evaluation must still happen), the resumed run's records are
    the uninterrupted run's."""
    from _faults import final_records

    from digitjax.stop import Interrupted

    tr = small_trainer(mnist_idx)
    tr.fit(0, tmp_path / "ref", progress=False)
    reference = final_records(tmp_path / "ref")
    chunks = 2 * tr.steps_per_epoch // 4  # SMALL: 2 epochs, 4 steps per call
    run_chunk = tr.run_chunk
    for k in range(1, chunks):
        stop, calls = StopAfter(), []

        def counted(*args, stop=stop, calls=calls, k=k):
            calls.append(1)
            if len(calls) == k:
                stop.requested = signal.SIGTERM  # seen right after this call returns
            return run_chunk(*args)

        tr.run_chunk = counted
        with pytest.raises(Interrupted):
            tr.fit(0, tmp_path / str(k), progress=False, stop=stop)
        tr.run_chunk = run_chunk
        assert not (tmp_path / str(k) / records.SUMMARY).exists()
        tr.fit(0, tmp_path / str(k), progress=False, stop=StopAfter())
        check_final_records(tmp_path / str(k), reference)  # the folder says which chunk
        assert resumed_from(tmp_path / str(k)) == 4 * k


def test_a_checkpoint_inside_a_chunk_resumes_every_remaining_step(mnist_idx, tmp_path,
                                                                   monkeypatch, capsys):
    """steps_per_call left to the backend (12 on a CPU, 100 on a GPU) can differ between the
    machine that saved a checkpoint and the one resuming it: the chunk the checkpoint falls
    inside is finished, not skipped (it was, silently: a shorter run marked completed)."""
    from digitjax import train
    from digitjax.stop import Interrupted

    auto = ["train.steps_per_call=0", "train.log_every_steps=4", "checkpoint.every_steps=4"]

    def trainer(steps_per_call):
        monkeypatch.setitem(train.BACKEND_DEFAULTS, "cpu",
                            {**train.BACKEND_DEFAULTS["cpu"], "steps_per_call": steps_per_call})
        return small_trainer(mnist_idx, *auto)

    tr = trainer(4)
    tr.fit(0, tmp_path / "ref", progress=False)
    reference = records.read_json(tmp_path / "ref" / records.SUMMARY)
    first, stop, calls = trainer(2), StopAfter(), []
    run_chunk = first.run_chunk

    def counted(*args):
        calls.append(1)
        if len(calls) == 3:  # after step 6: inside the 4-step chunk [4, 8)
            stop.requested = signal.SIGTERM
        return run_chunk(*args)

    first.run_chunk = counted
    with pytest.raises(Interrupted):
        first.fit(0, tmp_path / "run", progress=False, stop=stop)
    second = trainer(4)
    capsys.readouterr()
    summary = second.fit(0, tmp_path / "run", progress=False, stop=StopAfter())
    assert resumed_from(tmp_path / "run") == 6
    # The record and a warning say the run was trained with two chunkings.
    config = records.read_json(tmp_path / "run" / records.CONFIG)
    assert config["execution"]["steps_per_call"] == 4
    assert config["execution_before_resume"]["steps_per_call"] == 2
    assert "trained before with other settings (steps_per_call 2 -> 4)" in capsys.readouterr().err
    assert summary["steps"] == reference["steps"] == second.num_steps
    rows = records.read_metrics(tmp_path / "run" / records.METRICS)
    ref_rows = records.read_metrics(tmp_path / "ref" / records.METRICS)
    assert [(r["step"], r["split"]) for r in rows] == [(r["step"], r["split"]) for r in ref_rows]
    # The same batches in the same order; chunks of 2 and 4 steps may round differently.
    assert summary["test_accuracy"] == pytest.approx(reference["test_accuracy"], abs=0.01)


class StopAfter:
    """A stop request the test sets, in place of the SIGINT/SIGTERM handler."""

    requested = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def test_a_mid_epoch_checkpoint_carries_the_time_trained_so_far(mnist_idx, tmp_path):
    # A run killed after it and resumed from it must not lose that part of the epoch.
    tr = small_trainer(mnist_idx, "checkpoint.keep=4")
    tr.fit(0, tmp_path, progress=False)
    assert 8 < tr.steps_per_epoch  # SMALL saves every 8 steps: step 8 is mid-epoch
    meta = checkpoint.restore_state(tmp_path, 8)[4]
    assert meta["epoch"] == 0 and meta["train_seconds"] > 0
