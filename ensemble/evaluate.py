"""Score members and the combined ensemble on one split. Pure numpy; no Ray.

`outputs` maps member name to its predictions on the split: (N, C) probabilities for a
classification member (classifier, teacher, student), (N,) intensities for the regressor.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ensemble import calibration, combine
from ensemble.combination import Combination
from ensemble.metrics import (
    calibration_metrics,
    classification_metrics,
    pairwise_disagreement,
    regression_metrics,
)


def disagreement(
    outputs: Mapping[str, np.ndarray], kinds: Mapping[str, str], edges: Sequence[float]
) -> dict[str, Any]:
    """`metrics.pairwise_disagreement` of the members' top-1 classes; a regressor's is its bin."""
    num_classes = len(edges) + 1
    names, votes = list(outputs), combine.member_votes(outputs, kinds, edges, num_classes)
    return pairwise_disagreement(dict(zip(names, votes.argmax(axis=2), strict=True)))


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


def member_temperatures(
    dev_outputs: Mapping[str, np.ndarray],
    kinds: Mapping[str, str],
    dev_labels: np.ndarray,
    calibrate: bool = True,
) -> dict[str, float] | None:
    """Each classification member's temperature for ``training.calibrate``, fitted on dev.

    None (every member votes its raw probabilities) when ``calibrate`` is off.
    """
    if not calibrate:
        return None
    return calibration.fit_temperatures(dev_outputs, kinds, np.asarray(dev_labels))


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
    """The members' intensity estimates averaged with `combine.intensity_weights`."""
    names = list(estimates)
    weights = combine.intensity_weights([kinds[n] for n in names])
    return combine.combine_intensity(np.stack([estimates[n] for n in names]), weights)


def voted_intensity(
    outputs: Mapping[str, np.ndarray],
    kinds: Mapping[str, str],
    names: Sequence[str],
    votes: np.ndarray,
    class_intensity: Sequence[float],
) -> np.ndarray:
    """The ensemble's (N,) intensity from what its members vote (``votes``, `combine.member_votes`
    in ``names`` order): the regressor's own output, a classifier's expected intensity under its
    temperature-scaled vote, averaged by `ensemble_intensity`."""
    voted = {n: outputs[n] if kinds[n] == "regressor" else votes[i] for i, n in enumerate(names)}
    return ensemble_intensity(intensity_estimates(voted, kinds, class_intensity), kinds)


def evaluate_split(
    outputs: Mapping[str, np.ndarray],
    kinds: Mapping[str, str],
    labels: np.ndarray,
    intensity: np.ndarray | None,
    label_names: Sequence[str],
    class_intensity: Sequence[float],
    edges: Sequence[float],
    learned: Combination | None = None,
    sharpness: float | None = None,
    temperatures: Mapping[str, float] | None = None,
) -> dict[str, dict[str, Any]]:
    """Metrics of every member and of the ensemble under each combination method.

    Args:
        outputs: member name -> predictions on this split (see module docstring).
        kinds: member name -> kind.
        labels: (N,) class ids; intensity: (N,) targets or None.
        label_names, class_intensity, edges: the label space (see `Manifest`).
        learned: the published combination; its row replaces the plain row of its method.
        sharpness: the regressor vote's sharpness (`regressor_sharpness`); None for one-hot.
        temperatures: member -> T (`member_temperatures`); None combines raw probabilities.

    Returns:
        {name: metrics} for members and "ensemble/<method>" rows; each row has the
        classification metrics and, with intensities, pearson/spearman/mae of its intensity.
        A member's row scores its own probabilities; a temperature-scaled member's row adds
        ``temperature`` and the ``nll_calibrated``, ``ece_calibrated`` and ``brier_calibrated``
        of its scaled probabilities, the ones the ensemble rows combine.
    """
    num_classes = len(label_names)
    names = list(outputs)
    probs = combine.member_votes(outputs, kinds, edges, num_classes, sharpness, temperatures)
    temps = temperatures or {}
    rows: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(names):
        own = np.asarray(outputs[name], dtype=np.float64) if name in temps else probs[i]
        rows[name] = classification_metrics(labels, own, label_names)
        if name in temps:
            rows[name]["temperature"] = float(temps[name])
            scaled = calibration_metrics(labels, probs[i])
            rows[name].update({f"{k}_calibrated": v for k, v in scaled.items()})
    ens_intensity = None
    if intensity is not None:
        for name, estimate in intensity_estimates(outputs, kinds, class_intensity).items():
            rows[name].update(regression_metrics(intensity, estimate))
        ens_intensity = voted_intensity(outputs, kinds, names, probs, class_intensity)
    methods: dict[str, np.ndarray] = {m: combine.apply(m, probs) for m in combine.UNFITTED}
    if learned is not None:  # the published combination, its params (an output temperature) too
        methods[learned.method] = learned.combine_votes(probs, names)
    for method, combined in methods.items():
        row = classification_metrics(labels, combined, label_names)
        if ens_intensity is not None:
            row.update(regression_metrics(intensity, ens_intensity))
        rows[f"ensemble/{method}"] = row
    return rows


def compact(rows: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """The headline numbers of each row (for round tables and Tune)."""
    keys = ("accuracy", "macro_f1", "nll", "ece", "temperature", "nll_calibrated",
            "ece_calibrated", "pearson", "spearman", "mae")
    return {name: {k: float(r[k]) for k in keys if k in r} for name, r in rows.items()}
