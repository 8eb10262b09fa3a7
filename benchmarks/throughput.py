"""Benchmarks 1 and 4: training images/s of the Flax-example CNN at batch 128, digitjax's
compiled chunk loop against the Flax example's loop, and the GFLOP/s both achieve.

The loops train in ONE process, alternating in rounds of `--steps` steps after compile and
warm-up (each round starts with another loop), so drift in the machine's speed hits all
alike; evaluation is excluded. The reference is benchmarks/reference_loop.py: the official
example's CNN code (nnx.avg_pool), nnx.Optimizer, an nnx.jit step and a Python loop over
numpy batches of 128; a third loop runs the same reference loop on digitjax's model (pooling
as reshape + mean) to split the gain between loop and model code. digitjax's XLA flag must
be set before jax is imported, so each flag setting runs in its own child process
(DIGITJAX_XLA_DEFAULTS=1 and =0); ratios across the two are across processes.

FLOP convention: a training image costs 3 x the forward FLOPs counted by
`digitjax.models.forward_flops` (2 x multiply-adds of convs and matmuls; backward ~2x
forward); pooling, activations, loss and optimizer update are not counted.

    python benchmarks/throughput.py                      # ~7 min on 2 idle cores
    python benchmarks/throughput.py --steps 24 --rounds 2 --force   # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import _common

MODES = {"on": "1", "off": "0"}  # digitjax's XLA default flag -> DIGITJAX_XLA_DEFAULTS
RESULT_PREFIX = "RESULT "
LOOPS = {  # name -> what it is, for the report
    "digitjax": "digitjax chunk loop",
    "reference": "reference loop (the example's code)",
    "reference_digitjax_model": "reference loop, digitjax's model",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=120,
                   help="timed steps per loop per round (rounded up to whole chunks; 120)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (3)")
    p.add_argument("--warmup", type=int, default=24, help="untimed steps after compile (24)")
    p.add_argument("--flag", choices=("both", "on", "off"), default="both",
                   help="digitjax's XLA CPU flag: both (two child processes), on, or off")
    p.add_argument("--train-split", default="train[:55000]", help="training images drawn from")
    p.add_argument("--peak-gflops", type=float, default=None,
                   help="fp32 peak for the share of peak (default: "
                   f"{_common.CPU_PEAK_GFLOPS} on the 2-core EPYC of the committed figures, "
                   f"CPU family/model {_common.CPU_PEAK_FAMILY_MODEL} with 2 cores; none on "
                   "other CPUs)")
    p.add_argument("--timeout", type=float, default=1200, help="seconds per child process")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    _common.add_common_args(p)
    return p.parse_args(argv)


# --- the child: the loops in one process ---------------------------------------------------

class DigitjaxLoop:
    """digitjax's training loop reduced to its hot path: compiled chunks of steps on
    device-resident data, metrics fetched at the log cadence as `digitjax run` does."""

    def __init__(self, trainer, seed: int):
        from digitjax import steps

        self.tr, self.steps = trainer, steps
        self.keys = trainer.keys(seed)
        self.state = trainer.init_state(seed)
        trainer.compile(self.state, self.keys)
        self.spc = trainer.execution.steps_per_call
        self.epoch, self.step_in_epoch = 0, 0
        self.perm = steps.epoch_permutation(self.keys["data"], 0, trainer.data.num_train)

    def run(self, num_steps: int) -> None:
        import jax

        tr, window = self.tr, []
        batch = tr.config.train.batch_size
        for _ in range(num_steps // self.spc):
            if self.step_in_epoch + self.spc > tr.steps_per_epoch:  # full chunks only
                self.epoch, self.step_in_epoch = self.epoch + 1, 0
                self.perm = self.steps.epoch_permutation(self.keys["data"], self.epoch,
                                                         tr.data.num_train)
            self.state, metrics = tr.run_chunk(self.state, self.spc, self.perm,
                                               self.step_in_epoch * batch, self.keys)
            self.step_in_epoch += self.spc
            window.append(metrics)
            if len(window) * self.spc >= tr.execution.log_every_steps:
                jax.device_get(window)
                window = []
        jax.device_get(window)
        jax.block_until_ready(self.state)


class ReferenceLoop:
    """The Flax example's loop (benchmarks/reference_loop.py), resumable across rounds.

    It runs at digitjax's matmul precision: on a GPU, JAX's default would be TF32 against
    digitjax's float32, an unequal comparison (on a CPU both are float32 anyway).
    """

    def __init__(self, model_name: str, images_u8, labels, seed: int, batch: int,
                 precision: str):
        import numpy as np
        import optax
        import reference_loop as ref
        from flax import nnx

        self.ref, self.images, self.labels = ref, images_u8, labels
        self.precision = precision
        self.model = ref.MODELS[model_name](seed)
        self.optimizer = nnx.Optimizer(self.model, optax.sgd(0.1, 0.9), wrt=nnx.Param)
        self.order = ref.index_batches(np.random.RandomState(seed), len(images_u8), batch)

    def run(self, num_steps: int) -> None:
        import itertools

        import jax

        with jax.default_matmul_precision(self.precision):
            self.ref.train_steps(self.model, self.optimizer, self.images, self.labels,
                                 itertools.islice(self.order, num_steps)).block_until_ready()


def child(args) -> dict:
    # digitjax before jax: it sets its XLA flag unless DIGITJAX_XLA_DEFAULTS=0.
    import digitjax  # noqa: F401, I001
    import jax

    from digitjax import data, data_device, models, registry
    from digitjax.train import Trainer

    t0 = time.perf_counter()
    config = registry.resolve("quick", [f"data.train_split={args.train_split}"], seeds=(0,))
    trainer = Trainer(config, data_device.load(config, download=False))
    images_u8, labels = data.load_split("mnist", args.train_split)
    batch = config.train.batch_size
    precision = trainer.execution.matmul_precision
    loops = {"digitjax": DigitjaxLoop(trainer, seed=0),
             "reference": ReferenceLoop("example", images_u8, labels, seed=0, batch=batch,
                                        precision=precision),
             "reference_digitjax_model": ReferenceLoop("digitjax", images_u8, labels, seed=0,
                                                       batch=batch, precision=precision)}
    spc = loops["digitjax"].spc
    num_steps = -(-args.steps // spc) * spc
    warmup = max(spc, -(-args.warmup // spc) * spc)
    for loop in loops.values():
        loop.run(warmup)  # the reference's first call compiles
    setup_seconds = time.perf_counter() - t0

    names, rounds = list(loops), []
    for r in range(args.rounds):
        row = {}
        for name in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter()
            loops[name].run(num_steps)
            row[name] = num_steps * batch / (time.perf_counter() - t)
        rounds.append(row)
        print(f"round {r}: " + ", ".join(f"{n} {row[n]:,.0f}" for n in names) + " images/s",
              file=sys.stderr, flush=True)

    st = trainer.abstract_state()
    fwd = models.forward_flops(trainer.graphdef, st.params, st.rest, trainer.data.image_shape)
    return {
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "matmul_precision": precision,  # both loops
        "backend": jax.default_backend(),
        "device_count": jax.device_count(),
        "steps_per_call": spc,
        "batch_size": batch,
        "steps_per_round": num_steps,
        "warmup_steps": warmup,
        "setup_seconds": round(setup_seconds, 2),
        "forward_flops_per_image": fwd,
        "rounds": [{k: round(v, 1) for k, v in row.items()} for row in rounds],
    }


# --- the parent: one child per flag setting, then the report -------------------------------

def peak_for(env: dict, given: float | None) -> float | None:
    """The fp32 peak to share against: the one given, or the known CPU's, else None."""
    if given is not None:
        return given
    if (env["cpu_family_model"] == _common.CPU_PEAK_FAMILY_MODEL
            and env.get("cpu_cores") == _common.CPU_PEAK_CORES):
        return _common.CPU_PEAK_GFLOPS
    return None


def summarize(run: dict, peak_gflops: float | None) -> dict:
    """Mean images/s over rounds (total images / total time), ratios, GFLOP/s."""
    out = dict(run)
    train_flops = 3 * run["forward_flops_per_image"]
    out["train_flops_per_image"] = train_flops
    for name in LOOPS:
        per_round = [r[name] for r in run["rounds"]]
        ips = len(per_round) / sum(1 / x for x in per_round)  # equal images per round
        gflops = ips * train_flops / 1e9
        out[name] = {"images_per_second": round(ips, 1),
                     "min": round(min(per_round), 1), "max": round(max(per_round), 1),
                     "gflops": round(gflops, 2),
                     "share_of_peak": round(gflops / peak_gflops, 4)
                     if run["backend"] == "cpu" and peak_gflops else None}

    def ratio(a, b):
        return {"ratio": round(out[a]["images_per_second"] / out[b]["images_per_second"], 3),
                "per_round": [round(r[a] / r[b], 3) for r in run["rounds"]]}

    out["ratios"] = {"digitjax / reference": ratio("digitjax", "reference"),
                     "digitjax / reference_digitjax_model":
                         ratio("digitjax", "reference_digitjax_model"),
                     "reference_digitjax_model / reference":
                         ratio("reference_digitjax_model", "reference")}
    return out


def clock_note(mhz: float | None, peak_gflops: float) -> str:
    """The peak assumes a clock; say so when /proc/cpuinfo reports another one."""
    if not mhz or abs(peak_gflops / 64 * 1000 / mhz - 1) < 0.02:
        return ""
    return (f" /proc/cpuinfo reports {mhz:.0f} MHz: at that clock the peak would be "
            f"{2 * 32 * mhz / 1000:.1f} GFLOP/s.")


def _peak_text(results: dict, args) -> str:
    peak = results["peak_gflops"]
    if peak is None:
        return ("no fp32 peak is known for this CPU, so no share of it is given (pass "
                "`--peak-gflops`).")
    if args.peak_gflops is not None:
        return f"peak {peak} GFLOP/s fp32 (given with --peak-gflops)."
    return (f"peak {peak} GFLOP/s fp32 (2 cores x 2 FMA x 8 lanes x 2 x 2.445 GHz)."
            + clock_note(results["cpu_mhz"], peak))


def report(results: dict, args) -> str:
    runs = {f: r for f, r in results["modes"].items() if "error" not in r}
    any_run = next(iter(runs.values()), None)

    def cell(x):
        share = x["share_of_peak"]
        pct = f", {100 * share:.1f}% of peak" if share is not None else ""
        return (f"{x['images_per_second']:,.0f} ({x['min']:,.0f}-{x['max']:,.0f}); "
                f"{x['gflops']:.1f} GFLOP/s{pct}")

    rows = [[f"flag {f}", f"`{r['xla_flags'] or '(none)'}`",
             *[cell(r[name]) for name in LOOPS], f"{r['setup_seconds']:.0f} s"]
            for f, r in runs.items()]
    rows += [[f"flag {f}", r["error"], "", "", "", ""]
             for f, r in results["modes"].items() if "error" in r]
    ratio_rows = [[f"flag {f}", *[f"**{x['ratio']:.2f}x** ("
                                  + ", ".join(f"{v:.2f}" for v in x["per_round"]) + ")"
                                  for x in r["ratios"].values()]] for f, r in runs.items()]
    steps = any_run["steps_per_round"] if any_run else "?"
    warm = any_run["warmup_steps"] if any_run else "?"
    lines = [
        "Flax-example CNN, SGD 0.1 momentum 0.9, batch 128, training images from "
        f"`{args.train_split}`. Per flag setting one process trains the three loops in turn, "
        f"{args.rounds} rounds of {steps} steps each after compile and {warm} warm-up steps; "
        "evaluation excluded. images/s: mean over rounds (min-max per round).",
        "",
        _common.table(["digitjax XLA flag", "XLA_FLAGS in the process",
                       *LOOPS.values(), "setup (data, compile, warm-up)"], rows),
        "",
        _common.table(["ratio (per round)",
                       *(any_run["ratios"] if any_run else ["", "", ""])], ratio_rows),
        "",
    ]
    if any_run:
        lines.append(
            f"FLOPs: {any_run['forward_flops_per_image'] / 1e6:.2f} MFLOP forward per image "
            "(`models.forward_flops`: 2 x multiply-adds of convs and matmuls) x 3 for "
            f"forward + backward = {any_run['train_flops_per_image'] / 1e6:.1f} MFLOP per "
            "training image; " + _peak_text(results, args))
    x = results.get("across_processes")
    if x:
        lines += ["", "Across the two processes (one after the other, not interleaved): "
                  "digitjax as shipped (flag on) / the reference without the flag (the "
                  "official example's loop as published) = "
                  f"**{x['digitjax_on_vs_reference_off']:.2f}x**; the flag alone speeds "
                  f"digitjax {x['flag_speedup_digitjax']:.2f}x and the reference "
                  f"{x['flag_speedup_reference']:.2f}x."]
    on = runs.get("on")
    if on:
        share = on["digitjax"]["share_of_peak"]
        same = on["ratios"]["digitjax / reference"]["ratio"]
        lines += ["", f"Targets: >= 4x the reference loop: {same:.2f}x with the same flags"
                  + (f", {x['digitjax_on_vs_reference_off']:.2f}x against the reference "
                     "without the flag" if x else "")
                  + (f"; >= 40% of the fp32 peak: {100 * share:.1f}%" if share else "") + "."]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        print(RESULT_PREFIX + json.dumps(child(args)), flush=True)
        return 0
    guard = _common.check_idle(args)
    env = _common.environment()
    modes = list(MODES) if args.flag == "both" else [args.flag]
    forwarded = ["--steps", str(args.steps), "--rounds", str(args.rounds), "--warmup",
                 str(args.warmup), "--train-split", args.train_split]
    peak = peak_for(env, args.peak_gflops)
    results = {"modes": {}, "peak_gflops": peak, "cpu_mhz": env["cpu_mhz"]}
    for flag in modes:
        print(f"digitjax XLA flag {flag}: training the loops", file=sys.stderr, flush=True)
        proc = _common.run_process(
            [sys.executable, __file__, "--child", *forwarded], timeout=args.timeout,
            env=_common.child_env(DIGITJAX_XLA_DEFAULTS=MODES[flag]))
        found = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
        if proc.returncode != 0 or not found:
            why = (f"timed out after {args.timeout:.0f} s" if proc.timed_out
                   else f"exit {proc.returncode}")
            print(f"child failed ({why}):\n{proc.tail()}", file=sys.stderr)
            results["modes"][flag] = {"error": why, "tail": proc.tail()}
            continue
        run = json.loads(found[-1][len(RESULT_PREFIX):])
        results["modes"][flag] = summarize(run, peak)
    on, off = results["modes"].get("on"), results["modes"].get("off")
    if on and off and "error" not in on and "error" not in off:
        ips = {(f, n): results["modes"][f][n]["images_per_second"]
               for f in MODES for n in ("digitjax", "reference")}
        results["across_processes"] = {
            "digitjax_on_vs_reference_off": round(ips["on", "digitjax"]
                                                  / ips["off", "reference"], 3),
            "flag_speedup_digitjax": round(ips["on", "digitjax"] / ips["off", "digitjax"], 3),
            "flag_speedup_reference": round(ips["on", "reference"]
                                            / ips["off", "reference"], 3),
        }
    _common.record("throughput", "1 + 4. Training throughput and share of the fp32 peak",
                   env, guard, results, report(results, args),
                   enabled=not args.no_record, stem=args.results)
    return 0 if all("error" not in r for r in results["modes"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
