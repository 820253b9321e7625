"""Multi-stage schedules: which stages a member runs, and what each stage changes.

A member's `stages:` run in order in the first round, each starting from the previous stage's
exported weights and each evaluated; later rounds repeat the last stage. Stages:

- `mlm`: domain-adaptive masked-LM on the task texts (or `corpus`), then the encoder is put back
  under the member's head.
- `finetune`: supervised training, optionally with gradual (layer-wise) unfreezing, top layers
  first, and layer-wise LR decay.
- `curriculum`: supervised training on examples ordered easy to hard by a difficulty score, with
  a pacing schedule that widens the pool each epoch.
- `distill`: the student's (1-λ)·task + λ·T²·KL(teacher‖student).

Pure torch/numpy; no Ray.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from torch import nn

from ensemble.combine import softmax
from ensemble.config import MemberConfig, StageConfig
from ensemble.models.members import layer_index

SUPERVISED = ("finetune", "curriculum", "distill")


def plan(member: MemberConfig) -> list[StageConfig]:
    """The member's stages; without a `stages:` list, one stage of the member's own kind."""
    if member.stages:
        return list(member.stages)
    name = "distill" if member.kind == "student" else "finetune"
    return [StageConfig(name=name, epochs=member.epochs)]


def validate(name: str, member: MemberConfig) -> list[str]:
    """Config problems with a member's stage list (unknown names are caught by the schema)."""
    problems = []
    stages = plan(member)
    if stages[-1].name not in SUPERVISED:
        problems.append(
            f"members.{name}.stages must end with a supervised stage "
            f"({', '.join(SUPERVISED)}), not {stages[-1].name!r}"
        )
    for i, stage in enumerate(stages):
        if stage.name == "mlm" and i > 0 and stages[i - 1].name != "mlm":
            problems.append(f"members.{name}.stages[{i}]: mlm must come before supervised stages")
        if stage.name == "distill" and member.kind != "student":
            problems.append(f"members.{name}.stages[{i}]: distill is for kind=student members")
        if stage.name == "mlm" and member.kind == "student":
            problems.append(
                f"members.{name}.stages[{i}]: a student starts from its teacher; "
                "put the mlm stage on the teacher"
            )
        if stage.corpus is not None and not Path(stage.corpus).is_file():
            problems.append(f"members.{name}.stages[{i}].corpus={stage.corpus!r} is not a file")
    return problems


def layer_lr_scale(model: nn.Module, decay: float) -> dict[str, float]:
    """Layer-wise LR decay: the head gets 1, each layer below it `decay` times the one above."""
    if decay >= 1.0:
        return {}
    layers = int(model.config.num_hidden_layers)
    top = layers + 1
    return {n: decay ** (top - layer_index(n, layers)) for n, _ in model.named_parameters()}


def unfreeze_steps(model: nn.Module, stage: StageConfig, steps_per_epoch: int) -> dict[str, int]:
    """Gradual unfreezing: the head trains from step 0, then one more layer (top down) per epoch.

    Returns the optimizer step from which each parameter trains (0 for all when disabled).
    """
    if not stage.gradual_unfreeze:
        return {}
    layers = int(model.config.num_hidden_layers)
    top = layers + 1
    return {
        n: (top - layer_index(n, layers)) * steps_per_epoch for n, _ in model.named_parameters()
    }


def difficulty(
    stage: StageConfig, intensity: np.ndarray | None, teacher_logits: np.ndarray | None
) -> np.ndarray:
    """Per-example difficulty (higher = harder)."""
    if stage.difficulty == "teacher_confidence":
        if teacher_logits is None:
            raise ValueError(
                "curriculum difficulty=teacher_confidence needs a teacher's logits "
                "(a teacher member trained in an earlier round); use "
                "intensity_extremity for the first round"
            )
        return 1.0 - softmax(teacher_logits).max(axis=1)
    if intensity is None:
        raise ValueError("curriculum difficulty=intensity_extremity needs data.intensity_column")
    mid = 0.5 * (intensity.min() + intensity.max())
    return -np.abs(intensity - mid)  # extreme sentiment is easy, mid-scale is hard


def curriculum_order(scores: np.ndarray) -> np.ndarray:
    """Example indices from easiest to hardest (stable for ties)."""
    return np.argsort(scores, kind="stable")


def pacing_fraction(stage: StageConfig, epoch: int, epochs: int) -> float:
    """Share of the easiest examples available in `epoch` (0-based) of `epochs`."""
    if epochs <= 1:
        return 1.0
    t = min(1.0, epoch / (epochs - 1))
    s = stage.start_fraction
    if stage.pacing == "root":
        return min(1.0, s + (1 - s) * math.sqrt(t))
    if stage.pacing == "step":
        return s if t < 0.5 else 1.0
    return s + (1 - s) * t


def paced_order(
    order: np.ndarray, stage: StageConfig, epoch: int, epochs: int, seed: int
) -> np.ndarray:
    """This epoch's examples: the easiest fraction, shuffled, repeated to a full epoch's length.

    Every epoch keeps the same number of steps, so checkpoints and LR schedules line up.
    """
    keep = max(1, int(round(pacing_fraction(stage, epoch, epochs) * len(order))))
    pool = order[:keep].copy()
    np.random.default_rng([seed, epoch]).shuffle(pool)
    return np.resize(pool, len(order))
