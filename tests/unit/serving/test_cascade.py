"""The pure cascade logic the Serve combiner runs (no Ray, no torch)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ensemble import combination, combine
from ensemble.rundir import Manifest
from ensemble.serving import cascade

from ..test_combination import LABELS, MEMBERS, TEMPS, _manifest_run, _outputs, _spec


def _brute_force(s, e, y, loss, measure):
    """Reference: try every observed confidence (and 'never'), keep the lowest that passes."""
    conf = s.max(1) if measure == "max_prob" else np.sort(s, 1)[:, -1] - np.sort(s, 1)[:, -2]
    target = np.mean(e.argmax(1) == y) - loss
    for t in np.sort(np.unique(conf)):
        pred = np.where(conf >= t, s.argmax(1), e.argmax(1))
        if np.mean(pred == y) >= target - 1e-12:
            return t
    return None


# ----------------------------------------------------------------------------- confidence


def test_confidence_measures():
    p = np.array([[0.5, 0.3, 0.2], [0.1, 0.45, 0.45], [0.0, 0.0, 1.0]])
    np.testing.assert_allclose(cascade.student_confidence(p, "max_prob"), [0.5, 0.45, 1.0])
    np.testing.assert_allclose(cascade.student_confidence(p, "margin"), [0.2, 0.0, 1.0])
    np.testing.assert_allclose(cascade.student_confidence(p), [0.2, 0.0, 1.0])  # the default
    # a tie at the top is "unsure" by margin, whatever the top probability
    assert cascade.hard_examples(p, 0.1).tolist() == [1]
    assert cascade.hard_examples(p, 0.48, "max_prob").tolist() == [1]
    with pytest.raises(ValueError, match="use one of"):
        cascade.student_confidence(p, "entropy")


# ----------------------------------------------------------------------------- fit_threshold


MEASURES = pytest.mark.parametrize("measure", cascade.CONFIDENCE_MEASURES)


@MEASURES
def test_perfect_student_takes_all_traffic(measure):
    y = np.array([0, 1, 2, 1])
    student = np.eye(3)[y] * 0.6 + 0.4 / 3  # right on every example, confidence 0.733
    ensemble = np.eye(3)[y]
    t = cascade.fit_threshold(student, ensemble, y, measure=measure)
    assert t == pytest.approx(cascade.student_confidence(student, measure).min())
    stats = cascade.cascade_accuracy(student, ensemble, y, t, measure)
    assert stats["student_fraction"] == 1.0


def test_threshold_stops_where_the_student_starts_to_err():
    y = np.array([0, 0, 0, 0])
    # top probabilities 0.9, 0.8 (right) then 0.7, 0.6 (wrong); margins 0.8, 0.6, 0.4, 0.2
    student = np.array([[0.9, 0.1, 0], [0.8, 0.2, 0], [0.3, 0.7, 0], [0.4, 0.6, 0]])
    ensemble = np.tile([1.0, 0, 0], (4, 1))
    def fit(*args, **kwargs):  # the point estimate: four examples are too few for a bound
        return cascade.fit_threshold(*args, bound=None, **kwargs)

    assert fit(student, ensemble, y, max_accuracy_loss=0.0, measure="max_prob") == 0.8
    assert fit(student, ensemble, y, max_accuracy_loss=0.0) == pytest.approx(0.6)
    # allowing a 25-point loss lets the student also take its third example (one error)
    assert fit(student, ensemble, y, max_accuracy_loss=0.25, measure="max_prob") == 0.7
    assert fit(student, ensemble, y, max_accuracy_loss=0.25) == pytest.approx(0.4)
    stats = cascade.cascade_accuracy(student, ensemble, y, 0.8, "max_prob")
    assert stats["accuracy"] == 1.0 and stats["student_fraction"] == 0.5
    assert cascade.cascade_accuracy(student, ensemble, y, 0.6)["student_fraction"] == 0.5


@MEASURES
def test_tied_confidences_are_never_split(measure):
    y = np.array([0, 0])
    student = np.array([[0.7, 0.3, 0], [0.3, 0.7, 0]])  # same confidence, one right one wrong
    ensemble = np.tile([1.0, 0, 0], (2, 1))
    t = cascade.fit_threshold(student, ensemble, y, max_accuracy_loss=0.0, measure=measure)
    assert t > cascade.student_confidence(student, measure).max()  # "neither" keeps accuracy
    assert cascade.cascade_accuracy(student, ensemble, y, t, measure)["student_fraction"] == 0.0


@MEASURES
def test_hopeless_student_never_answers_alone(measure):
    y = np.array([0, 1, 2])
    student = np.eye(3)[(y + 1) % 3] * 0.9 + 0.1 / 3
    ensemble = np.eye(3)[y]
    t = cascade.fit_threshold(student, ensemble, y, measure=measure)
    assert t > cascade.student_confidence(student, measure).max()
    assert cascade.cascade_accuracy(student, ensemble, y, t, measure)["accuracy_loss"] == 0.0


@MEASURES
@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force_on_random_data(seed, measure):
    rng = np.random.default_rng(seed)
    n = 200
    y = rng.integers(0, 3, n)
    student = rng.dirichlet(np.ones(3) * 0.7, n)
    student[rng.random(n) < 0.3] = student[0]  # many exactly tied confidences
    ensemble = np.where(rng.random((n, 1)) < 0.8, np.eye(3)[y], rng.dirichlet(np.ones(3), n))
    conf = cascade.student_confidence(student, measure)
    for loss in (0.0, 0.005, 0.05):
        expected = _brute_force(student, ensemble, y, loss, measure)
        got = cascade.fit_threshold(student, ensemble, y, max_accuracy_loss=loss, measure=measure,
                                    bound=None)
        if expected is None:
            assert got > conf.max()
        else:
            assert got == pytest.approx(expected)
            stats = cascade.cascade_accuracy(student, ensemble, y, got, measure)
            assert stats["accuracy_loss"] <= loss + 1e-12


def _known_loss_population(n: int, rng: np.random.Generator):
    """Dev sets where the accuracy loss of every threshold is known in closed form.

    The student's confidence c is uniform on [0, 1] (top probability 1/3 + 2c/3); an example
    costs the cascade a point (ensemble right, student wrong) with probability 0.3 (1 - c) and
    gains one (the other way round) with probability 0.05. Sending every example with
    confidence >= c0 to the student loses 0.15 (1 - c0)^2 - 0.05 (1 - c0) in expectation.
    """
    c = rng.random(n)
    u = rng.random(n)
    student_right = u >= 0.3 * (1 - c)
    ensemble_right = student_right & ~(u < 0.3 * (1 - c) + 0.05) | ~student_right
    top = 1 / 3 + 2 / 3 * c
    student = np.repeat(((1 - top) / 2)[:, None], 3, axis=1)
    student[np.arange(n), np.where(student_right, 0, 1)] = top
    ensemble = np.eye(3)[np.where(ensemble_right, 0, 1)]
    return student, ensemble, np.zeros(n, dtype=np.int64)


def _true_loss(threshold: float) -> tuple[float, float]:
    """(expected accuracy loss, expected student share) at a max_prob threshold."""
    x = 1 - float(np.clip((threshold - 1 / 3) * 1.5, 0.0, 1.0))
    return 0.15 * x * x - 0.05 * x, x


def test_the_bound_holds_the_budget_where_the_point_estimate_does_not():
    rng = np.random.default_rng(0)
    budget, fits = 0.005, {0.95: [], None: []}
    for _ in range(20):
        student, ensemble, y = _known_loss_population(800, rng)
        for bound in fits:
            t = cascade.fit_threshold(student, ensemble, y, budget, "max_prob", bound=bound)
            fits[bound].append(_true_loss(t))
    ucb, point = np.array(fits[0.95]), np.array(fits[None])
    # the point estimate spends the budget's noise: its true loss is over budget about half
    # the time; the 95 % bound is over budget at most rarely, yet still routes traffic
    assert np.mean(point[:, 0] > budget) >= 0.25
    assert np.mean(ucb[:, 0] > budget) <= 0.1
    assert 0.1 < ucb[:, 1].mean() < point[:, 1].mean()


def test_the_bound_is_the_bootstrap_quantile_of_the_loss():
    cost = np.array([0, 0, 1, -1, 1, 0, 1, 1])
    bound = cascade.accuracy_loss_bound(cost, level=0.9, bootstrap=4000, seed=1)
    assert bound.shape == cost.shape
    assert bound[0] == bound[1] == 0.0  # nothing lost yet in any resample
    assert np.all(bound >= np.cumsum(cost) / cost.size)  # a 90 % upper bound sits above the mean
    rng = np.random.default_rng(1)
    counts = rng.multinomial(8, np.full(8, 1 / 8), size=4000)
    expected = np.quantile(np.cumsum(counts * cost, axis=1) / 8, 0.9, axis=0)
    np.testing.assert_allclose(bound, expected, atol=1e-6)


def test_cascade_curve_matches_cascade_accuracy_at_each_threshold():
    rng = np.random.default_rng(3)
    student, ensemble, y = _known_loss_population(200, rng)
    curve = cascade.cascade_curve(student, ensemble, y, "max_prob")
    for i in (0, 50, 199):
        stats = cascade.cascade_accuracy(student, ensemble, y, curve["threshold"][i], "max_prob")
        assert stats["student_fraction"] == pytest.approx(curve["student_fraction"][i])
        assert stats["accuracy_loss"] == pytest.approx(curve["accuracy_loss"][i])


def test_fit_threshold_rejects_a_bound_outside_0_1():
    y = np.array([0, 1])
    with pytest.raises(ValueError, match="bound=1.5 must be in"):
        cascade.fit_threshold(np.eye(2)[y], np.eye(2)[y], y, bound=1.5)


@pytest.mark.parametrize(
    ("student", "ensemble", "labels", "loss", "match"),
    [
        (np.ones((3, 2)) / 2, np.ones((4, 2)) / 2, np.zeros(3, int), 0.0, "same N"),
        (np.ones((0, 2)), np.ones((0, 2)), np.zeros(0, int), 0.0, "no dev examples"),
        (np.ones((2, 2)) / 2, np.ones((2, 2)) / 2, np.array([0, 2]), 0.0, r"\[0, 2\)"),
        (np.ones((2, 2)) / 2, np.ones((2, 2)) / 2, np.array([0.0, 1.0]), 0.0, "integer"),
        (np.ones((2, 2)) / 2, np.ones((2, 2)) / 2, np.array([0, 1]), -0.1, "max_accuracy_loss"),
    ],
)
def test_fit_threshold_rejects_bad_input(student, ensemble, labels, loss, match):
    with pytest.raises(ValueError, match=match):
        cascade.fit_threshold(student, ensemble, labels, max_accuracy_loss=loss)


# ----------------------------------------------------------------------------- cascade_answer


def test_cascade_answer_merges_student_and_ensemble_rows():
    spec = _spec()
    out = _outputs(6, seed=3)
    hard = cascade.hard_examples(out["stud"], threshold=0.5, measure="max_prob")
    assert 0 < hard.size < 6  # the seed gives a mix
    rest = {n: v[hard] for n, v in out.items() if n != "stud"}
    ans = cascade.cascade_answer(spec, out["stud"], hard, rest)
    full = combination.combine_outputs(out, spec)
    easy = np.setdiff1d(np.arange(6), hard)
    np.testing.assert_allclose(ans.combined.probs[hard], full.probs[hard])
    np.testing.assert_allclose(ans.combined.probs[easy], out["stud"][easy])
    np.testing.assert_allclose(ans.combined.intensity[hard], full.intensity[hard])
    assert [ans.answered_by[i] for i in hard] == ["ensemble"] * hard.size
    assert [ans.answered_by[i] for i in easy] == ["student"] * easy.size
    assert np.isnan(ans.outputs["clf"][easy]).all()  # not asked about the easy ones
    np.testing.assert_allclose(ans.outputs["clf"][hard], out["clf"][hard])


def test_cascade_extremes_equal_student_alone_and_full_ensemble():
    spec = _spec(method="hard_vote")
    out = _outputs(5, seed=4)
    all_hard = cascade.hard_examples(out["stud"], threshold=1.01)
    ans = cascade.cascade_answer(
        spec, out["stud"], all_hard, {n: v for n, v in out.items() if n != "stud"}
    )
    np.testing.assert_allclose(ans.combined.probs, combination.combine_outputs(out, spec).probs)
    none = cascade.hard_examples(out["stud"], threshold=0.0)
    ans = cascade.cascade_answer(spec, out["stud"], none, {})
    np.testing.assert_allclose(ans.combined.probs, out["stud"])
    assert ans.answered_by == ["student"] * 5


def test_answer_rows_split_a_batch_back_into_requests():
    spec = _spec()
    out = _outputs(5, seed=5)
    hard = cascade.hard_examples(out["stud"], threshold=0.5, measure="max_prob")
    whole = cascade.cascade_answer(
        spec, out["stud"], hard, {n: v[hard] for n, v in out.items() if n != "stud"}
    )
    part = whole.rows(1, 3)
    assert part.answered_by == whole.answered_by[1:3]
    np.testing.assert_array_equal(part.combined.probs, whole.combined.probs[1:3])
    np.testing.assert_array_equal(part.combined.intensity, whole.combined.intensity[1:3])
    assert set(part.outputs) == set(whole.outputs)
    np.testing.assert_array_equal(part.outputs["reg"], whole.outputs["reg"][1:3])


def test_cascade_answer_scales_the_student_as_the_ensemble_does():
    spec = _spec(params={"temperatures": TEMPS})
    out = _outputs(6, seed=3)
    vote = combination.member_probs(spec, "stud", out["stud"])
    hard = cascade.hard_examples(vote, threshold=0.5, measure="max_prob")
    rest = {n: v[hard] for n, v in out.items() if n != "stud"}
    ans = cascade.cascade_answer(spec, out["stud"], hard, rest)
    easy = np.setdiff1d(np.arange(6), hard)
    np.testing.assert_allclose(ans.combined.probs[easy], vote[easy])
    np.testing.assert_allclose(ans.combined.confidence[easy], vote[easy].max(1))
    full = combination.combine_outputs(out, spec)
    np.testing.assert_allclose(ans.combined.probs[hard], full.probs[hard])
    np.testing.assert_array_equal(ans.outputs["stud"], out["stud"])  # members' own outputs kept


def _cascade_only(**kw):
    """The four members' combination with ``stud`` as the non-voting cascade student."""
    voting = {n: k for n, k in MEMBERS.items() if n != "stud"}
    return _spec(members=voting, cascade_student="stud", **kw)


def test_a_cascade_only_student_answers_first_and_never_votes():
    spec = _cascade_only(params={"temperatures": {"clf": 1.5, "stud": 2.0}})
    assert cascade.student_of(spec) == "stud" and spec.served == [*spec.members, "stud"]
    out = _outputs(8, seed=3)
    vote = combination.member_probs(spec, "stud", out["stud"])  # scaled by its own T
    np.testing.assert_allclose(vote, combine.member_vote("student", out["stud"], [], 3, None, 2.0))
    hard = cascade.hard_examples(vote, threshold=0.5, measure="max_prob")
    assert 0 < hard.size < 8
    rest = {n: v[hard] for n, v in out.items() if n != "stud"}
    ans = cascade.cascade_answer(spec, out["stud"], hard, rest)
    voters = {n: v for n, v in out.items() if n != "stud"}
    full = combination.combine_outputs(voters, spec)  # the ensemble without the student
    np.testing.assert_allclose(ans.combined.probs[hard], full.probs[hard])
    easy = np.setdiff1d(np.arange(8), hard)
    np.testing.assert_allclose(ans.combined.probs[easy], vote[easy])
    # the student's output beside the voters' changes nothing: it is not stacked
    np.testing.assert_array_equal(combination.combine_outputs(out, spec).probs, full.probs)
    # a voting member left out keeps the student's temperature
    assert combination.without(spec, ["clf"]).temperature("stud") == 2.0


def test_a_cascade_only_student_comes_first_and_round_trips_through_the_manifest(tmp_path):
    both = {**MEMBERS, "fast": "student"}  # a voting student and a published one
    spec = _spec(members=MEMBERS, cascade_student="fast")
    assert spec.student == "fast" and _spec().student == "stud"
    section = json.loads(json.dumps(spec.section()))
    assert section["cascade_student"] == "fast" and section["members"] == list(MEMBERS)
    back = combination.Combination.from_section(section, both, LABELS, [-2.0, 0.0, 2.0],
                                                [-1.0, 1.0])
    assert back == spec
    with pytest.raises(ValueError, match="not a member of kind 'student'"):
        combination.Combination.from_section(section, MEMBERS, LABELS, [-2.0, 0.0, 2.0],
                                             [-1.0, 1.0])
    with pytest.raises(ValueError, match="also a voting member"):
        _spec(cascade_student="stud")


def test_cascade_needs_a_student():
    with pytest.raises(ValueError, match="kind 'student'"):
        cascade.student_of(_spec(members={"clf": "classifier", "reg": "regressor"}))


# -------------------------------------------------------------------------- run directory


def test_fit_threshold_from_run_uses_the_served_combination(tmp_path):
    preds = _manifest_run(tmp_path, {"method": "soft_vote", "weights": {}, "params": {}})
    spec = Manifest.load(tmp_path).combination()
    threshold, stats = cascade.fit_threshold_from_run(tmp_path, spec, max_accuracy_loss=0.005)
    ensemble = combination.combine_outputs(preds, spec).probs
    assert threshold == cascade.fit_threshold(preds["stud"], ensemble, preds["labels"])
    assert stats["accuracy_loss"] <= 0.005 + 1e-12
    assert 0.0 < stats["student_fraction"] < 1.0  # a real split on this data


def test_a_fitted_threshold_reports_its_loss_on_test_beside_dev(tmp_path):
    spec_section = {"method": "soft_vote", "weights": {}, "params": {}}
    dev = _manifest_run(tmp_path, spec_section)
    assert "test" not in cascade.fit_cascade_from_run(tmp_path, _run_spec(tmp_path))[2]
    test = {k: np.roll(v, 7, axis=0) for k, v in dev.items()}  # other texts, same members
    np.savez(tmp_path / "predictions" / "test.npz", **test)
    spec = _run_spec(tmp_path)
    threshold, measure, stats = cascade.fit_cascade_from_run(tmp_path, spec, "margin", 0.01)
    expected = cascade.cascade_accuracy(
        combination.member_probs(spec, "stud", test["stud"]),
        combination.combine_outputs(test, spec).probs, test["labels"], threshold, measure,
    )
    assert stats["test"] == expected and stats["max_accuracy_loss"] == 0.01


def _run_spec(run_dir):
    return Manifest.load(run_dir).combination()


def test_cascade_fit_on_a_calibrated_run_uses_the_scaled_student(tmp_path):
    temps = {"clf": 1.3, "teach": 0.8, "stud": 2.5}
    preds = _manifest_run(tmp_path, {"method": "soft_vote", "params": {"temperatures": temps}})
    spec = Manifest.load(tmp_path).combination()
    assert spec.temperature("stud") == 2.5
    ensemble = combination.combine_outputs(preds, spec).probs
    student = combination.member_probs(spec, "stud", preds["stud"])
    for m in cascade.CONFIDENCE_MEASURES:
        threshold, stats = cascade.fit_threshold_from_run(tmp_path, spec, measure=m)
        assert threshold == cascade.fit_threshold(student, ensemble, preds["labels"], measure=m)
        dev = cascade.cascade_accuracy(student, ensemble, preds["labels"], threshold, m)
        assert {k: stats[k] for k in dev} == dev and stats["max_accuracy_loss"] == 0.005


def test_missing_predictions_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="cascade_threshold"):
        cascade.load_predictions(tmp_path)


@pytest.mark.parametrize("seed", range(4))
def test_auto_confidence_keeps_the_measure_with_the_larger_student_share(tmp_path, seed):
    preds = _manifest_run(tmp_path, {"method": "soft_vote", "weights": {}, "params": {}})
    rng = np.random.default_rng(seed)  # reshape the student's probabilities differently per seed
    sharp = preds["stud"] ** rng.uniform(0.3, 3.0, size=(len(preds["stud"]), 1))
    preds["stud"] = sharp / sharp.sum(1, keepdims=True)
    np.savez(tmp_path / "predictions" / "dev.npz", **preds)
    spec = Manifest.load(tmp_path).combination()
    each = {m: cascade.fit_threshold_from_run(tmp_path, spec, measure=m)
            for m in cascade.CONFIDENCE_MEASURES}
    threshold, measure, stats = cascade.fit_cascade_from_run(tmp_path, spec, "auto")
    best = max(s["student_fraction"] for _, s in each.values())
    assert stats["student_fraction"] == best and stats["accuracy_loss"] <= 0.005 + 1e-12
    assert (threshold, stats) == each[measure] and stats["measure"] == measure
    for m in cascade.CONFIDENCE_MEASURES:  # a named measure is used as given
        assert cascade.fit_cascade_from_run(tmp_path, spec, m)[:2] == (each[m][0], m)
    with pytest.raises(ValueError, match="use auto or one of"):
        cascade.fit_cascade_from_run(tmp_path, spec, "entropy")
    # the same fit on arrays (a student that is not the run's own, e.g. `ensemble distill`)
    assert cascade.fit_cascade(*cascade.served_probs(tmp_path, spec)) == (threshold, measure,
                                                                          stats)


def test_a_published_run_with_a_student_plots_its_cascade_and_records_the_test_loss(tmp_path):
    from ensemble import config as C
    from ensemble import publish

    dev = _manifest_run(tmp_path, {"method": "soft_vote", "weights": {}, "params": {}})
    np.savez(tmp_path / "predictions" / "test.npz", **{k: v[::-1] for k, v in dev.items()})
    cfg = C.load("configs/tiny.yaml", ["serve.cascade_max_accuracy_loss=0.02"])
    stats = json.loads(json.dumps(publish._cascade(cfg, tmp_path, Manifest.load(tmp_path))))
    assert stats["max_accuracy_loss"] == 0.02 and set(stats["test"]) >= {"accuracy_loss",
                                                                          "student_fraction"}
    assert stats["test"]["threshold"] == stats["threshold"]  # the dev-fitted one, scored on test
    png = tmp_path / "plots" / "cascade.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


# ----------------------------------------------------------------------------- degraded answers


def test_degraded_answers_say_so_and_name_the_members_used():
    from ensemble.serving.schemas import predictions

    spec, out = _spec(), _outputs(3)
    full = predictions(cascade.ensemble_answer(out, spec), spec, True)
    assert all(not p.degraded and p.members_used == list(MEMBERS) for p in full)
    part = {n: v for n, v in out.items() if n != "reg"}
    some = predictions(cascade.ensemble_answer(part, spec, ["reg"]), spec, True)
    assert all(p.degraded and p.members_used == ["clf", "teach", "stud"] for p in some)
    assert all("reg" not in p.members for p in some)
    # the cascade: the student's own answers are not degraded, the ensemble's hard ones are
    hard = np.array([1])
    rest = {n: v[hard] for n, v in out.items() if n in ("clf", "teach")}
    mixed = predictions(cascade.cascade_answer(spec, out["stud"], hard, rest, ["reg"]), spec,
                        False)
    assert [p.degraded for p in mixed] == [False, True, False]
    assert [p.members_used for p in mixed] == [["stud"], ["clf", "teach", "stud"], ["stud"]]
