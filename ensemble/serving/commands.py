"""Deploying the Serve app, pushing live updates, the Serve config YAML, and the CLI hooks.

Deployment is declarative, the way ``serve deploy`` does it: the app is described by a Serve
config (``import_path: ensemble.serving.app:build_app`` + ``args`` + per-deployment overrides)
and applied to the Serve controller. That is what makes ``ensemble serve --update RUN_DIR`` a
live update: the import path and args stay the same, only the combiner's and members'
``user_config`` change, so Serve calls ``reconfigure`` on the running replicas instead of
restarting them. (``serve.run`` gives every call a fresh code version and so restarts
replicas.) New member weights change ``args.members_fingerprint`` and therefore do reload the
members, with a rolling restart.

Ray is imported only inside the functions that talk to a cluster, so ``ensemble query`` and
``--write-config`` start nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
import typing
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml

from ensemble import combination
from ensemble.combine import METHODS
from ensemble.config import ServeConfig
from ensemble.rundir import Manifest
from ensemble.serving import cascade
from ensemble.serving.schemas import CombinerSettings, MemberSettings

logger = logging.getLogger(__name__)

APP_NAME = "ensemble"
IMPORT_PATH = "ensemble.serving.app:build_app"
COMBINER = "combiner"
_BUILD_ARGS = ("num_cpus", "num_gpus")  # settings fixed when replicas start (not live)


def member_deployment_name(member: str) -> str:
    return f"member_{member}"


def serve_config_for(
    run_dir: str | os.PathLike, overrides: dict[str, Any] | None = None
) -> ServeConfig:
    """The run's ``serve`` settings (from its manifest's resolved config) plus overrides.

    Args:
        run_dir: the run directory.
        overrides: `ServeConfig` field -> value; None values are ignored.

    Returns:
        The validated ServeConfig.

    Raises:
        ValueError: for unknown fields or invalid values.
    """
    known = {f.name for f in dataclasses.fields(ServeConfig)}
    base = dict(Manifest.load(run_dir).config.get("serve") or {})
    extra = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted((set(base) | set(extra)) - known)
    if unknown:
        raise ValueError(f"unknown serve setting(s) {unknown}; valid: {sorted(known)}")
    return ServeConfig(**{**base, **extra})


def members_fingerprint(run_dir: str | os.PathLike, manifest: Manifest) -> str:
    """Hash of the members' exported files (names, sizes, mtimes): changes when weights do."""
    h = hashlib.sha1()
    for name in sorted(manifest.members):
        root = manifest.member_path(run_dir, name)
        h.update(f"{name}:{manifest.members[name].kind}".encode())
        for f in sorted(p for p in root.rglob("*") if p.is_file()):
            st = f.stat()
            h.update(f"{f.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def resolve_threshold(
    run_dir: str | os.PathLike, manifest: Manifest, cfg: ServeConfig, spec: combination.Combination
) -> tuple[float | None, str]:
    """Cascade threshold and the confidence it applies to.

    The threshold is ``serve.cascade_threshold``, else the manifest's, else fitted on dev within
    ``serve.cascade_max_accuracy_loss`` of the ensemble's dev accuracy. With
    ``serve.cascade_confidence: auto`` a fitted threshold comes with whichever measure lets the
    student answer more dev texts within the budget; a given threshold is read as a margin.

    Returns:
        (threshold, measure). The threshold is None when none is set and it cannot be fitted
        (no student or no dev predictions); that is an error only if the cascade is switched on
        (`CombinerSettings` says so).
    """
    fallback = "margin" if cfg.cascade_confidence == "auto" else cfg.cascade_confidence
    given = cfg.cascade_threshold
    if given is None:
        given = (manifest.combine or {}).get("cascade_threshold")
    if given is not None:
        return float(given), fallback
    try:
        threshold, measure, stats = cascade.fit_cascade_from_run(
            run_dir, spec, cfg.cascade_confidence, cfg.cascade_max_accuracy_loss
        )
    except (FileNotFoundError, ValueError, KeyError) as err:
        logger.info("no cascade threshold fitted: %s", err)
        return None, fallback
    logger.info("cascade threshold %.4f on the student's %s, fitted on dev: %s",
                threshold, measure, stats)
    return threshold, measure


def combiner_settings(
    run_dir: str | os.PathLike, manifest: Manifest, cfg: ServeConfig, method: str | None = None
) -> CombinerSettings:
    """The combiner's live settings from the manifest's combine section and ``cfg``.

    Raises:
        ValueError: if the combination is inconsistent (e.g. stacking without params) or the
            cascade is on without a student or threshold.
    """
    spec = combination.combination_from_manifest(manifest, method)
    if cfg.cascade:
        cascade.student_of(spec)
    if cfg.min_members > len(spec.members):
        raise ValueError(
            f"serve.min_members={cfg.min_members} but the run has {len(spec.members)} members; "
            f"use 1 to {len(spec.members)}"
        )
    threshold, measure = resolve_threshold(run_dir, manifest, cfg, spec)
    return CombinerSettings(method=spec.method, weights=spec.weights, params=_plain(spec.params),
                            cascade_threshold=threshold, cascade_confidence=measure,
                            **_shared(cfg, CombinerSettings, exclude=("cascade_threshold",
                                                                      "cascade_confidence")))


def member_settings(cfg: ServeConfig) -> MemberSettings:
    """A member deployment's live settings from ``cfg``."""
    return MemberSettings(**_shared(cfg, MemberSettings))


def _shared(cfg: ServeConfig, model: type, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """The settings a deployment's ``user_config`` takes from ServeConfig, by field name."""
    return {k: getattr(cfg, k) for k in model.model_fields
            if k not in exclude and hasattr(cfg, k)}


def replicas(cfg: ServeConfig, combiner: bool) -> dict[str, Any]:
    """A deployment's replica options: a fixed count, or Ray Serve's ``autoscaling_config``.

    Raises:
        ValueError: an autoscaling config Ray Serve rejects (the message names the setting).
    """
    from pydantic import ValidationError
    from ray.serve.config import AutoscalingConfig

    key = "combiner_autoscaling" if combiner else "autoscaling"
    auto = getattr(cfg, key)
    if auto is None:
        return {"num_replicas": cfg.combiner_replicas if combiner else cfg.num_replicas}
    example = "e.g. {min_replicas: 1, max_replicas: 2, target_ongoing_requests: 2}"
    unknown = sorted(set(auto) - set(AutoscalingConfig.model_fields))
    if unknown:
        raise ValueError(f"serve.{key} has unknown keys {unknown}; valid: "
                         f"{sorted(AutoscalingConfig.model_fields)} ({example})")
    try:
        checked = AutoscalingConfig(**auto)
    except ValidationError as err:
        why = "; ".join(str(e["msg"]).removeprefix("Value error, ") for e in err.errors())
        raise ValueError(f"serve.{key} is not a valid Ray Serve autoscaling_config: {why} "
                         f"({example})") from None
    return {"autoscaling_config": checked.model_dump(exclude_unset=True)}


def deploy_config(
    run_dir: str | os.PathLike,
    cfg: ServeConfig,
    method: str | None = None,
    app_name: str = APP_NAME,
) -> dict[str, Any]:
    """A Serve config (``serve deploy``-able) for the run: one app, every deployment explicit.

    Args:
        run_dir: the run directory; written as an absolute path (on a cluster it must be on
            storage every node sees).
        cfg: serving settings.
        method: override of the manifest's combine method.
        app_name: the Serve application name.

    Returns:
        A dict matching Ray's ``ServeDeploySchema``.
    """
    run_dir = str(Path(run_dir).resolve())
    manifest = Manifest.load(run_dir)
    if not cfg.route_prefix.startswith("/"):
        raise ValueError(f"route prefix {cfg.route_prefix!r} must start with '/'")
    common = {
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "health_check_period_s": cfg.health_check_period_s,
    }
    member_user_config = member_settings(cfg).model_dump()
    deployments = [
        {
            "name": COMBINER,
            **common,
            **replicas(cfg, combiner=True),
            "ray_actor_options": {"num_cpus": min(cfg.num_cpus, 0.25)},
            "user_config": combiner_settings(run_dir, manifest, cfg, method).model_dump(),
        }
    ] + [
        {
            "name": member_deployment_name(name),
            **common,
            **replicas(cfg, combiner=False),
            "ray_actor_options": {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
            "user_config": member_user_config,
        }
        for name in manifest.members
    ]
    args = {"run_dir": run_dir, "members_fingerprint": members_fingerprint(run_dir, manifest)}
    args.update({k: getattr(cfg, k) for k in _BUILD_ARGS})
    app = {
        "name": app_name,
        "route_prefix": cfg.route_prefix,
        "import_path": IMPORT_PATH,
        "args": args,
        "deployments": deployments,
    }
    return {"http_options": {"host": cfg.host, "port": cfg.port}, "applications": [app]}


def write_deploy_config(path: str | os.PathLike, config: dict[str, Any]) -> Path:
    """Write a Serve config as YAML (validated against Ray's schema first)."""
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(config)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def url_for(cfg: ServeConfig) -> str:
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    return f"http://{host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"


def _app_status(app_name: str) -> Any:
    from ray import serve

    return serve.status().applications.get(app_name)


def running_http_options() -> dict[str, Any] | None:
    """Host and port of the Serve proxy already running on the connected cluster, if any."""
    from ray.serve.context import _get_global_client
    from ray.serve.exceptions import RayServeException

    try:
        http = _get_global_client().http_config
    except RayServeException:
        return None
    return {"host": http.host, "port": http.port}


def apply(
    config: dict[str, Any],
    app_name: str = APP_NAME,
    timeout_s: float = 600.0,
    check_http: bool = True,
) -> None:
    """Apply a Serve config to the connected cluster and wait until the app is RUNNING.

    Like ``serve deploy``, the config replaces the set of config-deployed apps on the cluster.

    Args:
        config: a `deploy_config` dict.
        app_name: the app to wait for.
        timeout_s: how long to wait.
        check_http: fail if Serve already runs with other HTTP options (they cannot change
            without a Serve restart, and the app would not be where the caller expects it).

    Raises:
        RuntimeError: on an HTTP options clash, if the app fails to deploy, or if it is not
            running within ``timeout_s``.
    """
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    running = running_http_options()
    if running is None:
        serve.start(http_options=config["http_options"])
    elif check_http and running != config["http_options"]:
        raise RuntimeError(
            f"Serve already runs on this cluster with HTTP {running}, not "
            f"{config['http_options']}; pass --host/--port to match, or stop it (serve shutdown)"
        )
    before = _app_status(app_name)
    previous = before.last_deployed_time_s if before is not None else -1.0
    # the same controller call `serve deploy` / `serve run CONFIG` make
    _get_global_client().deploy_apps(schema)
    deadline = time.monotonic() + timeout_s
    status = None
    while time.monotonic() < deadline:
        status = _app_status(app_name)
        if status is not None and status.last_deployed_time_s > previous:
            if status.status == "RUNNING":
                return
            if status.status == "DEPLOY_FAILED":
                raise RuntimeError(f"Serve app {app_name!r} failed to deploy: {status.message}")
        time.sleep(0.25)
    raise RuntimeError(f"Serve app {app_name!r} not RUNNING after {timeout_s:.0f}s: {status}")


def deploy(
    run_dir: str | os.PathLike,
    cfg: ServeConfig,
    method: str | None = None,
    app_name: str = APP_NAME,
    timeout_s: float = 600.0,
) -> str:
    """Deploy (or redeploy) the run's app on the connected Ray cluster; returns its URL."""
    apply(deploy_config(run_dir, cfg, method, app_name), app_name, timeout_s)
    url = url_for(cfg)
    logger.info("serving %s at %s", run_dir, url)
    return url


def update(
    run_dir: str | os.PathLike,
    cfg: ServeConfig,
    method: str | None = None,
    app_name: str = APP_NAME,
    timeout_s: float = 600.0,
) -> dict[str, Any]:
    """Push the run's current manifest (method, weights, threshold) to the running app.

    Returns:
        The combiner settings now live.

    Raises:
        RuntimeError: if the app is not running (start it with `ensemble serve RUN_DIR`).
    """
    if _app_status(app_name) is None:
        raise RuntimeError(
            f"no Serve app {app_name!r} is running on this cluster; start it with "
            "`ensemble serve RUN_DIR` (and pass --address of that cluster to --update)"
        )
    config = deploy_config(run_dir, cfg, method, app_name)
    apply(config, app_name, timeout_s, check_http=False)  # the proxy keeps its host and port
    return config["applications"][0]["deployments"][0]["user_config"]


def _plain(obj: Any) -> Any:
    """JSON-safe copy (numpy arrays and scalars -> lists and floats)."""
    return json.loads(json.dumps(obj, default=lambda o: np.asarray(o).tolist()))


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


__all__ = [
    "APP_NAME",
    "add_commands",
    "apply",
    "COMBINER",
    "member_deployment_name",
    "combiner_settings",
    "deploy",
    "deploy_config",
    "members_fingerprint",
    "resolve_threshold",
    "running_http_options",
    "serve_config_for",
    "update",
    "url_for",
    "write_deploy_config",
]
