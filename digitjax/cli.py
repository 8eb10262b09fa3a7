"""The `digitjax` command: parses arguments and calls library functions, nothing more."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from .config import PARALLEL_MODES

EPILOG_RUN = """examples:
  digitjax run                                 # the default experiment (quick)
  digitjax run flax_cnn --seeds 0-2
  digitjax run flax_cnn --set train.epochs=2 --set optimizer.learning_rate=3e-3 --workdir runs/
  digitjax run fashion_flax_cnn --data-idx ../shared/data/fashion_mnist
"""

EPILOG_COMPARE = """examples:
  digitjax compare flax_cnn keras_cnn mlp      # runs under ./runs (or $DIGITJAX_WORKDIR)
  digitjax compare quick --workdir /data/runs-copied-from-a-gpu-box
  digitjax compare flax_cnn keras_cnn --wandb  # the same table from W&B
"""


class UsageError(Exception):
    """Bad input: reported as one line, exit code 2."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="digitjax", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("list", help="list registered experiments")

    show = sub.add_parser("show", help="print an experiment's full resolved config",
                          epilog="examples:\n  digitjax show best_bn_cnn\n"
                          "  digitjax show quick --set train.epochs=2 --set augment.name=affine\n",
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    show.add_argument("name")
    show.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config key (repeatable), as `run --set` does")

    run = sub.add_parser("run", help="train an experiment's seeds", epilog=EPILOG_RUN,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("name", nargs="?", help="registered experiment (default: quick)")
    run.add_argument("--experiment", dest="experiment", help=argparse.SUPPRESS)
    run.add_argument("--seeds", help="e.g. 0-2 or 0,3,5 (default: the experiment's seeds)")
    run.add_argument("--seed", type=int, help="a single seed")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key (repeatable), e.g. train.epochs=2")
    run.add_argument("--workdir", help="where run folders go (default: $DIGITJAX_WORKDIR "
                     "or ./runs)")
    run.add_argument("--fresh", action="store_true",
                     help="start over even if the run folder holds a finished run")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--no-plots", action="store_true",
                     help="do not write the run's plots (<run_dir>/plots/*.png) at the end")
    _execution_args(run)
    run.add_argument("--wandb", choices=("auto", "online", "offline", "off"), default="auto",
                     help="Weights & Biases logging (default auto: online when logged in and "
                     "the server answers, else offline under the run folder; follows "
                     "$WANDB_MODE)")
    _data_args(run)

    cmp = sub.add_parser("compare", help="mean +- std over seeds of experiments' results",
                         epilog=EPILOG_COMPARE,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    cmp.add_argument("experiments", nargs="+", metavar="EXPERIMENT",
                     help="experiment names (NAME also lists its NAME+<hash> --set variants)")
    cmp.add_argument("--workdir", help="where run folders are, searched at any depth "
                     "(default: $DIGITJAX_WORKDIR or ./runs)")
    cmp.add_argument("--wandb", action="store_true", help="read the runs from the W&B API "
                     "(project $WANDB_PROJECT or digitjax, entity $WANDB_ENTITY)")

    sw = sub.add_parser("sweep", help="run every (experiment, seed) of a study; resumable",
                        epilog="examples:\n  digitjax sweep architectures --dry-run\n"
                        "  digitjax sweep architectures --shard 0/2   # on machine 1 of 2\n"
                        "  digitjax sweep architectures --wandb-sweep > sweep.yaml\n",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    sw.add_argument("study")
    sw.add_argument("--workdir", help="default: results/runs/<study>")
    sw.add_argument("--shard", help="i/n: run the i-th of n deterministic slices")
    sw.add_argument("--dry-run", action="store_true", help="list the runs and their state")
    sw.add_argument("--wandb-sweep", action="store_true",
                    help="print a W&B Sweeps config (grid over experiments and seeds)")
    sw.add_argument("--wandb", choices=("auto", "online", "offline", "off"), default="auto")
    sw.add_argument("--no-progress", action="store_true")
    sw.add_argument("--no-plots", action="store_true", help="do not write each run's plots")
    _execution_args(sw)
    _data_args(sw)

    en = sub.add_parser("ensemble", help="test accuracy of an experiment's seeds' averaged "
                        "logits (each seed's reported checkpoint)",
                        epilog="examples:\n  digitjax ensemble flax_cnn\n"
                        "  digitjax ensemble arch_bn_cnn --workdir results/runs/architectures\n",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    en.add_argument("experiment")
    en.add_argument("--workdir", help="default: $DIGITJAX_WORKDIR or ./runs")
    _data_args(en)

    tb = sub.add_parser("table", help="rebuild results/<study>.md and .csv from run records",
                        epilog="examples:\n  digitjax table architectures\n"
                        "  digitjax table architectures --check   # exit 1 if they differ\n",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    tb.add_argument("study")
    tb.add_argument("--workdir", help="default: results/runs/<study>")
    tb.add_argument("--check", action="store_true",
                    help="recompute and compare with the committed files instead of writing")

    ev = sub.add_parser("eval", help="evaluate a saved checkpoint of a run",
                        epilog="examples:\n  digitjax eval runs/quick/seed0\n"
                        "  digitjax eval runs/flax_cnn/seed1 --checkpoint latest --split val\n"
                        "  digitjax eval runs/best_bn_cnn/seed0 --tta 8 --split val\n",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ev.add_argument("run_dir", help="a run folder, e.g. runs/quick/seed0")
    ev.add_argument("--checkpoint", default="best",
                    help="best (by validation accuracy), latest, or a step number")
    ev.add_argument("--split", default="test", choices=("test", "val"),
                    help="the split to evaluate (default test)")
    ev.add_argument("--tta", type=int, default=0, metavar="N",
                    help="test-time augmentation: average the logits of each image and N "
                    "augmented views (the run's augmentation, or --tta-augment)")
    ev.add_argument("--tta-augment", metavar="NAME", help="augmentation the --tta views use")
    _data_args(ev)
    _app_parsers(sub)
    return p


EPILOG_PREDICT = """examples:
  digitjax predict runs/quick/seed0 my_digit.png
  digitjax predict runs/flax_cnn/seed0 photos/*.jpg --checkpoint latest --json
  digitjax predict runs/quick/seed0 photo.jpg --save-input seen/   # what the model sees

Each image (PNG/JPEG/..., any size, dark-on-light or light-on-dark, colour or grey) is made
MNIST-like first: greyscale, inverted if its border is light, cropped to the ink, scaled
into 20x20 keeping the aspect ratio and centred by centre of mass in 28x28.
"""

EPILOG_KAGGLE = """examples:
  digitjax kaggle runs/quick/seed0 --test test.csv -o submission.csv
  DIGITJAX_KAGGLE_CSV=train.csv digitjax run quick --set data.dataset=kaggle \\
      --set data.train_split='train[:38000]' --set data.val_split='train[38000:40000]' \\
      --set data.test_split='train[40000:]'        # train on Kaggle's train.csv instead

Kaggle's images come from MNIST, so a run trained on MNIST has seen Kaggle's test digits:
its submission is flagged (warning on stderr, "leakage": true with --json).
"""

EPILOG_PLOT = """examples:
  digitjax plot runs/quick/seed0            # -> runs/quick/seed0/plots/*.png
  digitjax plot --augment none -o results/plots/augment_none.png
  digitjax plot --experiments flax_cnn keras_cnn mlp --workdir runs -o results/plots/study.png
  digitjax plot --curves runs/best_bn_cnn/seed0 runs/best_bn_cnn_ema/seed0 -o ema.png
"""


def _app_parsers(sub) -> None:
    raw = argparse.RawDescriptionHelpFormatter
    pr = sub.add_parser("predict", help="classify image files with a trained run",
                        epilog=EPILOG_PREDICT, formatter_class=raw)
    pr.add_argument("run_dir", help="a run folder, e.g. runs/quick/seed0")
    pr.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...)")
    pr.add_argument("--checkpoint", default="best",
                    help="best (by validation accuracy), latest, or a step number")
    pr.add_argument("--top", type=int, default=3, help="how many classes to list (default 3)")
    pr.add_argument("--json", action="store_true", help="machine-readable output")
    pr.add_argument("--save-input", metavar="DIR",
                    help="also write each preprocessed 28x28 image to DIR as PNG")

    kg = sub.add_parser("kaggle", help="write a Kaggle Digit Recognizer submission",
                        epilog=EPILOG_KAGGLE, formatter_class=raw)
    kg.add_argument("run_dir", help="a run folder, e.g. runs/quick/seed0")
    kg.add_argument("--test", required=True, help="Kaggle's test.csv (pixel0..pixel783)")
    kg.add_argument("-o", "--output", default="submission.csv",
                    help="submission file to write (default: submission.csv)")
    kg.add_argument("--checkpoint", default="best",
                    help="best (by validation accuracy), latest, or a step number")
    kg.add_argument("--json", action="store_true", help="machine-readable report")
    kg.add_argument("--no-progress", action="store_true", help="no progress bar")

    pl = sub.add_parser("plot", help="plot a run, an augmentation or a set of experiments",
                        epilog=EPILOG_PLOT, formatter_class=raw)
    pl.add_argument("run_dir", nargs="?", help="a run folder: learning curves, confusion "
                    "matrix, confident mistakes (and augmentation) into RUN_DIR/plots/")
    pl.add_argument("--checkpoint", help="best, latest or a step (default: the reported one)")
    pl.add_argument("--augment", metavar="NAME", help="a grid of augmentation NAME on MNIST "
                    "test digits (no run needed)")
    pl.add_argument("--study", help="each experiment's test accuracy and seed spread in a "
                    "study (default output results/plots/study_STUDY.png)")
    pl.add_argument("--experiments", nargs="+", metavar="NAME",
                    help="test accuracy of each experiment with its seed spread, from "
                    "WORKDIR/NAME/seed*/summary.json")
    pl.add_argument("--curves", nargs="+", metavar="RUN_DIR",
                    help="several runs' loss and accuracy per epoch on one split, one line "
                    "each (e.g. two recipes' seed 0)")
    pl.add_argument("--split", choices=("val", "test"), default="val",
                    help="the split --curves shows (default val, the one runs are chosen on)")
    pl.add_argument("--workdir", help="where run folders are (default: $DIGITJAX_WORKDIR "
                    "or ./runs)")
    pl.add_argument("-o", "--output",
                    help="PNG to write (--augment, --experiments, --study, --curves)")
    _data_args(pl)


def _execution_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--parallel", choices=PARALLEL_MODES, default="auto",
                   help="how seeds share the hardware. vmap: all seeds in one vmapped "
                   "program; devices: one seed per local device; off: one after another; "
                   "auto (default): vmap on GPU/TPU, devices on CPU when there are several")
    p.add_argument("--data-parallel", default="auto", metavar="auto|off|N",
                   help="split each step's batch over devices, the state replicated (seeds "
                   "then train one after another). auto (default): every device on GPU/TPU "
                   "or across processes, off on CPU; N: N devices (on CPU, N host devices "
                   "sharing the cores)")
    p.add_argument("--distributed", action="store_true",
                   help="one process of a multi-process run (jax.distributed): from "
                   "$DIGITJAX_COORDINATOR=host:port, $DIGITJAX_NUM_PROCESSES and "
                   "$DIGITJAX_PROCESS_ID, or a cluster JAX detects (Slurm, Open MPI, TPU); "
                   "only process 0 writes the run records")


def _start_execution(args) -> str | int:
    """Set up devices and processes as asked; before anything starts a jax backend."""
    from . import distributed

    data_parallel = distributed.parse_choice(args.data_parallel)
    if isinstance(data_parallel, int) and not args.distributed:
        distributed.cpu_devices(data_parallel)
    if args.distributed:
        distributed.initialize()
    return data_parallel


def _echo():
    """print, on the process that writes the records (the others of a multi-process run
    train the same runs and would repeat every line)."""
    from .distributed import is_primary

    return print if is_primary() else (lambda *a, **k: None)


def _progress(args) -> bool:
    from .distributed import is_primary

    return not args.no_progress and is_primary()


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="TFDS data dir (default: $TFDS_DATA_DIR or "
                   "~/tensorflow_datasets)")
    p.add_argument("--data-idx", help="folder with the data set's four IDX gzip files "
                   "(or env DIGITJAX_IDX_DIR)")
    p.add_argument("--download", action="store_true",
                   help="allow TFDS to download a data set that is not prepared (online)")


def cmd_list(args) -> int:
    from . import registry

    exps = registry.registry()
    width = max(len(n) for n in exps)
    default = registry.default_name()
    for name, exp in exps.items():
        seeds = ",".join(map(str, exp.config.seeds))
        mark = "*" if name == default else " "
        print(f"{mark} {name:<{width}}  seeds {seeds:<9} {exp.description}")
    print("(* = default for `digitjax run`)")
    print("\nStudies (`digitjax sweep STUDY`, then `digitjax table STUDY`):")
    for name, st in registry.studies().items():
        print(f"  {name:<{width}}  {len(st.experiments)} experiments: "
              f"{', '.join(st.experiments)}")
    return 0


def cmd_show(args) -> int:
    from . import registry
    from .config import to_dict
    from .runner import model_summary

    config = registry.resolve(args.name, args.set)
    print(json.dumps(to_dict(config), indent=2))
    print(model_summary(config))
    return 0


def cmd_run(args) -> int:
    from . import ensemble, records, registry, runner, wandb_log
    from .config import ConfigError, parse_override, parse_seeds

    data_parallel = _start_execution(args)
    name = args.name or args.experiment or registry.default_name()
    seeds = None
    try:
        if args.seed is not None:
            seeds = (args.seed,)
        elif args.seeds:
            seeds = parse_seeds(args.seeds)
    except ValueError:
        raise ConfigError(f"--seeds {args.seeds!r}: expected e.g. 0-2 or 0,3,5") from None
    config = registry.resolve(name, args.set, seeds)
    overrides = dict(parse_override(o) for o in args.set)
    summaries = runner.run_experiment(
        config, overrides=overrides, workdir=args.workdir, fresh=args.fresh,
        progress=_progress(args), data_dir=args.data_dir,
        idx_dir=args.data_idx, download=args.download,
        make_loggers=wandb_log.make_loggers(args.wandb), parallel=args.parallel,
        plots=not args.no_plots, data_parallel=data_parallel, echo=_echo())
    if not overrides:  # record the ensemble of its seeds once all have finished
        ensemble.record_if_complete(
            name, args.workdir or records.default_workdir(), _echo(),
            data_dir=args.data_dir, idx_dir=args.data_idx, download=args.download)
    return 0 if all(s.get("status") == "completed" for s in summaries) else 1


def cmd_compare(args) -> int:
    from .compare import compare

    print(compare(args.experiments, workdir=args.workdir, use_wandb=args.wandb))
    return 0


def cmd_sweep(args) -> int:
    from . import study, wandb_log

    if args.wandb_sweep:
        print(study.wandb_sweep_config(args.study), end="")
        return 0
    data_parallel = "off" if args.dry_run else _start_execution(args)
    summaries = study.sweep(
        args.study, workdir=args.workdir, shard=args.shard, dry_run=args.dry_run,
        progress=_progress(args), data_dir=args.data_dir, idx_dir=args.data_idx,
        download=args.download, make_loggers=wandb_log.make_loggers(args.wandb),
        parallel=args.parallel, plots=not args.no_plots, data_parallel=data_parallel,
        echo=_echo())
    diverged = sum(s.get("status") == "diverged" for s in summaries)
    if diverged:  # as `run` does: a script or CI notices, the table counts them apart
        _echo()(f"{args.study}: {diverged} of {len(summaries)} finished runs diverged")
    return 1 if diverged else 0


def cmd_ensemble(args) -> int:
    from . import records
    from .ensemble import ensemble

    r = ensemble(args.experiment, args.workdir or records.default_workdir(),
                 data_dir=args.data_dir, idx_dir=args.data_idx, download=args.download)
    for m in r["members"]:
        print(f"  {args.experiment}/{m['run']} step {m['step']}: {100 * m['accuracy']:.2f}%")
    print(f"{args.experiment}: ensemble of {r['seeds']} seeds: {r['split']} accuracy "
          f"{100 * r['accuracy']:.2f}%")
    return 0


def cmd_table(args) -> int:
    from . import study

    paths = study.table(args.study, workdir=args.workdir, check=args.check)
    if args.check:
        shown = study.shown_workdir(args.study, args.workdir)
        where = f" --workdir {shown}" if shown else ""
        if paths:
            print(f"digitjax: {', '.join(paths)} differ from the run records "
                  f"(rebuild with: digitjax table {args.study}{where})", file=sys.stderr)
            return 1
        print(f"{study.table_stem(args.study, args.workdir)}: tables match the run records")
        return 0
    print("wrote " + ", ".join(paths))
    return 0


def cmd_eval(args) -> int:
    from .runner import evaluate_run

    r = evaluate_run(args.run_dir, which=args.checkpoint, split=args.split,
                     tta_views=args.tta, tta_augment=args.tta_augment, data_dir=args.data_dir,
                     idx_dir=args.data_idx, download=args.download)
    tta = f", TTA {r['tta_views']} views of {r['tta_augment']}" if r["tta_views"] else ""
    print(f"{r['run_dir']} step {r['step']} (epoch {r['epoch']:g}, {args.checkpoint}{tta}): "
          f"{r['split']} accuracy {100 * r['accuracy']:.2f}%, loss {r['loss']:.4f}")
    return 0


def cmd_predict(args) -> int:
    from .predict import Predictor, format_prediction
    from .preprocess import load_digits, save_digit

    if args.top < 1:
        raise UsageError("--top must be >= 1")
    saved = _save_input_paths(args.images, args.save_input) if args.save_input else []
    # Every image is read before the checkpoint: a bad file fails in a fraction of a second.
    images = load_digits(args.images, progress=len(args.images) > 20)
    for path, image in zip(saved, images[:len(saved)], strict=True):
        save_digit(image, path)
    predictor = Predictor.from_run(args.run_dir, args.checkpoint)
    predictions = predictor.predict(images, top=args.top)
    if args.json:
        print(json.dumps({"run_dir": args.run_dir, "checkpoint_step": predictor.checkpoint_step,
                          "predictions": [{"file": f, **p.to_json()} for f, p in
                                          zip(args.images, predictions, strict=True)]},
                         indent=2))
    else:
        for f, p in zip(args.images, predictions, strict=True):
            print(format_prediction(f, p))
    return 0


def _save_input_paths(images: list[str], folder: str) -> list[Path]:
    """Where `--save-input` writes each image's 28x28: `<stem>_28x28.png`, numbered
    (`<stem>-1_28x28.png`, ...) when several inputs share a stem; never onto an input."""
    stems = [Path(p).stem for p in images]
    taken = {s for s in stems if stems.count(s) == 1}
    seen: dict[str, int] = {}
    out = []
    for stem in stems:
        if stems.count(stem) > 1:
            name = None
            while name is None or name in taken:  # skip numbers other inputs' names use
                seen[stem] = seen.get(stem, 0) + 1
                name = f"{stem}-{seen[stem]}"
            taken.add(name)
            stem = name
        out.append(Path(folder) / f"{stem}_28x28.png")
    inputs = {Path(p).resolve() for p in images}
    for path in out:
        if path.resolve() in inputs:
            raise UsageError(f"--save-input {folder} would overwrite the input {path}; "
                             "choose another folder")
    return out


def cmd_kaggle(args) -> int:
    from .kaggle import make_submission, read_kaggle_csv
    from .predict import Predictor

    if Path(args.output).resolve() == Path(args.test).resolve():
        raise UsageError(f"-o {args.output} is the --test file itself; choose another output")
    images, _ = read_kaggle_csv(args.test, labelled=False)  # fail fast, before the model
    predictor = Predictor.from_run(args.run_dir, args.checkpoint)
    report = make_submission(predictor, images, args.output, progress=not args.no_progress)
    if report["warning"]:
        print(f"digitjax: warning: {report['warning']}", file=sys.stderr)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"wrote {report['submission']}: {report['images']:,} rows (ImageId,Label) from "
              f"{args.run_dir} step {report['checkpoint_step']}")
    return 0


def cmd_plot(args) -> int:
    from pathlib import Path

    from . import plots, records

    chosen = [x for x in (args.run_dir, args.augment, args.experiments, args.study,
                          args.curves) if x]
    if len(chosen) != 1:
        raise UsageError("give exactly one of RUN_DIR, --augment NAME, --study STUDY, "
                         "--experiments NAMES or --curves RUN_DIRS")
    if args.curves:
        out = args.output or "curves.png"
        print(f"wrote {plots.plot_runs(plots.read_runs(args.curves), out, split=args.split)}")
        return 0
    if args.study:
        from . import registry, study

        workdir = Path(args.workdir) if args.workdir else study.default_workdir(args.study)
        # Experiments not run yet are left out (a study can be plotted while it grows).
        names = [n for n in registry.get_study(args.study).experiments
                 if any((workdir / n).glob("seed*/summary.json"))]
        if not names:
            raise UsageError(f"no finished runs of study {args.study} in {workdir}")
        stem = study.table_stem(args.study, args.workdir)  # best_h200 beside best_h200.md
        out = args.output or f"results/plots/study_{stem}.png"
        print(f"wrote {plots.plot_study(plots.read_study(workdir, names), out)}")
        return 0
    if args.augment:
        out = plots.plot_augmentations(plots.sample_images(), args.augment,
                                       args.output or f"augment_{args.augment}.png")
        written = [out]
    elif args.experiments:
        workdir = Path(args.workdir) if args.workdir else records.default_workdir()
        study = plots.read_study(workdir, args.experiments)
        written = [plots.plot_study(study, args.output or "results/study.png")]
    else:
        if args.output:
            raise UsageError("-o is for --augment, --experiments, --study and --curves; a "
                             "run's plots go to RUN_DIR/plots/")
        written = plots.make_run_plots(
            args.run_dir, which=args.checkpoint, data_dir=args.data_dir, idx_dir=args.data_idx,
            download=args.download,
            echo=lambda line: print(f"digitjax: {line}", file=sys.stderr)).values()
    for path in written:
        print(f"wrote {path}")
    return 0


COMMANDS = {"list": cmd_list, "show": cmd_show, "run": cmd_run, "eval": cmd_eval,
            "sweep": cmd_sweep, "table": cmd_table, "ensemble": cmd_ensemble,
            "compare": cmd_compare, "predict": cmd_predict, "kaggle": cmd_kaggle, "plot": cmd_plot}


def _storage_error(e: BaseException) -> str | None:
    """One line for a failed read or write (full disk, I/O error), else None.

    Orbax writes arrays through TensorStore, which reports a full disk as a ValueError
    carrying the OS error code, so the message is checked too.
    """
    for err in (e, e.__cause__, e.__context__):
        if isinstance(err, OSError):
            where = f"{err.filename}: " if err.filename else ""
            return f"{where}{err.strerror or err}"
        code = re.search(r"\[os_error_code='?(\d+)", str(err)) if err is not None else None
        if code:
            # Name the checkpoint being written, not TensorStore's file inside it.
            path = re.search(r'local file "([^"]+)"', str(err))
            where = re.sub(r"\.orbax-checkpoint-tmp.*", "", path.group(1)) + ": " if path else ""
            return f"{where}{os.strerror(int(code.group(1)))}"
    return None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .config import ConfigError
    from .idx import DataError
    from .records import RunLocked
    from .stop import Interrupted

    try:
        return COMMANDS[args.command](args)
    except (ConfigError, DataError, UsageError, RunLocked) as e:
        print(f"digitjax: error: {e}", file=sys.stderr)
        return 2
    except json.JSONDecodeError as e:  # a run record edited or damaged by hand
        print(f"digitjax: error: a JSON record is not valid JSON ({e})", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Interrupted):
        print("digitjax: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `digitjax show NAME | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:
        message = _storage_error(e)
        if message is None:
            raise
        # Records are written atomically and checkpoints commit by rename, so what was
        # written before is intact and rerunning `run` or `sweep` resumes from it.
        print(f"digitjax: error: {message} (files written before this are intact)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

