"""benchmarks/student_sweep.py bookkeeping: means and SEs over runs, and what counts as met."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import student_sweep as W


def _row(layers: int, acc: float, best: float, share: float, cascade_share: float,
         cascade_loss: float) -> dict:
    return {"run": "r", "name": f"l{layers}", "layers": layers, "params": 1e6 * layers,
            "teacher_params": 6e6, "student_accuracy": acc, "ensemble_accuracy": 0.52,
            "share_of_ensemble": share, "best_member": "c", "best_member_accuracy": best,
            "minus_best_member": acc - best, "minus_best_member_se": 0.006,
            "minus_ensemble_se": 0.006, "nll": 1.2, "ece_calibrated": 0.03,
            "kl_to_ensemble": 0.05, "cascade_dev_share": 0.6, "cascade_dev_loss": 0.002,
            "cascade_test_share": cascade_share, "cascade_test_loss": cascade_loss,
            "cascade_measure": "margin", "train_wall_s": 600.0, "epochs": 3.0,
            "corpus_texts": 0, "texts": 8544}


def test_one_run_uses_the_paired_se_and_several_the_se_over_runs():
    one = W.summarize([_row(3, 0.50, 0.51, 0.96, 0.8, 0.001)], None)[3]
    assert one["accuracy_se"] is None and one["minus_best_member_se"] == 0.006
    assert one["targets"]["speedup_1_9"] is None  # not timed
    rows = [_row(3, a, b, 0.98, 0.75, 0.004) for a, b in ((0.52, 0.50), (0.53, 0.50))]
    many = W.summarize(rows, {"teacher_ms_per_text": 4.0, "ms_per_text": {"l3": 2.0}})[3]
    gaps = np.array([0.02, 0.03])
    assert many["minus_best_member"] == pytest.approx(gaps.mean())
    assert many["minus_best_member_se"] == pytest.approx(gaps.std(ddof=1) / np.sqrt(2))
    assert many["speedup"] == 2.0 and many["texts_per_s"] == 500.0
    assert many["targets"] == {"beats_best_member": True, "share_97": True,
                               "speedup_1_9": True, "cascade_70_within_half_point": True}


def test_a_gap_within_its_se_or_one_bad_cascade_run_is_not_met():
    rows = [_row(2, 0.503, 0.50, 0.96, 0.9, 0.001), _row(2, 0.50, 0.50, 0.96, 0.6, 0.001)]
    t = W.summarize(rows, None)[2]["targets"]
    assert t["beats_best_member"] is False  # +0.15 pt with an SE of 0.15 pt: a tie
    assert t["share_97"] is False and t["cascade_70_within_half_point"] is False
    md = W.markdown(W.summarize(rows, None), None, {
        "commit": "abc", "runs": 2, "run_names": ["a", "b"], "epochs": 3, "alpha": 0.9,
        "temperature": 2.0, "corpus_texts": 0})
    assert "| 2 | 2.0 | 0.33 | – | –" in md and "missed" in md and "not measured" in md


def test_the_speedup_is_met_only_when_its_mean_less_one_se_clears_the_target():
    rows = [_row(3, 0.52, 0.50, 0.98, 0.75, 0.004)]
    steady = {"teacher_ms_per_text": 4.0, "ms_per_text": {"l3": 2.0},
              "rounds": [{"teacher": 4.0, "l3": 2.0}, {"teacher": 4.2, "l3": 2.1}]}
    e = W.summarize(rows, steady)[3]
    assert e["speedup"] == pytest.approx(2.0) and e["speedup_se"] == pytest.approx(0.0)
    assert e["targets"]["speedup_1_9"] is True
    noisy = {"teacher_ms_per_text": 4.0, "ms_per_text": {"l3": 2.0},
             "rounds": [{"teacher": 4.0, "l3": 1.6}, {"teacher": 4.0, "l3": 2.4}]}
    e = W.summarize(rows, noisy)[3]  # speed-ups 2.5 and 1.67: mean 2.08, SE 0.42
    assert e["speedup"] == pytest.approx((2.5 + 4 / 2.4) / 2)
    assert e["targets"]["speedup_1_9"] is False


def test_student_seeds_of_a_run_are_replicates_and_are_only_tabled_once_trained(tmp_path, capsys):
    runs = [tmp_path / "r0", tmp_path / "r1"]
    got = W.students(runs, [3, 6], ["_a", "_a_seed11"])
    assert got[:4] == [(runs[0], 3, "l3_a"), (runs[0], 3, "l3_a_seed11"),
                       (runs[0], 6, "l6_a"), (runs[0], 6, "l6_a_seed11")]
    assert len(got) == 8 and got[-1] == (runs[1], 6, "l6_a_seed11")
    with pytest.raises(SystemExit):  # training them here would give every replicate one seed
        W.main(["--run", str(runs[0]), "--layers", "6", "--name-suffix", "_a", "_b"])
    assert "--time-only" in capsys.readouterr().err
