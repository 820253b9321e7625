"""ensemble.evaluate with temperature scaling: members' own rows, scaled votes in the ensemble."""

from __future__ import annotations

import numpy as np
import pytest

from ensemble import combine
from ensemble import evaluate as E
from ensemble.calibration import temper
from ensemble.metrics import calibration_metrics, classification_metrics

NAMES = ["neg", "neu", "pos"]
KINDS = {"clf": "classifier", "reg": "regressor", "teach": "teacher", "stud": "student"}
CLASS_INTENSITY = [-2.0, 0.0, 2.0]
EDGES = [-1.0, 1.0]


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _outputs(n: int = 400, seed: int = 0):
    """An overconfident classifier, an underconfident teacher, a student, and a regressor."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    out = {}
    for name, scale in (("clf", 4.0), ("teach", 0.4), ("stud", 1.0)):
        out[name] = _softmax(scale * (rng.normal(size=(n, 3)) + 1.5 * np.eye(3)[y]))
    out["reg"] = np.array(CLASS_INTENSITY)[y] + rng.normal(0, 1.0, n)
    return out, y, np.array(CLASS_INTENSITY)[y] + rng.normal(0, 0.3, n)


def _evaluate(out, y, intensity, temperatures=None):
    return E.evaluate_split(out, KINDS, y, intensity, NAMES, CLASS_INTENSITY, EDGES,
                            sharpness=1.5, temperatures=temperatures)


def test_member_temperatures_fit_classification_members_only_when_calibrating():
    out, y, _ = _outputs()
    assert E.member_temperatures(out, KINDS, y, calibrate=False) is None
    temps = E.member_temperatures(out, KINDS, y)
    assert set(temps) == {"clf", "teach", "stud"}
    assert temps["clf"] > 1.5 and temps["teach"] < 0.7  # softens the sure one, sharpens the shy


def test_without_temperatures_members_vote_as_they_are():
    out, y, _ = _outputs()
    names, plain = list(out), combine.member_votes(out, KINDS, EDGES, 3, 1.5)
    none = combine.member_votes(out, KINDS, EDGES, 3, 1.5, temperatures=None)
    empty = combine.member_votes(out, KINDS, EDGES, 3, 1.5, temperatures={})
    np.testing.assert_array_equal(plain, none)
    np.testing.assert_array_equal(plain, empty)
    np.testing.assert_array_equal(plain[names.index("clf")], out["clf"])


def test_rows_keep_members_raw_and_combine_their_scaled_votes():
    out, y, intensity = _outputs()
    temps = E.member_temperatures(out, KINDS, y)
    raw = _evaluate(out, y, intensity)
    cal = _evaluate(out, y, intensity, temps)
    for name, t in temps.items():
        scaled = temper(out[name], t)
        for key in ("accuracy", "macro_f1", "nll", "ece", "brier", "roc_auc_macro", "pearson"):
            assert cal[name][key] == raw[name][key]  # the member's own numbers
        assert cal[name]["temperature"] == t
        expected = calibration_metrics(y, scaled)
        assert cal[name]["nll_calibrated"] == pytest.approx(expected["nll"])
        assert cal[name]["ece_calibrated"] == pytest.approx(expected["ece"])
        assert cal[name]["brier_calibrated"] == pytest.approx(expected["brier"])
        assert cal[name]["nll_calibrated"] < cal[name]["nll"]  # fitted on this very split
        assert "temperature" not in raw[name]
    assert "temperature" not in cal["reg"] and cal["reg"] == raw["reg"]
    votes = combine.member_votes(out, KINDS, EDGES, 3, 1.5, temps)
    soft = classification_metrics(y, combine.soft_vote(votes), NAMES)
    assert cal["ensemble/soft_vote"]["nll"] == pytest.approx(soft["nll"])
    assert cal["ensemble/soft_vote"]["accuracy"] == soft["accuracy"]
    assert cal["ensemble/soft_vote"]["nll"] < raw["ensemble/soft_vote"]["nll"]


def test_ensemble_intensity_averages_the_scaled_votes():
    out, y, intensity = _outputs()
    temps = {"clf": 3.0, "teach": 0.5, "stud": 1.0}
    voted = {n: temper(o, temps[n]) if n in temps else o for n, o in out.items()}
    estimates = E.intensity_estimates(voted, KINDS, CLASS_INTENSITY)
    expected = E.ensemble_intensity(estimates, KINDS)
    row = _evaluate(out, y, intensity, temps)["ensemble/soft_vote"]
    assert row["pearson"] == pytest.approx(np.corrcoef(intensity, expected)[0, 1])


def test_compact_carries_calibration_for_tables_and_tune():
    out, y, intensity = _outputs()
    rows = E.compact(_evaluate(out, y, intensity, E.member_temperatures(out, KINDS, y)))
    assert {"accuracy", "nll", "ece", "temperature", "nll_calibrated", "ece_calibrated"} <= set(
        rows["clf"]
    )
    assert {"nll", "ece"} <= set(rows["ensemble/soft_vote"])
    assert "temperature" not in rows["reg"]


def test_disagreement_compares_top1_classes_and_the_regressors_bin():
    probs = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.6, 0.3, 0.1]])
    outputs = {
        "clf": probs,
        "teach": probs[[0, 1, 2, 2]],  # differs on the last text
        "reg": np.array([-1.5, 0.0, 1.5, 1.2]),  # bins 0, 1, 2, 2: same as the teacher
    }
    d = E.disagreement(outputs, KINDS, EDGES)
    assert d["models"] == ["clf", "teach", "reg"]
    assert d["matrix"][0][1] == d["matrix"][1][0] == 0.25
    assert d["matrix"][0][2] == 0.25 and d["matrix"][1][2] == 0.0
    assert d["mean"] == pytest.approx(0.5 / 3)
