"""ensemble.calibration: temperature scaling recovers a known temperature and keeps the argmax."""

from __future__ import annotations

import numpy as np
import pytest

from ensemble.calibration import T_BOUNDS, fit_temperature, fit_temperatures, log_probs, temper


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _sampled(t0: float, n: int = 20_000, c: int = 5, seed: int = 0):
    """Logits z and labels drawn from softmax(z / t0): t0 is the true temperature of z."""
    rng = np.random.default_rng(seed)
    z = 3.0 * rng.normal(size=(n, c))
    p = _softmax(z / t0)
    labels = (p.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)
    return z, labels


@pytest.mark.parametrize("t0", [2.0, 0.5, 1.0])
def test_fit_recovers_the_temperature_labels_were_drawn_at(t0):
    z, labels = _sampled(t0)
    assert fit_temperature(z, labels) == pytest.approx(t0, rel=0.03)


def test_fit_on_log_probabilities_equals_fit_on_logits():
    z, labels = _sampled(2.0, n=3000)
    assert fit_temperature(log_probs(_softmax(z)), labels) == pytest.approx(
        fit_temperature(z, labels), rel=1e-4
    )


def test_fit_minimises_the_dev_log_loss():
    z, labels = _sampled(1.5, n=3000, seed=1)

    def nll(t: float) -> float:
        p = _softmax(z / t)
        return float(-np.mean(np.log(p[np.arange(labels.size), labels])))

    t = fit_temperature(z, labels)
    assert nll(t) <= min(nll(t * 0.97), nll(t * 1.03))
    assert nll(t) < nll(1.0)


def test_fit_stays_within_bounds_when_dev_is_separable():
    z = np.array([[1.0, 0.0], [0.0, 1.0]] * 10)
    labels = np.array([0, 1] * 10)  # always right: the log loss falls as T -> 0
    assert fit_temperature(z, labels) == pytest.approx(T_BOUNDS[0], rel=1e-3)


def test_temper_equals_softmax_of_scaled_logits_and_keeps_the_argmax():
    rng = np.random.default_rng(0)
    z = 4.0 * rng.normal(size=(50, 4))
    for t in (0.3, 1.0, 2.5):
        tempered = temper(_softmax(z), t)
        np.testing.assert_allclose(tempered, _softmax(z / t), rtol=1e-9, atol=1e-12)
        assert (tempered.argmax(axis=1) == z.argmax(axis=1)).all()
    probs = _softmax(z)
    assert np.array_equal(temper(probs, 1.0), probs)


def test_temper_of_a_zero_probability_stays_finite():
    out = temper(np.array([[1.0, 0.0]]), 5.0)
    assert np.all(np.isfinite(out)) and out[0, 0] > 0.99 and out.sum() == pytest.approx(1.0)


def test_fit_temperatures_skips_the_regressor():
    z, labels = _sampled(2.0, n=2000)
    out = fit_temperatures(
        {"cls": _softmax(z), "reg": np.zeros(labels.size), "stud": _softmax(z / 2.0)},
        {"cls": "classifier", "reg": "regressor", "stud": "student"},
        labels,
    )
    assert list(out) == ["cls", "stud"]
    assert out["cls"] == pytest.approx(2.0, rel=0.06)
    assert out["stud"] == pytest.approx(1.0, rel=0.06)


@pytest.mark.parametrize(
    "logits, labels, match",
    [
        (np.zeros((3, 2)), np.array([0, 1]), "same N"),
        (np.zeros((0, 2)), np.zeros(0, dtype=int), "same N"),
        (np.zeros((2, 2)), np.array([0, 2]), r"class ids in \[0, 2\)"),
        (np.zeros((2, 2)), np.array([0.0, 1.0]), "integer class ids"),
        (np.array([[0.0, np.inf], [0.0, 1.0]]), np.array([0, 1]), "NaN or inf"),
    ],
)
def test_fit_rejects_bad_input(logits, labels, match):
    with pytest.raises(ValueError, match=match):
        fit_temperature(logits, labels)


@pytest.mark.parametrize("t", [0.0, -1.0, float("nan")])
def test_temper_rejects_bad_temperatures(t):
    with pytest.raises(ValueError, match="must be finite and > 0"):
        temper(np.full((1, 2), 0.5), t)
