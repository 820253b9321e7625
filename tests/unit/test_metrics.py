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

from ensemble.metrics import classification_metrics, regression_metrics, roc_curves

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
