"""The student-first cascade: the (cheap) student answers alone when its confidence reaches a
threshold, the full ensemble (`ensemble.combination`) answers the rest.

Pure numpy (no Ray, no torch), so the Serve combiner, the load benchmark and the unit tests run
exactly the same code. `fit_threshold` picks the lowest threshold whose dev accuracy loss against
the full ensemble stays within a budget with 95 % confidence (a bootstrap upper bound), which
sends as much traffic to the student as the budget safely allows. The confidence is the
student's margin (top probability minus the runner-up) or its top probability
(`CONFIDENCE_MEASURES`); `fit_cascade_from_run` with ``auto`` (Serve's default) fits both and
keeps the one that lets the student answer more. Which wins depends on the student: on SST the
margin did for independently trained students, the top probability for jointly trained ones.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ensemble import combine
from ensemble.combination import Combination, Combined, combine_outputs, member_probs, without

__all__ = [
    "CONFIDENCE_MEASURES",
    "Answer",
    "cascade_answer",
    "ensemble_answer",
    "hard_examples",
    "accuracy_loss_bound",
    "cascade_accuracy",
    "cascade_curve",
    "fit_threshold",
    "fit_cascade",
    "fit_cascade_from_run",
    "fit_threshold_from_run",
    "load_predictions",
    "student_confidence",
    "served_probs",
    "student_of",
]

CONFIDENCE_MEASURES = ("margin", "max_prob")


def student_confidence(student_probs: np.ndarray, measure: str = "margin") -> np.ndarray:
    """(N,) confidence of (N, C) student probabilities that the cascade thresholds.

    ``margin``: top probability minus the second one (0 = a tie, 1 = certain);
    ``max_prob``: the top probability.

    Raises:
        ValueError: on an unknown measure.
    """
    p = np.asarray(student_probs, dtype=np.float64)
    if measure == "max_prob":
        return p.max(axis=1)
    if measure == "margin":
        if p.shape[1] < 2:
            return p.max(axis=1)
        top2 = np.partition(p, p.shape[1] - 2, axis=1)[:, -2:]  # (N, 2): runner-up, top
        return top2[:, 1] - top2[:, 0]
    raise ValueError(f"cascade confidence {measure!r} unknown; use one of {CONFIDENCE_MEASURES}")


@dataclass(frozen=True)
class Answer:
    """What the combiner returns for B texts, before it becomes JSON."""

    combined: Combined
    outputs: dict[str, np.ndarray]  # member outputs; NaN rows where a member was not asked
    answered_by: list[str]  # "ensemble" or "student", per text
    missing: tuple[str, ...] = ()  # members that did not answer: the ensemble rows are degraded

    def rows(self, start: int, stop: int) -> Answer:
        """The answer for texts ``start:stop`` (splitting a batch back into requests)."""
        part = slice(start, stop)
        comb = Combined(
            **{f.name: getattr(self.combined, f.name)[part] for f in dataclasses.fields(Combined)}
        )
        return Answer(comb, {n: v[part] for n, v in self.outputs.items()},
                      self.answered_by[part], self.missing)


def ensemble_answer(
    outputs: Mapping[str, np.ndarray], spec: Combination, missing: Sequence[str] = ()
) -> Answer:
    """The ensemble of the members in ``outputs``; ``missing`` ones are left out (`without`)."""
    comb = combine_outputs(outputs, without(spec, missing))
    return Answer(comb, dict(outputs), ["ensemble"] * len(comb.label_ids), tuple(missing))


def hard_examples(
    student_probs: np.ndarray, threshold: float, measure: str = "margin"
) -> np.ndarray:
    """Indices of the texts whose student confidence is below ``threshold`` (ensemble's job)."""
    return np.flatnonzero(student_confidence(student_probs, measure) < threshold)


def cascade_answer(
    spec: Combination,
    student_probs: np.ndarray,
    hard: np.ndarray,
    rest: Mapping[str, np.ndarray],
    missing: Sequence[str] = (),
) -> Answer:
    """Merge the student's answers with the ensemble's answers on the hard texts.

    Args:
        spec: the combination (the student is ``student_of(spec)``).
        student_probs: (B, C) student probabilities for all B texts, as the student gave them
            (its temperature is applied here).
        hard: indices (from `hard_examples` on `member_probs` of the student) the other members
            were asked about.
        rest: the other members' outputs on ``hard`` only (rows aligned with ``hard``).
        missing: members asked about ``hard`` that did not answer (left out, `without`).

    Returns:
        The student's prediction where it was confident, the ensemble's elsewhere.
    """
    student = student_of(spec)
    if student in missing:
        raise ValueError(f"the cascade's student {student} answered; it cannot be missing")
    raw = np.asarray(student_probs, dtype=np.float64)  # (B, C)
    probs = member_probs(spec, student, raw)  # (B, C) the student's vote
    n = len(probs)
    comb = Combined(
        probs=probs.copy(),
        label_ids=probs.argmax(axis=1),
        confidence=probs.max(axis=1),
        intensity=combine.expected_intensity(probs, spec.class_intensity),
        disagreement=np.zeros(n),
    )
    outputs: dict[str, np.ndarray] = {student: raw}
    answered_by = ["student"] * n
    if len(hard):
        comb_hard = combine_outputs({student: raw[hard], **rest}, without(spec, missing))
        for f in dataclasses.fields(Combined):
            getattr(comb, f.name)[hard] = getattr(comb_hard, f.name)
        for name, values in rest.items():
            values = np.asarray(values, dtype=np.float64)
            outputs[name] = np.full((n, *values.shape[1:]), np.nan)
            outputs[name][hard] = values
        for i in hard:
            answered_by[i] = "ensemble"
    return Answer(comb, outputs, answered_by, tuple(missing))


def _check_cascade_inputs(
    student_probs: np.ndarray, ensemble_probs: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    s = np.asarray(student_probs, dtype=np.float64)
    e = np.asarray(ensemble_probs, dtype=np.float64)
    y = np.asarray(labels)
    if s.ndim != 2 or s.shape != e.shape or y.shape != (s.shape[0],):
        raise ValueError(
            f"student {s.shape}, ensemble {e.shape} and labels {y.shape} must be "
            "(N, C), (N, C) and (N,) for the same N examples"
        )
    if s.shape[0] == 0:
        raise ValueError("no dev examples; fit the threshold on a non-empty dev split")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= s.shape[1]:
        raise ValueError(f"labels must be integer class ids in [0, {s.shape[1]})")
    return s, e, y


def _routing(
    student_probs: np.ndarray, ensemble_probs: np.ndarray, labels: np.ndarray, measure: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The examples most confident first: confidences, the accuracy each costs, valid cuts.

    Returns ``(conf, cost, valid)``, all (N,) in that order: ``cost`` is 1 where the ensemble is
    right and the student wrong, -1 the other way round, else 0, so sending the first k + 1
    examples to the student loses ``cost[:k + 1].sum() / N`` accuracy; ``valid`` marks the cuts
    that do not split tied confidences (a threshold cannot).
    """
    s, e, y = _check_cascade_inputs(student_probs, ensemble_probs, labels)
    conf = student_confidence(s, measure)
    order = np.argsort(-conf, kind="stable")
    conf = conf[order]
    cost = (e.argmax(axis=1) == y).astype(np.int64) - (s.argmax(axis=1) == y).astype(np.int64)
    valid = np.append(conf[1:] < conf[:-1], True)
    return conf, cost[order], valid


def accuracy_loss_bound(
    cost: np.ndarray, level: float = 0.95, bootstrap: int = 1000, seed: int = 0
) -> np.ndarray:
    """One-sided upper confidence bound of the accuracy loss at every cut, by bootstrap.

    Args:
        cost: (N,) per-example cost in routing order (`_routing`).
        level: the bound's confidence level, e.g. 0.95.
        bootstrap: resamples of the N examples (seeded by ``seed``).

    Returns:
        (N,) the ``level`` quantile over resamples of the loss of sending the first k + 1
        examples to the student.
    """
    n = cost.size
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=bootstrap).astype(np.float32)
    losses = np.cumsum(counts * cost.astype(np.float32), axis=1) / n  # (B, N)
    return np.quantile(losses, level, axis=0)


def fit_threshold(
    student_probs: np.ndarray,
    ensemble_probs: np.ndarray,
    labels: np.ndarray,
    max_accuracy_loss: float = 0.005,
    measure: str = "margin",
    bound: float | None = 0.95,
    bootstrap: int = 1000,
    seed: int = 0,
) -> float:
    """Lowest student-confidence threshold whose cascade keeps the ensemble's accuracy.

    At threshold ``t`` the student answers every example whose confidence (`student_confidence`
    by ``measure``) is ``>= t`` and the ensemble answers the rest. Only thresholds equal to an
    observed confidence matter, so all of them are scored at once (sort by confidence, cumulative
    sums). A lower threshold sends more traffic to the student.

    With ``bound`` (the default, 0.95) the accuracy loss must hold with that confidence: its
    one-sided upper bound over ``bootstrap`` resamples of the dev examples must stay within
    ``max_accuracy_loss``. Thresholds are tested in a fixed sequence, from the highest down, and
    the scan stops at the first one that fails, so picking among many thresholds does not spend
    the bound's confidence (fixed-sequence testing). A point estimate on a thousand dev texts
    overfits their noise: its test loss exceeds the budget about half the time.

    With ``bound=None`` the point estimate decides: the lowest threshold whose dev accuracy is at
    least ``ensemble accuracy - max_accuracy_loss`` wins.

    Either way, if no threshold passes, the result is just above the largest confidence, i.e. the
    student never answers alone.

    Args:
        student_probs: (N, C) dev probabilities of the student.
        ensemble_probs: (N, C) dev probabilities of the full ensemble.
        labels: (N,) integer dev labels.
        max_accuracy_loss: allowed accuracy drop as a fraction (0.005 = half a point).
        measure: the confidence, one of `CONFIDENCE_MEASURES`.
        bound: confidence level of the loss's upper bound in (0, 1), or None for the point
            estimate.
        bootstrap: resamples behind the bound; seed: their seed.

    Returns:
        The threshold, a Python float.

    Raises:
        ValueError: on mismatched shapes, empty input, bad labels, a negative tolerance, a
            level outside (0, 1) or an unknown measure.
    """
    if not 0.0 <= max_accuracy_loss < 1.0:
        raise ValueError(f"max_accuracy_loss={max_accuracy_loss} must be in [0, 1), e.g. 0.005")
    if bound is not None and not 0.0 < bound < 1.0:
        raise ValueError(f"bound={bound} must be in (0, 1), e.g. 0.95, or None")
    conf, cost, valid = _routing(student_probs, ensemble_probs, labels, measure)
    # small slack so a loss of exactly max_accuracy_loss passes despite float rounding
    budget = max_accuracy_loss + 1e-6 if bound is not None else max_accuracy_loss + 1e-12
    if bound is None:
        ok = valid & (np.cumsum(cost) / cost.size <= budget)
    else:
        passes = accuracy_loss_bound(cost, bound, bootstrap, seed) <= budget
        failed = valid & ~passes
        stop = int(np.argmax(failed)) if failed.any() else cost.size  # the first failing cut
        ok = valid & (np.arange(cost.size) < stop)
    if not ok.any():
        return float(np.nextafter(conf[0], np.inf))
    return float(conf[np.flatnonzero(ok)[-1]])


def cascade_curve(
    student_probs: np.ndarray,
    ensemble_probs: np.ndarray,
    labels: np.ndarray,
    measure: str = "margin",
) -> dict[str, np.ndarray]:
    """Student share and accuracy loss at every threshold (for plots and reports).

    Returns:
        ``threshold``, ``student_fraction`` and ``accuracy_loss`` arrays, one entry per
        distinct confidence, most confident first.
    """
    conf, cost, valid = _routing(student_probs, ensemble_probs, labels, measure)
    idx = np.flatnonzero(valid)
    return {
        "threshold": conf[idx],
        "student_fraction": (idx + 1) / cost.size,
        "accuracy_loss": np.cumsum(cost)[idx] / cost.size,
    }


def cascade_accuracy(
    student_probs: np.ndarray,
    ensemble_probs: np.ndarray,
    labels: np.ndarray,
    threshold: float,
    measure: str = "margin",
) -> dict[str, float]:
    """Dev accuracy of the cascade at ``threshold`` next to the student's and the ensemble's.

    Args:
        student_probs: (N, C) student probabilities.
        ensemble_probs: (N, C) ensemble probabilities.
        labels: (N,) integer labels.
        threshold: student confidence at or above which the student answers alone.
        measure: the confidence, one of `CONFIDENCE_MEASURES`.

    Returns:
        ``accuracy``, ``ensemble_accuracy``, ``student_accuracy``, ``accuracy_loss`` (ensemble
        minus cascade) and ``student_fraction`` (share of examples the student answers).
    """
    s, e, y = _check_cascade_inputs(student_probs, ensemble_probs, labels)
    easy = student_confidence(s, measure) >= threshold  # (N,)
    pred = np.where(easy, s.argmax(axis=1), e.argmax(axis=1))
    acc = float(np.mean(pred == y))
    ens = float(np.mean(e.argmax(axis=1) == y))
    return {
        "accuracy": acc,
        "ensemble_accuracy": ens,
        "student_accuracy": float(np.mean(s.argmax(axis=1) == y)),
        "accuracy_loss": ens - acc,
        "student_fraction": float(easy.mean()),
        "threshold": float(threshold),
        "measure": measure,
    }


def student_of(spec: Combination) -> str:
    """Name of the cascade's first stage (`Combination.student`).

    Raises:
        ValueError: if there is no student member.
    """
    if spec.student is None:
        raise ValueError(
            f"cascade mode needs a member of kind 'student'; members are "
            f"{spec.members}. Train one (a `distill:` section), publish one with `ensemble "
            "distill RUN_DIR --publish`, or serve without --cascade"
        )
    return spec.student


def load_predictions(run_dir: str | os.PathLike, split: str = "dev") -> dict[str, np.ndarray]:
    """``RUN_DIR/predictions/<split>.npz`` as a dict (``labels``, ``intensity``, one per member).

    Raises:
        FileNotFoundError: if training did not save predictions for ``split``.
    """
    path = Path(run_dir) / "predictions" / f"{split}.npz"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found; training writes it after evaluation. Set "
            "serve.cascade_threshold explicitly or re-run the evaluation"
        )
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def served_probs(
    run_dir: str | os.PathLike, spec: Combination, split: str = "dev"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A run's saved ``split`` as the cascade sees it: (student, ensemble, labels).

    The student's (N, C) probabilities temperature-scaled as served, the combined ensemble's
    (N, C) probabilities, and the (N,) integer labels.

    Raises:
        FileNotFoundError: if training did not save predictions for ``split``.
    """
    preds = load_predictions(run_dir, split)
    name = student_of(spec)
    return (member_probs(spec, name, preds[name]), combine_outputs(preds, spec).probs,
            np.asarray(preds["labels"]).astype(np.int64))


def fit_threshold_from_run(
    run_dir: str | os.PathLike,
    spec: Combination,
    max_accuracy_loss: float = 0.005,
    split: str = "dev",
    measure: str = "margin",
) -> tuple[float, dict[str, float]]:
    """Fit the cascade threshold on the saved dev predictions of a run.

    Args:
        run_dir: the run directory (reads ``predictions/<split>.npz``).
        spec: the served combination (its method and weights define the ensemble).
        max_accuracy_loss: allowed accuracy drop, see `fit_threshold`.
        split: which saved predictions to use.
        measure: the student's confidence, one of `CONFIDENCE_MEASURES`.

    Returns:
        (threshold, `cascade_accuracy` at that threshold on the same split).

    Raises:
        FileNotFoundError: without saved predictions.
        ValueError: without a student member or with inconsistent predictions.
    """
    threshold, _, stats = fit_cascade_from_run(run_dir, spec, measure, max_accuracy_loss, split)
    return threshold, stats


def fit_cascade(
    student_probs: np.ndarray,
    ensemble_probs: np.ndarray,
    labels: np.ndarray,
    confidence: str = "auto",
    max_accuracy_loss: float = 0.005,
) -> tuple[float, str, dict[str, Any]]:
    """Threshold and confidence measure of a cascade, fitted on (dev) probabilities.

    Args:
        student_probs, ensemble_probs: (N, C) probabilities; labels: (N,) integer labels.
        confidence: one of `CONFIDENCE_MEASURES`, or ``auto``: fit each and keep the one whose
            threshold lets the student answer the most texts (a tie keeps ``margin``).
        max_accuracy_loss: allowed accuracy drop, see `fit_threshold` (bounded by bootstrap).

    Returns:
        (threshold, measure, `cascade_accuracy` at that threshold on the same data, with the
        budget under ``max_accuracy_loss``).

    Raises:
        ValueError: an unknown confidence, or inconsistent inputs.
    """
    if confidence != "auto" and confidence not in CONFIDENCE_MEASURES:
        raise ValueError(
            f"cascade confidence {confidence!r} unknown; use auto or one of {CONFIDENCE_MEASURES}"
        )
    measures = CONFIDENCE_MEASURES if confidence == "auto" else (confidence,)
    fits = {}
    for m in measures:
        threshold = fit_threshold(student_probs, ensemble_probs, labels, max_accuracy_loss, m)
        fits[m] = threshold, cascade_accuracy(student_probs, ensemble_probs, labels, threshold, m)
    measure = max(measures, key=lambda m: fits[m][1]["student_fraction"])
    threshold, stats = fits[measure]
    return threshold, measure, {**stats, "max_accuracy_loss": max_accuracy_loss}


def fit_cascade_from_run(
    run_dir: str | os.PathLike,
    spec: Combination,
    confidence: str = "auto",
    max_accuracy_loss: float = 0.005,
    split: str = "dev",
) -> tuple[float, str, dict[str, Any]]:
    """Threshold and confidence measure for a run's cascade, fitted on its dev predictions.

    Args:
        run_dir: the run directory (reads ``predictions/<split>.npz``).
        spec: the served combination.
        confidence: one of `CONFIDENCE_MEASURES`, or ``auto``: fit each and keep the one whose
            threshold lets the student answer the most texts (a tie keeps ``margin``).
        max_accuracy_loss: allowed accuracy drop, see `fit_threshold`.
        split: which saved predictions to use.

    Returns:
        (threshold, measure, `cascade_accuracy` at that threshold on the same split, with the
        budget under ``max_accuracy_loss`` and, when the run saved test predictions,
        `cascade_accuracy` on test under ``test``).

    Raises:
        FileNotFoundError: without saved predictions.
        ValueError: without a student member, with inconsistent predictions or an unknown
            confidence.
    """
    threshold, measure, stats = fit_cascade(*served_probs(run_dir, spec, split), confidence,
                                            max_accuracy_loss)
    try:  # the budget's check on data the threshold never saw
        test = served_probs(run_dir, spec, "test")
    except FileNotFoundError:
        return threshold, measure, stats
    stats["test"] = cascade_accuracy(*test, threshold, measure)
    return threshold, measure, stats

