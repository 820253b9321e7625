"""ensemble.publish without Ray running: the combiner's temperatures, the plots, the summary."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from ensemble import evaluate as E
from ensemble import publish as P
from ensemble.calibration import temper
from ensemble.combine import member_votes
from ensemble.data import Splits
from ensemble.rundir import RunState

NAMES = ["neg", "neu", "pos"]
KINDS = {"clf": "classifier", "reg": "regressor", "teach": "teacher", "stud": "student"}


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _run(n: int = 300, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = {s: rng.integers(0, 3, n) for s in ("train", "dev", "test")}
    intensity = {s: y - 1.0 + rng.normal(0, 0.3, n) for s, y in labels.items()}
    splits = Splits(texts={s: ["t"] * n for s in labels}, labels=labels, intensity=intensity,
                    label_names=NAMES)
    probs = {}
    for split in ("dev", "test"):
        y = labels[split]
        probs[split] = {
            name: _softmax(scale * (rng.normal(size=(n, 3)) + 1.5 * np.eye(3)[y]))
            for name, scale in (("clf", 4.0), ("teach", 0.4), ("stud", 1.0))
        }
        probs[split]["reg"] = y - 1.0 + rng.normal(0, 0.6, n)
    return splits, probs


def _soft_vote_accuracy(probs, splits, entry, temperatures) -> float:
    sharpness = entry.params["regressor_sharpness"]
    votes = member_votes(probs, KINDS, splits.intensity_edges(), 3, sharpness, temperatures)
    return float(np.mean(votes.mean(axis=0).argmax(axis=1) == splits.labels["dev"]))


def test_fit_combiner_without_calibration_fits_the_raw_votes():
    splits, probs = _run()
    entry = P.fit_combiner(probs["dev"], KINDS, splits, seed=0, method="soft_vote",
                           calibrate=False)
    assert "temperatures" not in entry.params
    raw = _soft_vote_accuracy(probs["dev"], splits, entry, None)
    assert entry.info["candidates"]["soft_vote"] == pytest.approx(raw)


def test_fit_combiner_stores_temperatures_and_fits_the_scaled_votes():
    splits, probs = _run()
    entry = P.fit_combiner(probs["dev"], KINDS, splits, seed=0, method="soft_vote")
    temps = entry.params["temperatures"]
    assert set(temps) == {"clf", "teach", "stud"}
    assert temps == E.member_temperatures(probs["dev"], KINDS, splits.labels["dev"])
    scaled = _soft_vote_accuracy(probs["dev"], splits, entry, temps)
    assert entry.info["candidates"]["soft_vote"] == pytest.approx(scaled)
    assert scaled != _soft_vote_accuracy(probs["dev"], splits, entry, None)  # it mattered here


def test_plots_include_the_reliability_diagram(tmp_path):
    splits, probs = _run()
    combine = P.fit_combiner(probs["dev"], KINDS, splits, seed=0, method="soft_vote")
    rows = E.evaluate_split(
        probs["test"], KINDS, splits.labels["test"], splits.intensity["test"], NAMES,
        splits.class_intensity(), splits.intensity_edges(), learned=combine,
        sharpness=combine.params["regressor_sharpness"],
        temperatures=combine.params["temperatures"],
    )
    state = RunState(history={"clf": [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]})
    P._plots(tmp_path, splits, probs["test"], KINDS, rows, state, combine)
    png = tmp_path / "plots" / "reliability.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_disagreement_heatmap_is_written(tmp_path):
    splits, probs = _run()
    d = E.disagreement(probs["test"], KINDS, splits.intensity_edges())
    assert set(d["models"]) == set(KINDS) and 0.0 < d["mean"] < 1.0
    png = tmp_path / "disagreement.png"
    P.report.plot_disagreement(d, png, "test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_summary_shows_nll_ece_and_the_scaled_rows(tmp_path, capsys):
    splits, probs = _run()
    combine = P.fit_combiner(probs["dev"], KINDS, splits, seed=0, method="soft_vote")
    rows = E.evaluate_split(
        probs["test"], KINDS, splits.labels["test"], splits.intensity["test"], NAMES,
        splits.class_intensity(), splits.intensity_edges(), learned=combine,
        sharpness=combine.params["regressor_sharpness"],
        temperatures=combine.params["temperatures"],
    )
    P.print_summary(rows, {}, tmp_path)
    text = capsys.readouterr().out
    header = next(line for line in text.splitlines() if "member" in line)
    assert "NLL" in header and "ECE" in header
    t = combine.params["temperatures"]["clf"]
    scaled = next(line for line in text.splitlines() if f"clf (T={t:.2f})" in line)
    assert f"{rows['clf']['nll_calibrated']:.3f}" in scaled


def test_guidance_ensemble_target_divides_by_each_members_temperature():
    from ensemble import guidance as G

    splits, _ = _run(n=20)
    rng = np.random.default_rng(1)
    train = {"clf": rng.normal(size=(20, 3)), "teach": rng.normal(size=(20, 3)),
             "reg": rng.normal(size=20)}
    kinds = {n: KINDS[n] for n in train}
    before = G._ensemble_probs(train, kinds, splits, 2.0, 1.5)
    assert np.array_equal(before, G._ensemble_probs(train, kinds, splits, 2.0, 1.5, None))
    temps = {"clf": 3.0, "teach": 0.5}
    after = G._ensemble_probs(train, kinds, splits, 2.0, 1.5, temps)
    from ensemble import combine

    reg = combine.regressor_probs(train["reg"], splits.intensity_edges(), 3, sharpness=1.5)
    expected = combine.soft_vote(np.stack([
        _softmax(train["clf"] / 6.0), _softmax(train["teach"] / 1.0), reg
    ]))
    np.testing.assert_allclose(after, expected, rtol=1e-5)
    np.testing.assert_allclose(  # the same as scaling the probabilities, then softening
        _softmax(train["clf"] / 6.0), temper(_softmax(train["clf"] / 3.0), 2.0), rtol=1e-9
    )


def _diverse_members(n: int, seed: int):
    """Two members that are each calibrated but err independently: their average is too unsure.

    The label is drawn from softmax(z); each member sees z plus its own noise and has been
    temperature-scaled on its own, as `fit_combiner` scales members before combining them.
    """
    rng = np.random.default_rng(seed)
    z = 2.5 * rng.normal(size=(n, 3))
    labels = np.array([rng.choice(3, p=p) for p in _softmax(z)])
    members = {f"c{i}": _softmax(z + 2.0 * rng.normal(size=(n, 3))) for i in range(2)}
    return members, labels


def test_fit_combiner_gives_the_combined_output_a_temperature_that_holds_out_of_sample():
    kinds = {"c0": "classifier", "c1": "classifier"}
    dev, y_dev = _diverse_members(3000, seed=0)
    test, y_test = _diverse_members(3000, seed=1)
    splits = Splits(texts={s: ["t"] * 3000 for s in ("train", "dev", "test")},
                    labels={"train": y_dev, "dev": y_dev, "test": y_test}, intensity=None,
                    label_names=NAMES)
    entry = P.fit_combiner(dev, kinds, splits, seed=0, method="soft_vote")
    t = entry.params["output_temperature"]
    assert t < 0.95  # the average of two calibrated, independently wrong members is too unsure
    rows = E.evaluate_split(test, kinds, y_test, None, NAMES, [0.0, 0.5, 1.0], [0.25, 0.75],
                            learned=entry, temperatures=entry.params["temperatures"])
    unscaled = dataclasses.replace(entry, params={k: v for k, v in entry.params.items()
                                                  if k != "output_temperature"})
    plain = E.evaluate_split(test, kinds, y_test, None, NAMES, [0.0, 0.5, 1.0], [0.25, 0.75],
                             learned=unscaled, temperatures=entry.params["temperatures"])
    published, before = rows["ensemble/soft_vote"], plain["ensemble/soft_vote"]
    assert published["accuracy"] == before["accuracy"]
    assert published["nll"] < before["nll"] - 0.005 and published["ece"] < before["ece"]
    # off with training.calibrate, and never for a hard vote
    assert "output_temperature" not in P.fit_combiner(
        dev, kinds, splits, seed=0, method="soft_vote", calibrate=False).params
    assert "output_temperature" not in P.fit_combiner(
        dev, kinds, splits, seed=0, method="hard_vote").params
