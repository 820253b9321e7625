"""ensemble.combine: the pure combination math that Tune scores and Serve runs."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression, RidgeClassifier

from ensemble import combine
from ensemble.tuning.weights import fit_stacking


def _probs(rows: list[list[list[float]]]) -> np.ndarray:
    return np.asarray(rows, dtype=np.float64)


def _random_probs(m: int, b: int, c: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).dirichlet(np.ones(c), size=(m, b))  # (M, B, C)


# --- soft and hard votes ------------------------------------------------------------------------


def test_soft_vote_is_the_normalised_weighted_mean():
    p = _random_probs(3, 4, 5)
    out = combine.soft_vote(p, np.array([2.0, 1.0, 1.0]))
    np.testing.assert_allclose(out, 0.5 * p[0] + 0.25 * p[1] + 0.25 * p[2])
    np.testing.assert_allclose(combine.soft_vote(p), p.mean(axis=0))
    np.testing.assert_allclose(out.sum(axis=1), 1.0)


def test_one_member_is_the_identity():
    p = _random_probs(1, 6, 4)
    for method in ("soft_vote", "weighted", "caruana"):
        np.testing.assert_allclose(combine.apply(method, p, [3.0]), p[0])
    one_hot = np.eye(4)[p[0].argmax(axis=1)]
    np.testing.assert_allclose(combine.hard_vote(p), one_hot, atol=1e-8)
    assert np.all(combine.disagreement(p) == 0.0)


def test_zero_weight_member_is_ignored():
    p = _random_probs(3, 20, 5, seed=1)
    w = np.array([0.7, 0.0, 0.3])
    np.testing.assert_allclose(combine.soft_vote(p, w), combine.soft_vote(p[[0, 2]], w[[0, 2]]))
    np.testing.assert_allclose(
        combine.hard_vote(p, w), combine.hard_vote(p[[0, 2]], w[[0, 2]]), atol=1e-8
    )


def test_hard_vote_with_weights_counts_weight_not_heads():
    # members 0 and 1 vote class 0, member 2 votes class 1 with more weight than both together
    p = _probs([[[0.9, 0.1]], [[0.8, 0.2]], [[0.3, 0.7]]])
    out = combine.hard_vote(p, np.array([0.2, 0.2, 0.6]))
    np.testing.assert_allclose(out, [[0.4, 0.6]], atol=1e-8)
    np.testing.assert_allclose(combine.hard_vote(p), [[2 / 3, 1 / 3]], atol=1e-8)


def test_hard_vote_ties_go_to_the_higher_soft_vote():
    # one vote each for classes 0 and 2; the mean probability of class 2 is higher
    p = _probs([[[0.5, 0.1, 0.4]], [[0.05, 0.05, 0.9]], [[0.1, 0.1, 0.8]]])
    out = combine.hard_vote(p[:2])
    assert out.argmax() == 2
    np.testing.assert_allclose(out, [[0.5, 0.0, 0.5]], atol=1e-8)  # still the vote shares
    np.testing.assert_allclose(out.sum(), 1.0)
    # the mirror image: the soft vote favours class 0 and so does the tie-break
    mirrored = p[:2, :, ::-1]
    assert combine.hard_vote(mirrored).argmax() == 0
    # a tie created by weights is broken the same way
    assert combine.hard_vote(p, np.array([0.5, 0.25, 0.25])).argmax() == 2


def test_hard_vote_tie_break_never_overturns_a_real_majority():
    p = _probs([[[0.51, 0.49]], [[0.51, 0.49]], [[0.0, 1.0]]])
    w = np.array([0.25, 0.25 + 1e-6, 0.5 - 1e-6])  # class 0 leads by 2e-6 of the vote
    assert combine.hard_vote(p, w).argmax() == 0


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ([0.0, 0.0, 0.0], "all weights are zero"),
        ([1.0, -0.5, 1.0], "must be finite and >= 0"),
        ([1.0, np.nan, 1.0], "must be finite and >= 0"),
        ([1.0, 1.0], "2 weights .* for 3 members; pass one weight per member"),
        ([[1.0, 1.0, 1.0]], "pass one weight per member"),
    ],
)
@pytest.mark.parametrize("method", ["hard_vote", "soft_vote", "weighted", "caruana"])
def test_bad_weights_are_rejected(method, weights, match):
    with pytest.raises(ValueError, match=match):
        combine.apply(method, _random_probs(3, 2, 4), weights)


def test_apply_validates_method_and_inputs():
    p = _random_probs(2, 3, 4)
    with pytest.raises(ValueError, match="use one of hard_vote, soft_vote, weighted, caruana"):
        combine.apply("median", p)
    with pytest.raises(ValueError, match="needs learned weights; fit them with fit_caruana"):
        combine.apply("caruana", p)
    with pytest.raises(ValueError, match="needs params; fit them with fit_stacking"):
        combine.apply("stacking", p)
    with pytest.raises(ValueError, match=r"\(M, B, C\).*np.stack"):
        combine.soft_vote(p[0])
    with pytest.raises(ValueError, match="NaN or inf"):
        combine.soft_vote(np.full((2, 3, 4), np.nan))


# --- the regressor's vote -----------------------------------------------------------------------


EDGES = [0.2, 0.4, 0.6, 0.8]


def test_regressor_probs_bins_with_edges_going_to_the_upper_class():
    x = np.array([-3.0, 0.0, np.nextafter(0.2, 0.0), 0.2, 0.4, 0.79, 0.8, 1.0, 7.0])
    out = combine.regressor_probs(x, EDGES, num_classes=5)
    assert out.shape == (9, 5)
    np.testing.assert_array_equal(out.argmax(axis=1), [0, 0, 0, 1, 2, 3, 4, 4, 4])
    np.testing.assert_array_equal(out.max(axis=1), 1.0)  # one-hot by default
    np.testing.assert_array_equal(out.sum(axis=1), 1.0)


def test_soft_regressor_probs_keep_the_bin_and_decay_with_distance():
    x = np.linspace(-0.5, 1.5, 81)
    hard = combine.regressor_probs(x, EDGES, 5)
    soft = combine.regressor_probs(x, EDGES, 5, sharpness=10.0)
    np.testing.assert_allclose(soft.sum(axis=1), 1.0)
    inside = ~np.isin(np.round(x, 6), EDGES)
    np.testing.assert_array_equal(soft.argmax(axis=1)[inside], hard.argmax(axis=1)[inside])
    # exactly on an edge the two neighbouring classes share the top probability
    on_edge = combine.regressor_probs(np.array([0.4]), EDGES, 5, sharpness=10.0)[0]
    assert on_edge[1] == pytest.approx(on_edge[2]) and on_edge[1] > on_edge[0]
    # inside class 1 = [0.2, 0.4): class 2 gets more the nearer the intensity is to 0.4
    near, far = combine.regressor_probs(np.array([0.39, 0.21]), EDGES, 5, sharpness=10.0)
    assert near[2] > far[2] and far[0] > near[0]
    sharp = combine.regressor_probs(x[inside], EDGES, 5, sharpness=1e4)
    np.testing.assert_allclose(sharp, hard[inside], atol=1e-6)


@pytest.mark.parametrize("true_sharpness", [5.0, 40.0])
def test_fitted_sharpness_recovers_the_one_that_generated_the_labels(true_sharpness):
    rng = np.random.default_rng(0)
    x = rng.uniform(-0.1, 1.1, size=20_000)
    p = combine.regressor_probs(x, EDGES, 5, sharpness=true_sharpness)
    y = (p.cumsum(axis=1) > rng.uniform(size=(x.size, 1))).argmax(axis=1)  # one draw per row
    fitted = combine.fit_regressor_sharpness(x, y, EDGES, 5)
    assert fitted == pytest.approx(true_sharpness, rel=0.1)


def test_fitted_sharpness_beats_the_one_hot_vote_on_log_loss():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 5, size=2_000)
    x = (y + 0.5) / 5 + rng.normal(0.0, 0.12, size=y.size)  # a noisy regressor
    s = combine.fit_regressor_sharpness(x, y, EDGES, 5)
    soft = combine.regressor_probs(x, EDGES, 5, sharpness=s)
    hard = combine.regressor_probs(x, EDGES, 5)
    rows = np.arange(y.size)
    assert -np.log(soft[rows, y]).mean() < -np.log(np.clip(hard[rows, y], 1e-12, 1)).mean()
    np.testing.assert_array_equal(soft.argmax(axis=1), hard.argmax(axis=1))
    assert soft.max(axis=1).mean() < 0.9  # no longer as confident as a one-hot vote


def test_fit_sharpness_rejects_bad_input():
    with pytest.raises(ValueError, match="matching non-empty"):
        combine.fit_regressor_sharpness(np.zeros(3), np.zeros(2, dtype=int), EDGES, 5)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
        combine.fit_regressor_sharpness(np.zeros(2), np.array([0, 5]), EDGES, 5)


@pytest.mark.parametrize(
    ("edges", "kwargs", "match"),
    [
        ([0.2, 0.4], {}, "got 2 intensity edges for 5 classes; pass num_classes - 1"),
        ([0.2, 0.6, 0.4, 0.8], {}, "strictly ascending"),
        ([0.2, 0.2, 0.4, 0.8], {}, "strictly ascending"),
        (EDGES, {"sharpness": 0.0}, "sharpness=0.0 must be > 0"),
    ],
)
def test_regressor_probs_rejects_bad_edges(edges, kwargs, match):
    with pytest.raises(ValueError, match=match):
        combine.regressor_probs(np.array([0.5]), edges, 5, **kwargs)


# --- stacking -----------------------------------------------------------------------------------


def test_stack_features_are_member_major():
    p = _random_probs(2, 3, 4)
    x = combine.stack_features(p)
    assert x.shape == (3, 8)
    np.testing.assert_array_equal(x[:, 4:], p[1])  # column m*C + c


@pytest.mark.parametrize("num_classes", [2, 5])
def test_stack_apply_reproduces_sklearn_predict_proba(num_classes):
    rng = np.random.default_rng(num_classes)
    y = rng.integers(0, num_classes, 200)
    logits = rng.normal(size=(3, 200, num_classes))
    logits[:, np.arange(200), y] += 1.0
    p = np.exp(logits) / np.exp(logits).sum(axis=2, keepdims=True)  # (M, B, C)
    fitted = fit_stacking(p, y, folds=3, C=0.7)
    reference = LogisticRegression(C=0.7, max_iter=2000).fit(combine.stack_features(p), y)
    new = _random_probs(3, 50, num_classes, seed=9)
    np.testing.assert_allclose(
        combine.stack_apply(new, fitted.params),
        reference.predict_proba(combine.stack_features(new)),
        atol=1e-5,
    )


def test_stacking_ridge_predicts_like_ridge_classifier():
    rng = np.random.default_rng(3)
    p = _random_probs(3, 150, 4, seed=3)
    y = np.where(rng.random(150) < 0.7, p[0].argmax(axis=1), rng.integers(0, 4, 150))
    fitted = fit_stacking(p, y, kind="ridge", folds=3, C=2.0)
    reference = RidgeClassifier(alpha=0.5).fit(combine.stack_features(p), y)
    new = _random_probs(3, 60, 4, seed=4)
    out = combine.stack_apply(new, fitted.params)
    np.testing.assert_allclose(out.sum(axis=1), 1.0)
    np.testing.assert_array_equal(
        out.argmax(axis=1), reference.predict(combine.stack_features(new))
    )


def test_stack_apply_rejects_params_of_another_ensemble():
    params = {"coef": np.zeros((4, 8)).tolist(), "intercept": [0.0] * 4}
    assert combine.stack_apply(_random_probs(2, 3, 4), params).shape == (3, 4)
    with pytest.raises(ValueError, match=r"3 members x 4 classes need \(4, 12\).*refit"):
        combine.stack_apply(_random_probs(3, 3, 4), params)
    with pytest.raises(ValueError, match=r"lack \['intercept'\]"):
        combine.stack_apply(_random_probs(2, 3, 4), {"coef": params["coef"]})


# --- intensity, disagreement, confidence --------------------------------------------------------


def test_intensity_helpers():
    probs = np.array([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    np.testing.assert_allclose(combine.expected_intensity(probs, [0.0, 0.5, 1.0]), [0.25, 1.0])
    with pytest.raises(ValueError, match="2 values for 3 classes"):
        combine.expected_intensity(probs, [0.0, 1.0])
    estimates = np.array([[0.2, 0.4], [0.6, 0.8]])  # (K, B)
    np.testing.assert_allclose(combine.combine_intensity(estimates), [0.4, 0.6])
    np.testing.assert_allclose(combine.combine_intensity(estimates, [3.0, 1.0]), [0.3, 0.5])
    np.testing.assert_allclose(combine.combine_intensity(estimates, [0.0, 1.0]), [0.6, 0.8])
    with pytest.raises(ValueError, match="all weights are zero"):
        combine.combine_intensity(estimates, [0.0, 0.0])
    with pytest.raises(ValueError, match=r"\(K, B\)"):
        combine.combine_intensity(np.array([0.1, 0.2]))


def test_disagreement_and_confidence():
    a, b = [0.8, 0.1, 0.1], [0.1, 0.8, 0.1]
    p = _probs([[a, a, a], [a, b, a], [b, a, a]])  # (M=3, B=3, C=3)
    np.testing.assert_allclose(combine.disagreement(p), [1 / 3, 1 / 3, 0.0])
    np.testing.assert_allclose(
        combine.confidence(np.array([a, b, [0.3, 0.3, 0.4]])), [0.8, 0.8, 0.4]
    )


def test_pure_modules_import_without_ray_torch_or_deepspeed():
    # Ray and DeepSpeed are blocked outright; torch cannot be (scipy probes sys.modules["torch"]),
    # so the test checks that nothing imported it.
    code = (
        "import sys\n"
        "sys.modules['ray'] = sys.modules['deepspeed'] = None\n"
        "import ensemble.combine, ensemble.tuning.objective, ensemble.tuning.weights\n"
        "import ensemble.tuning\n"
        "mods = {k for k, v in sys.modules.items() if v}\n"
        "loaded = sorted({'torch', 'ray', 'deepspeed'} & mods)\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_output_temperature_scales_the_combined_probabilities_last():
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.ones(4), size=(3, 50))  # (M, B, C)
    w = np.array([0.5, 0.3, 0.2])
    plain = combine.apply("weighted", probs, w)
    scaled = combine.apply("weighted", probs, w, {"output_temperature": 0.5})
    np.testing.assert_allclose(scaled, combine.temper(plain, 0.5))
    np.testing.assert_array_equal(scaled.argmax(1), plain.argmax(1))
    assert scaled.max(1).mean() > plain.max(1).mean()  # T < 1 sharpens
    # a hard vote's shares are not scaled; T = 1 changes nothing
    hard = combine.apply("hard_vote", probs, None, {"output_temperature": 0.5})
    np.testing.assert_array_equal(hard, combine.apply("hard_vote", probs))
    np.testing.assert_allclose(combine.apply("soft_vote", probs, None, {"output_temperature": 1.0}),
                               combine.apply("soft_vote", probs))
    with pytest.raises(ValueError, match="must be finite and > 0"):
        combine.apply("soft_vote", probs, None, {"output_temperature": 0.0})
