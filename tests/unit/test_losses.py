"""Loss terms against direct computations: distillation, the student's mix, guidance terms."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ensemble.losses import (
    LossWeights,
    distillation,
    expected_intensity,
    intensity_soft_target,
    kl_to_target,
    member_loss,
    task_loss,
)

B, C = 6, 5
CI = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9])


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "labels": torch.randint(C, (B,), generator=g),
        "intensity": torch.rand(B, generator=g),
        "teacher_logits": 3 * torch.randn(B, C, generator=g),
        "regressor_intensity": torch.rand(B, generator=g),
        "classifier_probs": torch.softmax(torch.randn(B, C, generator=g), dim=-1),
        "ensemble_probs": torch.softmax(torch.randn(B, C, generator=g), dim=-1),
    }


@pytest.fixture
def logits() -> torch.Tensor:
    return 2 * torch.randn(B, C, generator=torch.Generator().manual_seed(1))


def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Batch mean of KL(p || q) written out: sum_c p_c (log p_c - log q_c)."""
    return (p * (p.log() - q.log())).sum(-1).mean()


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_distillation_is_t_squared_kl(logits: torch.Tensor, batch, temperature: float) -> None:
    t = temperature
    teacher = batch["teacher_logits"]
    expected = t**2 * _kl(torch.softmax(teacher / t, -1), torch.softmax(logits / t, -1))
    got = distillation(logits, teacher, t)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert float(distillation(teacher, teacher, t)) == pytest.approx(0.0, abs=1e-6)


def test_distillation_gradient_matches_hinton_form(logits: torch.Tensor, batch) -> None:
    # d/dz_s of T^2 KL = T (p_s - p_t) / B  (the T^2 factor keeps gradients comparable across T)
    t = 3.0
    z = logits.clone().requires_grad_(True)
    distillation(z, batch["teacher_logits"], t).backward()
    p_s, p_t = torch.softmax(logits / t, -1), torch.softmax(batch["teacher_logits"] / t, -1)
    torch.testing.assert_close(z.grad, t * (p_s - p_t) / B, rtol=1e-4, atol=1e-6)


def test_task_losses(logits: torch.Tensor, batch) -> None:
    ce = task_loss("classifier", "cross_entropy", logits, batch["labels"], None)
    torch.testing.assert_close(ce, F.cross_entropy(logits, batch["labels"]))
    pred = logits[:, :1]
    mse = task_loss("regressor", "mse", pred, batch["labels"], batch["intensity"])
    torch.testing.assert_close(mse, ((pred[:, 0] - batch["intensity"]) ** 2).mean())
    huber = task_loss("regressor", "huber", pred, batch["labels"], batch["intensity"])
    torch.testing.assert_close(huber, F.huber_loss(pred[:, 0], batch["intensity"]))
    assert float(huber) < float(mse)  # outputs ~N(0, 4) are far from [0, 1]: huber is linear
    with pytest.raises(ValueError, match="intensity_column"):
        task_loss("regressor", "mse", pred, batch["labels"], None)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_student_loss_mixes_task_and_distillation(logits, batch, alpha: float) -> None:
    w = LossWeights(distill_alpha=alpha, distill_temperature=2.0)
    total, parts = member_loss("student", "cross_entropy", logits, batch, w)
    task = F.cross_entropy(logits, batch["labels"])
    kd = distillation(logits, batch["teacher_logits"], 2.0)
    torch.testing.assert_close(total, (1 - alpha) * task + alpha * kd)
    assert parts["task"] == pytest.approx(float(task))
    if alpha > 0:
        assert parts["distill"] == pytest.approx(float(kd))
    else:
        assert "distill" not in parts


def test_classifier_from_regressor_term(logits, batch) -> None:
    w = LossWeights(from_regressor=0.7, guidance_temperature=0.5)
    total, parts = member_loss("classifier", "cross_entropy", logits, batch, w, CI)
    target = intensity_soft_target(batch["regressor_intensity"], CI, 0.5)
    term = _kl(target, torch.softmax(logits, -1))
    torch.testing.assert_close(total, F.cross_entropy(logits, batch["labels"]) + 0.7 * term)
    assert parts["from_regressor"] == pytest.approx(float(term), rel=1e-5)


def test_regressor_from_classifier_term(logits, batch) -> None:
    pred = logits[:, :1]
    w = LossWeights(from_classifier=0.4)
    total, parts = member_loss("regressor", "mse", pred, batch, w, CI)
    target = (batch["classifier_probs"] * CI).sum(-1)  # expected intensity, (B,)
    term = ((pred[:, 0] - target) ** 2).mean()
    task = ((pred[:, 0] - batch["intensity"]) ** 2).mean()
    torch.testing.assert_close(total, task + 0.4 * term)
    assert parts["from_classifier"] == pytest.approx(float(term), rel=1e-5)


@pytest.mark.parametrize("kind", ["teacher", "classifier", "student"])
def test_ensemble_term(logits, batch, kind: str) -> None:
    t = 2.0
    w = LossWeights(from_ensemble=0.25, guidance_temperature=t)
    total, parts = member_loss(kind, "cross_entropy", logits, batch, w)
    term = t**2 * _kl(batch["ensemble_probs"], torch.softmax(logits / t, -1))
    torch.testing.assert_close(total, F.cross_entropy(logits, batch["labels"]) + 0.25 * term)
    assert parts["from_ensemble"] == pytest.approx(float(term), rel=1e-5)


@pytest.mark.parametrize("kind", ["classifier", "teacher", "student", "regressor"])
def test_zero_weights_leave_the_task_loss(logits, batch, kind: str) -> None:
    out = logits[:, :1] if kind == "regressor" else logits
    loss = "mse" if kind == "regressor" else "cross_entropy"
    task = task_loss(kind, loss, out, batch["labels"], batch["intensity"])
    # the guidance arrays need not even exist when their weight is 0
    only_targets = {"labels": batch["labels"], "intensity": batch["intensity"]}
    total, parts = member_loss(kind, loss, out, only_targets, LossWeights(), CI)
    torch.testing.assert_close(total, task)
    assert parts == {"task": pytest.approx(float(task))}


def test_terms_for_other_kinds_are_ignored(logits, batch) -> None:
    # a regressor gets no KL terms; a classifier gets no from_classifier; only students distil
    w = LossWeights(distill_alpha=0.5, from_regressor=1.0, from_ensemble=1.0, from_classifier=1.0)
    pred = logits[:, :1]
    total, parts = member_loss("regressor", "mse", pred, batch, w, CI)
    assert set(parts) == {"task", "from_classifier"}
    total, parts = member_loss("classifier", "cross_entropy", logits, batch, w, CI)
    assert set(parts) == {"task", "from_regressor", "from_ensemble"}


def test_all_terms_add_into_one_scalar_with_gradients(logits, batch) -> None:
    z = logits.clone().requires_grad_(True)
    w = LossWeights(distill_alpha=0.5, distill_temperature=2.0, from_regressor=0.3,
                    from_ensemble=0.2)
    total, parts = member_loss("student", "cross_entropy", z, batch, w, CI)
    assert total.ndim == 0
    expected = 0.5 * parts["task"] + 0.5 * parts["distill"] + 0.3 * parts["from_regressor"] + (
        0.2 * parts["from_ensemble"])
    assert float(total.detach()) == pytest.approx(expected, rel=1e-5)
    total.backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()


def test_kl_to_target_is_zero_at_the_target() -> None:
    target = torch.softmax(torch.randn(4, C), -1)
    assert float(kl_to_target(target.log(), target)) == pytest.approx(0.0, abs=1e-6)


def test_intensity_soft_target_peaks_at_the_nearest_class() -> None:
    intensity = torch.tensor([0.0, 0.12, 0.29, 0.5, 0.66, 0.95, 1.0])
    q = intensity_soft_target(intensity, CI, temperature=1.0)
    assert q.shape == (7, C)
    torch.testing.assert_close(q.sum(-1), torch.ones(7))
    nearest = (intensity[:, None] - CI[None, :]).abs().argmin(-1)
    assert torch.equal(q.argmax(-1), nearest)
    assert torch.equal(nearest, torch.tensor([0, 0, 1, 2, 3, 4, 4]))
    # halfway between two centres splits evenly between them
    mid = intensity_soft_target(torch.tensor([0.4]), CI, 1.0)[0]
    assert float(mid[1]) == pytest.approx(float(mid[2]), rel=1e-5)
    # lower temperature: sharper
    sharp = intensity_soft_target(intensity, CI, temperature=0.25)
    assert (sharp.max(-1).values > q.max(-1).values).all()


def test_expected_intensity() -> None:
    certain = torch.full((1, C), -1e4)
    certain[0, 3] = 0.0
    torch.testing.assert_close(expected_intensity(certain, CI), torch.tensor([0.7]))
    torch.testing.assert_close(expected_intensity(torch.zeros(1, C), CI), torch.tensor([0.5]))
