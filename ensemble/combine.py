"""Combine member outputs into one prediction: pure numpy, shared by Tune and Serve.

Shapes used throughout: ``M`` members, ``B`` examples, ``C`` classes, ``K`` intensity sources.
Classification members give probabilities ``(M, B, C)``; the regressor gives an intensity ``(B,)``
and votes through `regressor_probs`, which bins it into a class. `ensemble.tuning` fits weights
and stacking parameters with these same functions, so what Tune scores is exactly what Serve
returns.

Weights are per member, non-negative and need not sum to one (they are normalised here); a
weight of 0 removes a member. A combination's ``params`` may hold an ``output_temperature``: the
combined probabilities are then temperature-scaled (`temper`) as the last step of `apply`, which
undoes the under-confidence that averaging calibrated members brings. Every function validates
its inputs and raises ``ValueError`` naming the fix; none of them mutate their arguments.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, get_args

import numpy as np

from ensemble.config import CombineMethod

__all__ = [
    "METHODS",
    "UNFITTED",
    "apply",
    "check_probs",
    "combine_intensity",
    "confidence",
    "disagreement",
    "expected_intensity",
    "fit_regressor_sharpness",
    "hard_vote",
    "intensity_weights",
    "log_probs",
    "member_vote",
    "member_votes",
    "regressor_probs",
    "soft_vote",
    "stack_apply",
    "stack_features",
    "temper",
]

METHODS: tuple[str, ...] = get_args(CombineMethod)
# Methods whose weights are learned on dev data and must be passed to `apply`.
_NEEDS_WEIGHTS = ("weighted", "caruana")
# Methods with nothing learned: every member counts the same.
UNFITTED = tuple(m for m in METHODS if m not in (*_NEEDS_WEIGHTS, "stacking"))
# Bump given to classes tied for the most votes; far below any real difference in vote shares.
_TIE_EPS = 1e-9
# `params` key of the temperature applied to the combined probabilities (not to a hard vote)
OUTPUT_TEMPERATURE = "output_temperature"
_TINY = np.finfo(np.float64).tiny  # log(0) would be -inf: a probability 0 is read as this


def regressor_probs(
    intensity: np.ndarray,
    edges: Sequence[float],
    num_classes: int,
    sharpness: float | None = None,
) -> np.ndarray:
    """Turn regressor intensities into class votes by binning them.

    Class ``c`` covers ``[edges[c-1], edges[c])``; the first class extends to -inf and the last to
    +inf. An intensity exactly on an edge belongs to the upper class (``np.digitize`` semantics).

    Args:
        intensity: (B,) predicted intensities.
        edges: C-1 strictly ascending bin edges (`Manifest.intensity_edges`).
        num_classes: C.
        sharpness: None (default) for a one-hot vote on the bin. A positive number gives a soft
            vote ``softmax(-sharpness * d_c)`` where ``d_c`` is the distance from the intensity to
            class ``c``'s interval (0 inside it). Distance to the interval rather than to a class
            centre keeps the argmax equal to the hard bin, and the outer classes, which are
            unbounded, need no centre. Larger values approach the one-hot vote.

    Returns:
        (B, C) probabilities; every row sums to 1.

    Raises:
        ValueError: if ``edges`` has the wrong length or is not ascending, the intensities are not
            a finite 1-D array, or ``sharpness`` is not positive.
    """
    x = np.asarray(intensity, dtype=np.float64)
    e = np.asarray(edges, dtype=np.float64)
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes}; a classification needs at least 2 classes")
    if e.shape != (num_classes - 1,):
        raise ValueError(
            f"got {e.size} intensity edges for {num_classes} classes; pass num_classes - 1 edges"
        )
    if np.any(np.diff(e) <= 0) or not np.all(np.isfinite(e)):
        raise ValueError(f"intensity edges {e.tolist()} must be finite and strictly ascending")
    if x.ndim != 1 or not np.all(np.isfinite(x)):
        raise ValueError(f"intensity must be a finite (B,) array, got shape {x.shape}")
    if sharpness is None:
        return np.eye(num_classes)[np.digitize(x, e)]  # (B, C)
    if not sharpness > 0:
        raise ValueError(f"sharpness={sharpness} must be > 0, or None for one-hot votes")
    lower = np.concatenate([[-np.inf], e])  # (C,)
    upper = np.concatenate([e, [np.inf]])  # (C,)
    dist = np.maximum(lower[None, :] - x[:, None], 0.0) + np.maximum(
        x[:, None] - upper[None, :], 0.0
    )
    return softmax(-sharpness * dist)  # (B, C)


def fit_regressor_sharpness(
    intensity: np.ndarray, labels: np.ndarray, edges: Sequence[float], num_classes: int
) -> float:
    """The `regressor_probs` sharpness that minimises the vote's log loss on labelled data.

    A one-hot regressor vote is as confident as a vote can be, so in a soft vote it outweighs
    members that give calibrated probabilities. Fitting the one sharpness parameter on dev labels
    (like temperature scaling) makes the regressor's vote a calibrated distribution too; its
    argmax stays the hard bin.

    The search is scale-free: over ``[0.1, 1e4] / gap``, where ``gap`` is the median bin width, on
    a log grid refined by golden-section search.

    Args:
        intensity: (N,) predicted intensities on held-out data.
        labels: (N,) class ids.
        edges: C-1 ascending bin edges.
        num_classes: C.

    Returns:
        The fitted sharpness (> 0).

    Raises:
        ValueError: on mismatched or empty inputs, or labels outside ``[0, C)``.
    """
    x = np.asarray(intensity, dtype=np.float64)
    y = np.asarray(labels)
    if x.ndim != 1 or x.shape != y.shape or x.size == 0:
        raise ValueError(
            f"need matching non-empty (N,) intensities and labels, got {x.shape} and {y.shape}"
        )
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got {y.min()}..{y.max()}")
    gap = float(np.median(np.diff(np.asarray(edges, dtype=np.float64)))) if num_classes > 2 else 1.0

    def nll(log_s: float) -> float:
        p = regressor_probs(x, edges, num_classes, sharpness=float(np.exp(log_s)))
        return float(-np.mean(np.log(p[np.arange(y.size), y] + 1e-12)))

    grid = np.linspace(np.log(0.1 / gap), np.log(1e4 / gap), 41)
    losses = [nll(g) for g in grid]
    i = int(np.argmin(losses))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, grid.size - 1)]
    ratio = (np.sqrt(5.0) - 1.0) / 2.0
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(a), nll(b)
    for _ in range(30):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(b)
    return float(np.exp((lo + hi) / 2.0))


def hard_vote(probs: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Weighted majority vote: each member's argmax class receives that member's weight.

    Ties: when several classes share the most votes, the one with the highest weighted mean
    probability (the soft vote) wins, i.e. it is the argmax of the returned row. This is done by
    adding at most 1e-9 to the tied classes, so the rows equal the vote shares to within 1e-9.
    If the soft vote ties too, the lowest class index wins (``np.argmax``).

    Args:
        probs: (M, B, C) member probabilities.
        weights: (M,) non-negative member weights, not all zero; None for equal weights.

    Returns:
        (B, C) vote shares; every row sums to 1.

    Raises:
        ValueError: on a bad shape or bad weights.
    """
    p = check_probs(probs)
    w = _check_weights(weights, p.shape[0])
    m, b, c = p.shape
    shares = np.zeros((b, c))
    np.add.at(shares, (np.arange(b)[None, :].repeat(m, 0), p.argmax(axis=2)), w[:, None])  # (B, C)
    top = shares.max(axis=1, keepdims=True)  # (B, 1)
    tied = np.isclose(shares, top, rtol=0.0, atol=1e-12)  # (B, C)
    shares = shares + _TIE_EPS * tied * np.einsum("m,mbc->bc", w, p)
    return shares / shares.sum(axis=1, keepdims=True)


def soft_vote(probs: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Weighted mean of member probabilities.

    Args:
        probs: (M, B, C) member probabilities.
        weights: (M,) non-negative member weights, not all zero; None for equal weights.

    Returns:
        (B, C) probabilities.

    Raises:
        ValueError: on a bad shape or bad weights.
    """
    p = check_probs(probs)
    w = _check_weights(weights, p.shape[0])
    return np.einsum("m,mbc->bc", w, p)  # (B, C)


def stack_features(probs: np.ndarray) -> np.ndarray:
    """Features of the stacking meta-learner: member probabilities side by side.

    Args:
        probs: (M, B, C) member probabilities.

    Returns:
        (B, M*C); column ``m*C + c`` is member ``m``'s probability of class ``c``.
    """
    p = check_probs(probs)
    m, b, c = p.shape
    return p.transpose(1, 0, 2).reshape(b, m * c)  # (B, M*C)


def stack_apply(probs: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
    """Apply a fitted linear meta-learner (multinomial logistic) to member probabilities.

    Args:
        probs: (M, B, C) member probabilities.
        params: ``{"coef": (C, M*C) nested list, "intercept": (C,) list}`` as written by
            `ensemble.tuning.weights.fit_stacking`; other keys are ignored.

    Returns:
        (B, C) probabilities ``softmax(stack_features(probs) @ coef.T + intercept)``.

    Raises:
        ValueError: if ``params`` is missing a key or its shapes do not match ``probs``.
    """
    x = stack_features(probs)  # (B, M*C)
    m, _, c = np.shape(probs)
    missing = [k for k in ("coef", "intercept") if k not in params]
    if missing:
        raise ValueError(f"stacking params lack {missing}; fit them with fit_stacking()")
    coef = np.asarray(params["coef"], dtype=np.float64)
    intercept = np.asarray(params["intercept"], dtype=np.float64)
    if coef.shape != (c, m * c) or intercept.shape != (c,):
        raise ValueError(
            f"stacking params have coef {coef.shape} and intercept {intercept.shape}, but "
            f"{m} members x {c} classes need ({c}, {m * c}) and ({c},); refit the stacker on "
            "the current members"
        )
    return softmax(x @ coef.T + intercept)  # (B, C)


def apply(
    method: str,
    probs: np.ndarray,
    weights: np.ndarray | Sequence[float] | None = None,
    params: Mapping[str, Any] | None = None,
) -> np.ndarray:
    """Combine member probabilities with one of `METHODS`.

    ``hard_vote`` and ``soft_vote`` use ``weights`` if given, else equal weights. ``weighted``
    (optimised simplex weights) and ``caruana`` (greedy ensemble selection) are soft votes whose
    learned weights are required. ``stacking`` needs ``params`` and ignores ``weights``.

    Args:
        method: one of `METHODS`.
        probs: (M, B, C) member probabilities.
        weights: (M,) member weights.
        params: stacking parameters (see `stack_apply`) and an optional ``output_temperature``
            T > 0 that scales the combined probabilities (`temper`; a hard vote's vote shares are
            left as they are).

    Returns:
        (B, C) combined probabilities.

    Raises:
        ValueError: for an unknown method, missing weights/params, or bad inputs.
    """
    if method not in METHODS:
        raise ValueError(f"unknown combine method {method!r}; use one of {', '.join(METHODS)}")
    if method == "stacking":
        if params is None:
            raise ValueError("method 'stacking' needs params; fit them with fit_stacking()")
        combined = stack_apply(probs, params)
    elif method in _NEEDS_WEIGHTS and weights is None:
        raise ValueError(f"method {method!r} needs learned weights; fit them with fit_{method}()")
    else:
        w = None if weights is None else np.asarray(weights, dtype=np.float64)
        if method == "hard_vote":
            return hard_vote(probs, w)
        combined = soft_vote(probs, w)
    t = (params or {}).get(OUTPUT_TEMPERATURE)
    return combined if t is None else temper(combined, t)


def combine_intensity(intensities: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Weighted mean of several intensity estimates.

    Args:
        intensities: (K, B) estimates, e.g. the regressor's output and each classifier's
            `expected_intensity`.
        weights: (K,) non-negative weights, not all zero; None for equal weights.

    Returns:
        (B,) combined intensity.

    Raises:
        ValueError: on a bad shape, non-finite values or bad weights.
    """
    x = np.asarray(intensities, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"intensities must be (K, B) with K >= 1, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("intensities contain NaN or inf; check the members' outputs")
    return _check_weights(weights, x.shape[0]) @ x  # (B,)


def member_vote(
    kind: str,
    output: np.ndarray,
    edges: Sequence[float],
    num_classes: int,
    sharpness: float | None = None,
    temperature: float | None = None,
) -> np.ndarray:
    """One member's (B, C) vote, the rule every combination uses (training, Tune, Serve).

    A classification member's probabilities, scaled by its ``temperature`` (`temper`; None or 1
    leaves them as they are); the regressor's (B,) intensities vote through their bin
    (`regressor_probs`, softened by ``sharpness``).

    Raises:
        ValueError: if the vote is not (B, ``num_classes``).
    """
    out = np.asarray(output, dtype=np.float64)
    if kind == "regressor":
        vote = regressor_probs(out.reshape(-1), edges, num_classes, sharpness=sharpness)
    else:
        vote = temper(out, temperature) if temperature is not None and out.ndim == 2 else out
    if vote.ndim != 2 or vote.shape[1] != num_classes:
        raise ValueError(
            f"a {kind} member gave shape {out.shape}; expected (B, {num_classes}) probabilities"
            + ("" if kind == "regressor" else " (the regressor gives (B,) intensities)")
        )
    return vote


def member_votes(
    outputs: Mapping[str, np.ndarray],
    kinds: Mapping[str, str],
    edges: Sequence[float],
    num_classes: int,
    sharpness: float | None = None,
    temperatures: Mapping[str, float] | None = None,
    names: Sequence[str] | None = None,
) -> np.ndarray:
    """The members' votes (`member_vote`) stacked as (M, B, C), in ``names`` order (default:
    ``outputs``' order). A member missing from ``temperatures`` votes with T = 1.

    Raises:
        ValueError: if a named member has no output, or a vote has the wrong shape.
    """
    names = list(outputs) if names is None else list(names)
    missing = [n for n in names if n not in outputs]
    if missing:
        raise ValueError(f"no outputs for members {missing}; have {sorted(outputs)}")
    temps = temperatures or {}
    votes = []
    for n in names:
        try:
            votes.append(member_vote(kinds[n], outputs[n], edges, num_classes, sharpness,
                                     temps.get(n)))
        except ValueError as err:
            raise ValueError(f"member {n!r}: {err}") from None
    return np.stack(votes)  # (M, B, C)


def intensity_weights(kinds: Sequence[str]) -> np.ndarray:
    """(M,) weights of the members' intensity estimates in the ensemble's intensity.

    The regressor is trained for intensity, so the regressors together weigh as much as all
    classification members together (each group shares its half equally); without one of the
    groups the other has all the weight.
    """
    n_reg = sum(k == "regressor" for k in kinds)
    n_cls = len(kinds) - n_reg
    reg_share = 0.5 if n_reg and n_cls else (1.0 if n_reg else 0.0)
    return np.array(
        [reg_share / n_reg if k == "regressor" else (1.0 - reg_share) / n_cls for k in kinds]
    )


def expected_intensity(probs: np.ndarray, class_intensity: Sequence[float]) -> np.ndarray:
    """A classifier's intensity estimate: the mean class intensity under its probabilities.

    Args:
        probs: (B, C) probabilities.
        class_intensity: (C,) mean intensity of each class (`Manifest.class_intensity`).

    Returns:
        (B,) ``probs @ class_intensity``.

    Raises:
        ValueError: if the number of classes differs.
    """
    p = _check_probs_2d(probs)
    ci = np.asarray(class_intensity, dtype=np.float64)
    if ci.shape != (p.shape[1],):
        raise ValueError(
            f"class_intensity has {ci.size} values for {p.shape[1]} classes; pass one per class"
        )
    return p @ ci  # (B,)


def disagreement(probs: np.ndarray) -> np.ndarray:
    """How much the members disagree on each example.

    Defined as the fraction of members whose argmax differs from the plurality class (the
    unweighted `hard_vote` winner, ties broken as there). 0 means unanimous; the maximum is
    ``(M-1)/M``. A single member always gives 0.

    Args:
        probs: (M, B, C) member probabilities.

    Returns:
        (B,) values in ``[0, (M-1)/M]``.
    """
    p = check_probs(probs)
    majority = hard_vote(p).argmax(axis=1)  # (B,)
    return (p.argmax(axis=2) != majority[None, :]).mean(axis=0)  # (B,)


def confidence(probs: np.ndarray) -> np.ndarray:
    """Probability of the predicted class.

    Args:
        probs: (B, C) probabilities.

    Returns:
        (B,) row maxima.
    """
    return _check_probs_2d(probs).max(axis=1)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis (the project's one definition)."""
    z = logits - logits.max(axis=-1, keepdims=True)  # stable; rows with -inf entries stay finite
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def log_probs(probs: np.ndarray) -> np.ndarray:
    """log of (N, C) probabilities, 0 read as the smallest float64; usable as logits."""
    return np.log(np.maximum(np.asarray(probs, dtype=np.float64), _TINY))


def temper(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Temperature-scaled probabilities ``softmax(log(probs) / T)``; T = 1 returns them as they are.

    ``log p`` is the logits shifted by a per-row constant, so this equals ``softmax(z / T)``.

    Args:
        probs: (N, C) probabilities, rows summing to 1.
        temperature: T > 0.

    Returns:
        (N, C) float64 probabilities, each row's argmax unchanged.

    Raises:
        ValueError: if the temperature is not a finite positive number.
    """
    if not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature={temperature} must be finite and > 0")
    p = np.asarray(probs, dtype=np.float64)
    if temperature == 1.0:
        return p
    return softmax(log_probs(p) / temperature)  # (N, C)


def weight_vector(weights: Mapping[str, float] | None, names: Sequence[str]) -> list[float] | None:
    """A combiner's ``{member: weight}`` as a list in ``names`` order (absent members weigh 0).

    None (no weights: every member counts equally) stays None.
    """
    return [float(weights.get(n, 0.0)) for n in names] if weights else None


def to_probs(outputs: Mapping[str, np.ndarray], kinds: Mapping[str, str]) -> dict[str, np.ndarray]:
    """Classification members' logits -> probabilities; the regressor's intensities unchanged."""
    return {n: o if kinds[n] == "regressor" else softmax(o) for n, o in outputs.items()}


def check_probs(probs: np.ndarray) -> np.ndarray:
    """Validate member probabilities at a boundary.

    Args:
        probs: (M, B, C) per-member probabilities (any array-like).

    Returns:
        The same values as a float64 array.

    Raises:
        ValueError: if the array is not 3-D with non-empty axes or holds NaN/inf.
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 3 or 0 in p.shape:
        raise ValueError(
            f"member probabilities must be (M, B, C) with M, B, C >= 1, got shape {p.shape}; "
            "stack per-member (B, C) arrays with np.stack"
        )
    if not np.all(np.isfinite(p)):
        raise ValueError("member probabilities contain NaN or inf; check the members' outputs")
    return p


def _check_probs_2d(probs: np.ndarray) -> np.ndarray:
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or 0 in p.shape:
        raise ValueError(f"probabilities must be (B, C) with B, C >= 1, got shape {p.shape}")
    return p


def _check_weights(weights: np.ndarray | Sequence[float] | None, n: int) -> np.ndarray:
    """(n,) normalised copy of ``weights``; None means equal weights."""
    if weights is None:
        return np.full(n, 1.0 / n)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n,):
        raise ValueError(
            f"got {w.size} weights (shape {w.shape}) for {n} members; pass one weight per member"
        )
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"weights {w.tolist()} must be finite and >= 0")
    total = w.sum()
    if total <= 0:
        raise ValueError("all weights are zero; give at least one member a positive weight")
    return w / total
