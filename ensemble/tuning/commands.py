"""`ensemble tune CONFIG`: a Ray Tune experiment whose trials are joint-training runs."""

from __future__ import annotations

import argparse


def cmd_tune(args: argparse.Namespace) -> int:
    from ensemble import config as C
    from ensemble.raystart import init_ray
    from ensemble.tuning.search import run_tune

    overrides = list(args.overrides or [])
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    cfg = C.load(args.config, overrides)
    init_ray(cfg.ray, args.address, args.verbose)
    out = run_tune(cfg, resume=not args.fresh)
    print(f"TUNE_DIR={out}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tune", help="Ray Tune over joint-training runs (PBT/PB2/ASHA/random)")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. tune.num_samples=8")
    p.add_argument("--address", default=None, help="Ray cluster to join")
    p.add_argument("--output-dir", default=None)
    p.add_argument("--fresh", action="store_true",
                   help="ignore an existing experiment (by default an interrupted one resumes)")
    p.add_argument("--verbose", action="store_true")
    p.set_defaults(func=cmd_tune)
