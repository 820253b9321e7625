"""A run's serving settings: `ServeConfig` (the one definition of each setting and its default)
read from the run's manifest plus overrides, and the live ``user_config`` of each deployment
derived from it by field name; the cascade threshold the combiner starts with.

Imports neither Ray nor torch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import numpy as np

from ensemble import combination
from ensemble.config import ServeConfig
from ensemble.rundir import Manifest
from ensemble.serving import cascade
from ensemble.serving.schemas import CombinerSettings, MemberSettings

logger = logging.getLogger(__name__)


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


def resolve_threshold(
    run_dir: str | os.PathLike, cfg: ServeConfig, spec: combination.Combination
) -> tuple[float | None, str]:
    """Cascade threshold and the confidence it applies to.

    The threshold is ``serve.cascade_threshold``, else the manifest's (``spec.info``), else fitted
    on dev within ``serve.cascade_max_accuracy_loss`` of the ensemble's dev accuracy. With
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
        given = spec.info.get("cascade_threshold")
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
    spec = manifest.combination(method)
    if cfg.cascade:
        cascade.student_of(spec)
    if cfg.min_members > len(spec.members):
        raise ValueError(
            f"serve.min_members={cfg.min_members} but the run has {len(spec.members)} members; "
            f"use 1 to {len(spec.members)}"
        )
    threshold, measure = resolve_threshold(run_dir, cfg, spec)
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


def _plain(obj: Any) -> Any:
    """JSON-safe copy (numpy arrays and scalars -> lists and floats)."""
    return json.loads(json.dumps(obj, default=lambda o: np.asarray(o).tolist()))


__all__ = ["combiner_settings", "member_settings", "resolve_threshold", "serve_config_for"]
