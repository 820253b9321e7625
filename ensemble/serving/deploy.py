"""Deploying the Serve app, pushing live updates, and the Serve config YAML.

Deployment is declarative, the way ``serve deploy`` does it: the app is described by a Serve
config (``import_path: ensemble.serving.app:build_app`` + ``args`` + per-deployment overrides)
and applied to the Serve controller. That is what makes ``ensemble serve --update RUN_DIR`` a
live update: the import path and args stay the same, only the combiner's and members'
``user_config`` change, so Serve calls ``reconfigure`` on the running replicas instead of
restarting them. (``serve.run`` gives every call a fresh code version and so restarts
replicas.) New member weights change ``args.members_fingerprint`` and therefore do reload the
members, with a rolling restart.

Ray is imported only inside the functions that talk to a cluster, so writing the YAML starts
nothing. `deployments` builds every deployment's options once, for both ``build_app`` (``serve
run``) and the ``serve deploy`` YAML.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any

import yaml

from ensemble.config import ServeConfig
from ensemble.rundir import Manifest
from ensemble.serving.settings import combiner_settings, member_settings

logger = logging.getLogger(__name__)

APP_NAME = "ensemble"
IMPORT_PATH = "ensemble.serving.app:build_app"
COMBINER = "combiner"
_BUILD_ARGS = ("num_cpus", "num_gpus")  # settings fixed when replicas start (not live)


def member_deployment_name(member: str) -> str:
    return f"member_{member}"


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


def deployments(
    run_dir: str | os.PathLike, manifest: Manifest, cfg: ServeConfig, method: str | None = None
) -> dict[str, dict[str, Any]]:
    """Every deployment's Serve options, by deployment name: the combiner first, then a member
    deployment per member. The one builder for ``build_app`` and the ``serve deploy`` YAML.

    Raises:
        ValueError: settings Serve or the run reject (the message names the setting).
    """
    common = {
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "health_check_period_s": cfg.health_check_period_s,
    }
    member_user_config = member_settings(cfg).model_dump()
    options = {COMBINER: {
        **common,
        **replicas(cfg, combiner=True),
        "ray_actor_options": {"num_cpus": min(cfg.num_cpus, 0.25)},
        "user_config": combiner_settings(run_dir, manifest, cfg, method).model_dump(),
    }}
    for name in manifest.members:
        options[member_deployment_name(name)] = {
            **common,
            **replicas(cfg, combiner=False),
            "ray_actor_options": {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
            "user_config": member_user_config,
        }
    return options


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
    args = {"run_dir": run_dir, "members_fingerprint": members_fingerprint(run_dir, manifest)}
    args.update({k: getattr(cfg, k) for k in _BUILD_ARGS})
    app = {
        "name": app_name,
        "route_prefix": cfg.route_prefix,
        "import_path": IMPORT_PATH,
        "args": args,
        "deployments": [{"name": name, **options} for name, options
                        in deployments(run_dir, manifest, cfg, method).items()],
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


__all__ = [
    "APP_NAME",
    "COMBINER",
    "apply",
    "deploy",
    "deploy_config",
    "deployments",
    "member_deployment_name",
    "members_fingerprint",
    "running_http_options",
    "update",
    "url_for",
    "write_deploy_config",
]
