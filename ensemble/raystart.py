"""Ray is started in one place: join a cluster, or start a local Ray that stays on loopback.

`ensemble train`, `tune`, `serve`, `predict` and `distill` all call `init_ray`. A local Ray binds
``ray.node_ip_address`` (127.0.0.2 by default): Ray swaps 127.0.0.1 for the machine's interface
address, but not the rest of 127.0.0.0/8, so nothing it starts listens beyond the machine.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

from ensemble.config import RayConfig

__all__ = ["init_ray", "run_ray_config"]


def init_ray(rc: RayConfig, address: str | None = None, verbose: bool = False) -> bool:
    """Join a cluster (``address``, ``rc.address`` or RAY_ADDRESS) or start a local Ray.

    Args:
        rc: the run's ``ray`` section (local CPUs and node IP; a cluster address).
        address: a cluster to join, ahead of ``rc.address`` and RAY_ADDRESS.
        verbose: forward the workers' logs to this process.

    Returns:
        True when this call started a local Ray (whoever called it shuts it down), False when
        Ray was running already or a cluster was joined.

    Raises:
        RuntimeError: a cluster refused the connection; the message names the token-auth fix.
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or rc.address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"log_to_driver": verbose, "logging_level": logging.WARNING}
    if address:
        try:
            ray.init(address=address, **kwargs)
        except ConnectionError as err:
            # Ray >= 2.5x turns token auth on for local clusters, but a driver joining by an
            # explicit address presents the token only in token mode
            raise RuntimeError(
                f"{err}; if the cluster uses token authentication (the default for a local "
                "ray.init), run with RAY_AUTH_MODE=token"
            ) from None
        return False
    ray.init(num_cpus=rc.num_cpus, _node_ip_address=rc.node_ip_address, include_dashboard=False,
             **kwargs)
    return True


def run_ray_config(run_dir: str | os.PathLike, **overrides: Any) -> RayConfig:
    """The ``ray`` section a finished run was trained with (from its manifest), overridden by
    the non-None ``overrides``."""
    from ensemble.rundir import Manifest

    saved = Manifest.load(Path(run_dir)).config.get("ray") or {}
    known = {f.name for f in dataclasses.fields(RayConfig)}
    values = {k: v for k, v in saved.items() if k in known}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return RayConfig(**values)
