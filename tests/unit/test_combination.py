"""ensemble.combination: the Combination spec, its validation, and the combined answer from
member outputs (no Ray, no torch). The shared helpers here are imported by serving/test_cascade.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from ensemble import combination, combine
from ensemble.combination import Combination
from ensemble.rundir import Manifest, MemberEntry
from ensemble.serving import cascade

LABELS = ["neg", "neu", "pos"]
MEMBERS = {"clf": "classifier", "reg": "regressor", "teach": "teacher", "stud": "student"}


def _spec(**kw) -> Combination:
    base = dict(
        members=MEMBERS,
        label_names=LABELS,
        class_intensity=[-2.0, 0.0, 2.0],
        intensity_edges=[-1.0, 1.0],
    )
    return Combination(**{**base, **kw})


def _outputs(b: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {n: rng.dirichlet(np.ones(3), b) for n in ("clf", "teach", "stud")}
    out["reg"] = rng.uniform(-3, 3, b)
    return out


def _manifest_run(tmp_path, combine_section):
    members = {
        n: MemberEntry(
            kind=k,
            path=f"members/{n}/export",
            num_labels=1 if k == "regressor" else 3,
            max_length=16,
        )
        for n, k in MEMBERS.items()
    }
    Manifest(
        name="t",
        label_names=LABELS,
        class_intensity=[-2.0, 0.0, 2.0],
        intensity_edges=[-1.0, 1.0],
        intensity_range=[-4.0, 4.0],
        members=members,
        combine=combine_section,
    ).save(tmp_path)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    preds = {"labels": y, "intensity": rng.normal(size=300)}
    for n, strength in (("clf", 2.0), ("teach", 2.5), ("stud", 1.0)):
        logits = rng.normal(size=(300, 3)) + strength * np.eye(3)[y]
        preds[n] = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    preds["reg"] = np.array([-2.0, 0.0, 2.0])[y] + rng.normal(0, 0.5, 300)
    (tmp_path / "predictions").mkdir(parents=True)
    np.savez(tmp_path / "predictions" / "dev.npz", **preds)
    return preds


# ------------------------------------------------------------------------ combine_outputs


@pytest.mark.parametrize("method", combine.METHODS)
def test_combine_outputs_is_combine_apply_on_the_stacked_members(method):
    rng = np.random.default_rng(1)
    weights = {"clf": 0.5, "reg": 0.2, "teach": 1.0, "stud": 0.3}
    params = {"coef": rng.normal(size=(3, 12)).tolist(), "intercept": [0.1, 0.0, -0.1]}
    spec = _spec(method=method, weights=weights, params=params if method == "stacking" else {})
    out = _outputs(7)
    got = combination.combine_outputs(out, spec)

    reg_probs = combine.regressor_probs(out["reg"], [-1.0, 1.0], 3)
    probs = np.stack([out["clf"], reg_probs, out["teach"], out["stud"]])  # manifest order
    w = np.array([0.5, 0.2, 1.0, 0.3])
    expected = combine.apply(method, probs, w, spec.params)
    np.testing.assert_allclose(got.probs, expected)
    np.testing.assert_array_equal(got.label_ids, expected.argmax(1))
    np.testing.assert_allclose(got.confidence, expected.max(1))
    np.testing.assert_allclose(got.disagreement, combine.disagreement(probs))
    # the regressor half, the three classification members a sixth each
    expected_cls = [
        combine.expected_intensity(out[n], [-2, 0, 2]) for n in ("clf", "teach", "stud")
    ]
    np.testing.assert_allclose(got.intensity, 0.5 * out["reg"] + np.mean(expected_cls, axis=0) / 2)


@pytest.mark.parametrize(
    "members",
    [
        MEMBERS,
        {"a": "classifier", "b": "teacher"},
        {"r": "regressor"},
        {"r1": "regressor", "r2": "regressor", "c": "student"},
    ],
)
def test_served_intensity_is_the_evaluated_intensity(members):
    """Serving and `ensemble.evaluate` (the run's reported metrics) weigh intensities alike."""
    from ensemble import evaluate

    spec = _spec(members=members)
    rng = np.random.default_rng(2)
    out = {
        n: rng.uniform(-3, 3, 6) if k == "regressor" else rng.dirichlet(np.ones(3), 6)
        for n, k in members.items()
    }
    estimates = evaluate.intensity_estimates(out, members, spec.class_intensity)
    np.testing.assert_allclose(
        combination.combine_outputs(out, spec).intensity,
        evaluate.ensemble_intensity(estimates, members),
    )


def test_stacking_member_order_comes_from_the_fitted_combiner(tmp_path):
    _manifest_run(
        tmp_path,
        {
            "method": "soft_vote",
            "weights": {},
            "params": {},
            "members": ["stud", "reg", "clf", "teach"],
        },
    )
    spec = Manifest.load(tmp_path).combination()
    assert list(spec.members) == ["stud", "reg", "clf", "teach"]
    # a manifest.json whose combiner was fitted on other members (Manifest refuses to make one)
    raw = json.loads((tmp_path / "manifest.json").read_text())
    raw["combine"]["members"] = ["stud", "reg"]
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="refit the combiner"):
        Manifest.load(tmp_path).combination()


def test_regressor_sharpness_param_gives_a_soft_vote():
    out = _outputs(5)
    hard = combination.stack_member_probs(out, _spec())[1]
    soft = combination.stack_member_probs(out, _spec(params={"regressor_sharpness": 2.0}))[1]
    assert set(np.unique(hard)) <= {0.0, 1.0}
    assert np.all((soft > 0) & (soft < 1))
    np.testing.assert_array_equal(hard.argmax(1), soft.argmax(1))


TEMPS = {"clf": 2.0, "teach": 0.5, "stud": 1.5}


def test_temperatures_scale_classification_votes_and_their_absence_is_t_1():
    from ensemble.calibration import temper

    out = _outputs(6, seed=7)
    plain = combination.stack_member_probs(out, _spec())
    scaled = combination.stack_member_probs(out, _spec(params={"temperatures": TEMPS}))
    for i, name in enumerate(MEMBERS):
        if name in TEMPS:
            np.testing.assert_allclose(scaled[i], temper(out[name], TEMPS[name]))
            np.testing.assert_array_equal(scaled[i].argmax(1), plain[i].argmax(1))
        else:
            np.testing.assert_array_equal(scaled[i], plain[i])  # the regressor has its sharpness
    # without the key (an older manifest) the members vote their probabilities as they are
    np.testing.assert_array_equal(plain, np.stack([
        combination.member_probs(_spec(), n, out[n]) for n in MEMBERS
    ]))
    np.testing.assert_array_equal(plain[0], out["clf"])
    assert _spec().temperature("clf") == 1.0
    assert _spec(params={"temperatures": {"clf": 2.0}}).temperature("teach") == 1.0


def test_combined_probs_use_the_scaled_votes():
    out = _outputs(8, seed=8)
    spec = _spec(params={"temperatures": TEMPS})
    votes = combination.stack_member_probs(out, spec)
    np.testing.assert_allclose(combination.combine_outputs(out, spec).probs,
                               combine.soft_vote(votes))


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"params": {"temperatures": {"reg": 2.0}}}, r"not classification members"),
        ({"params": {"temperatures": {"ghost": 2.0}}}, r"not classification members"),
        ({"params": {"temperatures": {"clf": 0.0}}}, "must be finite and > 0"),
        ({"params": {"temperatures": {"clf": "hot"}}}, "must be finite and > 0"),
        ({"params": {"temperatures": [2.0]}}, "must map member names"),
        ({"method": "median"}, "unknown"),
        ({"weights": {"clf": 1.0}}, r"weights lack members \['reg', 'stud', 'teach'\]"),
        ({"weights": {**dict.fromkeys(MEMBERS, 1.0), "ghost": 1.0}}, "unknown members"),
        ({"weights": dict.fromkeys(MEMBERS, 0.0)}, "all weights are 0"),
        ({"method": "stacking"}, "coef"),
        ({"method": "weighted"}, "learned weights"),
        ({"members": {"x": "ranker"}}, "unknown member kinds"),
    ],
)
def test_combination_names_the_fix(kw, match):
    with pytest.raises(ValueError, match=match):
        _spec(**kw)


def test_missing_member_output_is_an_error():
    out = _outputs(2)
    del out["teach"]
    with pytest.raises(ValueError, match="no outputs for members"):
        combination.combine_outputs(out, _spec())


# ----------------------------------------------------------------------------- Manifest.combination


def test_the_manifests_combination_reads_method_and_weights(tmp_path):
    _manifest_run(
        tmp_path, {"method": "hard_vote", "weights": {"clf": 2, "reg": 1, "teach": 1, "stud": 0}}
    )
    spec = Manifest.load(tmp_path).combination()
    assert spec.method == "hard_vote" and spec.weights["clf"] == 2.0
    assert Manifest.load(tmp_path).combination("soft_vote").method == (
        "soft_vote"
    )
    np.testing.assert_array_equal(spec.weight_vector(), [2.0, 1.0, 1.0, 0.0])


# ----------------------------------------------------------------------------- without


def test_without_renormalises_the_weights_of_the_members_left():
    spec = _spec(method="weighted", weights={"clf": 0.4, "reg": 0.1, "teach": 0.3, "stud": 0.2},
                 params={"temperatures": {"clf": 2.0, "teach": 0.5}, "output_temperature": 0.9})
    left = combination.without(spec, ["teach", "ghost"])
    assert list(left.members) == ["clf", "reg", "stud"] and left.method == "weighted"
    assert left.weights == pytest.approx({"clf": 4 / 7, "reg": 1 / 7, "stud": 2 / 7})
    assert left.params == {"temperatures": {"clf": 2.0}, "output_temperature": 0.9}
    assert combination.without(spec, []) is spec
    out = _outputs(7)
    # the degraded answer is the reduced combination of the members that answered
    answer = cascade.ensemble_answer({n: v for n, v in out.items() if n != "teach"}, spec,
                                     ["teach"])
    want = combination.combine_outputs({n: v for n, v in out.items() if n != "teach"}, left)
    np.testing.assert_allclose(answer.combined.probs, want.probs)
    assert answer.missing == ("teach",) and answer.rows(2, 4).missing == ("teach",)


def test_without_falls_back_to_the_soft_vote_where_the_learned_combiner_cannot_go_on():
    stack = _spec(method="stacking", params={"coef": [[0.0] * 12] * 3, "intercept": [0.0] * 3})
    left = combination.without(stack, ["reg"])
    assert (left.method, left.weights, left.params) == ("soft_vote", {}, {})
    only_zero = _spec(method="caruana", weights={"clf": 1.0, "reg": 0.0, "teach": 0.0,
                                                 "stud": 0.0})
    assert combination.without(only_zero, ["clf"]).method == "soft_vote"
    with pytest.raises(ValueError, match="no member left"):
        combination.without(_spec(), list(MEMBERS))
