"""Shared helpers of the fault tests, and the tally the session prints at its end.

A small real run (`SMALL`) is started as a user starts it (a `digitjax` subprocess), killed,
resumed and its final records compared with an uninterrupted run's. Every kill, bad input,
corrupt file and comparison is counted in `TALLY`; tests/conftest.py prints the counts.

`python tests/_faults.py ARGS...` is `digitjax ARGS...` with the test study `faults`
registered (a run that diverges, then two seeds of a linear model on 2,048 digits), so a
sweep can be killed in a subprocess in seconds.
"""

from __future__ import annotations

import collections
import signal
import subprocess
import sys
from pathlib import Path

TIMING = {"time", "train_seconds", "compile_seconds", "eval_seconds", "total_seconds",
          "images_per_second"}
# A small real run: 2,048 training images, batch 64 -> 32 steps per epoch, 2 epochs, a
# compiled call of 4 steps, a log line every 8 steps and a checkpoint every 8 steps.
SMALL = ["data.train_split=train[:2048]", "data.val_split=train[55000:56000]",
         "data.test_split=test[:1000]", "train.batch_size=64", "train.epochs=2",
         "train.steps_per_call=4", "train.log_every_steps=8", "checkpoint.every_steps=8",
         "checkpoint.keep=1"]

RUN_FLAGS = ["--no-progress", "--no-plots", "--wandb", "off"]

# What the fault tests tried and how it ended, summed over the session.
TALLY: collections.Counter = collections.Counter()
FAULT_SEED = {"seed": None}  # the seed of the random kill moments, set by a fixture


def strip(d: dict) -> dict:
    return {k: v for k, v in d.items() if k not in TIMING}


def final_records(run_dir: Path):
    """summary.json and metrics.jsonl without their timings: what must not change."""
    from digitjax import records

    summary = strip(records.read_json(run_dir / records.SUMMARY))
    rows = [strip(r) for r in records.read_metrics(run_dir / records.METRICS)]
    return summary, rows


def check_final_records(run_dir: Path, reference) -> None:
    """Assert a run's final records equal the uninterrupted run's, and count it."""
    TALLY["runs compared"] += 1
    assert final_records(run_dir) == reference, run_dir
    TALLY["runs correct"] += 1


def start(workdir: Path, env: dict, fault: str | None = None,
          argv: list[str] | None = None) -> subprocess.Popen:
    """`digitjax run quick --seed 0` with the SMALL settings (or `argv`) in a subprocess;
    `fault` sets DIGITJAX_FAULT (see digitjax/faults.py)."""
    argv = argv or (["-m", "digitjax", "run", "quick", "--seed", "0", "--no-progress",
                     "--workdir", str(workdir)] + [a for s in SMALL for a in ("--set", s)])
    env = {k: v for k, v in env.items() if k != "DIGITJAX_FAULT"}
    if fault:
        env["DIGITJAX_FAULT"] = fault
    proc = subprocess.Popen([sys.executable, *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.fault = fault
    return proc


def start_sweep(workdir: Path, env: dict, fault: str | None = None) -> subprocess.Popen:
    """`digitjax sweep faults` (the test study) in a subprocess."""
    return start(workdir, env, fault, [__file__, "sweep", STUDY, "--workdir", str(workdir),
                                       "--no-progress", "--no-plots", "--wandb", "off"])


def finish(proc: subprocess.Popen, timeout: float = 300):
    """(exit code, stdout, stderr); a process that died by SIGKILL counts as a kill."""
    out, err = proc.communicate(timeout=timeout)
    if proc.returncode == -signal.SIGKILL:
        TALLY["kills at named points" if proc.fault else "kills at random moments"] += 1
    return proc.returncode, out, err


def _metrics_times(workdir: Path | None) -> dict:
    times = {}
    # Not rglob: Orbax deletes old checkpoint folders while the walk would be inside them.
    for path in workdir.glob("*/seed*/metrics.jsonl") if workdir else ():
        try:
            times[path] = path.stat().st_mtime_ns
        except FileNotFoundError:  # a fresh start deletes it
            pass
    return times


def kill_after(proc: subprocess.Popen, seconds: float, workdir: Path | None = None) -> bool:
    """SIGKILL `proc` `seconds` after now unless it ends first; True if it was killed.

    With `workdir`, a kill after this process wrote or cut back a metrics.jsonl there (it
    was training, not starting up) is also counted apart: kills during start-up test less.
    """
    before = _metrics_times(workdir)
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        if _metrics_times(workdir).items() - before.items():
            TALLY["random kills after training began"] += 1
        proc.kill()
    code, _, err = finish(proc)
    assert code in (0, -signal.SIGKILL), err
    return code == -signal.SIGKILL


def resumed_from(run_dir: Path) -> int | None:
    """The step the last attempt restored (config.json), None for a start from scratch:
    equal final records alone cannot tell a resume from a deterministic retrain."""
    from digitjax import records

    return records.read_json(run_dir / records.CONFIG)["resumed_from_step"]


def run_dir_of(workdir: Path) -> Path:
    (folder,) = [p for p in workdir.iterdir() if p.name.startswith("quick+")]
    return folder / "seed0"


# -- the test study `faults` --------------------------------------------------------------

STUDY = "faults"
# The linear model on the SMALL slice: a sweep of it takes seconds. Plain SGD warming up
# over 2 epochs to a learning rate of 5e36 overflows the logits after two checkpoints but
# before the first evaluation (loss inf at step 19 on x86 CPU), so the run has a last
# good checkpoint to keep.
LINEAR = {**dict(s.split("=", 1) for s in SMALL), "model.name": "linear"}
DIVERGE = {**LINEAR, "optimizer.learning_rate": "5e36", "optimizer.momentum": "0",
           "schedule.warmup_epochs": "2"}


def fault_study():
    """(experiments, study) of the test study: the diverging run first, so a sweep must
    move on past it."""
    from digitjax import registry

    base = registry.get("quick").config
    exps = [registry.experiment("fault_diverge", "diverges after its first checkpoints", base,
                                {**DIVERGE, "seeds": (0,)}),
            registry.experiment("fault_linear", "linear model on 2,048 digits", base,
                                {**LINEAR, "seeds": (0, 1)})]
    return exps, registry.Study(STUDY, "fault tests", tuple(e.name for e in exps))


def install_fault_study(setattr) -> None:
    """Register the test study through `setattr` (monkeypatch.setattr in tests)."""
    from digitjax import registry

    exps, study = fault_study()
    experiments = {**registry.registry(), **{e.name: e for e in exps}}
    studies = {**registry.studies(), STUDY: study}
    setattr(registry, "registry", lambda: experiments)
    setattr(registry, "studies", lambda: studies)


def sweep_records(workdir: Path) -> dict:
    """Every run's final records and the ensemble of a `faults` sweep (no absolute paths)."""
    from digitjax import records

    out = {}
    for run_dir in sorted(workdir.glob("fault_*/seed*")):
        out[f"{run_dir.parent.name}/{run_dir.name}"] = final_records(run_dir)
    for path in sorted(workdir.glob("fault_*/ensemble.json")):
        out[path.parent.name] = records.read_json(path)  # members' run folders are relative
    return out


def check_sweep_records(workdir: Path, reference: dict) -> None:
    """Assert every run of a sweep ended with the uninterrupted sweep's records."""
    found = sweep_records(workdir)
    assert set(found) == set(reference)
    for name, ref in reference.items():
        if "/" in name:
            TALLY["runs compared"] += 1
            assert found[name] == ref, name
            TALLY["runs correct"] += 1
        else:
            assert found[name] == ref, name


def summary_lines() -> list[str]:
    """What the session's fault tests tried, for the terminal summary."""
    t = TALLY
    if not t:
        return []
    kills = t["kills at named points"] + t["kills at random moments"]
    seed = FAULT_SEED["seed"]
    return [
        f"kills: {kills} SIGKILLs ({t['kills at named points']} at named fault points, "
        f"{t['kills at random moments']} at seeded random moments"
        + (f" of which {t['random kills after training began']} after training began"
           if t["random kills after training began"] else "")
        + (f"; seed {seed}" if seed is not None else "") + ")",
        f"bad inputs: {t['bad inputs']} tried, {t['bad inputs refused']} refused with one line "
        "and exit code 2, nothing written",
        f"corrupt files: {t['corrupt files']} tried, {t['corrupt files handled']} refused "
        "with one line or recovered from",
        f"full disk: {t['full disk']} writes failed on a full disk, "
        f"{t['full disk intact']} left the previous files intact",
        f"runs after faults: {t['runs correct']} of {t['runs compared']} ended with the "
        "uninterrupted run's final records",
    ]


if __name__ == "__main__":
    import digitjax  # noqa: F401  (sets the XLA flags before jax loads, as the CLI does)
    from digitjax import cli

    install_fault_study(setattr)
    sys.exit(cli.main(sys.argv[1:]))
