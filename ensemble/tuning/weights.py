"""Learn how to combine members from their dev-set predictions.

Three learned combiners, all scored and served through `ensemble.combine`:

- `fit_weighted`: simplex weights minimising the soft vote's log loss (softmax-parametrised,
  L-BFGS). The log loss is convex in the weights, so the optimum is global.
- `fit_caruana`: greedy ensemble selection with replacement (Caruana et al., 2004), as in
  AutoGluon: start from the best single member, repeatedly add the member whose addition scores
  best, then keep the best prefix. Weights are pick counts / total, so they are multiples of
  ``1 / picks``.
- `fit_stacking`: a multinomial logistic (or ridge) meta-learner on the concatenated member
  probabilities, cross-fitted so that its dev score is out-of-fold.

`choose` fits several combiners and picks one by a dev score that is out-of-fold for every
learned method, so a combiner that merely memorises the dev set does not win.

Shapes: ``probs`` is (M, B, C) member probabilities on the dev set and ``labels`` is (B,)
integer class ids.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
from scipy.optimize import minimize, minimize_scalar
from sklearn.linear_model import LogisticRegression, RidgeClassifier
from sklearn.model_selection import KFold, StratifiedKFold

from ensemble import combine
from ensemble.tuning.objective import METRICS, metric_value

logger = logging.getLogger(__name__)

__all__ = [
    "AUTO", "FitResult", "candidates", "choose", "fit_caruana", "fit_stacking", "fit_weighted",
    "select",
]

# what `training.combiner: auto` chooses among, simplest first
AUTO = ("soft_vote", "weighted", "caruana", "stacking")
# A class never seen by a stacking fold gets this much less logit than the least likely seen one.
_UNSEEN_LOGIT_GAP = 30.0
_EPS = 1e-12


@dataclass
class FitResult:
    """A fitted combiner, ready for `combine.apply(method, probs, weights, params)`.

    Attributes:
        method: one of `ensemble.combine.METHODS`.
        weights: (M,) member weights summing to 1. For ``stacking`` they are informational only
            (each member's share of the absolute meta-learner coefficients).
        params: JSON-ready parameters (``coef``/``intercept`` for stacking; else empty).
        dev_score: the dev score under ``metric``; out-of-fold when ``out_of_fold`` is true.
        metric: the metric of ``dev_score`` (higher is better).
        out_of_fold: whether ``dev_score`` comes from cross-fitting rather than in-sample.
        dev_probs: the (B, C) dev predictions ``dev_score`` was computed from, when known.
    """

    method: str
    weights: list[float]
    params: dict[str, Any] = field(default_factory=dict)
    dev_score: float = float("nan")
    metric: str = "accuracy"
    out_of_fold: bool = False
    # (B, C) dev predictions behind dev_score (out-of-fold when out_of_fold); not serialised
    dev_probs: np.ndarray | None = field(default=None, repr=False, compare=False)

    def apply(self, probs: np.ndarray) -> np.ndarray:
        """(M, B, C) member probabilities -> (B, C) combined probabilities."""
        return combine.apply(self.method, probs, np.asarray(self.weights), self.params)

    def to_manifest(self, member_names: Sequence[str]) -> dict[str, Any]:
        """The ``Manifest.combine`` entry: weights keyed by member name, in member order."""
        if len(member_names) != len(self.weights):
            raise ValueError(
                f"{len(member_names)} member names for {len(self.weights)} weights; pass the "
                "names in the order of the members' probabilities"
            )
        out = asdict(self)
        del out["dev_probs"]
        out["weights"] = dict(zip(member_names, self.weights, strict=True))
        out["members"] = list(member_names)
        return out


def fit_weighted(
    probs: np.ndarray,
    labels: np.ndarray,
    metric: str = "neg_log_loss",
    seed: int = 0,
    restarts: int = 2,
) -> FitResult:
    """Simplex weights that minimise the log loss of the soft vote.

    ``w = softmax(theta)`` keeps the weights non-negative and summing to 1; ``theta`` is fitted
    with L-BFGS on the analytic gradient, from equal weights and ``restarts`` random starts.
    A useless member's weight goes towards 0 (softmax never reaches it exactly).

    Args:
        probs: (M, B, C) dev probabilities.
        labels: (B,) dev labels.
        metric: metric reported as ``dev_score`` (the fit itself always minimises log loss).
        seed: seed of the random restarts.
        restarts: number of random starts besides equal weights.

    Returns:
        A ``weighted`` `FitResult` with an in-sample ``dev_score``.
    """
    p, y = _check_dev(probs, labels, metric)
    m, b, _ = p.shape
    picked = p[:, np.arange(b), y]  # (M, B): each member's probability of the true class

    def loss_and_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w = combine.softmax(theta)  # (M,)
        mix = np.maximum(w @ picked, _EPS)  # (B,)
        grad_w = -(picked / mix).mean(axis=1)  # (M,)
        return float(-np.mean(np.log(mix))), w * (grad_w - w @ grad_w)  # chain rule via softmax

    rng = np.random.default_rng(seed)
    starts = [np.zeros(m)] + [rng.normal(size=m) for _ in range(restarts)]
    fits = [minimize(loss_and_grad, x0, jac=True, method="L-BFGS-B") for x0 in starts]
    best = min(fits, key=lambda r: r.fun)
    weights = combine.softmax(best.x)
    return FitResult(
        "weighted", weights.tolist(), {}, _soft_score(weights, p, y, metric), metric, False
    )


def fit_caruana(
    probs: np.ndarray, labels: np.ndarray, n_iter: int = 50, metric: str = "accuracy"
) -> FitResult:
    """Greedy ensemble selection with replacement (Caruana et al., 2004; AutoGluon's variant).

    The bag starts with the best single member; each of the next ``n_iter - 1`` steps adds the
    member (possibly one already in the bag) whose addition gives the best soft vote. Candidates
    are ranked by ``metric`` and then by log loss, which breaks the frequent ties of a discrete
    metric such as accuracy; remaining ties go to the lower member index. Finally the bag is cut
    back to the shortest prefix with the best score, so extra picks never make it worse.

    Args:
        probs: (M, B, C) dev probabilities.
        labels: (B,) dev labels.
        n_iter: total number of picks (the bag size before trimming), >= 1.
        metric: selection metric, one of `ensemble.tuning.objective.METRICS`.

    Returns:
        A ``caruana`` `FitResult`; weights are pick counts / total, ``dev_score`` is in-sample.
    """
    p, y = _check_dev(probs, labels, metric)
    if n_iter < 1:
        raise ValueError(f"n_iter={n_iter} must be >= 1")
    m = p.shape[0]
    total = np.zeros(p.shape[1:])  # (B, C): sum of the picked members' probabilities
    picks: list[int] = []
    trajectory: list[tuple[float, float]] = []
    for _ in range(n_iter):
        keys = [_key((total + p[i]) / (len(picks) + 1), y, metric) for i in range(m)]
        choice = max(range(m), key=lambda i: (keys[i], -i))
        picks.append(choice)
        total += p[choice]
        trajectory.append(keys[choice])
    best_len = 1 + max(range(n_iter), key=lambda k: (trajectory[k], -k))
    counts = np.bincount(picks[:best_len], minlength=m)
    weights = counts / counts.sum()
    logger.debug("caruana kept %d of %d picks: counts %s", best_len, n_iter, counts.tolist())
    return FitResult(
        "caruana", weights.tolist(), {}, _soft_score(weights, p, y, metric), metric, False
    )


def fit_stacking(
    probs: np.ndarray,
    labels: np.ndarray,
    kind: Literal["logistic", "ridge"] = "logistic",
    folds: int = 5,
    seed: int = 0,
    C: float = 1.0,
    metric: str = "accuracy",
) -> FitResult:
    """A linear meta-learner on the concatenated member probabilities, cross-fitted.

    ``logistic`` is scikit-learn's multinomial `LogisticRegression` (inverse L2 strength ``C``).
    ``ridge`` is `RidgeClassifier` (``alpha = 1 / C``) on one-vs-rest +-1 targets; its decision
    values are not probabilities, so they are scaled by one temperature fitted on the training
    fold's log loss and the softmax of the scaled decision is the output. Both end up as
    ``softmax(X @ coef.T + intercept)``, so `combine.stack_apply` serves either.

    ``dev_score`` is out-of-fold: each fold is predicted by a model fitted on the other folds
    (stratified when every class has at least ``folds`` examples). The returned parameters are
    then refitted on all of dev.

    Args:
        probs: (M, B, C) dev probabilities.
        labels: (B,) dev labels.
        kind: ``logistic`` or ``ridge``.
        folds: number of cross-fitting folds, >= 2.
        seed: shuffling seed of the folds.
        C: inverse regularisation strength (> 0).
        metric: metric of ``dev_score``.

    Returns:
        A ``stacking`` `FitResult` with JSON-ready ``params = {"coef", "intercept", "kind", "C"}``.
    """
    p, y = _check_dev(probs, labels, metric)
    if kind not in ("logistic", "ridge"):
        raise ValueError(f"unknown stacking kind {kind!r}; use logistic or ridge")
    if not C > 0:
        raise ValueError(f"C={C} must be > 0 (smaller means stronger regularisation)")
    m, _, c = p.shape
    x = combine.stack_features(p)  # (B, M*C)

    def fit(idx: np.ndarray) -> dict[str, Any]:
        return _fit_linear(x[idx], y[idx], c, kind, C)

    oof = _cross_fit(lambda idx: lambda q: combine.stack_apply(q, fit(idx)), p, y, folds, seed)
    params = {**fit(np.arange(y.size)), "kind": kind, "C": C}
    mass = np.abs(np.asarray(params["coef"])).reshape(c, m, c).sum(axis=(0, 2))  # (M,)
    weights = mass / mass.sum() if mass.sum() > 0 else np.full(m, 1.0 / m)
    dev_score = metric_value(oof, y, metric)
    return FitResult("stacking", weights.tolist(), params, dev_score, metric, out_of_fold=True,
                     dev_probs=oof)


def choose(
    probs_dev: np.ndarray,
    labels_dev: np.ndarray,
    methods: Sequence[str] = AUTO,
    metric: str = "accuracy",
    folds: int = 5,
    seed: int = 0,
    n_iter: int = 50,
    rule: Literal["one_se", "best"] = "one_se",
    bootstrap: int = 500,
) -> tuple[FitResult, dict[str, FitResult]]:
    """Fit every method in ``methods`` and pick one by a fair dev score.

    Fixed combiners (``soft_vote``, ``hard_vote``, equal weights) fit nothing, so their dev
    score is honest in-sample. Every learned combiner is scored out-of-fold: ``weighted`` and
    ``caruana`` are refitted on each training fold and their combined predictions on the held-out
    fold are scored together; ``stacking`` is cross-fitted by `fit_stacking`. The returned
    results carry parameters fitted on all of dev. List simpler methods first.

    ``rule="best"`` picks the highest dev score (ties to the method listed first).
    ``rule="one_se"`` picks the first-listed method whose dev score is within one standard error
    of the best one's: the standard error of the paired score difference over ``bootstrap``
    resamples of the dev examples. On a dev set of a thousand texts, learned combiners often lead
    the uniform vote by a few examples, which says little about test; this rule keeps the simpler
    method unless the lead is larger than its own noise.

    Args:
        probs_dev: (M, B, C) dev probabilities.
        labels_dev: (B,) dev labels.
        methods: a subset of ``hard_vote``, ``soft_vote``, ``weighted``, ``caruana``,
            ``stacking``.
        metric: selection metric, one of `ensemble.tuning.objective.METRICS`.
        folds: cross-fitting folds for the learned methods.
        seed: seed of the folds and of `fit_weighted`'s restarts.
        n_iter: picks of `fit_caruana`.
        rule: ``one_se`` or ``best``, see above.
        bootstrap: resamples behind the one-standard-error rule (seeded by ``seed``).

    Returns:
        ``(chosen, {method: FitResult})``.
    """
    unknown = [name for name in methods if name not in combine.METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown methods {unknown}; choose from {', '.join(combine.METHODS)}")
    _check_rule(rule, bootstrap)  # before any fitting
    p, y = _check_dev(probs_dev, labels_dev, metric)
    m = p.shape[0]
    learners: dict[str, Callable[[np.ndarray, np.ndarray], FitResult]] = {
        "weighted": lambda q, t: fit_weighted(q, t, metric=metric, seed=seed),
        "caruana": lambda q, t: fit_caruana(q, t, n_iter=n_iter, metric=metric),
    }
    results: dict[str, FitResult] = {}
    for name in methods:
        if name in combine.UNFITTED:
            uniform = np.full(m, 1.0 / m)
            voted = combine.apply(name, p, uniform)
            dev = metric_value(voted, y, metric)
            results[name] = FitResult(name, uniform.tolist(), {}, dev, metric, False, voted)
        elif name == "stacking":
            results[name] = fit_stacking(p, y, folds=folds, seed=seed, metric=metric)
        else:
            learn = learners[name]
            oof = _cross_fit(lambda idx, f=learn: f(p[:, idx], y[idx]).apply, p, y, folds, seed)
            full = learn(p, y)
            full.dev_score, full.out_of_fold = metric_value(oof, y, metric), True
            full.dev_probs = oof
            results[name] = full
    chosen = select(results, y, rule, metric, bootstrap, seed)
    logger.info(
        "combiner %s chosen on dev %s by rule %s (%s)",
        chosen.method,
        metric,
        rule,
        ", ".join(f"{k}={r.dev_score:.4f}" for k, r in results.items()),
    )
    return chosen, results


def candidates(combiner: str) -> tuple[str, ...]:
    """The methods a run with ``training.combiner: combiner`` chooses among (AUTO for auto)."""
    return AUTO if combiner == "auto" else (combiner,)


def _check_rule(rule: str, bootstrap: int) -> None:
    if rule not in ("one_se", "best"):
        raise ValueError(f"unknown rule {rule!r}; use one_se or best")
    if rule == "one_se" and bootstrap < 2:
        raise ValueError(f"bootstrap={bootstrap} must be >= 2 for the one_se rule")


def select(
    results: dict[str, FitResult],
    labels_dev: np.ndarray,
    rule: Literal["one_se", "best"] = "one_se",
    metric: str = "accuracy",
    bootstrap: int = 500,
    seed: int = 0,
) -> FitResult:
    """Pick one of `choose`'s fitted ``results`` (listed simplest first) by ``rule``.

    ``best``: the highest dev score, ties to the first listed. ``one_se``: the first listed whose
    dev score is within one standard error of the best's, the error of the paired difference over
    ``bootstrap`` resamples of dev (seeded by ``seed``), from each result's ``dev_probs``.
    """
    _check_rule(rule, bootstrap)
    best = max(results.values(), key=lambda r: r.dev_score)  # first of equals: listed first
    if rule == "best":
        return best
    rng = np.random.default_rng(seed)
    draws = [rng.integers(0, labels_dev.size, labels_dev.size) for _ in range(bootstrap)]
    best_scores = np.array([metric_value(best.dev_probs[i], labels_dev[i], metric) for i in draws])
    for r in results.values():
        if r is best:
            return best
        scores = np.array([metric_value(r.dev_probs[i], labels_dev[i], metric) for i in draws])
        if best.dev_score - r.dev_score <= float(np.std(best_scores - scores, ddof=1)):
            return r
    return best


def _cross_fit(
    fit_on: Callable[[np.ndarray], Callable[[np.ndarray], np.ndarray]],
    p: np.ndarray,
    y: np.ndarray,
    folds: int,
    seed: int,
) -> np.ndarray:
    """(B, C) out-of-fold predictions: ``fit_on(train_idx)`` returns a predictor of probs."""
    oof = np.zeros(p.shape[1:])
    for train, test in _splits(y, folds, seed):
        oof[test] = fit_on(train)(p[:, test])
    return oof


def _splits(y: np.ndarray, folds: int, seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    if folds < 2 or folds > y.size:
        raise ValueError(f"folds={folds} must be in [2, {y.size}] (the number of dev examples)")
    counts = np.bincount(y)
    if counts[counts > 0].min() >= folds:
        return StratifiedKFold(folds, shuffle=True, random_state=seed).split(y, y)
    logger.warning("a dev class has fewer than %d examples; using unstratified folds", folds)
    return KFold(folds, shuffle=True, random_state=seed).split(y)


def _fit_linear(
    x: np.ndarray, y: np.ndarray, num_classes: int, kind: str, C: float
) -> dict[str, Any]:
    """Fit a linear model and express it as full (C, F) softmax coefficients, JSON-ready."""
    seen = np.unique(y)
    if seen.size < 2:
        raise ValueError(
            f"a stacking fold has only class {seen.tolist()}; use more dev data or fewer folds"
        )
    if kind == "logistic":
        model = LogisticRegression(C=C, max_iter=2000).fit(x, y)
        coef, intercept = model.coef_, model.intercept_
    else:
        model = RidgeClassifier(alpha=1.0 / C).fit(x, y)
        coef, intercept = model.coef_, np.atleast_1d(model.intercept_)
    if seen.size == 2:  # one decision z for classes_[1]; softmax([0, z]) == sigmoid(z)
        coef = np.vstack([np.zeros_like(coef), coef])
        intercept = np.concatenate([[0.0], intercept])
    if kind == "ridge":
        t = _fit_temperature(x @ coef.T + intercept, np.searchsorted(seen, y))
        coef, intercept = coef * t, intercept * t
    full_coef = np.zeros((num_classes, x.shape[1]))
    full_intercept = np.full(num_classes, intercept.min() - _UNSEEN_LOGIT_GAP)
    full_coef[seen], full_intercept[seen] = coef, intercept
    return {"coef": full_coef.tolist(), "intercept": full_intercept.tolist()}


def _fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """Scale t > 0 minimising the log loss of softmax(t * logits); logits (B, K), y in [0, K)."""

    def nll(log_t: float) -> float:
        z = np.exp(log_t) * logits
        z = z - z.max(axis=1, keepdims=True)
        log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return float(-log_p[np.arange(y.size), y].mean())

    return float(np.exp(minimize_scalar(nll, bounds=(-5.0, 8.0), method="bounded").x))


def _key(combined: np.ndarray, y: np.ndarray, metric: str) -> tuple[float, float]:
    return metric_value(combined, y, metric), metric_value(combined, y, "neg_log_loss")


def _soft_score(weights: np.ndarray, p: np.ndarray, y: np.ndarray, metric: str) -> float:
    return metric_value(combine.soft_vote(p, weights), y, metric)


def _check_dev(probs: np.ndarray, labels: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate dev probabilities (M, B, C) and labels (B,) once, at the boundary."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    p = combine.check_probs(probs)
    y = np.asarray(labels)
    if y.shape != (p.shape[1],):
        raise ValueError(
            f"{y.size} labels for {p.shape[1]} examples; pass one label per dev example"
        )
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= p.shape[2]:
        raise ValueError(f"labels must be integers in [0, {p.shape[2]}); map label names to ids")
    return p, y.astype(np.int64)
