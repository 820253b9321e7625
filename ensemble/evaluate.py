"""Score members and the combined ensemble on one split. Pure numpy; no Ray.

`outputs` maps member name to its predictions on the split: (N, C) probabilities for a
classification member (classifier, teacher, student), (N,) intensities for the regressor.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ensemble import combine
from ensemble.metrics import classification_metrics, regression_metrics

FIXED_METHODS = ("hard_vote", "soft_vote")


def vote_probs(
    outputs: Mapping[str, np.ndarray],
    kinds: Mapping[str, str],
    edges: Sequence[float],
    num_classes: int,
    sharpness: float | None = None,
) -> tuple[list[str], np.ndarray]:
    """Member names and their class votes stacked as (M, N, C); the regressor votes by its bin.

    ``sharpness`` is `combine.regressor_probs`'s: None for a one-hot regressor vote.
    """
    names = list(outputs)
    stacked = [
        combine.regressor_probs(outputs[n], edges, num_classes, sharpness=sharpness)
        if kinds[n] == "regressor"
        else np.asarray(outputs[n], dtype=np.float64)
        for n in names
    ]
    return names, np.stack(stacked)


def regressor_sharpness(
    dev_outputs: Mapping[str, np.ndarray],
    kinds: Mapping[str, str],
    dev_labels: np.ndarray,
    edges: Sequence[float],
    num_classes: int,
    vote: str = "calibrated",
) -> float | None:
    """The regressor vote's sharpness for ``training.regressor_vote``, fitted on dev outputs.

    None (a one-hot vote) when the vote is ``one_hot`` or there is no regressor; with several
    regressors, their intensities are pooled for one fit.
    """
    reg = [
        np.asarray(o, dtype=np.float64) for n, o in dev_outputs.items() if kinds[n] == "regressor"
    ]
    if vote == "one_hot" or not reg:
        return None
    labels = np.concatenate([np.asarray(dev_labels)] * len(reg))
    return combine.fit_regressor_sharpness(np.concatenate(reg), labels, edges, num_classes)


def intensity_estimates(
    outputs: Mapping[str, np.ndarray], kinds: Mapping[str, str], class_intensity: Sequence[float]
) -> dict[str, np.ndarray]:
    """Each member's intensity estimate: the regressor's output or a classifier's expectation."""
    return {
        n: np.asarray(out, dtype=np.float64)
        if kinds[n] == "regressor"
        else combine.expected_intensity(out, class_intensity)
        for n, out in outputs.items()
    }


def ensemble_intensity(estimates: Mapping[str, np.ndarray], kinds: Mapping[str, str]) -> np.ndarray:
    """The regressor's intensity and the classifiers' expected intensities, averaged.

    The regressor is trained for intensity, so it carries as much weight as all classification
    members together (when there is one).
    """
    names = list(estimates)
    reg = [n for n in names if kinds[n] == "regressor"]
    cls = [n for n in names if kinds[n] != "regressor"]
    weights = [
        (0.5 / len(reg) if cls else 1.0 / len(reg))
        if kinds[n] == "regressor"
        else (0.5 / len(cls) if reg else 1.0 / len(cls))
        for n in names
    ]
    return combine.combine_intensity(np.stack([estimates[n] for n in names]), np.array(weights))


def evaluate_split(
    outputs: Mapping[str, np.ndarray],
    kinds: Mapping[str, str],
    labels: np.ndarray,
    intensity: np.ndarray | None,
    label_names: Sequence[str],
    class_intensity: Sequence[float],
    edges: Sequence[float],
    learned: Mapping[str, Any] | None = None,
    sharpness: float | None = None,
) -> dict[str, dict[str, Any]]:
    """Metrics of every member and of the ensemble under each combination method.

    Args:
        outputs: member name -> predictions on this split (see module docstring).
        kinds: member name -> kind.
        labels: (N,) class ids; intensity: (N,) targets or None.
        label_names, class_intensity, edges: the label space (see `Manifest`).
        learned: optional learned combiner {"method", "weights": {name: w}, "params"}.
        sharpness: the regressor vote's sharpness (`regressor_sharpness`); None for one-hot.

    Returns:
        {name: metrics} for members and "ensemble/<method>" rows; each row has the
        classification metrics and, with intensities, pearson/spearman/mae of its intensity.
    """
    num_classes = len(label_names)
    names, probs = vote_probs(outputs, kinds, edges, num_classes, sharpness)
    estimates = intensity_estimates(outputs, kinds, class_intensity)
    rows: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(names):
        rows[name] = classification_metrics(labels, probs[i], label_names)
        if intensity is not None:
            rows[name].update(regression_metrics(intensity, estimates[name]))
    ens_intensity = ensemble_intensity(estimates, kinds) if intensity is not None else None
    methods: dict[str, np.ndarray] = {m: combine.apply(m, probs) for m in FIXED_METHODS}
    if learned and learned.get("method") not in FIXED_METHODS:
        weights = (
            [learned["weights"].get(n, 0.0) for n in names] if learned.get("weights") else None
        )
        methods[learned["method"]] = combine.apply(
            learned["method"], probs, weights, learned.get("params")
        )
    for method, combined in methods.items():
        row = classification_metrics(labels, combined, label_names)
        if ens_intensity is not None:
            row.update(regression_metrics(intensity, ens_intensity))
        rows[f"ensemble/{method}"] = row
    return rows


def compact(rows: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """The headline numbers of each row (for round tables and Tune)."""
    keys = ("accuracy", "macro_f1", "pearson", "spearman", "mae")
    return {name: {k: float(r[k]) for k in keys if k in r} for name, r in rows.items()}
