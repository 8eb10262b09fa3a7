"""Data parallel on the CPU: one seed's batch split over 2 host devices against one device.

Each mode is one `digitjax run EXPERIMENT --seed 0` process into a fresh workdir:
- one_device: `--data-parallel off`;
- data_parallel_2: `--data-parallel 2` (2 host devices sharing the cores, each step's batch
  split between them, the gradient all-reduced).
Reported: training images/s (the loop alone, compile and evaluation excluded), wall time
from spawn to exit, test accuracy (the modes agree within float tolerance, not bit for bit:
the all-reduce sums in another order), and runs that hung. Every run is killed after
--timeout: an earlier data-parallel loop deadlocked (see MAX_PROGRAMS_IN_FLIGHT in
digitjax/train.py).

    python benchmarks/data_parallel.py                  # quick (Flax CNN, 1 epoch), 2 repeats
    python benchmarks/data_parallel.py --set 'data.train_split=train[:6400]' --repeats 1 --force
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import _common

MODES = {"one_device": "off", "data_parallel_2": "2"}  # name -> --data-parallel


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", default="quick", help="registered experiment (quick)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config overrides, passed to digitjax run")
    p.add_argument("--repeats", type=int, default=2,
                   help="runs per mode, in alternating order (median reported)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per run before a kill")
    _common.add_common_args(p)
    return p.parse_args(argv)


def run_mode(mode: str, args) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix=f"digitjax-bench-dp-{mode}-"))
    cmd = [*_common.digitjax_command(), "run", args.experiment, "--seed", "0",
           *[a for o in args.set for a in ("--set", o)], "--workdir", str(workdir),
           "--no-progress", "--no-plots", "--wandb", "off", "--data-parallel", MODES[mode]]
    print(f"{mode}: digitjax run ... --data-parallel {MODES[mode]}", file=sys.stderr,
          flush=True)
    proc = _common.run_process(cmd, timeout=args.timeout, env=_common.child_env())
    out = {"mode": mode, "wall_seconds": round(proc.wall_seconds, 2),
           "returncode": proc.returncode, "timed_out": proc.timed_out}
    summaries = sorted(workdir.glob("*/seed0/summary.json"))
    if summaries:
        s = _common.read_json(summaries[0])
        out.update({k: s.get(k) for k in ("images_per_second", "train_seconds",
                                           "compile_seconds", "test_accuracy")})
        c = _common.read_json(summaries[0].with_name("config.json"))
        out["data_parallel_devices"] = c["execution"]["data_parallel_devices"]
    if not _common.failed(mode, proc, out, args.timeout):
        print(f"{mode}: {out['images_per_second']:,.0f} images/s, wall "
              f"{proc.wall_seconds:.1f} s", file=sys.stderr, flush=True)
    shutil.rmtree(workdir, ignore_errors=True)
    return out


def summarize(runs: list[dict]) -> dict:
    modes = {}
    for mode in MODES:
        rs = [r for r in runs if r["mode"] == mode]
        ok = [r for r in rs if r["returncode"] == 0]
        modes[mode] = {
            "runs": len(rs), "failed": len(rs) - len(ok),
            "timed_out": sum(r["timed_out"] for r in rs),
            "images_per_second": _common.median([r["images_per_second"] for r in ok]),
            "all_images_per_second": [r.get("images_per_second") for r in rs],
            "wall_seconds": _common.median([r["wall_seconds"] for r in ok]),
            "compile_seconds": _common.median([r["compile_seconds"] for r in ok]),
            "test_accuracy": _common.median([r["test_accuracy"] for r in ok]),
        }
    base = modes["one_device"]["images_per_second"]
    for m in modes.values():
        m["speedup"] = round(m["images_per_second"] / base, 3) \
            if base and m["images_per_second"] else None
    return modes


def report(modes: dict, args) -> str:
    rows = [[mode, f"`--data-parallel {MODES[mode]}`",
             _common.fmt(m["images_per_second"], ",.0f"),
             "-" if m["speedup"] is None else f"{m['speedup']:.2f}x",
             _common.fmt(m["wall_seconds"]), _common.fmt(m["compile_seconds"]),
             _common.fmt(None if m["test_accuracy"] is None else 100 * m["test_accuracy"],
                         ".2f"),
             f"{m['failed']} of {m['runs']} failed ({m['timed_out']} hung)" if m["failed"]
             else "ok"] for mode, m in modes.items()]
    sets = " ".join(f"--set {o}" for o in args.set) or "(none)"
    return "\n".join([
        f"`digitjax run {args.experiment} --seed 0` with overrides `{sets}`, `--no-progress "
        f"--no-plots --wandb off`, a fresh workdir per run; images/s = training images / "
        f"seconds of the training loop (compile and evaluation excluded); median of "
        f"{args.repeats} run(s) per mode, modes alternating; each run killed after "
        f"{args.timeout:.0f} s.",
        "",
        _common.table(["mode", "option", "train images/s", "speed-up", "wall s", "compile s",
                       "test acc %", "runs"], rows),
    ])


def main(argv=None) -> int:
    args = parse_args(argv)
    guard = _common.check_idle(args)
    env = _common.environment()
    runs = [run_mode(mode, args) for mode in _common.alternating(list(MODES), args.repeats)]
    modes = summarize(runs)
    results = {"experiment": args.experiment, "overrides": args.set,
               "repeats": args.repeats, "modes": modes, "runs": runs}
    _common.record("data_parallel", "6. Data parallel over 2 host devices (CPU)", env, guard,
                   results, report(modes, args), enabled=not args.no_record,
                   stem=args.results)
    return 0 if all(r["returncode"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
