"""How member outputs become one answer: the ensemble combination and the student-first cascade.

Pure numpy (no Ray, no torch), so the Serve combiner, the load benchmark and the unit tests run
exactly the same code. The arithmetic itself lives in `ensemble.combine`; this module adapts the
run directory's view of the members (a mapping ``name -> output``) to it:

* classification members (classifier, teacher, student) output ``(B, C)`` probabilities; a
  member with a temperature in ``params["temperatures"]`` (fitted on dev when the run had
  ``training.calibrate``) votes them scaled by `combine.member_vote`, everywhere: in the
  combination, as the cascade's student and in the member views of a response;
* the regressor outputs ``(B,)`` intensities and votes through `combine.regressor_probs`;
* the ensemble intensity is `combine.combine_intensity` over the regressor's intensity and each
  classification member's `combine.expected_intensity`, weighted as `evaluate.ensemble_intensity`
  does (the regressor half, the classification members the other half), so Serve returns what
  the run's metrics describe.

The cascade lets the (cheap) student answer alone when its confidence reaches a threshold;
`fit_threshold` picks the lowest threshold whose dev accuracy loss against the full ensemble
stays within a budget with 95 % confidence (a bootstrap upper bound), which sends as much
traffic to the student as the budget safely allows. The confidence is the
student's margin (top probability minus the runner-up) or its top probability
(`CONFIDENCE_MEASURES`); `fit_cascade_from_run` with ``auto`` (Serve's default) fits both and
keeps the one that lets the student answer more. Which wins depends on the student: on SST the
margin did for independently trained students, the top probability for jointly trained ones.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ensemble import combine
from ensemble.rundir import Manifest

__all__ = [
    "CLASSIFICATION_KINDS",
    "CONFIDENCE_MEASURES",
    "Answer",
    "cascade_answer",
    "ensemble_answer",
    "hard_examples",
    "intensity_weights",
    "Combination",
    "Combined",
    "accuracy_loss_bound",
    "cascade_accuracy",
    "cascade_curve",
    "combination_from_manifest",
    "combine_outputs",
    "fit_threshold",
    "fit_cascade",
    "fit_cascade_from_run",
    "fit_threshold_from_run",
    "load_predictions",
    "member_probs",
    "stack_member_probs",
    "student_confidence",
    "served_probs",
    "student_of",
    "without",
]

CLASSIFICATION_KINDS = ("classifier", "teacher", "student")
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
class Combination:
    """Everything needed to turn member outputs into the served prediction.

    Attributes:
        members: member name -> kind, in the order the weights apply.
        label_names: class names, index = class id (C of them).
        class_intensity: (C,) mean intensity per class.
        intensity_edges: (C-1,) bin edges through which the regressor votes.
        method: one of `combine.METHODS`.
        weights: member name -> weight; empty means equal weights.
        params: method parameters (``coef``/``intercept`` for stacking; an optional
            ``regressor_sharpness`` turns the regressor's one-hot vote into a soft one; optional
            ``temperatures``, member name -> T, scale classification members' probabilities;
            a member without one, or a manifest without the key, votes with T = 1; an optional
            ``output_temperature`` scales the combined probabilities).
    """

    members: dict[str, str]
    label_names: list[str]
    class_intensity: list[float]
    intensity_edges: list[float]
    method: str = "soft_vote"
    weights: dict[str, float] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = []
        if self.method not in combine.METHODS:
            problems.append(f"combine method {self.method!r} unknown; use one of {combine.METHODS}")
        if not self.members:
            problems.append("no members to combine; the manifest lists none")
        bad_kinds = {
            n: k for n, k in self.members.items() if k not in (*CLASSIFICATION_KINDS, "regressor")
        }
        if bad_kinds:
            problems.append(
                f"unknown member kinds {bad_kinds}; use classifier/regressor/teacher/student"
            )
        if self.weights:
            missing = sorted(set(self.members) - set(self.weights))
            extra = sorted(set(self.weights) - set(self.members))
            if missing:
                problems.append(
                    f"weights lack members {missing}; give every member a weight "
                    "(0 drops it) or none at all for equal weights"
                )
            if extra:
                problems.append(
                    f"weights name unknown members {extra}; valid: {list(self.members)}"
                )
            if any(not np.isfinite(w) or w < 0 for w in self.weights.values()):
                problems.append(f"weights {self.weights} must be finite and >= 0")
            elif not missing and sum(self.weights.values()) <= 0:
                problems.append("all weights are 0; give at least one member a positive weight")
        if self.method == "stacking" and not {"coef", "intercept"} <= set(self.params):
            problems.append("method 'stacking' needs params.coef and params.intercept")
        problems += self._temperature_problems()
        if self.method in ("weighted", "caruana") and not self.weights:
            problems.append(f"method {self.method!r} needs learned weights in combine.weights")
        if len(self.class_intensity) != len(self.label_names):
            problems.append("class_intensity needs one value per label")
        if len(self.intensity_edges) != len(self.label_names) - 1:
            problems.append("intensity_edges needs len(label_names) - 1 values")
        if problems:
            raise ValueError("; ".join(problems))

    def _temperature_problems(self) -> list[str]:
        temps = self.params.get("temperatures") or {}
        if not isinstance(temps, Mapping):
            return [f"params.temperatures must map member names to T > 0, got {temps!r}"]
        problems = []
        not_cls = sorted(n for n in temps if self.members.get(n) not in CLASSIFICATION_KINDS)
        if not_cls:
            problems.append(
                f"params.temperatures names {not_cls}, which are not classification members "
                f"{[n for n, k in self.members.items() if k in CLASSIFICATION_KINDS]}"
            )
        bad = {n: t for n, t in temps.items() if not _positive(t)}
        if bad:
            problems.append(f"params.temperatures {bad} must be finite and > 0")
        out = self.params.get(combine.OUTPUT_TEMPERATURE)
        if out is not None and not _positive(out):
            problems.append(f"params.{combine.OUTPUT_TEMPERATURE}={out!r} must be finite and > 0")
        return problems

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def temperature(self, name: str) -> float:
        """Member ``name``'s temperature; 1.0 (its probabilities as they are) without one."""
        return float((self.params.get("temperatures") or {}).get(name, 1.0))

    def weight_vector(self, names: list[str] | None = None) -> np.ndarray | None:
        """(M,) weights of ``names`` (default: all members) in that order; None = equal."""
        w = combine.weight_vector(self.weights, names or list(self.members))
        return None if w is None else np.array(w, dtype=np.float64)


@dataclass(frozen=True)
class Combined:
    """The combined prediction for B texts (all arrays have B rows)."""

    probs: np.ndarray  # (B, C)
    label_ids: np.ndarray  # (B,)
    confidence: np.ndarray  # (B,)
    intensity: np.ndarray  # (B,)
    disagreement: np.ndarray  # (B,)


def member_probs(spec: Combination, name: str, output: np.ndarray) -> np.ndarray:
    """Member ``name``'s (B, C) vote as the combination uses it (`combine.member_vote`): a
    classification member's probabilities scaled by its temperature (`Combination.temperature`),
    the regressor's intensities through their bin, softened by ``params["regressor_sharpness"]``.
    """
    return combine.member_vote(spec.members[name], output, spec.intensity_edges, spec.num_classes,
                               spec.params.get("regressor_sharpness"), spec.temperature(name))


def _positive(value: Any) -> bool:
    try:
        return bool(np.isfinite(float(value)) and float(value) > 0)
    except (TypeError, ValueError):
        return False


def stack_member_probs(
    outputs: Mapping[str, np.ndarray], spec: Combination, names: list[str] | None = None
) -> np.ndarray:
    """Member outputs as one (M, B, C) tensor of their votes (`combine.member_votes`).

    Args:
        outputs: member name -> (B, C) probabilities or, for the regressor, (B,) intensities.
        spec: the combination (member kinds, edges, number of classes, temperatures).
        names: members to stack, in order; default all of ``spec.members``.

    Raises:
        ValueError: if a member's output is missing or has the wrong shape.
    """
    return combine.member_votes(outputs, spec.members, spec.intensity_edges, spec.num_classes,
                                spec.params.get("regressor_sharpness"),
                                spec.params.get("temperatures"), names or list(spec.members))


def intensity_weights(spec: Combination) -> np.ndarray:
    """(M,) weights of the members' intensity estimates (`combine.intensity_weights`)."""
    return combine.intensity_weights(list(spec.members.values()))


def combine_outputs(outputs: Mapping[str, np.ndarray], spec: Combination) -> Combined:
    """Combine every member's output into the served prediction.

    Args:
        outputs: member name -> (B, C) probabilities, or (B,) intensities for the regressor.
        spec: method, weights and run metadata.

    Returns:
        The combined probabilities, labels, confidence, intensity and member disagreement.

    Raises:
        ValueError: on missing outputs or inconsistent shapes.
    """
    names = list(spec.members)
    probs = stack_member_probs(outputs, spec, names)  # (M, B, C)
    weights = spec.weight_vector(names)
    final = combine.apply(spec.method, probs, weights, spec.params)  # (B, C)
    intensities = np.stack(
        [  # (M, B)
            np.asarray(outputs[n], dtype=np.float64).reshape(-1)
            if spec.members[n] == "regressor"
            else combine.expected_intensity(probs[i], spec.class_intensity)
            for i, n in enumerate(names)
        ]
    )
    return Combined(
        probs=final,
        label_ids=final.argmax(axis=1),
        confidence=combine.confidence(final),
        intensity=combine.combine_intensity(intensities, intensity_weights(spec)),
        disagreement=combine.disagreement(probs),
    )


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


def without(spec: Combination, missing: Sequence[str]) -> Combination:
    """The combination of the members that answered, for when some did not.

    ``missing`` members are left out and the others' weights renormalised; a stacking combiner,
    fitted on every member's votes, and learned weights that leave nobody a positive weight
    fall back to the soft vote of the members left. The other params (member temperatures, the
    regressor's sharpness, the output temperature) stay as they are.

    Raises:
        ValueError: if no member is left.
    """
    gone = set(missing) & set(spec.members)
    if not gone:
        return spec
    members = {n: k for n, k in spec.members.items() if n not in gone}
    if not members:
        raise ValueError(f"no member left to combine: {sorted(gone)} did not answer")
    params = dict(spec.params)
    if params.get("temperatures"):
        params["temperatures"] = {n: t for n, t in params["temperatures"].items() if n in members}
    method = spec.method
    weights = {n: w for n, w in spec.weights.items() if n in members}
    if method == "stacking" or (weights and sum(weights.values()) <= 0):
        method, weights = "soft_vote", {}
        params.pop("coef", None)
        params.pop("intercept", None)
    if weights:
        total = sum(weights.values())
        weights = {n: w / total for n, w in weights.items()}
    return dataclasses.replace(spec, members=members, method=method, weights=weights,
                               params=params)


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


def combination_from_manifest(manifest: Manifest, method: str | None = None) -> Combination:
    """The `Combination` a run directory's manifest describes.

    Args:
        manifest: the loaded manifest.
        method: override of ``manifest.combine["method"]`` (e.g. from ``--method``).

    Returns:
        The validated combination.

    Raises:
        ValueError: if the manifest's combine section is inconsistent with its members.
    """
    comb = manifest.combine or {}
    # stacking coefficients are laid out in the order the combiner was fitted in
    order = list(comb.get("members") or manifest.members)
    if sorted(order) != sorted(manifest.members):
        raise ValueError(
            f"combine.members {order} differ from the manifest's members "
            f"{list(manifest.members)}; refit the combiner on the current members"
        )
    return Combination(
        members={name: manifest.members[name].kind for name in order},
        label_names=list(manifest.label_names),
        class_intensity=[float(v) for v in manifest.class_intensity],
        intensity_edges=[float(v) for v in manifest.intensity_edges],
        method=method or comb.get("method", "soft_vote"),
        weights={k: float(v) for k, v in (comb.get("weights") or {}).items()},
        params=dict(comb.get("params") or {}),
    )


def student_of(spec: Combination) -> str:
    """Name of the member of kind ``student`` (the cascade's first stage).

    Raises:
        ValueError: if there is no student member.
    """
    students = [n for n, k in spec.members.items() if k == "student"]
    if not students:
        raise ValueError(
            f"cascade mode needs a member of kind 'student'; members are "
            f"{spec.members}. Train one or serve without --cascade"
        )
    return students[0]


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

