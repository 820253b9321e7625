"""HTTP bodies: request validation, limits, and building responses from arrays (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from ensemble import combination
from ensemble.serving import cascade
from ensemble.serving import schemas as s

LABELS = ["neg", "neu", "pos"]


@pytest.mark.parametrize(
    ("body", "texts"),
    [
        ({"text": "fine"}, ["fine"]),
        ({"texts": ["a", "b"], "return_members": True}, ["a", "b"]),
    ],
)
def test_valid_requests(body, texts):
    assert s.PredictRequest.model_validate(body).as_list() == texts


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ({}, "exactly one"),
        ({"text": "a", "texts": ["b"]}, "exactly one"),
        ({"texts": []}, "empty"),
        ({"text": "   "}, r"index \[0\] are empty"),
        ({"texts": ["ok", ""]}, r"index \[1\] are empty"),
        ({"text": 5}, "valid string"),  # strict: no int -> str coercion
        ({"texts": "abc"}, "valid list"),
        ({"texts": ["a", 3]}, "valid string"),
        ({"text": "a", "return_members": "yes"}, "valid boolean"),
        ({"text": "a", "return_member": True}, "Extra inputs"),  # typo is not ignored
    ],
)
def test_bad_requests_name_the_problem(body, match):
    with pytest.raises(ValidationError, match=match):
        s.PredictRequest.model_validate(body)


def test_limits():
    s.check_limits(["a"] * 4, max_texts=4, max_text_chars=1)
    with pytest.raises(s.RequestLimitError, match=r"5 texts.*limit is 4.*Split"):
        s.check_limits(["a"] * 5, max_texts=4, max_text_chars=10)
    with pytest.raises(s.RequestLimitError, match=r"index \[1\] exceed 3 characters"):
        s.check_limits(["abc", "abcd"], max_texts=4, max_text_chars=3)


def test_cascade_without_threshold_is_rejected():
    with pytest.raises(ValidationError, match="cascade_threshold"):
        s.CombinerSettings(cascade=True)
    assert s.CombinerSettings(cascade=True, cascade_threshold=0.8).cascade


def test_member_settings_bounds():
    with pytest.raises(ValidationError):
        s.MemberSettings(max_batch_size=0)
    with pytest.raises(ValidationError, match="Extra inputs"):
        s.MemberSettings(max_batch=4)


def _spec():
    return combination.Combination(
        members={"c": "classifier", "r": "regressor", "st": "student"},
        label_names=LABELS,
        class_intensity=[0.0, 0.5, 1.0],
        intensity_edges=[0.33, 0.66],
    )


def test_predictions_from_a_cascade_answer():
    spec = _spec()
    student = np.array([[0.9, 0.05, 0.05], [0.4, 0.3, 0.3]])
    hard = cascade.hard_examples(student, 0.8)  # only the second text
    rest = {"c": np.array([[0.1, 0.1, 0.8]]), "r": np.array([0.9])}
    preds = s.predictions(cascade.cascade_answer(spec, student, hard, rest), spec, True)
    first, second = preds
    assert first.answered_by == "student" and first.disagreement is None
    assert first.label == "neg" and set(first.members) == {"st"}
    assert second.answered_by == "ensemble" and set(second.members) == {"c", "r", "st"}
    reg = second.members["r"]
    assert reg.kind == "regressor" and reg.intensity == pytest.approx(0.9)
    assert reg.label == "pos" and reg.probs == {"neg": 0.0, "neu": 0.0, "pos": 1.0}
    assert second.members["c"].intensity == pytest.approx(0.85)  # 0.1*0.5 + 0.8*1.0
    assert sum(second.probs.values()) == pytest.approx(1.0)
    assert (
        s.predictions(cascade.cascade_answer(spec, student, hard, rest), spec, False)[1].members
        is None
    )


def test_member_views_show_the_temperature_scaled_vote():
    import dataclasses

    from ensemble.calibration import temper

    spec = dataclasses.replace(_spec(), params={"temperatures": {"c": 2.0, "st": 0.5}})
    probs = np.array([0.1, 0.1, 0.8])
    scaled = temper(probs[None], 2.0)[0]
    out = s.member_output("c", probs, spec)
    assert out.kind == "classifier" and out.label == "pos"
    assert list(out.probs.values()) == pytest.approx(scaled.tolist())
    assert out.confidence == pytest.approx(scaled.max())
    assert out.intensity == pytest.approx(scaled @ np.array([0.0, 0.5, 1.0]))
    assert s.member_output("c", probs, _spec()).probs == pytest.approx(
        dict(zip(LABELS, probs.tolist(), strict=True))  # no temperatures: as the member gave them
    )
    assert s.member_output("r", np.float64(0.9), spec).probs == {"neg": 0.0, "neu": 0.0, "pos": 1.0}
