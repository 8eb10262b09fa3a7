"""Benchmark 5: process start to the first training step, peak RSS of a whole run, and
the time and size of a fresh install.

Start-up: `digitjax run quick` runs in a child Python that wraps four library functions
with timestamps (data_device.load, Trainer.init_state, Trainer.compile and
Trainer.run_chunk, whose first call dispatches the first training step), then calls the
CLI's `main` as the `digitjax` script does. Start = time.time() just before the spawn; the
wrappers cost microseconds, and the child's peak RSS (os.wait4) is the run's. The first
training step comes after compilation, which digitjax does ahead of time per chunk size.

Install: `python3 -m venv` + `pip install -c constraints.txt -e .` into a temporary folder,
timed, with pip's cache off (--no-cache-dir) unless --pip-cache; `du` of the venv. pip reads
wheels from wherever pip is configured (recorded): a local mirror makes it faster than a
download from PyPI.

    python benchmarks/startup.py                    # 3 runs of quick + an install, ~5 min
    python benchmarks/startup.py --repeats 1 --set 'data.train_split=train[:2560]' \
        --skip-install --force                      # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import _common

TARGET_FIRST_STEP_SECONDS = 8.0
TARGET_RSS_GB = 1.0
TARGET_INSTALL_SECONDS = 90.0
TARGET_INSTALL_GB = 1.2
MARKS_ENV = "DIGITJAX_BENCH_MARKS"
PREPARE = ("import sys; from digitjax import data; "
           "data.prepare('mnist', data_dir=sys.argv[1] or None, progress=False)")

# The child: time stamps around the library calls of `digitjax run`, then the CLI itself.
INSTRUMENTED = r"""
import json, os, sys, time
marks = {"interpreter": time.time()}
rc = 1
try:
    from digitjax import cli, data_device, train
    marks["imports"] = time.time()

    def stamp(owner, name, before, after=None):
        fn = getattr(owner, name)

        def wrapped(*a, **k):
            marks.setdefault(before, time.time())
            out = fn(*a, **k)
            if after:
                marks.setdefault(after, time.time())
            return out

        setattr(owner, name, wrapped)

    stamp(data_device, "load", "data_start", "data_done")
    stamp(train.Trainer, "init_state", "init_start", "init_done")
    stamp(train.Trainer, "compile", "compile_start", "compile_done")
    stamp(train.Trainer, "run_chunk", "first_step")
    sys.argv[0] = "digitjax"
    rc = cli.main(sys.argv[1:])
finally:
    marks["exit"] = time.time()
    with open(os.environ["DIGITJAX_BENCH_MARKS"], "w") as f:
        json.dump(marks, f)
sys.exit(rc)
"""

# (label, from mark, to mark); "spawn" is the parent's clock just before the spawn.
PHASES = [
    ("interpreter start", "spawn", "interpreter"),
    ("imports (jax, flax, digitjax)", "interpreter", "imports"),
    ("config, run folder", "imports", "data_start"),
    ("data load onto the device", "data_start", "data_done"),
    ("trainer, checkpoint manager", "data_done", "init_start"),
    ("model init (one jit: compile + run)", "init_start", "init_done"),
    ("run records", "init_done", "compile_start"),
    ("compile (every chunk size)", "compile_start", "compile_done"),
    ("after compile, to the first step's dispatch", "compile_done", "first_step"),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", default="quick", help="registered experiment (quick)")
    p.add_argument("--repeats", type=int, default=3, help="runs of the experiment (median)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config overrides passed to digitjax run")
    p.add_argument("--wandb", default="off", choices=("auto", "offline", "off"),
                   help="digitjax run --wandb (default off; offline adds W&B's start-up)")
    p.add_argument("--data-dir", help="TFDS data dir (default: digitjax's default, "
                   "$TFDS_DATA_DIR or ~/tensorflow_datasets); prepared first, untimed")
    p.add_argument("--timeout", type=float, default=600, help="seconds per run before a kill")
    p.add_argument("--skip-install", action="store_true", help="no fresh-venv install")
    p.add_argument("--python", default="python3", help="interpreter for the fresh venv")
    p.add_argument("--pip-cache", action="store_true",
                   help="let pip use its cache (default --no-cache-dir)")
    p.add_argument("--keep-venv", action="store_true", help="keep the fresh venv")
    _common.add_common_args(p)
    return p.parse_args(argv)


def run_instrumented(args, i: int) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="digitjax-bench-startup-"))
    marks_path = workdir / "marks.json"
    cmd = [sys.executable, "-c", INSTRUMENTED, "run", args.experiment,
           *[a for o in args.set for a in ("--set", o)], "--workdir", str(workdir / "runs"),
           "--no-progress", "--wandb", args.wandb,
           *(["--data-dir", args.data_dir] if args.data_dir else [])]
    proc = _common.run_process(cmd, timeout=args.timeout,
                               env=_common.child_env(**{MARKS_ENV: str(marks_path)}))
    out = {"wall_seconds": round(proc.wall_seconds, 2), "returncode": proc.returncode,
           "timed_out": proc.timed_out, "max_rss_bytes": proc.max_rss_bytes}
    marks = json.loads(marks_path.read_text()) if marks_path.exists() else {}
    marks["spawn"] = proc.spawned_at
    out["phases"] = {label: round(marks[b] - marks[a], 3) for label, a, b in PHASES
                     if a in marks and b in marks}
    if "first_step" in marks:
        out["first_step_seconds"] = round(marks["first_step"] - marks["spawn"], 3)
    summaries = list(workdir.glob("runs/*/seed*/summary.json"))
    if summaries:
        s = _common.read_json(summaries[0])
        out.update({k: s.get(k) for k in ("train_seconds", "compile_seconds", "eval_seconds",
                                          "total_seconds", "test_accuracy")})
    if proc.returncode != 0:
        out["tail"] = proc.tail()
        print(f"run {i} failed (exit {proc.returncode}):\n{proc.tail()}", file=sys.stderr)
    else:
        print(f"run {i}: first step after {out.get('first_step_seconds', float('nan')):.2f} s, "
              f"peak RSS {proc.max_rss_bytes / 1e9:.2f} GB, exit after {proc.wall_seconds:.1f} s",
              file=sys.stderr, flush=True)
    shutil.rmtree(workdir, ignore_errors=True)
    return out


def du_bytes(path: Path) -> int:
    out = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, timeout=120)
    return int(out.stdout.split()[0])


def measure_install(args) -> dict:
    root = Path(tempfile.mkdtemp(prefix="digitjax-bench-venv-"))
    venv = root / "venv"
    try:
        steps = {}
        pip = [str(venv / "bin" / "pip"), "install", "-q", "-c", "constraints.txt", "-e", "."]
        if not args.pip_cache:
            pip.insert(2, "--no-cache-dir")
        for name, cmd in (("venv", [args.python, "-m", "venv", str(venv)]), ("pip", pip)):
            print(f"install: {' '.join(cmd)}", file=sys.stderr, flush=True)
            proc = _common.run_process(cmd, timeout=1800)
            if proc.returncode != 0:
                return {"error": f"{name} failed (exit {proc.returncode})", "tail": proc.tail()}
            steps[name] = round(proc.wall_seconds, 2)
        size = du_bytes(venv)
        check = _common.run_process(
            [str(venv / "bin" / "python"), "-c",
             "import digitjax, jax, flax, optax, tensorflow_datasets; print(jax.__version__)"],
            timeout=300)
        config = subprocess.run([str(venv / "bin" / "pip"), "config", "list"],
                                capture_output=True, text=True, timeout=60).stdout.strip()
        version = subprocess.run([str(venv / "bin" / "pip"), "--version"], capture_output=True,
                                 text=True, timeout=60).stdout.split(" from ")[0]
        return {
            "command": f"{args.python} -m venv VENV && VENV/bin/pip install "
                       f"{'' if args.pip_cache else '--no-cache-dir '}-q -c constraints.txt -e .",
            "venv_seconds": steps["venv"], "pip_seconds": steps["pip"],
            "install_seconds": round(steps["venv"] + steps["pip"], 2), "size_bytes": size,
            "first_import_seconds": round(check.wall_seconds, 2),
            "import_ok": check.returncode == 0, "pip_version": version, "pip_config": config,
            "pip_env": {k: v for k, v in os.environ.items() if k.startswith("PIP_")},
            "pip_cache": args.pip_cache,
        }
    finally:
        if args.keep_venv:
            print(f"kept {venv}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


def summarize(runs: list[dict]) -> dict:
    ok = [r for r in runs if r["returncode"] == 0 and "first_step_seconds" in r]
    phases = {label: _common.median([r["phases"][label] for r in ok if label in r["phases"]])
              for label, _, _ in PHASES}
    first = _common.median([r["first_step_seconds"] for r in ok])
    rss = max((r["max_rss_bytes"] for r in ok), default=None)
    return {"completed": len(ok), "runs": len(runs), "first_step_seconds": first,
            "first_step_all": [r["first_step_seconds"] for r in ok], "phases": phases,
            "max_rss_bytes": rss, "wall_seconds": _common.median([r["wall_seconds"] for r in ok]),
            "first_step_target_met": first is not None and first <= TARGET_FIRST_STEP_SECONDS,
            "rss_target_met": rss is not None and rss <= TARGET_RSS_GB * 1e9}


def met(ok) -> str:
    return "met" if ok else "NOT met"


def report(results: dict, args) -> str:
    s, f = results["summary"], _common.fmt
    sets = " ".join(f"--set {o}" for o in args.set)
    rows = [[label, f(s["phases"][label], ".2f")] for label, _, _ in PHASES]
    rows.append(["**process start to first training step**",
                 f"**{f(s['first_step_seconds'], '.2f')}**"])
    first_all = ", ".join(f"{x:.2f}" for x in s["first_step_all"])
    lines = [
        f"`digitjax run {args.experiment} {sets + ' ' if sets else ''}--workdir <fresh> "
        f"--no-progress --wandb {args.wandb}` (data already prepared), {s['completed']} of "
        f"{s['runs']} run(s); phases from timestamps around data_device.load, "
        "Trainer.init_state, Trainer.compile and the first Trainer.run_chunk call (medians, "
        "seconds):",
        "",
        _common.table(["phase", "seconds"], rows),
        "",
        f"Each run: first step after {first_all} s; whole process {f(s['wall_seconds'])} s. "
        f"Peak RSS (largest of the runs, os.wait4): **"
        f"{f(s['max_rss_bytes'] / 1e9 if s['max_rss_bytes'] else None, '.2f')} GB** "
        "(GB = 10^9 bytes).",
    ]
    inst = results.get("install")
    if inst and "error" not in inst:
        mirror = inst["pip_env"].get("PIP_FIND_LINKS") or inst["pip_config"] or "PyPI"
        lines += [
            "",
            f"Fresh install: `{inst['command']}`: **{inst['install_seconds']:.1f} s** (venv "
            f"{inst['venv_seconds']:.1f} s, pip {inst['pip_seconds']:.1f} s), **"
            f"{inst['size_bytes'] / 1e9:.2f} GB** on disk (du); first import of digitjax, "
            f"jax, flax, optax and tensorflow_datasets afterwards "
            f"{inst['first_import_seconds']:.1f} s "
            f"({'ok' if inst['import_ok'] else 'FAILED'}). {inst['pip_version']}; wheels "
            f"from: `{mirror}` (a local mirror has no download time; PyPI over a network "
            "adds it).",
        ]
    elif inst:
        lines += ["", f"Fresh install failed: {inst['error']}."]
    targets = [f"<= {TARGET_FIRST_STEP_SECONDS:.0f} s to the first step: "
               f"{met(s['first_step_target_met'])}",
               f"<= {TARGET_RSS_GB:.0f} GB peak RSS: {met(s['rss_target_met'])}"]
    if inst and "error" not in inst:
        targets += [f"install <= {TARGET_INSTALL_SECONDS:.0f} s: "
                    f"{met(inst['install_seconds'] <= TARGET_INSTALL_SECONDS)}",
                    f"<= {TARGET_INSTALL_GB} GB: "
                    f"{met(inst['size_bytes'] <= TARGET_INSTALL_GB * 1e9)}"]
    lines += ["", "Targets: " + "; ".join(targets) + "."]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    guard = _common.check_idle(args)
    env = _common.environment()
    prep = _common.run_process([sys.executable, "-c", PREPARE, args.data_dir or ""],
                               timeout=600)
    if prep.returncode != 0:
        print(f"preparing MNIST failed:\n{prep.tail()}", file=sys.stderr)
        return 1
    runs = [run_instrumented(args, i) for i in range(args.repeats)]
    results = {"experiment": args.experiment, "overrides": args.set, "wandb": args.wandb,
               "summary": summarize(runs), "runs": runs}
    if not args.skip_install:
        results["install"] = measure_install(args)
    _common.record("startup", "5. Start-up, peak memory and install", env, guard, results,
                   report(results, args), enabled=not args.no_record, stem=args.results)
    ok = all(r["returncode"] == 0 for r in runs) and "error" not in results.get("install", {})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
