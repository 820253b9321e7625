"""Early stopping's pure parts: evaluation points, the dev score, and the stopper's record."""

from __future__ import annotations

import numpy as np
import pytest

from ensemble import config as C
from ensemble.training.loop import EarlyStopper, dev_score, eval_chunks


def test_stops_after_patience_evaluations_without_improvement() -> None:
    stopper = EarlyStopper(lower_is_better=False, patience=2, min_delta=0.01)
    curve = [0.40, 0.45, 0.452, 0.47, 0.46, 0.465, 0.50]  # 0.452: within min_delta, no gain
    improved = []
    for step, value in enumerate(curve, start=1):
        improved.append(stopper.update(value, step))
        if stopper.stopped:
            break
    assert improved == [True, True, False, True, False, False]
    assert (stopper.best, stopper.best_step, stopper.stopped) == (0.47, 4, True)


def test_lower_is_better_and_the_record_survives_a_checkpoint() -> None:
    stopper = EarlyStopper(lower_is_better=True, patience=3)
    for step, value in enumerate([1.2, 1.0, 1.1], start=1):
        stopper.update(value, step)
    restored = EarlyStopper.from_dict(stopper.as_dict())
    assert restored == stopper
    assert (restored.best, restored.best_step, restored.bad) == (1.0, 2, 1)
    assert restored.update(0.9, 4) and restored.bad == 0


def test_eval_chunks_cut_at_multiples_of_every_from_any_start() -> None:
    group = [np.array([i]) for i in range(7)]  # job steps 3..9 (the epoch starts at step 3)
    chunks = list(eval_chunks(group, micro=3, every=3))
    assert [[int(b[0]) for b in c] for c in chunks] == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(eval_chunks(group, micro=0, every=None)) == [group]
    # a job restored at step 5 cuts at the same points (after steps 6 and 9)
    rest = list(eval_chunks(group[2:], micro=5, every=3))
    assert [[int(b[0]) for b in c] for c in rest] == [[2], [3, 4, 5], [6]]


def test_dev_score_matches_direct_computation() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 3))
    labels = rng.integers(0, 3, 50)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert dev_score("accuracy", logits, labels, None) == pytest.approx(
        np.mean(logits.argmax(1) == labels))
    assert dev_score("nll", logits, labels, None) == pytest.approx(
        -np.mean(np.log(p[np.arange(50), labels])))
    y = rng.normal(size=50)
    pred = y + rng.normal(size=50)
    assert dev_score("pearson", pred[:, None], None, y) == pytest.approx(np.corrcoef(pred, y)[0, 1])
    assert dev_score("mae", pred, None, y) == pytest.approx(np.mean(np.abs(pred - y)))
    with pytest.raises(ValueError, match="intensity"):
        dev_score("pearson", pred, labels, None)


def test_config_checks_the_metric_against_the_member_kind() -> None:
    cfg = C.load("configs/tiny.yaml", ["member_defaults.early_stopping.patience=3"])
    es = cfg.members["classifier"].early_stopping
    assert es is not None and es.patience == 3
    assert es.metric_for("classifier") == "accuracy" and es.metric_for("regressor") == "pearson"
    with pytest.raises(C.ConfigError, match="does not fit a regressor"):
        C.load("configs/tiny.yaml", ["members.regressor.early_stopping.metric=nll"])
    with pytest.raises(C.ConfigError, match="patience"):
        C.load("configs/tiny.yaml", ["members.classifier.early_stopping.patience=0"])
