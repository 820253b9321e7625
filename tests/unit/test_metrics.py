"""ensemble.metrics: hand-computed examples, agreement with sklearn/scipy, and edge cases."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

from ensemble.metrics import (
    ECE_BINS,
    PROB_FLOOR,
    brier_score,
    calibration_metrics,
    classification_metrics,
    expected_calibration_error,
    negative_log_likelihood,
    regression_metrics,
    reliability_bins,
    roc_curves,
)

NAMES3 = ["neg", "neu", "pos"]


@pytest.fixture(autouse=True)
def _warnings_are_errors():
    # Undefined metrics must be handled, not warned about (UndefinedMetricWarning, ConstantInput).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _random_probs(n: int, c: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c))
    logits[np.arange(n), labels] += 1.0  # better than chance, not perfect
    return labels, _softmax(logits)


def _strict_json(obj) -> str:
    return json.dumps(obj, allow_nan=False)  # raises on NaN/inf


# ---- classification --------------------------------------------------------------------------


def test_classification_hand_computed():
    labels = np.array([0, 0, 1, 1, 2])
    # argmax -> [0, 1, 1, 1, 0]
    probs = np.array(
        [
            [0.7, 0.2, 0.1],
            [0.3, 0.6, 0.1],
            [0.1, 0.8, 0.1],
            [0.2, 0.5, 0.3],
            [0.5, 0.1, 0.4],
        ]
    )
    m = classification_metrics(labels, probs, NAMES3)
    assert m["n"] == 5
    assert m["accuracy"] == pytest.approx(3 / 5)
    # neg: tp=1 fp=1 fn=1; neu: tp=2 fp=1 fn=0; pos: never predicted, 1 missed.
    assert m["per_class"]["neg"] == pytest.approx(
        {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    )
    assert m["per_class"]["neu"] == pytest.approx(
        {"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2}
    )
    assert m["per_class"]["pos"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert m["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    # One-vs-rest AUCs by hand (pairs positive > negative, ties count 1/2):
    # neg scores pos {.7,.3} vs neg {.1,.2,.5}: .7 beats 3, .3 beats 2 -> 5/6
    # neu scores pos {.8,.5} vs neg {.2,.6,.1}: .8 beats 3, .5 beats 2 -> 5/6
    # pos scores pos {.4} vs neg {.1,.1,.1,.3}: 4/4 -> 1
    assert m["roc_auc_macro"] == pytest.approx((5 / 6 + 5 / 6 + 1.0) / 3)
    _strict_json(m)


@pytest.mark.parametrize("c, seed", [(2, 1), (3, 2), (5, 3)])
def test_classification_matches_sklearn(c, seed):
    names = [f"c{i}" for i in range(c)]
    labels, probs = _random_probs(400, c, seed)
    preds = probs.argmax(axis=1)
    m = classification_metrics(labels, probs, names)
    assert m["accuracy"] == pytest.approx(accuracy_score(labels, preds))
    assert m["macro_f1"] == pytest.approx(f1_score(labels, preds, average="macro"))
    assert m["confusion"] == confusion_matrix(labels, preds).tolist()
    p, r, f, s = precision_recall_fscore_support(labels, preds)
    for i, name in enumerate(names):
        assert m["per_class"][name] == pytest.approx(
            {"precision": p[i], "recall": r[i], "f1": f[i], "support": s[i]}
        )
    expected_auc = (
        roc_auc_score(labels, probs[:, 1])
        if c == 2
        else roc_auc_score(labels, probs, multi_class="ovr", average="macro")
    )
    assert m["roc_auc_macro"] == pytest.approx(expected_auc)


def test_perfect_predictions():
    labels = np.array([0, 1, 2, 2, 1, 0])
    probs = np.eye(3)[labels] * 0.9 + 0.1 / 3
    m = classification_metrics(labels, probs, NAMES3)
    assert m["accuracy"] == 1.0
    assert m["macro_f1"] == 1.0
    assert m["roc_auc_macro"] == 1.0
    assert m["confusion"] == [[2, 0, 0], [0, 2, 0], [0, 0, 2]]


def test_single_class_present_gives_no_auc_and_no_nan():
    labels = np.zeros(4, dtype=int)
    probs = np.array([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.9, 0.05, 0.05], [0.5, 0.4, 0.1]])
    m = classification_metrics(labels, probs, NAMES3)
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["roc_auc_macro"] is None  # no class has both positives and negatives
    # Macro over the classes seen in labels or predictions (neg, neu); pos is absent from both.
    assert m["macro_f1"] == pytest.approx((2 * 0.75 / 1.75 + 0.0) / 2)
    assert m["per_class"]["pos"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["per_class"]["neu"]["support"] == 0
    _strict_json(m)


def test_class_absent_from_labels_is_skipped_in_auc():
    labels = np.array([0, 0, 1, 1])  # no "pos" label
    probs = np.array([[0.8, 0.1, 0.1], [0.4, 0.5, 0.1], [0.1, 0.8, 0.1], [0.3, 0.6, 0.1]])
    m = classification_metrics(labels, probs, NAMES3)
    neg_auc = roc_auc_score(labels == 0, probs[:, 0])
    neu_auc = roc_auc_score(labels == 1, probs[:, 1])
    assert m["roc_auc_macro"] == pytest.approx((neg_auc + neu_auc) / 2)
    assert m["macro_f1"] == pytest.approx(f1_score(labels, probs.argmax(1), average="macro"))
    assert m["confusion"][2] == [0, 0, 0]


def test_constant_prediction_classifier():
    labels = np.array([0, 1, 2, 1, 0])
    probs = np.tile([0.2, 0.5, 0.3], (5, 1))  # always "neu", identical scores
    m = classification_metrics(labels, probs, NAMES3)
    assert m["accuracy"] == pytest.approx(0.4)
    assert m["roc_auc_macro"] == pytest.approx(0.5)  # all ties -> chance
    assert m["per_class"]["neg"]["precision"] == 0.0
    _strict_json(m)


def test_labels_may_be_integer_valued_floats_or_lists():
    m = classification_metrics([0.0, 1.0], [[0.9, 0.1, 0.0], [0.2, 0.8, 0.0]], NAMES3)
    assert m["accuracy"] == 1.0


@pytest.mark.parametrize(
    "labels, probs, match",
    [
        ([0, 1], np.full((3, 3), 1 / 3), "2 labels for 3 rows"),
        ([0, 1], np.full((2, 2), 0.5), "2 columns but 3 label_names"),
        ([0, 3], np.full((2, 3), 1 / 3), r"class ids in \[0, 3\)"),
        ([0, -1], np.full((2, 3), 1 / 3), r"class ids in \[0, 3\)"),
        ([0, 0.5], np.full((2, 3), 1 / 3), "class ids"),
        (["neg", "pos"], np.full((2, 3), 1 / 3), "map label names to ids"),
        ([0, 1], np.array([[np.nan, 0.5, 0.5], [0.2, 0.4, 0.4]]), "NaN or inf"),
        ([], np.zeros((0, 3)), "non-empty split"),
        ([0, 1], np.full(3, 1 / 3), r"shape \(N, C\)"),
    ],
)
def test_classification_rejects_bad_input(labels, probs, match):
    with pytest.raises(ValueError, match=match):
        classification_metrics(np.asarray(labels), probs, NAMES3)


# ---- regression ------------------------------------------------------------------------------


def test_regression_hand_computed():
    m = regression_metrics(np.array([1.0, 2.0, 3.0, 4.0]), np.array([2.0, 4.0, 6.0, 8.0]))
    assert m == pytest.approx(
        {"pearson": 1.0, "spearman": 1.0, "mae": 2.5, "rmse": math.sqrt(7.5), "n": 4}
    )
    m = regression_metrics(np.array([0.0, 1.0, 2.0]), np.array([1.0, 0.0, -5.0]))
    assert m["spearman"] == pytest.approx(-1.0)
    assert m["mae"] == pytest.approx((1 + 1 + 7) / 3)


def test_regression_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    targets = rng.random(300)
    preds = np.round(targets + rng.normal(0, 0.3, 300), 1)  # rounding makes many ties
    m = regression_metrics(targets, preds)
    assert m["pearson"] == pytest.approx(pearsonr(targets, preds).statistic)
    assert m["spearman"] == pytest.approx(spearmanr(targets, preds).statistic)
    assert m["mae"] == pytest.approx(np.mean(np.abs(preds - targets)))
    assert m["rmse"] == pytest.approx(np.sqrt(np.mean((preds - targets) ** 2)))
    assert m["n"] == 300


@pytest.mark.parametrize("constant", [0.3, 0.1, 1e6])
def test_constant_predictions_give_zero_correlation(constant):
    targets = np.random.default_rng(1).random(500)
    m = regression_metrics(targets, np.full(500, constant))
    assert m["pearson"] == 0.0 and m["spearman"] == 0.0
    assert m["mae"] == pytest.approx(np.mean(np.abs(constant - targets)))
    _strict_json(m)


def test_constant_targets_and_single_point_give_zero_correlation():
    m = regression_metrics(np.full(4, 0.5), np.array([0.1, 0.2, 0.3, 0.4]))
    assert (m["pearson"], m["spearman"]) == (0.0, 0.0)
    m = regression_metrics(np.array([0.5]), np.array([0.7]))
    assert (m["pearson"], m["spearman"], m["n"]) == (0.0, 0.0, 1)
    assert m["mae"] == pytest.approx(0.2)


def test_perfect_regression_and_column_vectors():
    t = np.linspace(-4, 4, 9)
    m = regression_metrics(t[:, None], t.copy())
    assert m == pytest.approx({"pearson": 1.0, "spearman": 1.0, "mae": 0.0, "rmse": 0.0, "n": 9})


@pytest.mark.parametrize(
    "targets, preds, match",
    [
        ([1.0, 2.0], [1.0], "pass one prediction per target"),
        ([], [], "non-empty split"),
        ([1.0, np.nan], [1.0, 2.0], "NaN or inf"),
        ([1.0, 2.0], [1.0, np.inf], "NaN or inf"),
        (np.ones((2, 2)), np.ones((2, 2)), r"shape \(N,\) or \(N, 1\)"),
    ],
)
def test_regression_rejects_bad_input(targets, preds, match):
    with pytest.raises(ValueError, match=match):
        regression_metrics(np.asarray(targets), np.asarray(preds))


# ---- ROC curves ------------------------------------------------------------------------------


def test_roc_curves_match_sklearn_and_skip_absent_classes():
    labels, probs = _random_probs(200, 3, seed=4)
    labels[labels == 2] = 1  # "pos" absent from the labels
    curves = roc_curves(labels, probs, NAMES3)
    assert list(curves) == ["neg", "neu"]
    for c, name in enumerate(["neg", "neu"]):
        fpr, tpr, area = curves[name]
        ref_fpr, ref_tpr, _ = roc_curve(labels == c, probs[:, c])
        np.testing.assert_allclose(fpr, ref_fpr)
        np.testing.assert_allclose(tpr, ref_tpr)
        assert area == pytest.approx(roc_auc_score(labels == c, probs[:, c]))
        assert fpr[0] == 0.0 and tpr[-1] == 1.0
        assert all(isinstance(v, float) for v in fpr + tpr)
    m = classification_metrics(labels, probs, NAMES3)
    assert m["roc_auc_macro"] == pytest.approx(np.mean([a for *_, a in curves.values()]))
    _strict_json(curves)


def test_roc_curves_empty_when_single_class():
    assert roc_curves(np.array([1, 1]), np.full((2, 3), 1 / 3), NAMES3) == {}


def test_pure_module_imports_without_ray_or_deepspeed():
    code = (
        "import sys; sys.modules['ray'] = None; sys.modules['deepspeed'] = None\n"
        "import ensemble.metrics, ensemble.report\n"
        "assert 'torch' not in sys.modules, 'metrics/report should not need torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- calibration: NLL, Brier, ECE ------------------------------------------------------------


def test_nll_is_mean_minus_log_p_true():
    labels = np.array([0, 2, 1])
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.5, 0.25, 0.25]])
    expected = -(math.log(0.7) + math.log(0.6) + math.log(0.25)) / 3
    assert negative_log_likelihood(labels, probs) == pytest.approx(expected)


def test_nll_of_a_zero_probability_is_finite():
    nll = negative_log_likelihood(np.array([1]), np.array([[1.0, 0.0]]))
    assert math.isfinite(nll) and nll == pytest.approx(-math.log(PROB_FLOOR))


def test_brier_perfect_uniform_and_hand_computed():
    labels = np.array([0, 1, 2, 1])
    assert brier_score(labels, np.eye(3)[labels]) == 0.0
    # uniform over C classes: (1 - 1/C)^2 + (C-1)/C^2 = 1 - 1/C
    assert brier_score(labels, np.full((4, 3), 1 / 3)) == pytest.approx(2 / 3)
    assert brier_score(np.array([0]), np.array([[0.0, 1.0]])) == pytest.approx(2.0)  # worst
    probs = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]])
    expected = ((0.4**2 + 0.3**2 + 0.1**2) + (0.2**2 + 0.5**2 + 0.3**2)) / 2
    assert brier_score(np.array([0, 1]), probs) == pytest.approx(expected)


def _ece_by_loop(labels: np.ndarray, probs: np.ndarray, bins: int) -> float:
    """ECE straight from its definition: bin i holds confidences in (i/bins, (i+1)/bins]."""
    conf, pred = probs.max(axis=1), probs.argmax(axis=1)
    total = 0.0
    for i in range(bins):
        lo, hi = i / bins, (i + 1) / bins
        inside = [k for k in range(len(labels)) if lo < conf[k] <= hi or (i == 0 and conf[k] == 0)]
        if inside:
            acc = np.mean([pred[k] == labels[k] for k in inside])
            mean_conf = np.mean([conf[k] for k in inside])
            total += len(inside) / len(labels) * abs(acc - mean_conf)
    return total


def test_ece_hand_computed_two_bins():
    labels = np.array([0, 1, 0, 0])
    # confidences 0.9, 0.9 (bin (0.5, 1]: 1 of 2 right) and 0.4, 0.45 (bin (0, 0.5]: 1 of 2)
    probs = np.array([[0.9, 0.1, 0.0], [0.9, 0.1, 0.0], [0.4, 0.3, 0.3], [0.3, 0.45, 0.25]])
    expected = 0.5 * abs(0.5 - 0.9) + 0.5 * abs(0.5 - 0.425)
    assert expected_calibration_error(labels, probs, bins=2) == pytest.approx(expected)
    assert _ece_by_loop(labels, probs, 2) == pytest.approx(expected)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ece_matches_an_explicit_loop_over_15_bins(seed):
    labels, probs = _random_probs(200, 4, seed)
    assert expected_calibration_error(labels, probs) == pytest.approx(
        _ece_by_loop(labels, probs, ECE_BINS)
    )
    assert ECE_BINS == 15


def test_ece_of_a_calibrated_and_an_overconfident_predictor():
    # a predictor right exactly as often as it says it is has ECE 0 ...
    labels = np.array([0, 0, 0, 1])  # 3 of 4 right at confidence 0.75
    probs = np.tile([0.75, 0.25], (4, 1))
    assert expected_calibration_error(labels, probs) == pytest.approx(0.0)
    # ... one-hot and right half the time has ECE 0.5
    assert expected_calibration_error(np.array([0, 1]), np.array([[1.0, 0.0], [1.0, 0.0]])) == (
        pytest.approx(0.5)
    )


def test_reliability_bins_counts_and_edge_membership():
    labels = np.array([0, 0, 1])
    probs = np.array([[0.5, 0.5], [0.6, 0.4], [1.0, 0.0]])  # confidence 0.5 sits on an edge
    r = reliability_bins(labels, probs, bins=2)
    assert r["edges"] == [0.0, 0.5, 1.0]
    assert r["count"] == [1, 2]  # (0, 0.5] holds 0.5; (0.5, 1] holds 0.6 and 1.0
    assert r["confidence"] == pytest.approx([0.5, 0.8])
    assert r["accuracy"] == pytest.approx([1.0, 0.5])
    empty = reliability_bins(labels, probs, bins=4)
    assert empty["count"][0] == 0 and empty["accuracy"][0] is None


def test_classification_metrics_include_calibration():
    labels, probs = _random_probs(100, 3)
    m = classification_metrics(labels, probs, NAMES3)
    assert m["nll"] == pytest.approx(negative_log_likelihood(labels, probs))
    assert m["ece"] == pytest.approx(expected_calibration_error(labels, probs))
    assert m["brier"] == pytest.approx(brier_score(labels, probs))
    assert calibration_metrics(labels, probs) == {k: m[k] for k in ("nll", "ece", "brier")}


def test_pairwise_disagreement_counts_differing_top1() -> None:
    from ensemble.metrics import pairwise_disagreement

    out = pairwise_disagreement({"a": np.array([0, 1, 2, 3]), "b": np.array([0, 1, 2, 0]),
                                 "c": np.array([1, 0, 2, 0])})
    assert out["models"] == ["a", "b", "c"]
    assert out["matrix"][0][1] == out["matrix"][1][0] == 0.25
    assert out["matrix"][0][2] == 0.75 and out["matrix"][1][2] == 0.5
    assert out["mean"] == pytest.approx((0.25 + 0.75 + 0.5) / 3)
    assert pairwise_disagreement({"a": np.array([1])})["mean"] == 0.0
    with pytest.raises(ValueError, match="length"):
        pairwise_disagreement({"a": np.array([1]), "b": np.array([1, 2])})
