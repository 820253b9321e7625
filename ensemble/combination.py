"""The combination spec: how a run's members become one prediction, the one definition.

A `Combination` is a manifest's ``combine`` section, typed and checked (method, weights, params
such as member temperatures, the regressor's sharpness and the output temperature), together
with the label space it needs: `Manifest.combine` holds one, `publish.fit_combiner` makes one,
and `Combination.section` is what manifest.json stores. `combine_outputs` turns the members'
outputs into the combined prediction with `ensemble.combine`'s rules (`Combination.probs` the
probabilities alone); the Serve combiner, `Ensemble.from_run`, `ensemble predict`, publish's
plots and the distillation targets all call them, so every one of them returns what the run's
metrics describe. Pure numpy (no Ray, no torch).

* classification members (classifier, teacher, student) output ``(B, C)`` probabilities; a
  member with a temperature in ``params["temperatures"]`` (fitted on dev when the run had
  ``training.calibrate``) votes them scaled (`combine.member_vote`);
* the regressor outputs ``(B,)`` intensities and votes through `combine.regressor_probs`;
* the ensemble intensity is `combine.combine_intensity` over the regressor's intensity and each
  classification member's `combine.expected_intensity`, weighted by `combine.intensity_weights`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ensemble import combine

__all__ = [
    "CLASSIFICATION_KINDS",
    "Combination",
    "Combined",
    "combine_outputs",
    "intensity_weights",
    "member_probs",
    "stack_member_probs",
    "without",
]

CLASSIFICATION_KINDS = ("classifier", "teacher", "student")


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
        info: what else the manifest's section records and combining does not use: how the
            combiner was chosen on dev (``dev_score``, ``metric``, ``select``, ``candidates``,
            ``out_of_fold``) and an optional ``cascade_threshold`` for serving.
        cascade_student: a student that does not vote: the cascade's first stage only (one
            published after training by ``ensemble distill --publish``). It is not in
            ``members``; its temperature, if fitted, is in ``params["temperatures"]``.
    """

    members: dict[str, str]
    label_names: list[str]
    class_intensity: list[float]
    intensity_edges: list[float]
    method: str = "soft_vote"
    weights: dict[str, float] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    cascade_student: str | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.cascade_student in self.members:
            problems.append(
                f"cascade_student {self.cascade_student!r} is also a voting member; a member "
                "either votes or is the cascade's non-voting first stage"
            )
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
        classifying = [n for n in self.served if self.kind(n) in CLASSIFICATION_KINDS]
        not_cls = sorted(set(temps) - set(classifying))
        if not_cls:
            problems.append(
                f"params.temperatures names {not_cls}, which are not classification members "
                f"{classifying}"
            )
        bad = {n: t for n, t in temps.items() if not _positive(t)}
        if bad:
            problems.append(f"params.temperatures {bad} must be finite and > 0")
        out = self.params.get(combine.OUTPUT_TEMPERATURE)
        if out is not None and not _positive(out):
            problems.append(f"params.{combine.OUTPUT_TEMPERATURE}={out!r} must be finite and > 0")
        return problems

    @classmethod
    def from_section(
        cls,
        section: Mapping[str, Any],
        kinds: Mapping[str, str],
        label_names: Sequence[str],
        class_intensity: Sequence[float],
        intensity_edges: Sequence[float],
    ) -> Combination:
        """The combination a manifest's ``combine`` section describes.

        Args:
            section: ``method``, ``weights``, ``params``, the ``members`` in the order a learned
                combiner was fitted in (default: the order of ``kinds``), an optional
                ``cascade_student`` and `info` keys.
            kinds: the run's members, name -> kind (the cascade student among them).
            label_names, class_intensity, intensity_edges: the run's label space.

        Raises:
            ValueError: if the section does not fit the members (the message names the fix).
        """
        cascade_student = section.get("cascade_student")
        if cascade_student is not None and kinds.get(cascade_student) != "student":
            raise ValueError(
                f"combine.cascade_student {cascade_student!r} is not a member of kind 'student' "
                f"in the manifest ({dict(kinds)}); publish it again with `ensemble distill "
                "RUN_DIR --name NAME --publish`"
            )
        voting = {n: k for n, k in kinds.items() if n != cascade_student}
        # stacking coefficients are laid out in the order the combiner was fitted in
        order = list(section.get("members") or voting)
        if sorted(order) != sorted(voting):
            raise ValueError(
                f"combine.members {order} differ from the manifest's voting members "
                f"{list(voting)}; refit the combiner on the current members"
            )
        return cls(
            members={name: kinds[name] for name in order},
            label_names=list(label_names),
            class_intensity=[float(v) for v in class_intensity],
            intensity_edges=[float(v) for v in intensity_edges],
            method=section.get("method", "soft_vote"),
            weights={k: float(v) for k, v in (section.get("weights") or {}).items()},
            params=dict(section.get("params") or {}),
            info={k: v for k, v in section.items() if k not in _SECTION_KEYS},
            cascade_student=cascade_student,
        )

    def section(self) -> dict[str, Any]:
        """The manifest's ``combine`` section (the label space is the manifest's own)."""
        out = {"method": self.method, "weights": dict(self.weights), "params": dict(self.params),
               "members": list(self.members), **self.info}
        if self.cascade_student is not None:
            out["cascade_student"] = self.cascade_student
        return out

    @property
    def served(self) -> list[str]:
        """Every member a server loads: the voting ones, then the cascade student if any."""
        return [*self.members, *([self.cascade_student] if self.cascade_student else [])]

    @property
    def student(self) -> str | None:
        """The cascade's first stage: the published cascade student, else the first voting
        member of kind ``student``, else None."""
        voting = (n for n, k in self.members.items() if k == "student")
        return self.cascade_student or next(voting, None)

    def kind(self, name: str) -> str:
        """Member ``name``'s kind (the cascade student's is ``student``).

        Raises:
            KeyError: if ``name`` is not served (`served`).
        """
        if name == self.cascade_student:
            return "student"
        return self.members[name]

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

    def combine_votes(self, votes: np.ndarray, names: list[str] | None = None) -> np.ndarray:
        """(B, C) the combination of (M, B, C) member votes stacked in ``names`` order (default:
        the members' order), with this method, its weights and params."""
        names = names or list(self.members)
        return combine.apply(self.method, votes, self.weight_vector(names), self.params)

    def probs(self, outputs: Mapping[str, np.ndarray]) -> np.ndarray:
        """(B, C) the combined probabilities of the members' outputs (`combine_outputs`'s)."""
        return self.combine_votes(stack_member_probs(outputs, self))


_SECTION_KEYS = ("method", "weights", "params", "members", "cascade_student")


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
    return combine.member_vote(spec.kind(name), output, spec.intensity_edges, spec.num_classes,
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
    final = spec.combine_votes(probs, names)  # (B, C)
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
        keep = {*members, spec.cascade_student}
        params["temperatures"] = {n: t for n, t in params["temperatures"].items() if n in keep}
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
