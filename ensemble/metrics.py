"""Evaluation metrics for members and the ensemble: pure numpy/scipy/scikit-learn.

Every function returns plain Python numbers and lists, so results go straight into
``metrics.json`` with `ensemble.rundir.atomic_write_json`. Undefined quantities never come back
as NaN: correlations of a constant series are 0.0, F1 of a class with no true or predicted
examples is excluded from the macro average, and a ROC AUC that cannot be computed for any
class is ``None`` (JSON ``null``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import (
    auc,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

logger = logging.getLogger(__name__)

__all__ = [
    "brier_score",
    "calibration_metrics",
    "classification_metrics",
    "expected_calibration_error",
    "negative_log_likelihood",
    "regression_metrics",
    "reliability_bins",
    "roc_curves",
]
ECE_BINS = 15
PROB_FLOOR = 1e-12  # NLL of a probability 0 is infinite: clip at this instead


def classification_metrics(
    labels: np.ndarray, probs: np.ndarray, label_names: Sequence[str]
) -> dict:
    """Score class probabilities against integer labels.

    The prediction is ``argmax(probs)``. Per-class precision/recall/F1 use ``zero_division=0``, so
    a class that is never predicted (or never present) scores 0 instead of warning. ``macro_f1``
    averages over the classes that occur in the labels or the predictions (scikit-learn's default
    label set): a class the model misses counts as F1 0, but a class absent from both, e.g. in a
    small evaluation subset, does not drag the average down. ``roc_auc_macro`` is the one-vs-rest
    AUC averaged over the classes that have both positive and negative examples.

    Args:
        labels: (N,) integer class ids in ``[0, C)``.
        probs: (N, C) class scores, usually probabilities (only their ranking matters for AUC).
        label_names: C class names, in class-id order.

    Returns:
        ``{"accuracy", "macro_f1", "per_class": {name: {"precision", "recall", "f1",
        "support"}}, "confusion": C x C nested list (rows = true class, columns = predicted),
        "roc_auc_macro": float | None, "n"}``.

    Raises:
        ValueError: if shapes disagree, ``probs`` is not finite or a label is out of range.
    """
    labels, probs = _check_classification(labels, probs, label_names)
    n_classes = probs.shape[1]
    preds = probs.argmax(axis=1)  # (N,)
    classes = np.arange(n_classes)

    precision, recall, f1, support = precision_recall_fscore_support(
        labels, preds, labels=classes, zero_division=0
    )
    seen = np.union1d(labels, preds)  # classes occurring in labels or predictions
    per_class = {
        name: {
            "precision": float(precision[c]),
            "recall": float(recall[c]),
            "f1": float(f1[c]),
            "support": int(support[c]),
        }
        for c, name in enumerate(label_names)
    }
    aucs = list(_per_class_auc(labels, probs).values())
    return {
        "accuracy": float(np.mean(preds == labels)),
        "macro_f1": float(np.mean(f1[seen])),
        "per_class": per_class,
        "confusion": confusion_matrix(labels, preds, labels=classes).tolist(),
        "roc_auc_macro": float(np.mean(aucs)) if aucs else None,
        **calibration_metrics(labels, probs),
        "n": int(labels.shape[0]),
    }


def negative_log_likelihood(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean -log p(true class), with p floored at PROB_FLOOR. probs: (N, C) rows summing to 1."""
    picked = probs[np.arange(len(labels)), labels]
    return float(-np.mean(np.log(np.clip(picked, PROB_FLOOR, 1.0))))


def brier_score(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean over texts of sum_c (p_c - 1[c = y])^2 (0 perfect, 2 worst)."""
    onehot = np.eye(probs.shape[1])[labels]
    return float(np.mean(np.sum((probs - onehot) ** 2, axis=1)))


def reliability_bins(labels: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS) -> dict:
    """Top-1 confidence vs accuracy in `bins` equal-width confidence bins on [0, 1].

    Returns {"edges": bins+1 floats, "count", "confidence", "accuracy": one entry per bin}; an
    empty bin has count 0 and confidence/accuracy None.
    """
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    # bin i holds (edges[i], edges[i+1]]; a confidence of exactly 0 falls in bin 0
    which = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)
    count, mean_conf, acc = [], [], []
    for b in range(bins):
        sel = which == b
        count.append(int(sel.sum()))
        mean_conf.append(float(conf[sel].mean()) if sel.any() else None)
        acc.append(float(correct[sel].mean()) if sel.any() else None)
    return {"edges": edges.tolist(), "count": count, "confidence": mean_conf, "accuracy": acc}


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray,
                               bins: int = ECE_BINS) -> float:
    """ECE: sum over equal-width top-1 confidence bins of |accuracy - confidence| x bin share."""
    r = reliability_bins(labels, probs, bins)
    n = max(1, sum(r["count"]))
    return float(sum(c / n * abs(a - f) for c, a, f in
                     zip(r["count"], r["accuracy"], r["confidence"], strict=True) if c))


def calibration_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """NLL, ECE (15 equal-width bins) and Brier score of class probabilities."""
    return {"nll": negative_log_likelihood(labels, probs),
            "ece": expected_calibration_error(labels, probs),
            "brier": brier_score(labels, probs)}


def regression_metrics(targets: np.ndarray, preds: np.ndarray) -> dict:
    """Score real-valued predictions (e.g. sentiment intensity) against targets.

    Pearson and Spearman correlations are undefined when either series is constant (or has
    fewer than two points); they are then reported as 0.0, i.e. "no linear / monotonic
    relationship", rather than NaN, so a collapsed regressor scores as uninformative and the
    JSON stays valid. Spearman uses average ranks for ties, as `scipy.stats.spearmanr` does.

    Args:
        targets: (N,) or (N, 1) true values.
        preds: predictions with the same number of values.

    Returns:
        ``{"pearson", "spearman", "mae", "rmse", "n"}`` as plain floats / int.

    Raises:
        ValueError: if the inputs are empty, differ in length, are not 1-D or are not finite.
    """
    targets = _as_vector(targets, "targets")
    preds = _as_vector(preds, "preds")
    if targets.shape != preds.shape:
        raise ValueError(
            f"targets has {targets.size} values but preds has {preds.size}; "
            "pass one prediction per target"
        )
    if targets.size == 0:
        raise ValueError("regression_metrics got no examples; evaluate on a non-empty split")
    err = preds - targets
    return {
        "pearson": _pearson(targets, preds),
        "spearman": _pearson(rankdata(targets), rankdata(preds)),
        "mae": float(np.mean(np.abs(err))),
        "rmse": float(np.sqrt(np.mean(err**2))),
        "n": int(targets.size),
    }


def roc_curves(
    labels: np.ndarray, probs: np.ndarray, label_names: Sequence[str]
) -> dict[str, tuple[list[float], list[float], float]]:
    """One-vs-rest ROC curve of every class, for `ensemble.report.plot_roc`.

    Classes without both positive and negative examples have no ROC curve and are left out.

    Args:
        labels: (N,) integer class ids in ``[0, C)``.
        probs: (N, C) class scores.
        label_names: C class names, in class-id order.

    Returns:
        ``{class_name: (fpr, tpr, auc)}`` with ``fpr``/``tpr`` as lists of floats.

    Raises:
        ValueError: as for `classification_metrics`.
    """
    labels, probs = _check_classification(labels, probs, label_names)
    curves: dict[str, tuple[list[float], list[float], float]] = {}
    for c in _rankable_classes(labels, probs.shape[1]):
        fpr, tpr, _ = roc_curve(labels == c, probs[:, c])
        curves[label_names[c]] = (fpr.tolist(), tpr.tolist(), float(auc(fpr, tpr)))
    return curves


def _per_class_auc(labels: np.ndarray, probs: np.ndarray) -> dict[int, float]:
    return {
        c: float(roc_auc_score(labels == c, probs[:, c]))
        for c in _rankable_classes(labels, probs.shape[1])
    }


def _rankable_classes(labels: np.ndarray, n_classes: int) -> list[int]:
    """Classes with at least one positive and one negative example (AUC is defined)."""
    counts = np.bincount(labels, minlength=n_classes)
    return [c for c in range(n_classes) if 0 < counts[c] < labels.size]


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson r, or 0.0 where it is undefined (a constant series or fewer than 2 points)."""
    # Exact test first: the centred values of a constant float series are rounding noise.
    if x.size < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return 0.0
    xc = x - x.mean()
    yc = y - y.mean()
    denom = np.sqrt(np.dot(xc, xc) * np.dot(yc, yc))
    if denom == 0.0 or not np.isfinite(denom):
        return 0.0
    return float(np.clip(np.dot(xc, yc) / denom, -1.0, 1.0))


def _as_vector(values: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(f"{name} must have shape (N,) or (N, 1), got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or inf; check the model outputs for divergence")
    return arr


def _check_classification(
    labels: np.ndarray, probs: np.ndarray, label_names: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probs, dtype=np.float64)
    raw = np.asarray(labels)
    problems = []
    if probs.ndim != 2:
        problems.append(f"probs must have shape (N, C), got {probs.shape}")
    elif probs.shape[1] != len(label_names):
        problems.append(
            f"probs has {probs.shape[1]} columns but {len(label_names)} label_names were given; "
            "pass one name per class"
        )
    if raw.ndim != 1:
        problems.append(f"labels must have shape (N,), got {raw.shape}")
    elif probs.ndim == 2 and raw.shape[0] != probs.shape[0]:
        problems.append(f"{raw.shape[0]} labels for {probs.shape[0]} rows of probs")
    if problems:
        raise ValueError("; ".join(problems))
    if raw.size == 0:
        raise ValueError("no examples to score; evaluate on a non-empty split")
    if not np.all(np.isfinite(probs)):
        raise ValueError("probs contains NaN or inf; check the model outputs for divergence")
    fix = f"labels must be integer class ids in [0, {len(label_names)}); map label names to ids"
    if raw.dtype.kind not in "biuf" or (raw.dtype.kind == "f" and not np.all(np.isfinite(raw))):
        raise ValueError(f"{fix} (got dtype {raw.dtype})")
    labels = raw.astype(np.int64)
    if not np.array_equal(labels, raw) or labels.min() < 0 or labels.max() >= len(label_names):
        raise ValueError(f"{fix} (got values in [{raw.min()}, {raw.max()}])")
    return labels, probs


def pairwise_disagreement(preds: dict[str, np.ndarray]) -> dict:
    """The share of texts on which two models' top-1 classes differ, for every pair.

    Args:
        preds: model name -> (N,) predicted class ids, all over the same N texts.

    Returns:
        {"models": names, "matrix": K x K nested list (0 on the diagonal), "mean": the mean over
        pairs (0.0 for fewer than two models)}.
    """
    names = list(preds)
    arrays = [np.asarray(preds[n]) for n in names]
    if len({a.shape for a in arrays}) > 1:
        raise ValueError(f"predictions differ in length: {[a.shape for a in arrays]}")
    k = len(names)
    matrix = [[float(np.mean(arrays[i] != arrays[j])) if i != j else 0.0 for j in range(k)]
              for i in range(k)]
    pairs = [matrix[i][j] for i in range(k) for j in range(i + 1, k)]
    return {"models": names, "matrix": matrix, "mean": float(np.mean(pairs)) if pairs else 0.0}
