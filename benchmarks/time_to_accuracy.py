"""Benchmark 3: time to accuracy of the `fast` recipe, from process start.

Each seed is its own `digitjax run fast --seed k` process into a fresh workdir, timed from
spawn to exit: interpreter start, imports, data load, compile, training, evaluation and
run records all count. The data (TFDS array_record + digitjax's decoded cache) is prepared
once beforehand into --data-dir, timed and reported apart, as a user's machine has it after
the first run. Accuracy is each summary's test accuracy (the checkpoint selected on
validation; with one epoch, the final one).

    python benchmarks/time_to_accuracy.py           # 5 seeds, ~2 min on 2 idle cores
    python benchmarks/time_to_accuracy.py --seeds 0-1 --set 'data.train_split=train[:5000]' \
        --force                                     # a quick check (not the recipe)
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import _common

TARGET_ACCURACY = 0.99
TARGET_WALL_SECONDS = 15.0
PREPARE = ("import sys; from digitjax import data; "
           "data.prepare('mnist', data_dir=sys.argv[1], progress=False)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", default="fast", help="registered experiment (fast)")
    p.add_argument("--seeds", default="0-4", help="seeds, e.g. 0-4 or 0,3 (default 0-4)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config overrides passed to digitjax run (the figures are then not "
                   "the recipe's)")
    p.add_argument("--data-dir", help="TFDS data dir to prepare once and read from "
                   "(default: a fresh temporary one, removed afterwards)")
    p.add_argument("--timeout", type=float, default=300, help="seconds per run before a kill")
    p.add_argument("--keep-workdirs", action="store_true", help="keep the run folders")
    _common.add_common_args(p)
    return p.parse_args(argv)


def parse_seeds(text: str) -> list[int]:
    seeds = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        seeds += list(range(int(a), int(b) + 1)) if b else [int(a)]
    return seeds


def prepare_data(data_dir: Path, timeout: float) -> dict:
    existed = (data_dir / "mnist").exists()
    proc = _common.run_process([sys.executable, "-c", PREPARE, str(data_dir)], timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"preparing MNIST in {data_dir} failed:\n{proc.tail()}")
    size = sum(f.stat().st_size for f in (data_dir / "mnist").rglob("*") if f.is_file())
    return {"data_dir": str(data_dir), "already_there": existed,
            "prepare_seconds": round(proc.wall_seconds, 2), "size_bytes": size}


def run_seed(seed: int, data_dir: Path, args) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix=f"digitjax-bench-tta-seed{seed}-"))
    cmd = [*_common.digitjax_command(), "run", args.experiment, "--seed", str(seed),
           *[a for o in args.set for a in ("--set", o)], "--workdir", str(workdir),
           "--data-dir", str(data_dir), "--no-progress", "--wandb", "off"]
    proc = _common.run_process(cmd, timeout=args.timeout, env=_common.child_env())
    out = {"seed": seed, "wall_seconds": round(proc.wall_seconds, 2),
           "returncode": proc.returncode, "timed_out": proc.timed_out,
           "max_rss_bytes": proc.max_rss_bytes}
    summaries = list(workdir.glob(f"*/seed{seed}/summary.json"))
    if summaries:
        s = _common.read_json(summaries[0])
        out.update({k: s.get(k) for k in (
            "status", "test_accuracy", "val_accuracy", "train_seconds", "compile_seconds",
            "eval_seconds", "total_seconds", "images_per_second")})
    if proc.returncode != 0:
        out["tail"] = proc.tail()
        why = " after a timeout" if proc.timed_out else ""
        print(f"seed {seed} failed (exit {proc.returncode}{why}):\n{proc.tail()}",
              file=sys.stderr, flush=True)
    else:
        print(f"seed {seed}: {proc.wall_seconds:.1f} s, test accuracy "
              f"{100 * out.get('test_accuracy', float('nan')):.2f}%", file=sys.stderr, flush=True)
    if args.keep_workdirs:
        out["workdir"] = str(workdir)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return out


def summarize(runs: list[dict]) -> dict:
    ok = [r for r in runs if r["returncode"] == 0 and r.get("test_accuracy") is not None]
    acc_mean, acc_std = _common.mean_std([r["test_accuracy"] for r in ok])
    wall = _common.median([r["wall_seconds"] for r in ok])
    return {
        "completed": len(ok), "runs": len(runs),
        "mean_test_accuracy": acc_mean, "std_test_accuracy": acc_std,
        "min_test_accuracy": min((r["test_accuracy"] for r in ok), default=None),
        "median_wall_seconds": wall,
        "max_wall_seconds": max((r["wall_seconds"] for r in ok), default=None),
        "median_train_seconds": _common.median([r["train_seconds"] for r in ok]),
        "median_compile_seconds": _common.median([r["compile_seconds"] for r in ok]),
        "median_eval_seconds": _common.median([r["eval_seconds"] for r in ok]),
        "median_in_process_seconds": _common.median([r["total_seconds"] for r in ok]),
        "accuracy_target_met": acc_mean is not None and acc_mean >= TARGET_ACCURACY
        and len(ok) == len(runs),
        "wall_target_met": wall is not None and wall <= TARGET_WALL_SECONDS,
    }


def report(results: dict, args) -> str:
    s, prep = results["summary"], results["data"]
    f = _common.fmt
    rows = [[r["seed"], f(r["wall_seconds"], ".2f"), f(r.get("total_seconds"), ".2f"),
             f(r.get("train_seconds"), ".2f"), f(r.get("compile_seconds"), ".2f"),
             f(r.get("eval_seconds"), ".2f"),
             f(100 * r["test_accuracy"], ".2f") if r.get("test_accuracy") is not None else "-",
             f(r["max_rss_bytes"] / 1e9, ".2f"),
             "ok" if r["returncode"] == 0 else f"exit {r['returncode']}"] for r in results["runs"]]
    sets = " ".join(f"--set {o}" for o in args.set)
    acc = (f"{100 * s['mean_test_accuracy']:.2f} +- {100 * s['std_test_accuracy']:.2f}%"
           if s["mean_test_accuracy"] is not None else "-")
    lines = [
        f"`digitjax run {args.experiment} --seed k {sets + ' ' if sets else ''}--workdir "
        f"<fresh> --data-dir <prepared> --no-progress --wandb off`, one process per seed, "
        "timed from spawn to exit (imports, data load, compile, training, evaluation and "
        "records included). "
        + ("**Overridden config: not the recipe's figures.** " if args.set else ""),
        "",
        f"Data prepared beforehand (not in the wall times): {prep['prepare_seconds']:.1f} s "
        f"({'already prepared; only checked' if prep['already_there'] else 'from the IDX files'}"
        f"), {prep['size_bytes'] / 2**20:.0f} MiB in {prep['data_dir']}.",
        "",
        _common.table(["seed", "wall s (process)", "in-process s", "train s", "compile s",
                       "eval s", "test acc %", "peak RSS GB", "run"], rows),
        "",
        f"**Mean test accuracy {acc}** over {s['completed']} of {s['runs']} seeds (min "
        f"{f(100 * s['min_test_accuracy'] if s['min_test_accuracy'] else None, '.2f')}%); "
        f"**median wall {f(s['median_wall_seconds'], '.2f')} s** from process start (max "
        f"{f(s['max_wall_seconds'], '.2f')} s), of which training "
        f"{f(s['median_train_seconds'], '.2f')} s, compile {f(s['median_compile_seconds'], '.2f')}"
        f" s, evaluation {f(s['median_eval_seconds'], '.2f')} s (medians).",
        "",
        f"Targets: mean >= {100 * TARGET_ACCURACY:.1f}%: "
        f"{'met' if s['accuracy_target_met'] else 'NOT met'}; <= {TARGET_WALL_SECONDS:.0f} s "
        f"wall from process start: {'met' if s['wall_target_met'] else 'NOT met'}.",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    guard = _common.check_idle(args)
    env = _common.environment()
    temp_data = args.data_dir is None
    data_dir = Path(tempfile.mkdtemp(prefix="digitjax-bench-data-") if temp_data
                    else args.data_dir).resolve()
    try:
        print(f"preparing MNIST in {data_dir} ...", file=sys.stderr, flush=True)
        prep = prepare_data(data_dir, timeout=600)
        runs = [run_seed(seed, data_dir, args) for seed in parse_seeds(args.seeds)]
    finally:
        if temp_data:
            shutil.rmtree(data_dir, ignore_errors=True)
    results = {"experiment": args.experiment, "overrides": args.set, "data": prep,
               "summary": summarize(runs), "runs": runs}
    _common.record("time_to_accuracy", "3. Time to 99% test accuracy (the fast recipe)", env,
                   guard, results, report(results, args),
                   enabled=not args.no_record, stem=args.results)
    return 0 if all(r["returncode"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
