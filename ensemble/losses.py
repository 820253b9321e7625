"""Loss terms: each member's task loss, distillation, and the guidance members exchange.

Pure tensor functions. `member_loss` adds every enabled term into ONE scalar, because DeepSpeed
rejects several backward passes per step under ZeRO.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor


def task_loss(
    kind: str, loss: str, logits: Tensor, labels: Tensor, intensity: Tensor | None
) -> Tensor:
    """logits: (B, C) or (B, 1) for a regressor; labels: (B,); intensity: (B,)."""
    if kind == "regressor":
        if intensity is None:
            raise ValueError("a regressor needs an intensity column (data.intensity_column)")
        pred = logits.squeeze(-1)  # (B,)
        if loss == "huber":
            return F.huber_loss(pred, intensity)
        return F.mse_loss(pred, intensity)
    return F.cross_entropy(logits, labels)


def kl_to_target(student_logits: Tensor, target_probs: Tensor, temperature: float = 1.0) -> Tensor:
    """T^2 * KL(target || softmax(student/T)), batch mean. target_probs: (B, C), rows sum to 1."""
    log_p = F.log_softmax(student_logits / temperature, dim=-1)
    return F.kl_div(log_p, target_probs, reduction="batchmean") * temperature**2


def distillation(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)) (Hinton et al. 2015)."""
    return kl_to_target(
        student_logits, F.softmax(teacher_logits / temperature, dim=-1), temperature
    )


def intensity_soft_target(intensity: Tensor, class_intensity: Tensor, temperature: float) -> Tensor:
    """A class distribution centred on a predicted intensity.

    q_c ∝ exp(-(I - μ_c)² / (2σ²)) with σ = temperature × the mean gap between class centres μ.
    intensity: (B,), class_intensity: (C,). Returns (B, C).
    """
    gaps = class_intensity[1:] - class_intensity[:-1]
    sigma = temperature * gaps.abs().mean().clamp_min(1e-6)
    dist2 = (intensity[:, None] - class_intensity[None, :]) ** 2  # (B, C)
    return F.softmax(-dist2 / (2 * sigma**2), dim=-1)


def expected_intensity(logits: Tensor, class_intensity: Tensor) -> Tensor:
    """Σ_c p_c μ_c under the classifier's probabilities. logits (B, C) -> (B,)."""
    return F.softmax(logits, dim=-1) @ class_intensity


@dataclass(frozen=True)
class LossWeights:
    """Per-member weights of each term; a term with weight 0 is not computed."""

    distill_alpha: float = 0.0  # student: lambda of (1-λ)·task + λ·T²·KL(teacher‖student)
    distill_temperature: float = 1.0
    from_regressor: float = 0.0  # classifier: soft CE to the regressor's intensity target
    from_classifier: float = 0.0  # regressor: MSE to the classifier's expected intensity
    from_ensemble: float = 0.0  # KL to the ensemble's soft vote (mutual learning / student)
    guidance_temperature: float = 1.0


def member_loss(
    kind: str,
    loss: str,
    logits: Tensor,
    batch: dict[str, Tensor],
    weights: LossWeights,
    class_intensity: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """One scalar loss for a member's micro-batch and its parts (for logging).

    `batch` holds `labels`, optionally `intensity`, and the guidance signals cached from the last
    round, aligned with the batch: `teacher_logits` (B, C), `regressor_intensity` (B,),
    `classifier_probs` (B, C), `ensemble_probs` (B, C).
    """
    task = task_loss(kind, loss, logits, batch["labels"], batch.get("intensity"))
    parts = {"task": float(task.detach())}
    total = task
    if kind == "student" and weights.distill_alpha > 0:
        kd = distillation(logits, batch["teacher_logits"], weights.distill_temperature)
        parts["distill"] = float(kd.detach())
        total = (1 - weights.distill_alpha) * task + weights.distill_alpha * kd
    if weights.from_regressor > 0 and kind != "regressor":
        assert class_intensity is not None
        target = intensity_soft_target(
            batch["regressor_intensity"], class_intensity, weights.guidance_temperature
        )
        term = kl_to_target(logits, target)
        parts["from_regressor"] = float(term.detach())
        total = total + weights.from_regressor * term
    if weights.from_classifier > 0 and kind == "regressor":
        assert class_intensity is not None
        target = batch["classifier_probs"] @ class_intensity  # (B,)
        term = F.mse_loss(logits.squeeze(-1), target)
        parts["from_classifier"] = float(term.detach())
        total = total + weights.from_classifier * term
    if weights.from_ensemble > 0 and kind != "regressor":
        term = kl_to_target(logits, batch["ensemble_probs"], weights.guidance_temperature)
        parts["from_ensemble"] = float(term.detach())
        total = total + weights.from_ensemble * term
    return total, parts
