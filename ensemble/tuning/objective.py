"""The pure objective Ray Tune optimises: member weights + held-out probabilities -> a metric.

`score` combines with `ensemble.combine.apply`, the function Serve calls, so a trial's score is
exactly the quality of what would be served with its weights. Every metric is "higher is
better" (log loss is negated), so Tune can always run with ``mode="max"``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import f1_score

from ensemble import combine

__all__ = ["METRICS", "metric_value", "score"]

METRICS = ("accuracy", "macro_f1", "neg_log_loss")
# Probabilities are clipped here before the log, so one-hot members (the binned regressor) give a
# large but finite loss when they are confidently wrong.
_EPS = 1e-12


def metric_value(probs: np.ndarray, labels: np.ndarray, metric: str = "accuracy") -> float:
    """Score combined probabilities against integer labels; higher is better.

    ``macro_f1`` averages F1 over the classes present in the labels or the predictions, with
    ``zero_division=0``, matching `ensemble.metrics.classification_metrics`. ``neg_log_loss`` is
    ``mean(log p[label])`` with probabilities clipped to ``[1e-12, 1]``.

    Args:
        probs: (B, C) probabilities.
        labels: (B,) integer class ids in ``[0, C)``.
        metric: one of `METRICS`.

    Returns:
        The metric as a Python float.

    Raises:
        ValueError: for an unknown metric, mismatched shapes or out-of-range labels.
    """
    p, y = _check(probs, labels, metric)
    if metric == "accuracy":
        return float(np.mean(p.argmax(axis=1) == y))
    if metric == "macro_f1":
        return float(f1_score(y, p.argmax(axis=1), average="macro", zero_division=0))
    picked = p[np.arange(y.size), y]  # (B,)
    return float(np.mean(np.log(np.clip(picked, _EPS, 1.0))))


def score(
    weights: Sequence[float] | np.ndarray,
    probs: np.ndarray,
    labels: np.ndarray,
    metric: str = "accuracy",
) -> float:
    """Quality of the soft vote of ``probs`` under ``weights``; higher is better.

    Args:
        weights: (M,) non-negative member weights, not all zero (normalised here).
        probs: (M, B, C) held-out member probabilities.
        labels: (B,) integer class ids.
        metric: ``accuracy``, ``macro_f1`` or ``neg_log_loss``.

    Returns:
        The metric of ``combine.apply("weighted", probs, weights)``.

    Raises:
        ValueError: for bad weights (wrong count, negative, all zero), an unknown metric or
            mismatched shapes.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    combined = combine.apply("weighted", probs, np.asarray(weights, dtype=np.float64))
    return metric_value(combined, labels, metric)


def _check(probs: np.ndarray, labels: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels)
    if p.ndim != 2 or y.shape != (p.shape[0],):
        raise ValueError(f"probs {p.shape} and labels {y.shape} do not match; need (B, C) and (B,)")
    if y.size == 0:
        raise ValueError("no examples to score; the held-out split is empty")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= p.shape[1]:
        raise ValueError(f"labels must be integers in [0, {p.shape[1]}); map label names to ids")
    return p, y.astype(np.int64)
