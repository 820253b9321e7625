"""ensemble.guidance: the loss weights of each member kind and what members send each other.

Members' outputs are synthetic (3 ordinal classes, a noisy regressor, classifiers of known
confidence); `build` and `teacher_only` put their arrays in the object store of the session's
local Ray.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ensemble import config as C
from ensemble import guidance as G
from ensemble.combine import softmax
from ensemble.data import Splits
from ensemble.testing import synthetic_splits

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"
KINDS = {"classifier": "classifier", "regressor": "regressor", "teacher": "teacher",
         "student": "student"}
GUIDANCE = ("classifier_from_regressor", "regressor_from_classifier", "student_from_ensemble",
            "mutual")


def _cfg(*overrides: str) -> C.RunConfig:
    return C.load(TINY, list(overrides))


def _splits(n: int = 90, seed: int = 0) -> Splits:
    return synthetic_splits(n, seed)


def _logits(y: np.ndarray, scale: float, rng: np.random.Generator) -> np.ndarray:
    """Logits pointing at the label with noise; `scale` sets how confident they are."""
    return (scale * (rng.normal(size=(len(y), 3)) + 1.5 * np.eye(3)[y])).astype(np.float32)


def _outputs(splits: Splits, reg_noise: float = 0.05, seed: int = 1) -> dict:
    """Every member's outputs on every split: logits (N, 3), the regressor's intensity (N,)."""
    rng = np.random.default_rng(seed)
    out: dict[str, dict[str, np.ndarray]] = {n: {} for n in KINDS}
    for split, y in splits.labels.items():
        for name, scale in (("classifier", 6.0), ("teacher", 0.3), ("student", 1.0)):
            out[name][split] = _logits(y, scale, rng)
        assert splits.intensity is not None
        truth = splits.intensity[split]
        out["regressor"][split] = (truth + rng.normal(0, reg_noise, len(y))).astype(np.float32)
    return out


# ---------------------------------------------------------------------------- loss_weights


@pytest.mark.parametrize("name", list(KINDS))
def test_loss_weights_have_no_guidance_before_a_previous_round(name: str) -> None:
    cfg = _cfg(*(f"training.guidance.{g}=0.7" for g in GUIDANCE))
    w = G.loss_weights(cfg, name, available=False)
    assert (w.from_regressor, w.from_classifier, w.from_ensemble) == (0.0, 0.0, 0.0)


def test_loss_weights_route_each_guidance_term_to_its_member_kind() -> None:
    cfg = _cfg("training.guidance.classifier_from_regressor=0.1",
               "training.guidance.regressor_from_classifier=0.2",
               "training.guidance.student_from_ensemble=0.3",
               "training.guidance.mutual=0.4", "training.guidance.temperature=2.5")
    w = {n: G.loss_weights(cfg, n, available=True) for n in KINDS}
    got = {n: (x.from_regressor, x.from_classifier, x.from_ensemble) for n, x in w.items()}
    assert got == {
        "classifier": (0.1, 0.0, 0.4),
        "teacher": (0.0, 0.0, 0.4),  # mutual learning, but no intensity target: not a classifier
        "regressor": (0.0, 0.2, 0.0),
        "student": (0.0, 0.0, 0.3),
    }
    assert {x.guidance_temperature for x in w.values()} == {2.5}
    assert {x.distill_alpha for x in w.values()} == {0.0, 0.5}  # only the student distils


def test_student_distils_from_its_teacher_in_every_round() -> None:
    cfg = _cfg("members.student.distill_alpha=0.8", "members.student.distill_temperature=3.0")
    for available in (False, True):
        w = G.loss_weights(cfg, "student", available=available)
        assert (w.distill_alpha, w.distill_temperature) == (0.8, 3.0)


# ------------------------------------------------------ regressor_sharpness / temperatures


def test_regressor_sharpness_is_none_for_a_one_hot_vote_or_without_a_regressor() -> None:
    splits = _splits()
    outputs = _outputs(splits)
    one_hot = _cfg("training.regressor_vote=one_hot")
    assert G.regressor_sharpness(one_hot, splits, KINDS, outputs) is None
    no_reg = {n: o for n, o in outputs.items() if n != "regressor"}
    assert G.regressor_sharpness(_cfg(), splits, KINDS, no_reg) is None


def test_regressor_sharpness_is_fitted_on_dev_and_grows_with_accuracy() -> None:
    splits, cfg = _splits(), _cfg()
    sharp = G.regressor_sharpness(cfg, splits, KINDS, _outputs(splits, reg_noise=0.02))
    blunt = G.regressor_sharpness(cfg, splits, KINDS, _outputs(splits, reg_noise=0.3))
    assert sharp is not None and blunt is not None
    assert sharp > blunt > 0
    # only dev counts: other splits' outputs (even garbage) change nothing
    outputs = _outputs(splits, reg_noise=0.02)
    outputs["regressor"]["train"] = outputs["regressor"]["train"] * 0 + 99.0
    assert G.regressor_sharpness(cfg, splits, KINDS, outputs) == sharp


def test_member_temperatures_soften_the_overconfident_and_sharpen_the_timid() -> None:
    splits = _splits()
    temps = G.member_temperatures(_cfg(), splits, KINDS, _outputs(splits))
    assert temps is not None
    assert set(temps) == {"classifier", "teacher", "student"}  # the regressor has a sharpness
    assert temps["classifier"] > 1.0  # logits x6: overconfident
    assert temps["teacher"] < 1.0  # logits x0.3: underconfident


def test_member_temperatures_are_none_when_calibration_is_off() -> None:
    splits = _splits()
    assert G.member_temperatures(_cfg("training.calibrate=false"), splits, KINDS,
                                 _outputs(splits)) is None


# ------------------------------------------------------------------------ _ensemble_probs


def test_ensemble_probs_are_a_float32_distribution_per_training_text() -> None:
    splits = _splits()
    train = {n: o["train"] for n, o in _outputs(splits).items()}
    probs = G._ensemble_probs(train, KINDS, splits, temperature=1.0, sharpness=5.0)
    assert probs.shape == (90, 3) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    # the ensemble of mostly-right members is mostly right
    assert np.mean(probs.argmax(axis=1) == splits.labels["train"]) > 0.8


def test_ensemble_probs_of_one_classifier_is_its_softmax_at_the_guidance_temperature() -> None:
    splits = _splits()
    logits = _outputs(splits)["classifier"]["train"]
    one = G._ensemble_probs({"classifier": logits}, KINDS, splits, 1.0, None)
    np.testing.assert_allclose(one, softmax(logits.astype(np.float64)), atol=1e-6)
    soft = G._ensemble_probs({"classifier": logits}, KINDS, splits, 3.0, None)
    np.testing.assert_allclose(soft, softmax(logits.astype(np.float64) / 3.0), atol=1e-6)
    # a member's own temperature multiplies the guidance temperature
    both = G._ensemble_probs({"classifier": logits}, KINDS, splits, 1.5, None, {"classifier": 2.0})
    np.testing.assert_allclose(both, soft, atol=1e-6)


def test_ensemble_probs_let_the_regressor_vote_its_bin() -> None:
    splits = _splits()
    intensity = _outputs(splits)["regressor"]["train"]
    bins = np.digitize(intensity, splits.intensity_edges())
    one_hot = G._ensemble_probs({"regressor": intensity}, KINDS, splits, 4.0, None)
    np.testing.assert_array_equal(one_hot, np.eye(3, dtype=np.float32)[bins])  # T is not for it
    soft = G._ensemble_probs({"regressor": intensity}, KINDS, splits, 1.0, 2.0)
    np.testing.assert_array_equal(soft.argmax(axis=1), bins)
    assert soft.max() < 1.0


# -------------------------------------------------------------------- build / teacher_only


def _get(ref):
    import ray

    return None if ref is None else ray.get(ref)


def test_build_without_guidance_sends_only_the_student_its_teacher_logits(ray_local) -> None:
    splits = _splits()
    outputs = _outputs(splits)
    refs = G.build(_cfg(), splits, KINDS, outputs)
    assert set(refs) == set(KINDS)
    assert refs["classifier"] is None and refs["regressor"] is None and refs["teacher"] is None
    sent = _get(refs["student"])
    assert set(sent) == {"teacher_logits"}
    np.testing.assert_array_equal(sent["teacher_logits"], outputs["teacher"]["train"])


def test_build_sends_each_member_the_signal_its_weights_ask_for(ray_local) -> None:
    splits = _splits()
    outputs = _outputs(splits)
    cfg = _cfg("training.guidance.classifier_from_regressor=0.5",
               "training.guidance.regressor_from_classifier=0.5")
    sent = {n: _get(r) for n, r in G.build(cfg, splits, KINDS, outputs).items()}
    assert set(sent["classifier"]) == {"regressor_intensity"}
    np.testing.assert_array_equal(sent["classifier"]["regressor_intensity"],
                                  outputs["regressor"]["train"])
    assert set(sent["regressor"]) == {"classifier_probs"}
    np.testing.assert_allclose(sent["regressor"]["classifier_probs"],
                               softmax(outputs["classifier"]["train"]), rtol=1e-6)
    assert sent["teacher"] is None  # neither term is for a teacher
    assert set(sent["student"]) == {"teacher_logits"}


def test_build_sends_the_calibrated_ensemble_vote_for_mutual_learning(ray_local) -> None:
    splits = _splits()
    outputs = _outputs(splits)
    cfg = _cfg("training.guidance.mutual=0.5", "training.guidance.student_from_ensemble=0.5",
               "training.guidance.temperature=2.0")
    sent = {n: _get(r) for n, r in G.build(cfg, splits, KINDS, outputs).items()}
    assert "ensemble_probs" not in (sent["regressor"] or {})
    train = {n: o["train"] for n, o in outputs.items()}
    expected = G._ensemble_probs(train, KINDS, splits, 2.0,
                                 G.regressor_sharpness(cfg, splits, KINDS, outputs),
                                 G.member_temperatures(cfg, splits, KINDS, outputs))
    for name in ("classifier", "teacher", "student"):
        np.testing.assert_array_equal(sent[name]["ensemble_probs"], expected)
    # the dev-fitted temperatures matter: without calibration the target differs
    raw = G.build(_cfg("training.guidance.mutual=0.5", "training.guidance.temperature=2.0",
                       "training.calibrate=false"), splits, KINDS, outputs)
    assert not np.allclose(_get(raw["classifier"])["ensemble_probs"], expected, atol=1e-3)


def test_build_names_the_member_and_the_fix_when_a_producer_is_missing(ray_local) -> None:
    splits = _splits()
    outputs = _outputs(splits)
    del outputs["regressor"]["train"]  # it predicted dev/test only
    cfg = _cfg("training.guidance.classifier_from_regressor=0.5")
    with pytest.raises(ValueError, match=r"member classifier: guidance \['regressor_intensity'\]"
                                         r".*set its weight to 0 in training.guidance"):
        G.build(cfg, splits, KINDS, outputs)


def test_build_names_the_fix_when_a_distilling_students_teacher_has_no_outputs(ray_local) -> None:
    splits = _splits()
    outputs = _outputs(splits)
    del outputs["teacher"]["train"]
    with pytest.raises(ValueError, match=r"member student: distill_alpha=.* its teacher 'teacher' "
                                         r"has no training outputs.*distill_alpha: 0"):
        G.build(_cfg(), splits, KINDS, outputs)


def test_build_names_each_missing_input_with_its_own_fix(ray_local) -> None:
    splits = _splits()
    outputs = _outputs(splits)
    for out in outputs.values():
        del out["train"]  # nobody predicted train: no teacher logits, no ensemble
    with pytest.raises(ValueError) as err:
        G.build(_cfg("training.guidance.student_from_ensemble=0.5"), splits, KINDS, outputs)
    msg = str(err.value)
    assert msg.startswith("member student: distill_alpha=")
    assert "set members.student.distill_alpha: 0" in msg
    assert "guidance ['ensemble_probs'] is on" in msg and "0 in training.guidance" in msg


def test_teacher_only_sends_just_the_teacher_logits(ray_local) -> None:
    logits = np.arange(12, dtype=np.float32).reshape(4, 3)
    sent = _get(G.teacher_only(logits))
    assert set(sent) == {"teacher_logits"}
    np.testing.assert_array_equal(sent["teacher_logits"], logits)
