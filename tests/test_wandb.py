"""W&B mirrors the run records: checked by reading the offline run's log back, never online."""

import time

import pytest

from digitjax import cli, compare, data_device, records, registry, wandb_log, wandb_offline
from digitjax.config import ConfigError, to_dict
from digitjax.train import Trainer


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """W&B offline and silent, its caches in tmp, not logged in, no server to reach."""
    for var in ("WANDB_API_KEY", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_DISABLED",
                "WANDB_IDENTITY_TOKEN_FILE", "WANDB_DIR", "WANDB_INIT_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "wandb_home"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(home / var.lower()))
    monkeypatch.setenv("NETRC", str(home / "no-netrc"))
    # Anything that still tried to go online would hit a closed local port.
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    return home


@pytest.fixture(scope="module")
def trainer(mnist_idx):
    """quick on 1,024 real MNIST images: 2 epochs of 16 steps, a train row every 4 steps."""
    (x, y), (tx, ty) = mnist_idx
    data = data_device.from_arrays((x[:1024], y[:1024]), (x[-500:], y[-500:]),
                                   (tx[:500], ty[:500]), num_classes=10, eval_batch_size=250)
    config = registry.resolve("quick", ["train.steps_per_call=4", "train.log_every_steps=4",
                                        "train.epochs=2", "train.batch_size=64"])
    return Trainer(config, data)


def read_offline(run_dir, timeout_s=10.0):
    """The run's only offline W&B run, once its exit record is on disk (wandb-core may
    still be flushing for a few ms after finish() returns)."""
    found = wandb_offline.find_runs(run_dir / "wandb")
    assert len(found) == 1, found
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            run = wandb_offline.read_run(found[0])
        except wandb_offline.FormatError:
            run = None
        if (run is not None and run.exit_code is not None) or time.monotonic() > deadline:
            assert run is not None
            return run
        time.sleep(0.05)


def expected_history(rows):
    """What W&B should hold for metrics.jsonl rows: (step, {key: value}) per history row,
    one per train row and one per evaluation (its val and test rows)."""
    out = []
    for r in rows:
        values = {f"{r['split']}/{k}": v for k, v in r.items() if k not in ("step", "epoch",
                                                                              "split")}
        if r["split"] == "test":
            out[-1][1].update(values)
        else:
            out.append((r["step"], {"epoch": r["epoch"], **values}))
    return out


def assert_history(run, rows):
    expected = expected_history(rows)
    assert [h["step"] for h in run.history] == [step for step, _ in expected]
    for h, (_, values) in zip(run.history, expected, strict=True):
        assert {k: h[k] for k in values} == values


def test_offline_run_mirrors_the_run_records(trainer, tmp_path, wandb_env):
    run_dir = tmp_path / "quick" / "seed3"
    make = wandb_log.WandbLoggers("auto")  # WANDB_MODE=offline
    assert make.mode == "offline"
    summary = trainer.fit(3, run_dir, progress=False, loggers=make(3, run_dir))
    config = records.read_json(run_dir / records.CONFIG)
    rows = records.read_metrics(run_dir / records.METRICS)
    run = read_offline(run_dir)

    assert run.run_id == (run_dir / wandb_log.RUN_ID_FILE).read_text().strip()
    assert (run.project, run.group, run.job_type, run.name) == (
        "digitjax", "quick", "train", "quick-seed3")
    assert run.tags == ["data:mnist", "model:flax_cnn", "augment:none"]
    assert run.config["config"] == config["config"]  # the full resolved config
    assert {k: run.config[k] for k in ("model", "augmentation", "optimizer", "learning_rate",
                                       "seed", "batch_size", "epochs", "config_hash",
                                       "git_commit", "study")} == {
        "model": "flax_cnn", "augmentation": "none", "optimizer": "sgd",
        "learning_rate": 0.1, "seed": 3, "batch_size": 64, "epochs": 2,
        "config_hash": config["config_hash"],
        "git_commit": config["environment"]["git_commit"], "study": ""}

    assert len(rows) == 8 + 2 * 2  # 8 train rows, 2 evaluations of val and test
    assert len(run.history) == 8 + 2
    assert_history(run, rows)

    for key in ("status", "test_accuracy", "val_accuracy", "best_val_accuracy", "num_params",
                "train_seconds", "total_seconds", "images_per_second", "selected_epoch"):
        assert run.summary[key] == summary[key], key
    assert run.summary["test/accuracy"] == summary["test_accuracy"]
    assert run.summary["val/accuracy"] == {"max": summary["best_val_accuracy"]}
    # Losses too are the reported checkpoint's, not the last evaluation's.
    assert run.summary["val/loss"] == summary["val_loss"]
    assert run.summary["test/loss"] == summary["test_loss"]
    assert run.exit_code == 0


class Killed(Exception):
    pass


def test_run_killed_after_an_eval_resumes_into_a_complete_offline_run(
        trainer, tmp_path, wandb_env, monkeypatch):
    """The real loop: stopped after epoch 2's evaluation, before its checkpoint; the rerun
    resumes from epoch 1's checkpoint, recomputes epoch 2, and W&B ends up like the files."""
    from digitjax import faults
    evals = []

    def point(name):
        if name == "eval":
            evals.append(name)
            if len(evals) == 2:
                raise Killed

    monkeypatch.setattr(faults, "point", point)
    run_dir = tmp_path / "quick" / "seed0"
    make = wandb_log.WandbLoggers("offline")
    first = make(0, run_dir)
    with pytest.raises(Killed):
        trainer.fit(0, run_dir, progress=False, loggers=first)
    first[0].run.finish(exit_code=1)  # what W&B sees of a killed process: no clean exit
    summary = trainer.fit(0, run_dir, progress=False, loggers=make(0, run_dir))
    assert records.read_json(run_dir / records.CONFIG)["resumed_from_step"] == 16
    run = read_offline(run_dir)
    assert_history(run, records.read_metrics(run_dir / records.METRICS))
    assert len(run.history) == 8 + 2
    assert run.summary["test/accuracy"] == summary["test_accuracy"]
    assert len(list((run_dir / "wandb" / wandb_log.SUPERSEDED).iterdir())) == 1


def test_a_fresh_start_is_a_new_wandb_run(trainer, tmp_path, wandb_env):
    """`--fresh` (or a restart before the first checkpoint) starts the records over, so it
    gets a new W&B id: the old one would resume the earlier run and keep its history."""
    run_dir = tmp_path / "quick" / "seed0"
    make = wandb_log.WandbLoggers("offline")
    trainer.fit(0, run_dir, progress=False, loggers=make(0, run_dir))
    old_id = read_offline(run_dir).run_id
    summary = trainer.fit(0, run_dir, progress=False, loggers=make(0, run_dir), resume=False)
    run = read_offline(run_dir)  # the only offline run left for `wandb sync`
    assert run.run_id != old_id
    assert run.run_id == (run_dir / wandb_log.RUN_ID_FILE).read_text().strip()
    assert_history(run, records.read_metrics(run_dir / records.METRICS))
    assert run.summary["test/accuracy"] == summary["test_accuracy"]


def config_record(name="exp", seed=0, overrides=None, resumed_from_step=None):
    config = to_dict(registry.resolve("quick"))
    config["name"] = name
    return {"config": config, "seed": seed, "config_hash": "0123456789ab", "num_params": 10,
            "environment": {"git_commit": "deadbeef"}, "overrides": overrides or {},
            "resumed_from_step": resumed_from_step}


def train_row(step, loss):
    return {"step": step, "epoch": step / 8, "split": "train", "loss": loss, "accuracy": 0.5,
            "learning_rate": 0.1, "time": step / 10}


def eval_rows(step, val, test):
    return [{"step": step, "epoch": step // 8, "split": split, "loss": 1 - acc,
             "accuracy": acc, "time": step / 10} for split, acc in (("val", val),
                                                                     ("test", test))]


# Three epochs of 8 steps; validation peaks at epoch 2, where test is neither its max nor
# its last value: the summary must report that epoch's test accuracy.
ROWS = [train_row(4, 2.0), train_row(8, 1.5), *eval_rows(8, 0.7, 0.99),
        train_row(12, 1.2), train_row(16, 1.0), *eval_rows(16, 0.9, 0.6),
        train_row(20, 0.9), train_row(24, 0.8), *eval_rows(24, 0.8, 0.7)]
SUMMARY = {"status": "completed", "test_accuracy": 0.6, "test_loss": 0.4, "val_accuracy": 0.9,
           "val_loss": 0.1,
           "best_val_accuracy": 0.9, "num_params": 10, "train_seconds": 2.0,
           "total_seconds": 3.0, "images_per_second": 100.0, "seed": 0}


def play(logger, run_dir, rows):
    """Feed rows the way the training loop does: append to metrics.jsonl, then log."""
    batches, i = [], 0
    while i < len(rows):
        n = 1 if rows[i]["split"] == "train" else 2
        batches.append(rows[i:i + n])
        i += n
    for batch in batches:
        records.append_metrics(run_dir / records.METRICS, batch)
        logger.log(batch)


def test_offline_resume_writes_one_complete_run_and_sets_earlier_attempts_aside(
        tmp_path, wandb_env, monkeypatch):
    monkeypatch.setenv("WANDB_PROJECT", "digitjax-test")
    run_dir = tmp_path / "exp" / "seed0"
    run_dir.mkdir(parents=True)
    make = wandb_log.WandbLoggers("offline")
    first = make(0, run_dir)[0]
    first.start(config_record(), run_dir)
    play(first, run_dir, ROWS[:8])  # up to the epoch-2 evaluation
    first.run.finish(exit_code=1)  # then the process dies
    run_id = (run_dir / wandb_log.RUN_ID_FILE).read_text().strip()

    # The resume: metrics.jsonl cut back to the checkpoint at step 8, rows after it again.
    records.truncate_metrics(run_dir / records.METRICS, 8)
    second = make(0, run_dir)[0]
    second.start(config_record(resumed_from_step=8), run_dir)
    play(second, run_dir, ROWS[4:])
    second.finish(SUMMARY)

    run = read_offline(run_dir)  # the only offline-run-* left for `wandb sync`
    assert run.run_id == run_id and run.project == "digitjax-test"
    assert_history(run, ROWS)  # nothing lost, nothing doubled
    superseded = list((run_dir / "wandb" / wandb_log.SUPERSEDED).glob("offline-run-*"))
    assert len(superseded) == 1 and superseded[0].name.endswith(run_id)
    assert run.summary["test/accuracy"] == 0.6  # the reported one: not max (0.99), last (0.7)
    assert run.summary["test/loss"] == 0.4 and run.summary["val/loss"] == 0.1  # not last
    assert run.summary["val/accuracy"] == {"max": 0.9}


class FakeRun:
    """Stands in for an online W&B run that the server resumes with `starting_step` rows."""

    def __init__(self, starting_step):
        self.resumed, self.starting_step = starting_step > 0, starting_step
        self.logged, self.summary, self.exit_code = [], {}, None
        self.settings = type("S", (), {"mode": "online", "sync_dir": ""})()
        self.url = "https://wandb.example/run"

    def define_metric(self, *args, **kwargs):
        pass

    def log(self, payload):
        self.logged.append(payload)

    def finish(self, exit_code=None):
        self.exit_code = exit_code


def test_online_resume_logs_only_the_rows_the_server_lacks(tmp_path, wandb_env, monkeypatch):
    import wandb

    run_dir = tmp_path / "exp" / "seed0"
    run_dir.mkdir(parents=True)
    (run_dir / wandb_log.RUN_ID_FILE).write_text("abcd1234\n")
    fake, calls = FakeRun(starting_step=4), []
    monkeypatch.setattr(wandb, "init", lambda **kw: calls.append(kw) or fake)
    records.append_metrics(run_dir / records.METRICS, ROWS[:4])  # checkpoint at step 8
    logger = wandb_log.WandbLoggers("online", env={"WANDB_API_KEY": "k"})(0, run_dir)[0]
    logger.start(config_record(resumed_from_step=8), run_dir)
    # The server got 4 history rows before the kill (steps 4, 8, eval 8, 12): only the
    # rows after those are sent; step 12 is recomputed but not sent twice.
    play(logger, run_dir, ROWS[4:])
    logger.finish(SUMMARY)
    assert calls[0]["mode"] == "online" and calls[0]["resume"] == "allow"
    assert calls[0]["id"] == "abcd1234" and calls[0]["reinit"] == "create_new"
    assert [p["step"] for p in fake.logged] == [16, 16, 20, 24, 24]
    assert fake.summary["test/accuracy"] == 0.6 and fake.exit_code == 0


def test_failed_online_start_falls_back_to_offline_once_per_process(
        tmp_path, wandb_env, monkeypatch, capsys):
    import wandb

    real_init, online_tries = wandb.init, []

    def init(**kwargs):
        if kwargs["mode"] == "online":
            online_tries.append(kwargs)
            raise wandb.errors.CommError("Timed out initializing run")
        return real_init(**kwargs)

    monkeypatch.setattr(wandb, "init", init)
    make = wandb_log.WandbLoggers("online", env={"WANDB_API_KEY": "k"})
    for seed in (0, 1):
        run_dir = tmp_path / "exp" / f"seed{seed}"
        run_dir.mkdir(parents=True)
        logger = make(seed, run_dir)[0]
        logger.start(config_record(seed=seed), run_dir)
        play(logger, run_dir, ROWS)
        logger.finish(SUMMARY)
        assert read_offline(run_dir).name == f"exp-seed{seed}"
    assert len(online_tries) == 1  # the second seed did not wait for a timeout again
    err = capsys.readouterr().err
    assert err.count("could not start an online run (CommError); logging offline") == 1


@pytest.mark.parametrize("where,stage", [("init", "start"), ("log", "log")])
def test_wandb_errors_never_stop_training(trainer, tmp_path, wandb_env, monkeypatch, capsys,
                                          where, stage):
    import wandb

    def boom(*args, **kwargs):
        raise RuntimeError("W&B is down")

    if where == "init":
        monkeypatch.setattr(wandb, "init", boom)
    else:
        monkeypatch.setattr(wandb.Run, "log", boom)
    run_dir = tmp_path / "quick" / "seed0"
    summary = trainer.fit(0, run_dir, progress=False,
                          loggers=wandb_log.WandbLoggers("offline")(0, run_dir))
    assert summary["status"] == "completed" and summary["steps"] == 32
    rows = records.read_metrics(run_dir / records.METRICS)
    assert len(rows) == 12 and rows[-1]["step"] == 32
    assert records.read_json(run_dir / records.SUMMARY) == summary
    err = capsys.readouterr().err
    assert err.count(f"stopped logging after an error in {stage} (RuntimeError: W&B is down)"
                     ) == 1


def test_mode_follows_the_flag_then_wandb_mode_then_credentials(tmp_path):
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai login user password k\n")
    home = {"HOME": str(tmp_path)}  # no wandb settings file: the public server
    none, key = {**home, "NETRC": str(tmp_path / "missing")}, {**home, "NETRC": str(netrc)}
    up, down = (lambda url: True), (lambda url: False)
    cases = [
        ("off", key, up, "off", ""),
        ("offline", key, up, "offline", ""),
        ("online", {**key, "WANDB_MODE": "offline"}, down, "online", ""),  # the flag wins
        ("online", none, up, "offline", "no API key"),
        ("auto", {**key, "WANDB_MODE": "disabled"}, up, "off", ""),
        ("auto", {**key, "WANDB_MODE": "offline"}, up, "offline", ""),
        ("auto", {**none, "WANDB_MODE": "online"}, up, "offline", "no API key"),
        ("auto", none, up, "offline", ""),  # not logged in: offline is the default
        ("auto", {**none, "WANDB_API_KEY": "k"}, up, "online", ""),
        ("auto", key, up, "online", ""),
        ("auto", key, down, "offline", "api.wandb.ai unreachable"),
    ]
    for choice, env, probe, mode, warning in cases:
        got, why = wandb_log.resolve_mode(choice, env, probe)
        assert got == mode and (warning in why if warning else why == ""), (choice, env)
    with pytest.raises(ConfigError, match="--wandb 'maybe'"):
        wandb_log.resolve_mode("maybe", none)


def test_credentials_of_a_self_hosted_server_are_found_as_wandb_finds_them(tmp_path):
    netrc = tmp_path / "netrc"
    netrc.write_text("machine localhost:8080 login user password k\n")  # wandb login --host
    env = {"NETRC": str(netrc), "HOME": str(tmp_path)}
    assert not wandb_log.api_key_available(env)  # the public server has no entry
    assert wandb_log.api_key_available({**env, "WANDB_BASE_URL": "http://localhost:8080"})
    # Without the variable, the server comes from wandb's settings file, as for wandb.
    settings = tmp_path / ".config" / "wandb" / "settings"
    settings.parent.mkdir(parents=True)
    settings.write_text("[default]\nbase_url = http://localhost:8080\n")
    assert wandb_log.base_url(env) == "http://localhost:8080"
    assert wandb_log.api_key_available(env)
    assert wandb_log.resolve_mode("auto", env, lambda url: url == "http://localhost:8080") == (
        "online", "")


def test_cli_run_passes_the_wandb_mode(tmp_path, wandb_env, monkeypatch):
    from digitjax import runner

    seen = []
    monkeypatch.setattr(runner, "run_experiment",
                        lambda config, **kw: seen.append(kw["make_loggers"]) or [])
    for flag in ("off", "offline", "auto"):
        assert cli.main(["run", "quick", "--wandb", flag, "--workdir", str(tmp_path)]) == 0
    assert seen[0] is None
    assert seen[1].mode == "offline" and seen[2].mode == "offline"  # auto + WANDB_MODE


def write_run(folder, name, seed, test_acc, *, status="completed", overrides=None,
              device=None):
    folder.mkdir(parents=True)
    record = config_record(name, seed, overrides)
    if device:
        record["environment"]["device_kind"] = device
    records.write_json(folder / records.CONFIG, record)
    records.write_json(folder / records.SUMMARY, {
        "status": status, "seed": seed, "config_hash": "0123456789ab",
        "test_accuracy": test_acc, "val_accuracy": test_acc + 0.01, "train_seconds": 10.0 + seed,
        "images_per_second": 1000.0})


def table_rows(text):
    return {line.split()[0]: line.split() for line in text.splitlines()[1:]
            if line and not line.startswith("(")}


def test_compare_prints_mean_and_std_over_seeds(tmp_path, wandb_env, capsys):
    workdir = tmp_path / "runs"
    write_run(workdir / "a" / "seed0", "a", 0, 0.90)
    write_run(workdir / "a" / "seed1", "a", 1, 0.92)
    write_run(workdir / "a" / "seed2", "a", 2, 0.10, status="diverged")  # not counted
    variant = "a+" + records.overrides_tag({"train.epochs": "2"})
    write_run(workdir / variant / "seed0", "a", 0, 0.50, overrides={"train.epochs": "2"})
    write_run(workdir / "b" / "seed0", "b", 0, 0.97)
    # A run folder copied from another machine, at another depth, counts with its experiment.
    write_run(workdir / "from-gpu-box" / "b" / "seed1", "b", 1, 0.99)
    # A seed whose files are gone but whose offline W&B run was copied: read from W&B's log.
    w_dir = workdir / "b" / "seed2"
    w_dir.mkdir(parents=True)
    logger = wandb_log.WandbLoggers("offline")(2, w_dir)[0]
    logger.start(config_record("b", 2), w_dir)
    play(logger, w_dir, ROWS)
    logger.finish({**SUMMARY, "seed": 2, "test_accuracy": 0.98, "config_hash": "0123456789ab"})
    read_offline(w_dir)
    (w_dir / records.METRICS).unlink()

    code = cli.main(["compare", "a", "b", "--workdir", str(workdir)])
    out = capsys.readouterr().out
    assert code == 0
    rows = table_rows(out)
    assert rows["a"][1:5] == ["2", "91.00", "+-", "1.41"]  # test acc: mean 91.00, std 1.41
    assert rows[variant][1:3] == ["1", "50.00"] and "+-" not in rows[variant]  # one seed
    assert rows["b"][1:5] == ["3", "98.00", "+-", "1.00"]
    assert "(not counted: 1 diverged run)" in out
    # Only the named experiments, and NAME+hash exactly.
    assert list(table_rows(compare.compare([variant], workdir=workdir))) == [variant]


def test_compare_keeps_runs_of_other_devices_apart(tmp_path):
    # The same experiment and seeds on a CPU and on a GPU: two rows, each naming its device,
    # never one row averaging (or one device hiding) the other.
    for seed, acc in ((0, 0.90), (1, 0.92)):
        write_run(tmp_path / "cpu" / "a" / f"seed{seed}", "a", seed, acc, device="cpu")
        write_run(tmp_path / "gpu" / "a" / f"seed{seed}", "a", seed, acc + 0.05,
                  device="NVIDIA H100")
    write_run(tmp_path / "gpu" / "b" / "seed0", "b", 0, 0.99, device="NVIDIA H100")
    lines = compare.compare(["a", "b"], workdir=tmp_path).splitlines()[1:]
    assert [line.split("  ")[0] for line in lines] == [
        "a [NVIDIA H100]", "a [cpu]", "b [NVIDIA H100]"]
    assert "91.00" in lines[1] and "96.00" in lines[0]
    # One device alone: no labels needed.
    assert compare.compare(["a"], workdir=tmp_path / "cpu").splitlines()[1].split()[0:2] == [
        "a", "2"]


def test_compare_of_an_experiment_without_runs_is_one_line_and_exit_2(tmp_path, capsys):
    write_run(tmp_path / "a" / "seed0", "a", 0, 0.9)
    code = cli.main(["compare", "a", "nope", "--workdir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "no runs of nope in" in err and "runs there: a" in err


def test_reader_rejects_a_file_that_is_not_a_wandb_log(tmp_path):
    bad = tmp_path / "run-x.wandb"
    bad.write_bytes(b"not a log at all")
    with pytest.raises(wandb_offline.FormatError, match="not a W&B log"):
        wandb_offline.read_run(bad)
