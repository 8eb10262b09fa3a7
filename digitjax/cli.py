"""The `digitjax` command: parses arguments and calls library functions, nothing more."""

from __future__ import annotations

import argparse
import json
import sys

EPILOG_RUN = """examples:
  digitjax run                                 # the default experiment (quick)
  digitjax run flax_cnn --seeds 0-2
  digitjax run flax_cnn --set train.epochs=2 --set optimizer.learning_rate=3e-3 --workdir runs/
  digitjax run fashion_flax_cnn --data-idx ../shared/data/fashion_mnist
"""


class UsageError(Exception):
    """Bad input: reported as one line, exit code 2."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="digitjax", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("list", help="list registered experiments")

    show = sub.add_parser("show", help="print an experiment's full resolved config")
    show.add_argument("name")
    show.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")

    run = sub.add_parser("run", help="train an experiment's seeds", epilog=EPILOG_RUN,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("name", nargs="?", help="registered experiment (default: quick)")
    run.add_argument("--seeds", help="e.g. 0-2 or 0,3,5 (default: the experiment's seeds)")
    run.add_argument("--seed", type=int, help="a single seed")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key (repeatable), e.g. train.epochs=2")
    run.add_argument("--workdir", help="where run folders go (default: $DIGITJAX_WORKDIR "
                     "or ./runs)")
    run.add_argument("--fresh", action="store_true",
                     help="start over even if the run folder holds a finished run")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    _data_args(run)
    return p


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
    from . import registry, runner
    from .config import ConfigError, parse_override, parse_seeds

    name = args.name or registry.default_name()
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
        progress=not args.no_progress, data_dir=args.data_dir, idx_dir=args.data_idx,
        download=args.download)
    return 0 if all(s.get("status") == "completed" for s in summaries) else 1


COMMANDS = {"list": cmd_list, "show": cmd_show, "run": cmd_run}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .config import ConfigError
    from .idx import DataError

    try:
        return COMMANDS[args.command](args)
    except (ConfigError, DataError, UsageError) as e:
        print(f"digitjax: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("digitjax: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

