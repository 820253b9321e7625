"""`ensemble launch`: run `ensemble train` / `ensemble tune` on a Ray cluster as a Ray Job.

The local project directory is packaged as the job's `working_dir` (without run outputs, `.git`
and benchmark results), the config is checked here before anything is uploaded, and the job's
entrypoint is `python -m ensemble.cli <command> --address auto CONFIG overrides...`, so the driver
and every Ray worker import the same uploaded code. The logs are streamed back while the job
runs; the job's last `RUN_DIR=<path>` line (`TUNE_DIR=` for tune) names its output directory,
which `launch` returns.

A job keeps running when the client goes away (Ctrl-C, lost connection): follow it again with
`ray job logs -f JOB_ID`, stop it with `ray job stop JOB_ID`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import shlex
import sys
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from ensemble import config as C

logger = logging.getLogger(__name__)

# command -> the line it prints last, naming its output directory: KEY=<path>
OUTPUT_KEYS = {"train": "RUN_DIR", "tune": "TUNE_DIR"}
COMMANDS = tuple(OUTPUT_KEYS)
# never uploaded: outputs and history can be large and are not code
DEFAULT_EXCLUDES = (
    "runs/",
    ".git",
    "benchmarks/results",
    "__pycache__",
    "*.egg-info",
    ".pytest_cache",
    ".ruff_cache",
    ".venv",
)
# client env vars the job gets as well. Never secrets (RAY_AUTH_TOKEN, HF_TOKEN): a job's
# runtime_env is readable in the dashboard, and cluster nodes carry their own credentials
PASSTHROUGH_ENV = (
    "RAY_AUTH_MODE",
    "RAY_TRAIN_V2_ENABLED",
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_ENDPOINT",
    "TOKENIZERS_PARALLELISM",
    "NCCL_DEBUG",
    "TORCH_DISTRIBUTED_DEBUG",
)
PASSTHROUGH_PREFIX = "ENSEMBLE_"
_ADDRESS_ENV = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")  # JobSubmissionClient prefers these


@dataclass(frozen=True)
class JobSpec:
    """Everything `JobSubmissionClient.submit_job` needs; built by `build_job`."""

    entrypoint: str
    runtime_env: dict[str, Any]
    submission_id: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    output_key: str = "RUN_DIR"  # the job prints `<output_key>=<path>` when it is done


@dataclass(frozen=True)
class LaunchResult:
    """How a launched job ended; `run_dir` is the path of its last `RUN_DIR=` line (or
    `TUNE_DIR=`, see `JobSpec.output_key`), None when it printed none."""

    job_id: str
    status: str  # a ray.job_submission.JobStatus value: SUCCEEDED, FAILED, STOPPED, ...
    run_dir: str | None = None
    message: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "SUCCEEDED"


def find_project_dir(start: str | os.PathLike | None = None) -> Path:
    """The nearest directory at or above `start` (default: cwd) holding a pyproject.toml.

    Falls back to `start` itself, so launching from outside a checkout uploads the cwd.
    """
    start = Path(start or Path.cwd()).resolve()
    for folder in (start, *start.parents):
        if (folder / "pyproject.toml").is_file():
            return folder
    return start


def passthrough_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The subset of `environ` (default: os.environ) that the job inherits."""
    environ = os.environ if environ is None else environ
    return {
        k: v for k, v in environ.items() if k in PASSTHROUGH_ENV or k.startswith(PASSTHROUGH_PREFIX)
    }


def build_job(
    config: str | os.PathLike,
    *,
    command: str = "train",
    overrides: Sequence[str] = (),
    storage_path: str | None = None,
    working_dir: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
    environ: Mapping[str, str] | None = None,
    submission_id: str | None = None,
) -> JobSpec:
    """Check the config locally and describe the Ray Job that runs `command` on it.

    Args:
        config: YAML config; must lie inside `working_dir`, which is what the job sees.
        command: "train" or "tune".
        overrides: dotted `key=value` config overrides, passed on to the command.
        storage_path: shared storage for Ray Train/Tune (a path every node mounts, or a
            cloud URI); becomes the override `ray.storage_path=...`.
        working_dir: uploaded as the job's working dir; default: the project dir of the cwd.
        env: extra env vars for the job (on top of the pass-through ones).
        environ: where pass-through vars are read (default: os.environ).
        submission_id: job id; default `ensemble-<command>-<name>-<random>`.

    Returns:
        The job's entrypoint, runtime_env, id and metadata.

    Raises:
        ValueError: unknown command, missing config or one outside the working dir.
        ConfigError: the config with its overrides does not load (malformed override, unknown
            key, bad value).
    """
    if command not in COMMANDS:
        raise ValueError(f"--command {command!r} is not one of {COMMANDS}")
    overrides = [*overrides, f"ray.storage_path={storage_path}"] if storage_path else [*overrides]
    working_dir = find_project_dir() if working_dir is None else Path(working_dir).resolve()
    config_path = Path(config).resolve()
    if not config_path.is_file():
        raise ValueError(f"config {config} does not exist")
    if not config_path.is_relative_to(working_dir):
        raise ValueError(
            f"config {config_path} is outside the working dir {working_dir} that the job "
            "receives; move the config into it or pass --working-dir"
        )
    cfg = C.load(config_path, overrides)  # fail here, not minutes later on the cluster
    _warn_about_storage(cfg)

    rel_config = config_path.relative_to(working_dir).as_posix()
    # options before the positionals: argparse cannot take positionals after an option
    argv = ["python", "-m", "ensemble.cli", command, "--address", "auto", rel_config, *overrides]
    runtime_env = {
        "working_dir": str(working_dir),
        "excludes": list(DEFAULT_EXCLUDES),
        "env_vars": {**passthrough_env(environ), **(env or {})},
    }
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", cfg.name).strip("-") or "run"
    return JobSpec(
        entrypoint=shlex.join(argv),
        runtime_env=runtime_env,
        submission_id=submission_id or f"ensemble-{command}-{name}-{uuid.uuid4().hex[:8]}",
        metadata={"ensemble_command": command, "config": rel_config, "name": cfg.name},
        output_key=OUTPUT_KEYS[command],
    )


def _warn_about_storage(cfg: C.RunConfig) -> None:
    if not cfg.ray.storage_path:
        logger.warning(
            "ray.storage_path is not set: checkpoints go to the run directory on the head node, "
            "which worker nodes of a multi-node cluster cannot reach; pass --storage-path "
            "(a shared mount or s3://...)"
        )
    if not Path(cfg.output_dir).is_absolute():
        logger.warning(
            "output_dir=%s is relative: the run directory will sit in the job's temporary "
            "working dir on the head node; pass output_dir=/shared/path as an override",
            cfg.output_dir,
        )


def parse_run_dir(logs: str | Iterable[str], key: str = "RUN_DIR") -> str | None:
    """The path of the last `<key>=<path>` line in `logs` (text or lines), or None."""
    lines = logs.splitlines() if isinstance(logs, str) else logs
    prefix = f"{key}="
    found = None
    for line in lines:
        line = line.strip()
        if line.startswith(prefix) and len(line) > len(prefix):
            found = line[len(prefix) :]
    return found


def resolve_address(address: str | None, environ: Mapping[str, str] | None = None) -> str:
    """The cluster address to submit to: `address`, else RAY_API_SERVER_ADDRESS / RAY_ADDRESS.

    Raises:
        ValueError: no address at all, or `address` disagrees with one of those env vars
            (JobSubmissionClient would silently submit to the env var's cluster instead).
    """
    environ = os.environ if environ is None else environ
    for var in _ADDRESS_ENV:
        value = environ.get(var)
        if not value:
            continue
        if address and address.rstrip("/") != value.rstrip("/"):
            raise ValueError(
                f"{var}={value} is set and Ray would submit there instead of --address "
                f"{address}; unset {var} or pass the same address"
            )
        return value
    if not address:
        raise ValueError(
            "no cluster address: pass --address http://HEAD:8265 (dashboard) or "
            "ray://HEAD:10001 (Ray Client), or set RAY_API_SERVER_ADDRESS"
        )
    return address


def submit(client: Any, spec: JobSpec) -> str:
    """Submit `spec` through a `JobSubmissionClient`; returns the job id."""
    job_id = client.submit_job(
        entrypoint=spec.entrypoint,
        runtime_env=spec.runtime_env,
        submission_id=spec.submission_id,
        metadata=spec.metadata,
    )
    logger.info("submitted job %s: %s", job_id, spec.entrypoint)
    return job_id


def follow(
    client: Any,
    job_id: str,
    out: TextIO | None = sys.stdout,
    key: str = "RUN_DIR",
    poll_s: float = 1.0,
) -> LaunchResult:
    """Stream the job's logs to `out` (None: don't) until it ends; returns how it ended,
    with the path of the job's last `<key>=` line."""
    if out is not None:
        try:
            asyncio.run(_tail(client, job_id, out))
        except (RuntimeError, OSError) as err:  # the stream broke, not the job: poll instead
            logger.warning("log stream of %s broke (%s); waiting for the job to end", job_id, err)
    while not (status := client.get_job_status(job_id)).is_terminal():
        time.sleep(poll_s)
    message = client.get_job_info(job_id).message
    run_dir = parse_run_dir(client.get_job_logs(job_id), key)
    return LaunchResult(job_id, str(status.value), run_dir, message)


async def _tail(client: Any, job_id: str, out: TextIO) -> None:
    async for chunk in client.tail_job_logs(job_id):
        out.write(chunk)
        out.flush()


def connect(address: str | None, headers: Mapping[str, str] | None = None) -> Any:
    """A `JobSubmissionClient` for the cluster at `address` (see `resolve_address`).

    Args:
        address: `http(s)://HEAD:8265`, `ray://HEAD:10001`, or None for the env var.
        headers: extra HTTP headers (e.g. for a proxy, or an explicit Authorization); without
            one, Ray adds the token of RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH / ~/.ray/auth_token
            when RAY_AUTH_MODE=token.

    Raises:
        ValueError: no usable address (see `resolve_address`).
        ConnectionError: the cluster is unreachable or refuses the token.
    """
    # imported here, not at the top: `ensemble --help` should not wait for Ray to import
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(address)
    try:
        return JobSubmissionClient(url, headers=dict(headers or {}))
    except AuthenticationError as err:
        raise ConnectionError(
            f"{url} refused this client's token ({err}); export RAY_AUTH_MODE=token and the "
            "cluster's token (RAY_AUTH_TOKEN_PATH=FILE, or ~/.ray/auth_token; "
            "`ray get-auth-token` on the head prints it)"
        ) from err


def launch(
    spec: JobSpec,
    address: str | None,
    *,
    out: TextIO | None = sys.stdout,
    headers: Mapping[str, str] | None = None,
) -> LaunchResult:
    """Submit `spec` to the cluster at `address` and follow it to the end.

    Args:
        spec: from `build_job`.
        address: see `connect`.
        out: where the streamed logs go; None streams nothing.
        headers: see `connect`.

    Returns:
        The job id, its final status, the output directory it reported and Ray's message.
    """
    client = connect(address, headers)
    return follow(client, submit(client, spec), out, spec.output_key)


# ----------------------------------------------------------------------------------- CLI
def _add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        help="cluster: http://HEAD:8265 (dashboard) or ray://HEAD:10001; "
        "default $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS",
    )
    parser.add_argument(  # dest: the CLI's subcommand name already lives in args.command
        "--command", dest="job_command", choices=COMMANDS, default="train", help="what the job runs"
    )
    parser.add_argument(
        "--storage-path", help="shared storage for checkpoints (NFS path or s3://...)"
    )
    parser.add_argument("--working-dir", help="uploaded as the job's cwd; default: project dir")
    parser.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE", help="extra job env var"
    )
    parser.add_argument("--job-id", help="submission id; default ensemble-<command>-<name>-<rand>")
    parser.add_argument("--no-wait", action="store_true", help="submit, print JOB_ID=..., return")
    parser.add_argument("--quiet", action="store_true", help="don't stream the job's logs")


def add_commands(subparsers: Any) -> None:
    """Register `ensemble launch` on the CLI's subparsers (`args.func(args) -> int`)."""
    parser = subparsers.add_parser(
        "launch",
        help="run train/tune on a Ray cluster as a Ray Job",
        description="Submit `ensemble train` (or `--command tune`) to a Ray cluster, stream its "
        "logs and print the run directory: ensemble launch CONFIG --address URL [--] "
        "[key=value ...]",
    )
    parser.add_argument("config", help="run config YAML, inside the working dir")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.rounds=2")
    _add_options(parser)
    parser.set_defaults(func=_cmd_launch)


def _parse_env(pairs: list[str]) -> dict[str, str]:
    bad = [p for p in pairs if "=" not in p or p.startswith("=")]
    if bad:
        raise ValueError(f"--env {bad} must be KEY=VALUE")
    return dict(p.split("=", 1) for p in pairs)


def job_from_args(args: argparse.Namespace) -> JobSpec:
    """The JobSpec of parsed `ensemble launch` arguments (`cli.parse_args`; no cluster contact).

    Raises:
        ValueError: bad options, overrides or config (see `build_job`).
    """
    return build_job(
        args.config,
        command=args.job_command,
        overrides=list(args.overrides),
        storage_path=args.storage_path,
        working_dir=args.working_dir,
        env=_parse_env(args.env),
        submission_id=args.job_id,
    )


def _cmd_launch(args: argparse.Namespace) -> int:
    try:
        spec = job_from_args(args)
        client = connect(args.address)
    except (ValueError, ConnectionError) as err:  # ValueError includes ConfigError
        print(f"ensemble launch: {err}", file=sys.stderr)
        return 2
    job_id = submit(client, spec)
    if args.no_wait:
        print(f"JOB_ID={job_id}")
        return 0
    try:
        result = follow(client, job_id, None if args.quiet else sys.stdout, spec.output_key)
    except KeyboardInterrupt:
        print(
            f"\ninterrupted; job {job_id} keeps running (`ray job stop {job_id}` ends it)",
            file=sys.stderr,
        )
        return 130
    if not result.ok:
        print(f"job {job_id} {result.status}: {result.message}", file=sys.stderr)
        return 1
    if result.run_dir is None:
        print(f"job {job_id} succeeded but printed no {spec.output_key}= line", file=sys.stderr)
        return 1
    print(f"{spec.output_key}={result.run_dir}")
    return 0
