"""Ensemble distillation's targets without Ray: the ensemble they encode, the cache, the split."""

from __future__ import annotations

import numpy as np
import pytest

from ensemble import calibration, combine
from ensemble import config as C
from ensemble import distill as D
from ensemble import evaluate as E
from ensemble.combination import Combination
from ensemble.data import DataError, Splits

NAMES = ["neg", "neu", "pos"]
KINDS = {"clf": "classifier", "reg": "regressor", "stud": "student"}


def _splits(n: int = 60, seed: int = 0) -> Splits:
    rng = np.random.default_rng(seed)
    labels = {s: rng.integers(0, 3, n) for s in ("train", "dev", "test")}
    intensity = {s: (y - 1.0 + rng.normal(0, 0.3, n)).astype(np.float32)
                 for s, y in labels.items()}
    texts = {s: [f"{s} {i}" for i in range(n)] for s in labels}
    return Splits(texts=texts, labels=labels, intensity=intensity, label_names=NAMES)


def _outputs(n: int, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"clf": rng.normal(size=(n, 3)) * 3, "reg": rng.normal(size=n),
            "stud": rng.normal(size=(n, 3))}


def test_targets_are_the_published_ensemble_on_the_members_outputs() -> None:
    splits, out = _splits(), _outputs(60)
    temps = {"clf": 2.0, "stud": 0.5}
    entry = Combination.from_section(
        {"method": "weighted", "weights": {"clf": 0.5, "reg": 0.2, "stud": 0.3},
         "params": {"temperatures": temps, "regressor_sharpness": 3.0}},
        KINDS, NAMES, splits.class_intensity(), splits.intensity_edges())
    got = D.ensemble_probs(out, KINDS, entry)
    probs = combine.to_probs(out, KINDS)
    # the same ensemble evaluate_split scores: its learned row on these outputs
    rows = E.evaluate_split(probs, KINDS, splits.labels["dev"], None, NAMES,
                            splits.class_intensity(), splits.intensity_edges(), learned=entry,
                            sharpness=3.0, temperatures=temps)
    expected_acc = rows["ensemble/weighted"]["accuracy"]
    assert float(np.mean(got.argmax(1) == splits.labels["dev"])) == pytest.approx(expected_acc)
    manual = (0.5 * calibration.temper(probs["clf"], 2.0)
              + 0.2 * combine.regressor_probs(out["reg"], splits.intensity_edges(), 3, 3.0)
              + 0.3 * calibration.temper(probs["stud"], 0.5))
    np.testing.assert_allclose(got, manual / manual.sum(1, keepdims=True), atol=1e-9)


def test_teacher_logits_temper_like_the_loss_expects() -> None:
    p = combine.softmax(np.random.default_rng(2).normal(size=(20, 3)))
    z = D.teacher_logits(p)
    np.testing.assert_allclose(combine.softmax(z / 2.0), calibration.temper(p, 2.0), atol=1e-5)
    assert D.mean_kl(p, p) == pytest.approx(0.0, abs=1e-9)
    assert D.mean_kl(p, np.full_like(p, 1 / 3)) > 0


def test_the_corpus_joins_train_with_the_ensembles_labels_and_intensity() -> None:
    splits = _splits(10)
    corpus = ["extra one", "extra two"]
    pred = D.prediction_splits(splits, corpus)
    assert pred.texts["train"][-2:] == corpus and pred.texts["dev"] == splits.texts["dev"]
    probs = np.vstack([np.eye(3)[splits.labels["train"]], [[0.1, 0.2, 0.7], [0.6, 0.3, 0.1]]])
    train = D.training_splits(splits, corpus, probs)
    assert train.labels["train"][:10].tolist() == splits.labels["train"].tolist()
    assert train.labels["train"][10:].tolist() == [2, 0]  # the ensemble's classes
    ci = np.array(splits.class_intensity())
    np.testing.assert_allclose(train.intensity["train"][10:], probs[10:] @ ci, rtol=1e-6)
    assert D.training_splits(splits, [], probs[:10]) is splits


def test_the_cache_belongs_to_its_texts(tmp_path) -> None:
    probs = np.full((3, 3), 1 / 3, dtype=np.float32)
    key = D.texts_key(["a", "b", "c"])
    assert D.load_cached(tmp_path, key) is None
    D.save(tmp_path, key, probs)
    np.testing.assert_array_equal(D.load_cached(tmp_path, key), probs)
    assert D.load_cached(tmp_path, D.texts_key(["a", "b", "d"])) is None
    assert D.texts_key(["ab", "c"]) != D.texts_key(["a", "bc"])


def test_corpus_reading_and_its_errors(tmp_path) -> None:
    path = tmp_path / "corpus.csv"
    path.write_text("sentence,other\nfirst text,x\n,y\nsecond text,z\nthird,w\n")
    cfg = C.load("configs/tiny.yaml", ["distill.student=student", f"distill.corpus={path}",
                                       "distill.corpus_text_column=sentence",
                                       "distill.max_corpus_texts=2"])
    assert D.read_corpus(cfg) == ["first text", "second text"]  # empty cells skipped
    bad = C.load("configs/tiny.yaml", ["distill.student=student", f"distill.corpus={path}"])
    with pytest.raises(DataError, match="no column 'text'.*distill.corpus_text_column"):
        D.read_corpus(bad)
    assert D.read_corpus(C.load("configs/tiny.yaml")) == []


def test_distill_config_is_checked() -> None:
    with pytest.raises(C.ConfigError, match="distill.student='classifier' must name a member"):
        C.load("configs/tiny.yaml", ["distill.student=classifier"])
    with pytest.raises(C.ConfigError, match="distill.alpha=1.5"):
        C.load("configs/tiny.yaml", ["distill.student=student", "distill.alpha=1.5"])


def test_corpus_texts_that_are_dev_or_test_texts_are_left_out(capsys) -> None:
    corpus = ["DEV  1", "unseen", " test 4", "train 0", "another", "Test-4 !", "dev1", "..."]
    assert D.held_out_corpus(corpus, _splits(5)) == ["unseen", "train 0", "another", "..."]
    assert "4 of 8 texts are dev/test texts" in capsys.readouterr().out
    assert D.held_out_corpus([], _splits(5)) == []
