"""benchmarks/pooled_recipe.py on tiny run directories with synthetic predictions (no training)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from benchmarks import common
from benchmarks import pooled_recipe as P
from ensemble import config as C
from ensemble.testing import LABELS, make_run_dir

REPO = Path(__file__).resolve().parents[3]


def _run(root: Path, seed: int = 0) -> Path:
    run = make_run_dir(root, seed=seed, n_dev=300)
    cfg = C.load(REPO / "configs" / "tiny.yaml", [f"output_dir={root}", "training.seed=3"])
    (run / "config.yaml").write_text(C.to_yaml(cfg))
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("pooled")
    first = _run(root / "a")
    shutil.copytree(first, root / "b")  # the same members again, under another name
    return [first, root / "b", _run(root / "c", seed=5)]


def test_a_pool_of_one_run_is_that_runs_published_choice(runs) -> None:
    votes = {r: common.member_votes(r) for r in runs[:1]}
    row = P.score(runs[:1], votes, LABELS, whole=True)
    table = common.combiners_on_test(runs[0])
    assert row["seed"] == 3 and row["chosen"] == table["chosen"]
    assert row["test_accuracy"] == table["methods"][table["chosen"]]["test_accuracy"]
    assert row["members"] == 4 and row["classifiers"] == 1
    assert 0 < row["test_accuracy_se"] < 0.05 and 0 < row["deep_ensemble_se"] < 0.05


def test_pooling_a_run_with_a_copy_of_itself_doubles_its_members_not_its_soft_vote(runs) -> None:
    votes = {r: common.member_votes(r) for r in runs[:2]}
    one = P.score(runs[:1], votes, LABELS, whole=False)
    two = P.score(runs[:2], votes, LABELS, whole=False)
    assert (two["members"], two["classifiers"]) == (8, 2)
    assert two["methods"]["soft_vote"] == pytest.approx(one["methods"]["soft_vote"])
    assert two["deep_ensemble_accuracy"] == pytest.approx(one["deep_ensemble_accuracy"])
    kinds, _, _ = P.pool(runs[:2], votes)
    assert list(kinds)[:2] == ["classifier@a", "regressor@a"] and "student@b" in kinds


def test_runs_scored_on_other_texts_are_refused(runs) -> None:
    votes = {r: common.member_votes(r) for r in (runs[0], runs[2])}
    with pytest.raises(ValueError, match="pool runs of one dataset"):
        P.pool([runs[0], runs[2]], votes)


def test_a_distilled_student_joins_the_pool_with_its_fitted_temperature(runs) -> None:
    import numpy as np

    from ensemble import combine
    from ensemble.rundir import atomic_write_json

    student = runs[0] / "students" / "l1"
    student.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    logits = {s: rng.normal(size=(300, len(LABELS))) for s in ("dev", "test")}
    np.savez(student / "predictions.npz", **logits)
    atomic_write_json(student / "metrics.json", {"temperature": 2.0})
    kinds, stacked, labels = P.student_votes(student)
    assert kinds == {"student": "student"} and stacked["test"].shape == (1, 300, len(LABELS))
    np.testing.assert_allclose(stacked["dev"][0], combine.softmax(logits["dev"] / 2.0))
    votes = {runs[0]: common.member_votes(runs[0]), student: (kinds, stacked, labels)}
    row = P.score([runs[0], student], votes, LABELS, whole=False)
    assert row["members"] == 5 and row["classifiers"] == 1  # it votes, outside the deep ensemble
    assert row["runs"] == [runs[0].name, "l1"]
