"""Benchmark 2: K seeds side by side against K seeds one after another, wall time.

Each mode is one `digitjax run EXPERIMENT --seeds ...` process into a fresh workdir, timed
from spawn to exit (start-up, data, compile, training and evaluation of every seed):
- sequential: one host device, `--parallel off`;
- parallel: XLA_FLAGS=--xla_force_host_platform_device_count=2, `--parallel auto` (one
  seed per device, i.e. per core, each with the plain single-seed program);
- parallel_no_eigen_mt: as parallel, plus --xla_cpu_multi_thread_eigen=false;
- vmap: `--parallel vmap`, every seed in one vmapped program (the GPU/TPU default; its
  grouped convolutions round differently, so it is compared by accuracy, not bit for bit).
Every run is killed after --timeout (2 host devices have deadlocked before), and each
seed's final parameter hash is compared with the sequential run's: the modes must agree
bit for bit.

    python benchmarks/seeds.py                      # 5 seeds of flax_cnn_1ep on 20k images
    python benchmarks/seeds.py --seeds 0-1 --train-split 'train[:1280]' --force   # a check
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import _common

MODES = {  # name -> (--parallel, extra XLA flags)
    "sequential": ("off", []),
    "parallel": ("auto", [_common.DEVICE_COUNT_2]),
    "parallel_no_eigen_mt": ("auto", [_common.DEVICE_COUNT_2,
                                      "--xla_cpu_multi_thread_eigen=false"]),
    "vmap": ("vmap", []),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", default="flax_cnn_1ep", help="registered experiment")
    p.add_argument("--seeds", default="0-4", help="the K seeds (default 0-4)")
    p.add_argument("--train-split", default="train[:20000]",
                   help="a shorter training split keeps the run short ('' = the experiment's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="more config overrides, passed to digitjax run")
    # vmap is opt-in: on XLA:CPU it turns the convolutions into slow grouped ones.
    p.add_argument("--modes", default="sequential,parallel,parallel_no_eigen_mt",
                   help=f"comma-separated, from {', '.join(MODES)} (sequential is the baseline; "
                   "default: all but vmap, the GPU/TPU mode)")
    p.add_argument("--repeats", type=int, default=1,
                   help="runs per mode, in alternating order (median reported)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per run before a kill")
    p.add_argument("--keep-workdirs", action="store_true", help="keep the run folders")
    _common.add_common_args(p)
    args = p.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(args.modes) - set(MODES)
    if unknown:
        p.error(f"unknown mode(s) {', '.join(sorted(unknown))}; known: {', '.join(MODES)}")
    return args


def overrides(args) -> list[str]:
    sets = [f"data.train_split={args.train_split}"] if args.train_split else []
    return sets + args.set


def run_mode(mode: str, args) -> dict:
    parallel, flags = MODES[mode]
    workdir = Path(tempfile.mkdtemp(prefix=f"digitjax-bench-seeds-{mode}-"))
    cmd = [*_common.digitjax_command(), "run", args.experiment, "--seeds", args.seeds,
           *[a for o in overrides(args) for a in ("--set", o)], "--workdir", str(workdir),
           "--no-progress", "--wandb", "off", "--parallel", parallel]
    xla_flags = " ".join(f for f in [_common.USER_XLA_FLAGS, *flags] if f)
    print(f"{mode}: XLA_FLAGS={xla_flags!r} digitjax run ... --parallel {parallel}",
          file=sys.stderr, flush=True)
    proc = _common.run_process(cmd, timeout=args.timeout, env=_common.child_env(xla_flags))
    out = {"mode": mode, "wall_seconds": round(proc.wall_seconds, 2),
           "returncode": proc.returncode, "timed_out": proc.timed_out,
           "xla_flags_given": xla_flags}
    seeds = []
    for path in sorted(workdir.glob("*/seed*/summary.json")):
        s = _common.read_json(path)
        seeds.append({k: s.get(k) for k in (
            "seed", "status", "train_seconds", "compile_seconds", "eval_seconds",
            "total_seconds", "images_per_second", "test_accuracy", "final_param_hash")})
    configs = sorted(workdir.glob("*/seed*/config.json"))
    if configs:
        c = _common.read_json(configs[0])
        out["device_count"] = c["execution"]["device_count"]
        out["xla_flags_in_run"] = c["environment"]["xla_flags"]
    out["seeds"] = sorted(seeds, key=lambda s: s["seed"])
    if not _common.failed(mode, proc, out, args.timeout):
        print(f"{mode}: {proc.wall_seconds:.1f} s", file=sys.stderr, flush=True)
    if args.keep_workdirs:
        out["workdir"] = str(workdir)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return out


def summarize(runs: list[dict], args) -> dict:
    by_mode = {m: [r for r in runs if r["mode"] == m] for m in args.modes}
    # The baseline is the first finished sequential run; every other run is checked
    # against it, each repeat on its own (the sequential mode's own repeats included).
    base_run = next((r for r in by_mode.get("sequential", []) if r["returncode"] == 0), None)
    base_seeds = base_run["seeds"] if base_run else []
    base_hashes = {s["seed"]: s["final_param_hash"] for s in base_seeds}
    base_acc = {s["seed"]: s["test_accuracy"] for s in base_seeds
                if s["test_accuracy"] is not None}
    modes = {}
    for mode, rs in by_mode.items():
        ok = [r for r in rs if r["returncode"] == 0]
        seeds = [s for r in ok for s in r["seeds"]]
        checked = [{s["seed"]: s["final_param_hash"] for s in r["seeds"]} for r in ok
                   if r is not base_run]
        modes[mode] = {
            "runs": len(rs), "failed": len(rs) - len(ok),
            "timed_out": sum(r["timed_out"] for r in rs),
            "wall_seconds": _common.median([r["wall_seconds"] for r in ok]),
            "walls": [r["wall_seconds"] for r in rs],
            "device_count": ok[0].get("device_count") if ok else None,
            "train_seconds_per_seed": _common.median([s["train_seconds"] for s in seeds]),
            # Sequential seeds share one compile; parallel ones compile once per device;
            # a vmapped group compiles once, and each seed records that one compile.
            "compile_seconds_all_seeds": _common.median(
                [(max if mode == "vmap" else sum)(s["compile_seconds"] for s in r["seeds"])
                 for r in ok]),
            "images_per_second_per_seed": _common.median(
                [s["images_per_second"] for s in seeds]),
            "mean_test_accuracy": _common.mean_std([s["test_accuracy"] for s in seeds])[0],
            # None: nothing to compare (no baseline, or the baseline run alone).
            "same_params_as_sequential": all(h == base_hashes for h in checked)
            if base_hashes and checked else None,
            "max_test_accuracy_diff_vs_sequential": max(
                (abs(s["test_accuracy"] - base_acc[s["seed"]]) for s in seeds
                 if s["seed"] in base_acc and s["test_accuracy"] is not None), default=None),
        }
    base = modes.get("sequential", {}).get("wall_seconds")
    for m in modes.values():
        m["speedup_vs_sequential"] = (round(base / m["wall_seconds"], 3)
                                      if base and m["wall_seconds"] else None)
    return modes


def times(x) -> str:
    return "-" if x is None else f"{x:.2f}x"


def report(modes: dict, args) -> str:
    rows = []
    for mode, m in modes.items():
        flags = " ".join(f for f in MODES[mode][1]) or "(none)"
        fails = f"{m['failed']} of {m['runs']} failed ({m['timed_out']} timed out)" \
            if m["failed"] else "ok"
        same = {True: "yes", False: "**NO**", None: "-"}[m["same_params_as_sequential"]]
        diff = m["max_test_accuracy_diff_vs_sequential"]
        if mode == "vmap" and diff is not None:  # grouped convolutions: not bit-identical
            same = f"no (by design); max test acc diff {100 * diff:.2f} points"
        rows.append([mode, f"`{flags}`", f"`--parallel {MODES[mode][0]}`",
                     _common.fmt(m["wall_seconds"]), times(m["speedup_vs_sequential"]),
                     _common.fmt(m["compile_seconds_all_seeds"]),
                     _common.fmt(m["train_seconds_per_seed"]),
                     _common.fmt(m["images_per_second_per_seed"], ",.0f"), same, fails])
    sets = " ".join(f"--set {o}" for o in overrides(args)) or "(none)"
    par = modes.get("parallel", modes.get("vmap", {})).get("speedup_vs_sequential")
    lines = [
        f"`digitjax run {args.experiment} --seeds {args.seeds}` with overrides `{sets}` "
        f"(a shortened config: same data and config in every mode), `--no-progress --wandb "
        f"off`, a fresh workdir per run; wall = spawn to exit of the whole process (start-up, "
        f"data, compile, training and evaluation of all seeds); median of {args.repeats} "
        f"run(s) per mode, modes alternating. Each run is killed after {args.timeout:.0f} s.",
        "",
        _common.table(["mode", "extra XLA_FLAGS", "digitjax option", "wall s",
                       "speed-up vs sequential", "compile s (all seeds)", "train s per seed",
                       "images/s per seed",
                       "same final params as sequential", "runs"], rows),
        "",
        "Targets: >= 1.6x faster than sequential on the 2-core CPU (parallel), >= 4x on a GPU "
        f"(vmap): {'parallel' if 'parallel' in modes else 'vmap'} {times(par)}.",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    guard = _common.check_idle(args)
    env = _common.environment()
    runs = [run_mode(mode, args) for mode in _common.alternating(args.modes, args.repeats)]
    modes = summarize(runs, args)
    results = {"experiment": args.experiment, "seeds": args.seeds,
               "overrides": overrides(args), "repeats": args.repeats, "modes": modes,
               "runs": runs}
    _common.record("seeds", "2. Seeds side by side vs one after another", env, guard,
                   results, report(modes, args), enabled=not args.no_record, stem=args.results)
    return 0 if all(r["returncode"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
