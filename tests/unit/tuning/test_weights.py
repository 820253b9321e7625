"""ensemble.tuning: the objective Tune calls and the combiners fitted on dev predictions.

The synthetic members are built so that the right answer is known:

- `_mixture`: labels are drawn from a known mixture of the members' probabilities, so the log-loss
  optimal soft-vote weights are exactly the mixture weights (one member has weight 0: pure noise).
- `_shifted`: member 0 is the strongest but names the wrong class (class y+1 for label y); only a
  learned meta-learner can use it.
"""

from __future__ import annotations

import numpy as np
import pytest

from ensemble import combine
from ensemble.tuning import (
    FitResult,
    choose,
    fit_caruana,
    fit_stacking,
    fit_weighted,
    metric_value,
    score,
)
from ensemble.tuning.weights import AUTO, candidates, select

TRUE_WEIGHTS = np.array([0.6, 0.3, 0.1, 0.0])


def _mixture(n: int, seed: int, c: int = 5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(c, 0.5), size=(TRUE_WEIGHTS.size, n))  # (M, B, C)
    mix = np.einsum("m,mbc->bc", TRUE_WEIGHTS, p)  # (B, C): the true P(y | member outputs)
    u = rng.random((n, 1))
    y = np.minimum((mix.cumsum(axis=1) < u).sum(axis=1), c - 1)  # one draw per row
    return p, y


def _shifted(n: int, seed: int, c: int = 5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    members = []
    for shift, signal in ((1, 2.5), (0, 1.0), (0, 0.8)):
        logits = rng.normal(size=(n, c))
        logits[np.arange(n), (y + shift) % c] += signal
        members.append(np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True))
    return np.stack(members), y


@pytest.fixture(scope="module")
def mixture():
    return _mixture(3000, seed=0), _mixture(3000, seed=1)


UNIFORM = np.full(TRUE_WEIGHTS.size, 1 / TRUE_WEIGHTS.size)


# --- objective ----------------------------------------------------------------------------------


def test_score_is_the_metric_of_the_served_soft_vote():
    p, y = _mixture(200, seed=5)
    w = [2.0, 1.0, 1.0, 0.0]
    combined = combine.apply("weighted", p, w)
    assert score(w, p, y) == pytest.approx(np.mean(combined.argmax(axis=1) == y))
    expected_nll = np.mean(np.log(combined[np.arange(200), y]))
    assert score(w, p, y, "neg_log_loss") == pytest.approx(expected_nll)
    assert 0.0 <= score(w, p, y, "macro_f1") <= 1.0
    # unnormalised weights give the same score as normalised ones
    assert score(np.array(w) / 4, p, y, "neg_log_loss") == pytest.approx(expected_nll)


def test_score_rejects_bad_input_with_the_fix():
    p, y = _mixture(20, seed=6)
    with pytest.raises(ValueError, match="use one of accuracy, macro_f1, neg_log_loss"):
        score(UNIFORM, p, y, "auc")
    with pytest.raises(ValueError, match="pass one weight per member"):
        score([1.0, 1.0], p, y)
    with pytest.raises(ValueError, match="all weights are zero"):
        score([0.0] * 4, p, y)
    with pytest.raises(ValueError, match=r"labels must be integers in \[0, 5\)"):
        score(UNIFORM, p, y + 5)


def test_log_loss_of_a_confidently_wrong_one_hot_vote_is_finite():
    one_hot = combine.regressor_probs(np.array([0.9]), [0.5], 2)  # votes class 1
    assert metric_value(one_hot, np.array([0]), "neg_log_loss") == pytest.approx(np.log(1e-12))


# --- fit_weighted -------------------------------------------------------------------------------


def test_fit_weighted_recovers_the_true_mixture_weights(mixture):
    (p, y), _ = mixture
    fit = fit_weighted(p, y)
    w = np.asarray(fit.weights)
    assert fit.method == "weighted" and fit.metric == "neg_log_loss" and not fit.out_of_fold
    assert np.all(w >= 0) and w.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(w, TRUE_WEIGHTS, atol=0.05)
    assert w[3] < 0.04  # the pure-noise member is (nearly) switched off; 0 up to sampling noise
    assert fit.dev_score == pytest.approx(score(w, p, y, "neg_log_loss"))
    # it is the optimum: nudging the weights anywhere on the simplex does not help
    for other in (TRUE_WEIGHTS, UNIFORM, [0.5, 0.3, 0.1, 0.1], [0.7, 0.2, 0.1, 0.0]):
        assert fit.dev_score >= score(other, p, y, "neg_log_loss") - 1e-9


def test_fit_weighted_beats_uniform_soft_vote_on_held_out_data(mixture):
    (p, y), (p_test, y_test) = mixture
    w = fit_weighted(p, y).weights
    for metric in ("neg_log_loss", "accuracy", "macro_f1"):
        assert score(w, p_test, y_test, metric) > score(UNIFORM, p_test, y_test, metric) + 0.02


# --- fit_caruana --------------------------------------------------------------------------------


def test_fit_caruana_selects_with_replacement_and_recovers_the_weights(mixture):
    (p, y), (p_test, y_test) = mixture
    fit = fit_caruana(p, y, n_iter=50, metric="neg_log_loss")
    w = np.asarray(fit.weights)
    picks = np.rint(w / w[w > 0].min()).astype(int)  # weights are pick counts / total
    np.testing.assert_allclose(w, picks / picks.sum(), atol=1e-12)
    assert picks.sum() <= 50
    assert picks.max() > 1, "a member must be picked more than once (with replacement)"
    np.testing.assert_allclose(w, TRUE_WEIGHTS, atol=0.06)
    assert w[3] < 0.04
    # greedy selection lands on the continuous optimum up to its 1/picks resolution
    np.testing.assert_allclose(w, fit_weighted(p, y).weights, atol=1.5 / picks.sum())
    assert score(w, p_test, y_test, "neg_log_loss") > score(UNIFORM, p_test, y_test, "neg_log_loss")
    assert score(w, p_test, y_test) > score(UNIFORM, p_test, y_test) + 0.02


def test_fit_caruana_starts_from_the_best_member_and_never_ends_worse():
    p, y = _mixture(400, seed=2)
    single = [metric_value(p[m], y) for m in range(4)]
    first = fit_caruana(p, y, n_iter=1)
    assert first.weights == [1.0 if m == int(np.argmax(single)) else 0.0 for m in range(4)]
    assert first.dev_score == pytest.approx(max(single))
    for n_iter in (5, 30):
        assert fit_caruana(p, y, n_iter=n_iter).dev_score >= max(single)
    with pytest.raises(ValueError, match="n_iter=0 must be >= 1"):
        fit_caruana(p, y, n_iter=0)


# --- fit_stacking -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["logistic", "ridge"])
def test_stacking_dev_score_is_out_of_fold_not_in_sample(kind):
    # 40 features, 120 examples, labels independent of everything: a weakly regularised
    # meta-learner memorises dev, so its in-sample accuracy is far above chance (0.2)
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(5), size=(8, 120))
    y = rng.integers(0, 5, 120)
    fit = fit_stacking(p, y, kind=kind, C=100.0, folds=5)
    in_sample = metric_value(combine.apply("stacking", p, params=fit.params), y)
    assert fit.out_of_fold
    assert in_sample > 0.5
    assert fit.dev_score < 0.35
    assert in_sample - fit.dev_score > 0.25


def test_stacking_uses_a_member_that_names_the_wrong_class():
    p, y = _shifted(600, seed=0)
    p_test, y_test = _shifted(2000, seed=1)
    fit = fit_stacking(p, y)
    assert fit.method == "stacking" and fit.params["kind"] == "logistic"
    assert np.asarray(fit.params["coef"]).shape == (5, 15)
    stacked = metric_value(fit.apply(p_test), y_test)
    assert stacked > 0.85
    assert stacked > score(fit_weighted(p, y).weights, p_test, y_test) + 0.2
    assert fit.dev_score == pytest.approx(stacked, abs=0.05)  # out-of-fold estimates held-out
    assert np.argmax(fit.weights) == 0  # member 0 carries the most coefficient mass


def test_stacking_handles_a_class_missing_from_dev():
    p, y = _shifted(300, seed=3)
    y = np.where(y == 4, 0, y)  # class 4 never occurs on dev
    fit = fit_stacking(p, y, folds=3)
    out = fit.apply(p)
    np.testing.assert_allclose(out.sum(axis=1), 1.0)
    assert out[:, 4].max() < 1e-6


# --- choose -------------------------------------------------------------------------------------


def test_choose_picks_stacking_when_only_it_can_use_a_member():
    p, y = _shifted(600, seed=0)
    best, results = choose(p, y, metric="accuracy", folds=5)
    assert set(results) == {"soft_vote", "weighted", "caruana", "stacking"}
    assert best.method == "stacking"
    assert best.dev_score == max(r.dev_score for r in results.values())
    assert not results["soft_vote"].out_of_fold
    assert all(results[k].out_of_fold for k in ("weighted", "caruana", "stacking"))
    # the learned weights are refitted on all of dev, the score is cross-fitted
    assert results["weighted"].weights == pytest.approx(fit_weighted(p, y).weights)
    assert results["weighted"].dev_score != fit_weighted(p, y, metric="accuracy").dev_score


def test_choose_prefers_the_method_listed_first_on_ties():
    p, y = _mixture(100, seed=4)
    p = np.repeat(p[:1], 3, axis=0)  # three identical members: every vote is the same
    best, results = choose(p, y, methods=("soft_vote", "hard_vote", "caruana"), folds=3)
    assert best.method == "soft_vote"
    assert results["soft_vote"].dev_score == results["caruana"].dev_score


def _equal_members(n: int, seed: int, c: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Three members of the same skill with independent errors: no weighting beats uniform."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    members = []
    for _ in range(3):
        logits = rng.normal(size=(n, c))
        logits[np.arange(n), y] += 1.0
        members.append(np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True))
    return np.stack(members), y


def _paired_se(a: np.ndarray, b: np.ndarray, y: np.ndarray, draws: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(draws):
        i = rng.integers(0, y.size, y.size)
        diffs.append(np.mean(a[i].argmax(1) == y[i]) - np.mean(b[i].argmax(1) == y[i]))
    return float(np.std(diffs, ddof=1))


@pytest.mark.parametrize("data_seed", [12, 17, 25, 2])
def test_one_se_rule_keeps_the_first_method_within_one_standard_error(data_seed):
    p, y = _equal_members(200 if data_seed != 2 else 400, seed=data_seed)
    best, results = choose(p, y, folds=5, rule="best", bootstrap=200)
    chosen, again = choose(p, y, folds=5, rule="one_se", bootstrap=200)
    assert best.method != "soft_vote"  # a learned method leads on dev
    assert {k: r.dev_score for k, r in again.items()} == {
        k: r.dev_score for k, r in results.items()
    }
    # the rule, computed directly: the first-listed method within one paired SE of the best
    expected = next(
        name for name, r in results.items()
        if r is best or best.dev_score - r.dev_score
        <= _paired_se(best.dev_probs, r.dev_probs, y, 200, seed=0)
    )
    assert chosen.method == expected
    # an out-of-fold score is what the rule compares: the stored predictions reproduce it
    for r in results.values():
        assert np.mean(r.dev_probs.argmax(1) == y) == pytest.approx(r.dev_score)


def test_one_se_rule_keeps_a_lead_larger_than_its_noise():
    p, y = _shifted(600, seed=0)  # only stacking can use the shifted member: a large lead
    chosen, results = choose(p, y, folds=5, rule="one_se")
    assert chosen.method == "stacking"
    assert results["stacking"].dev_score - results["soft_vote"].dev_score > 0.1


def test_one_se_choice_differs_from_best_on_noise():
    """Not vacuous: on equal members the two rules disagree on some dev sets."""
    picks = [(choose(*_equal_members(200, s), rule="best", bootstrap=200)[0].method,
              choose(*_equal_members(200, s), bootstrap=200)[0].method) for s in (12, 17, 24)]
    assert all(best != "soft_vote" and one_se == "soft_vote" for best, one_se in picks)


def test_choose_and_fitters_validate_their_input():
    p, y = _mixture(30, seed=7)
    with pytest.raises(ValueError, match="unknown methods \\['median'\\]; choose from"):
        choose(p, y, methods=("soft_vote", "median"))
    with pytest.raises(ValueError, match="unknown rule 'worst'; use one_se or best"):
        choose(p, y, rule="worst")
    _, fitted = choose(p, y, methods=("soft_vote",))
    with pytest.raises(ValueError, match="unknown rule 'bset'; use one_se or best"):
        select(fitted, y, rule="bset")  # the benchmark calls select directly
    assert candidates("auto") == AUTO and candidates("stacking") == ("stacking",)
    with pytest.raises(ValueError, match="29 labels for 30 examples"):
        fit_weighted(p, y[:-1])
    with pytest.raises(ValueError, match=r"folds=31 must be in \[2, 30\]"):
        fit_stacking(p, y, folds=31)
    with pytest.raises(ValueError, match="unknown stacking kind 'forest'"):
        fit_stacking(p, y, kind="forest")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="only class \\[2\\]"):
        fit_stacking(p, np.full(30, 2), folds=2)


def test_fit_result_round_trips_to_the_manifest():
    p, y = _shifted(200, seed=5)
    fit = fit_stacking(p, y, folds=3)
    entry = fit.to_manifest(["clf", "reg", "student"])
    assert entry["method"] == "stacking" and entry["members"] == ["clf", "reg", "student"]
    assert list(entry["weights"]) == ["clf", "reg", "student"]
    restored = FitResult(
        entry["method"], [entry["weights"][n] for n in entry["members"]], entry["params"]
    )
    np.testing.assert_allclose(restored.apply(p), fit.apply(p))
    with pytest.raises(ValueError, match="2 member names for 3 weights"):
        fit.to_manifest(["clf", "reg"])
