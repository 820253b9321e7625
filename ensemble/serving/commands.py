"""``ensemble serve`` and ``ensemble query``: the command-line side of serving.

Flags are derived from `ServeConfig`'s fields; the work is done by `ensemble.serving.deploy`
(Serve config, deploy, live update) and `ensemble.client` (queries). Ray is imported only when a
command talks to a cluster, so ``ensemble query`` and ``--write-config`` start nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import typing
from typing import Any, Literal

from ensemble.combine import METHODS
from ensemble.config import ServeConfig
from ensemble.serving.deploy import (
    APP_NAME,
    deploy,
    deploy_config,
    update,
    url_for,
    write_deploy_config,
)
from ensemble.serving.settings import serve_config_for

# ---------------------------------------------------------------- CLI hooks (ensemble.cli)


# serve.<key> -> its flag's help. A flag's name, type, choices and on/off form come from the
# ServeConfig field it sets (the one definition of a setting and its default).
_SERVE_HELP = {
    "host": "HTTP host (default serve.host: 127.0.0.1)",
    "port": "HTTP port (default serve.port)",
    "route_prefix": "route prefix, e.g. /ensemble (default /)",
    "cascade_threshold": "override the fitted cascade threshold",
    "cascade_max_accuracy_loss": "dev accuracy the fitted cascade may lose, as a fraction "
    "(default 0.005 = half a point)",
    "cascade_confidence": "what the cascade thresholds: margin (top-1 minus top-2 probability), "
    "max_prob, or auto (default: the one that lets the student answer more dev texts)",
    "num_cpus": "CPUs per member replica (fractions are fine)",
    "num_gpus": "GPUs per member replica",
    "num_replicas": "replicas per member deployment",
    "combiner_replicas": "combiner replicas (2 keep answering while one restarts)",
    "min_members": "fewest members that answer a request; members that fail or time out are "
    "left out of the combination (degraded: true) and below this it is a 503",
    "max_batch_size": "texts per forward pass; 1 turns batching off",
    "batch_wait_timeout_s": "seconds a batch waits to fill",
    "forward_chunk_size": "texts per forward pass, shortest first; 0 = the whole batch",
    "cascade": "the student answers alone when confident",
    "cascade_student_in_combiner": "run the cascade's student inside the combiner, saving a hop "
    "(default on)",
    "sequential": "call the members one after another (benchmark baseline)",
}


def _add_serve_flags(p: argparse.ArgumentParser) -> None:
    """``--<key>`` for every key of `_SERVE_HELP`, typed after its ServeConfig field."""
    hints = typing.get_type_hints(ServeConfig)
    for key, text in _SERVE_HELP.items():
        flag, typ = "--" + key.replace("_", "-"), hints[key]
        if typ is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
            continue
        choices = list(typing.get_args(typ)) if typing.get_origin(typ) is Literal else None
        base = next(t for t in (typing.get_args(typ) or (typ,)) if t is not type(None))
        p.add_argument(flag, type=str if choices else base, choices=choices, help=text)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``serve`` and ``query`` on the main CLI's subparsers.

    Each parser gets ``func(args) -> int`` as its handler (``args.func(args)``).
    """
    p = subparsers.add_parser(
        "serve",
        help="serve a run directory with Ray Serve (HTTP on 127.0.0.1 by default)",
        description="Start the ensemble's Serve app and block until Ctrl-C. --update pushes the "
        "manifest's method/weights to the running app live; --write-config writes a "
        "`serve deploy`-able YAML instead of serving.",
    )
    p.add_argument("run_dir", help="run directory with manifest.json and members/*/export")
    _add_serve_flags(p)
    p.add_argument("--method", choices=METHODS, help="combine method override")
    p.add_argument("--update", action="store_true", help="push the manifest to a running app")
    p.add_argument("--write-config", metavar="PATH", help="write the Serve config YAML and exit")
    p.add_argument("--app-name", default=APP_NAME, help="Serve application name")
    p.add_argument("--address", "--ray-address", dest="ray_address",
                   help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--node-ip-address", help="loopback IP for a local Ray (default from run)")
    mode = p.add_mutually_exclusive_group()  # default: block until Ctrl-C, then remove the app
    mode.add_argument(
        "--blocking", dest="detach", action="store_false", default=False, help="(default)"
    )
    mode.add_argument(
        "--detach",
        action="store_true",
        help="return once running (needs a Ray cluster that outlives this command: --address)",
    )
    p.set_defaults(func=_serve)

    q = subparsers.add_parser(
        "query",
        help="send texts to a running ensemble server",
        description="Classify texts with a running `ensemble serve`. More texts than the "
        "server's serve.max_texts are sent as several requests, in order.",
    )
    q.add_argument("texts", nargs="*", help="texts to classify; '-' or none reads stdin lines")
    q.add_argument("--url", default=url_for(ServeConfig()), type=_http_url,
                   help="server URL with route prefix")
    q.add_argument("--json", action="store_true", help="print the raw JSON response")
    q.add_argument("--members", action="store_true", help="include every member's output")
    q.add_argument("--timeout", type=float, default=30.0, help="seconds before giving up")
    q.set_defaults(func=_query)


def _http_url(value: str) -> str:
    if not value.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(
            f"{value!r} has no scheme; use e.g. http://{value.split('://')[-1]}")
    return value


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {n: getattr(args, n) for n in _SERVE_HELP if getattr(args, n) is not None}


def _connect(args: argparse.Namespace, run_dir: str) -> bool:
    """Connect to (or start) Ray; True if this process started it."""
    import ray

    from ensemble.raystart import init_ray, run_ray_config

    if ray.is_initialized():
        return False
    address = args.ray_address or os.environ.get("RAY_ADDRESS")
    if address is None and args.update:
        # never "auto": with several Ray instances on a machine it may pick someone else's
        raise ValueError(
            "--update needs the cluster serving the app: pass --address "
            "(`ensemble serve` prints it) or set RAY_ADDRESS"
        )
    # the run's own cluster address is not used: serve joins only the cluster it is given
    rc = dataclasses.replace(run_ray_config(run_dir, node_ip_address=args.node_ip_address),
                             address=None)
    return init_ray(rc, address, verbose=address is None)


def _serve(args: argparse.Namespace) -> int:
    try:
        cfg = serve_config_for(args.run_dir, _overrides(args))
        if args.write_config:
            config = deploy_config(args.run_dir, cfg, args.method, args.app_name)
            print(f"wrote {write_deploy_config(args.write_config, config)}")
            return 0
        import ray

        if args.detach and not (args.ray_address or ray.is_initialized()):
            print(
                "--detach needs a Ray cluster that outlives this command: `ray start --head "
                "--node-ip-address=127.0.0.1`, then pass --address auto",
                file=sys.stderr,
            )
            return 2
        started = _connect(args, args.run_dir)
        if args.update:
            live = update(args.run_dir, cfg, args.method, args.app_name)
            print(
                f"updated {args.app_name}: method={live['method']} weights={live['weights']}"
                f" cascade={live['cascade']} threshold={live['cascade_threshold']}"
            )
            return 0
        url = deploy(args.run_dir, cfg, args.method, args.app_name)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    import ray

    gcs = ray.get_runtime_context().gcs_address
    print(f"serving {args.run_dir} at {url} (POST {url}/predict, GET {url}/info)")
    auth = "RAY_AUTH_MODE=token " if os.environ.get("RAY_AUTH_MODE") == "token" else ""
    print(f"push new weights: {auth}ensemble serve {args.run_dir} --update --address {gcs}")
    if args.detach:
        return 0
    return _block(args.app_name, started)


def _block(app_name: str, started_ray: bool) -> int:
    import ray
    from ray import serve

    print("press Ctrl-C to stop")
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        print("shutting down")
    finally:
        serve.delete(app_name)
        if started_ray:
            serve.shutdown()
            ray.shutdown()
    return 0


def _query(args: argparse.Namespace) -> int:
    from ensemble.client import EnsembleClient, EnsembleError, print_predictions

    texts = list(args.texts)
    if not texts or texts == ["-"]:
        texts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    try:
        with EnsembleClient(args.url, timeout=args.timeout) as client:
            # a batch above serve.max_texts goes as several requests, in order
            response = client.predict_in_parts(texts, return_members=args.members)
    except EnsembleError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(response.model_dump_json(indent=2))
    else:
        print_predictions(texts, response.predictions, members=args.members)
    return 0


__all__ = ["add_commands"]
