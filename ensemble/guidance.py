"""What members send each other between rounds, and the loss weights that use it.

- classifier/teacher <- regressor: a soft class target centred on the regressor's intensity;
- regressor <- classifier: the expected intensity under the classifier's probabilities;
- student <- teacher: the teacher's logits of the previous round (cached: the student's step never
  runs the teacher), and optionally the whole ensemble's soft vote;
- teacher/classifier <- ensemble: mutual-learning KL to the ensemble's soft vote.

The arrays are put in Ray's object store once and each member's job gets a reference.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import ray

from ensemble import combine
from ensemble import evaluate as E
from ensemble.combine import softmax, to_probs
from ensemble.config import RunConfig
from ensemble.data import Splits
from ensemble.losses import LossWeights


def loss_weights(cfg: RunConfig, name: str, available: bool) -> LossWeights:
    """A member's loss weights; guidance terms are 0 until there is a previous round to use."""
    m, g = cfg.members[name], cfg.training.guidance
    on = 1.0 if available else 0.0
    if m.kind == "regressor":
        return LossWeights(
            from_classifier=on * g.regressor_from_classifier, guidance_temperature=g.temperature
        )
    if m.kind == "student":
        return LossWeights(
            distill_alpha=m.distill_alpha,
            distill_temperature=m.distill_temperature,
            from_ensemble=on * g.student_from_ensemble,
            guidance_temperature=g.temperature,
        )
    from_regressor = g.classifier_from_regressor if m.kind == "classifier" else 0.0
    return LossWeights(
        from_regressor=on * from_regressor,
        from_ensemble=on * g.mutual,
        guidance_temperature=g.temperature,
    )


def regressor_sharpness(
    cfg: RunConfig, splits: Splits, kinds: dict[str, str], outputs: dict[str, dict[str, np.ndarray]]
) -> float | None:
    """The regressor vote's sharpness for this round, fitted on the members' dev outputs."""
    dev = {n: o["dev"] for n, o in outputs.items() if "dev" in o}
    return E.regressor_sharpness(
        dev, kinds, splits.labels["dev"], splits.intensity_edges(), splits.num_labels(),
        cfg.training.regressor_vote,
    )


def member_temperatures(
    cfg: RunConfig, splits: Splits, kinds: dict[str, str], outputs: dict[str, dict[str, np.ndarray]]
) -> dict[str, float] | None:
    """Each classification member's temperature for this round, fitted on its dev outputs.

    None when ``training.calibrate`` is off.
    """
    dev = {n: o["dev"] for n, o in outputs.items() if "dev" in o}
    return E.member_temperatures(
        to_probs(dev, kinds), kinds, splits.labels["dev"], cfg.training.calibrate
    )


def _ensemble_probs(
    train: dict[str, np.ndarray],
    kinds: dict[str, str],
    splits: Splits,
    temperature: float,
    sharpness: float | None,
    member_t: dict[str, float] | None = None,
) -> np.ndarray:
    """The members' soft vote on the training texts (the regressor votes by its bin).

    A member's logits are divided by its own dev-fitted temperature (when calibrated) and then by
    the guidance ``temperature``, which softens the target the members learn from.
    """
    member_t = member_t or {}
    temps = {n: temperature * member_t.get(n, 1.0) for n in train if kinds[n] != "regressor"}
    votes = combine.member_votes(to_probs(train, kinds), kinds, splits.intensity_edges(),
                                 splits.num_labels(), sharpness, temps)
    return combine.soft_vote(votes).astype(np.float32)


def build(
    cfg: RunConfig, splits: Splits, kinds: dict[str, str], outputs: dict[str, dict[str, np.ndarray]]
) -> dict[str, Any]:
    """Object refs of each member's guidance arrays for the next round (None: nothing to send)."""
    g = cfg.training.guidance
    train = {n: o["train"] for n, o in outputs.items() if "train" in o}
    by_kind = {kinds[n]: n for n in train}
    refs: dict[str, Any] = {}
    ensemble = None
    if (g.mutual > 0 or g.student_from_ensemble > 0) and train:
        sharpness = regressor_sharpness(cfg, splits, kinds, outputs)
        temps = member_temperatures(cfg, splits, kinds, outputs)
        ensemble = _ensemble_probs(train, kinds, splits, g.temperature, sharpness, temps)
    for name, m in cfg.members.items():
        arrays: dict[str, Any] = {}
        w = loss_weights(cfg, name, available=True)
        if m.kind == "student" and m.teacher in train:
            arrays["teacher_logits"] = train[m.teacher]
        if w.from_regressor > 0 and "regressor" in by_kind:
            arrays["regressor_intensity"] = train[by_kind["regressor"]]
        if w.from_classifier > 0 and "classifier" in by_kind:
            arrays["classifier_probs"] = softmax(train[by_kind["classifier"]])
        if w.from_ensemble > 0 and ensemble is not None:
            arrays["ensemble_probs"] = ensemble
        problems = _missing(name, m.teacher, w, arrays)
        if problems:
            raise ValueError(f"member {name}: " + "; ".join(problems))
        refs[name] = ray.put(arrays) if arrays else None
    return refs


def _missing(name: str, teacher: str | None, w: LossWeights, arrays: dict[str, Any]) -> list[str]:
    """What member ``name``'s loss weights ask for and ``arrays`` lack, each with its fix."""
    problems = []
    if w.distill_alpha > 0 and "teacher_logits" not in arrays:
        problems.append(f"distill_alpha={w.distill_alpha} but its teacher {teacher!r} has no "
                        f"training outputs; train the teacher in this run or set "
                        f"members.{name}.distill_alpha: 0")
    need = {
        "regressor_intensity": w.from_regressor,
        "classifier_probs": w.from_classifier,
        "ensemble_probs": w.from_ensemble,
    }
    guidance = [k for k, v in need.items() if v > 0 and k not in arrays]
    if guidance:
        problems.append(f"guidance {guidance} is on but no member produces it; add that member "
                        "or set its weight to 0 in training.guidance")
    return problems


def teacher_only(teacher_train_logits: np.ndarray) -> Any:
    """A student's first-round guidance: just its freshly trained teacher's logits."""
    return ray.put({"teacher_logits": teacher_train_logits})
