"""`ensemble` command line: a thin dispatcher over the library.

ensemble validate CONFIG [key=value ...]
ensemble train CONFIG [--address ADDR] [--output-dir DIR] [key=value ...]
ensemble serve RUN_DIR ... | ensemble query TEXT ... | ensemble launch CONFIG ...
ensemble predict RUN_DIR INPUT --output OUT | ensemble distill RUN_DIR --layers N
"""

from __future__ import annotations

import argparse
import logging
import sys

from ensemble import config as C
from ensemble.data import DataError

logger = logging.getLogger("ensemble")


def _overrides(args: argparse.Namespace) -> list[str]:
    extra = list(args.overrides or [])
    if getattr(args, "output_dir", None):
        extra.append(f"output_dir={args.output_dir}")
    return extra


def cmd_validate(args: argparse.Namespace) -> int:
    from ensemble.data import load_splits
    from ensemble.orchestrate import check_config

    cfg = C.load(args.config, _overrides(args))
    check_config(cfg)
    print(
        f"config OK: {len(cfg.members)} members ({', '.join(cfg.members)}), "
        f"{cfg.training.rounds} round(s)"
    )
    if args.data:
        try:
            summary = load_splits(cfg.data).summary()
        except DataError as err:
            print(f"data error: {err}", file=sys.stderr)
            return 2
        print(f"data OK: {summary['splits']}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from ensemble.orchestrate import train

    cfg = C.load(args.config, _overrides(args))
    run_dir = train(cfg, address=args.address, verbose=args.verbose, progress=not args.no_progress)
    print(f"RUN_DIR={run_dir}", flush=True)  # `ensemble launch` reads this line
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ensemble", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO", type=str.upper,
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--version", action="version", version=f"ensemble {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check a config (and optionally its data) without Ray")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. members.student.lr=1e-4")
    p.add_argument("--data", action="store_true", help="also load and validate the data")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("train", help="train the ensemble's members in rounds on Ray")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.rounds=2")
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)",
    )
    p.add_argument("--output-dir", default=None, help="run directory (resumes if it exists)")
    p.add_argument("--verbose", action="store_true", help="forward Ray worker logs")
    p.add_argument("--no-progress", action="store_true", help="no live progress table")
    p.set_defaults(func=cmd_train)

    from ensemble import batch, launch, students
    from ensemble.serving import commands as serving
    from ensemble.tuning import commands as tuning

    # serve/query/..., cluster, tune, predict, distill
    for module in (serving, launch, tuning, batch, students):
        module.add_commands(sub)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ensemble")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


class UsageError(ValueError):
    """A command line the parser cannot place: an unknown option or a stray word."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse an ``ensemble`` command line, every subcommand alike.

    Options may come before or after CONFIG, and dotted ``key=value`` overrides anywhere after
    it (after a ``--`` too): argparse fills ``overrides`` only up to the first option, so the
    rest it leaves over are appended here. Argparse's own errors (a missing CONFIG, a bad
    choice) exit with status 2.

    Raises:
        UsageError: an unknown option, or a word that is not a ``key=value`` override.
    """
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and extra[0] == "--":
        extra = extra[1:]
    if extra:
        command = f"ensemble {args.command}"
        for token in extra:
            if token.startswith("-"):
                raise UsageError(f"unknown option {token!r} (see `{command} --help`)")
            if not hasattr(args, "overrides"):
                raise UsageError(f"unexpected argument {token!r}: `{command}` takes no overrides")
            if "=" not in token:
                raise UsageError(f"unexpected argument {token!r}: `{command}` takes dotted "
                                 "key=value overrides after CONFIG")
        args.overrides = list(args.overrides or []) + extra
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except UsageError as err:
        print(f"ensemble: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("ray", "deepspeed", "DeepSpeed", "transformers", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except C.ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except DataError as err:
        print(f"data error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
