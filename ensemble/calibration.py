"""Temperature scaling: one scalar per classification member, fitted on dev (Guo et al. 2017).

A member's probabilities ``softmax(z)`` become ``softmax(z / T)``. ``T > 1`` softens an
overconfident member, ``T < 1`` sharpens an underconfident one; the argmax, and so accuracy, never
changes. ``T`` minimises the dev log loss. In a soft vote, a member that is sure of everything
outweighs the others whatever its accuracy, so the run fits ``T`` per member before combining
(``training.calibrate``), as it fits the regressor's sharpness.

Members reach the combination as probabilities (the saved predictions, the Serve members'
answers), so `temper` works on probabilities: ``softmax(log p / T)`` equals ``softmax(z / T)``,
because ``log p`` is ``z`` shifted by a per-row constant. Pure numpy/scipy; no Ray, no torch.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp

from ensemble.combine import log_probs, temper

__all__ = ["T_BOUNDS", "fit_temperature", "fit_temperatures", "log_probs", "temper"]

T_BOUNDS = (0.05, 20.0)  # the search range of T; a fit at a bound means the dev data wanted more


def fit_temperature(
    logits: np.ndarray, labels: np.ndarray, bounds: tuple[float, float] = T_BOUNDS
) -> float:
    """The T minimising the mean log loss of ``softmax(logits / T)`` on labelled data.

    The log loss is convex in ``1/T``, so it has one minimum; a bounded Brent search on ``log T``
    finds it. Log-probabilities work as logits (a per-row shift changes nothing).

    Args:
        logits: (N, C) logits (or log-probabilities) of held-out examples.
        labels: (N,) class ids in ``[0, C)``.
        bounds: the range searched for T.

    Returns:
        The fitted temperature, within ``bounds``.

    Raises:
        ValueError: on mismatched or empty inputs, labels out of range, non-finite logits or bad
            bounds.
    """
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels)
    if z.ndim != 2 or z.shape[0] == 0 or y.shape != (z.shape[0],):
        raise ValueError(
            f"need (N, C) logits and (N,) labels for the same N > 0, got {z.shape} and {y.shape}"
        )
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= z.shape[1]:
        raise ValueError(f"labels must be integer class ids in [0, {z.shape[1]})")
    if not np.all(np.isfinite(z)):
        raise ValueError("logits contain NaN or inf; pass finite logits (or log_probs(probs))")
    lo, hi = bounds
    if not 0 < lo < hi:
        raise ValueError(f"temperature bounds {bounds} must satisfy 0 < low < high")
    picked = z[np.arange(y.size), y]  # (N,)

    def nll(log_t: float) -> float:
        t = np.exp(log_t)
        return float(np.mean(logsumexp(z / t, axis=1) - picked / t))

    res = minimize_scalar(nll, bounds=(np.log(lo), np.log(hi)), method="bounded",
                          options={"xatol": 1e-6})
    return float(np.clip(np.exp(res.x), lo, hi))


def fit_temperatures(
    dev_probs: Mapping[str, np.ndarray], kinds: Mapping[str, str], labels: np.ndarray
) -> dict[str, float]:
    """One temperature per classification member (every kind but ``regressor``), fitted on dev.

    Args:
        dev_probs: member name -> (N, C) dev probabilities; a regressor's (N,) intensities are
            skipped (its vote has a sharpness of its own, `combine.fit_regressor_sharpness`).
        kinds: member name -> kind.
        labels: (N,) dev class ids.

    Returns:
        member name -> T, in the order of ``dev_probs``.
    """
    return {
        name: fit_temperature(log_probs(p), labels)
        for name, p in dev_probs.items()
        if kinds[name] != "regressor"
    }
