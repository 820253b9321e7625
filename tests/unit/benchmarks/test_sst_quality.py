"""benchmarks/sst_quality.py bookkeeping: result names, ablation variants, a reused arm."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import sst_quality as Q

CONFIG = "/somewhere/configs/sst.yaml"
KINDS = {"classifier": "classifier", "teacher": "teacher", "student": "student"}


def _result(seed: int, variant: str | None, classifier: dict[str, float]) -> dict:
    def arm(acc: float) -> dict:
        test = {n: {"accuracy": a} for n, a in
                {"classifier": acc, "teacher": 0.46, "student": 0.45,
                 "ensemble/soft_vote": 0.48}.items()}
        return {"test": test, "wall_s": 1.0, "combine": {"method": "soft_vote"}, "combiners": {}}

    return {
        "seed": seed, "variant": variant, "config": CONFIG, "rounds": 2, "epochs": 0.5,
        "extra": [], "machine": {"git_commit": "abc1234"}, "kinds": KINDS,
        "independent": arm(classifier["independent"]), "joint": arm(classifier["joint"]),
    }


def _write(directory: Path, seed: int, variant: str | None, **acc: float) -> Path:
    path = directory / f"{Q.result_name(seed, variant)}.json"
    path.write_text(json.dumps(_result(seed, variant, acc)))
    return path


def test_result_names() -> None:
    assert Q.result_name(0) == "sst_quality"
    assert Q.result_name(2) == "sst_quality_seed2"
    assert Q.result_name(0, "no_c2r") == "sst_quality_no_c2r"
    assert Q.result_name(1, "no_c2r") == "sst_quality_no_c2r_seed1"
    assert Q.summary_name("no_c2r") == "sst_quality_no_c2r_seeds"


def test_summaries_keep_variants_apart(tmp_path: Path) -> None:
    _write(tmp_path, 0, None, independent=0.47, joint=0.46)
    _write(tmp_path, 1, None, independent=0.47, joint=0.45)
    _write(tmp_path, 0, "no_c2r", independent=0.47, joint=0.49)
    (tmp_path / "sst_quality_seeds.json").write_text("{}")  # a summary is not a seed's result

    main = Q.summarize(tmp_path)
    ablation = Q.summarize(tmp_path, "no_c2r")

    assert sorted(main["seeds"]) == [0, 1]
    assert main["over_seeds"]["classifier"]["diff_mean"] == pytest.approx(-0.015)
    assert not main["targets"]["joint_classifier_beats_independent"]
    assert sorted(ablation["seeds"]) == [0]
    assert ablation["over_seeds"]["classifier"]["diff_mean"] == pytest.approx(0.02)
    # one seed gives no standard error: a lead on one seed is never "better"
    assert not ablation["targets"]["joint_classifier_beats_independent"]
    assert "(no_c2r)" in Q.summary_markdown(ablation)
    _write(tmp_path, 1, "no_c2r", independent=0.47, joint=0.50)  # +2 and +3 pt: beyond one SE
    assert Q.summarize(tmp_path, "no_c2r")["targets"]["joint_classifier_beats_independent"]
    with pytest.raises(FileNotFoundError, match="sst_quality_other"):
        Q.summarize(tmp_path, "other")


def test_a_misnamed_result_file_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, 1, "no_c2r", independent=0.47, joint=0.46)
    path.rename(tmp_path / "sst_quality_no_c2r_seed3.json")
    with pytest.raises(ValueError, match="expected sst_quality_no_c2r_seed1.json"):
        Q.summarize(tmp_path, "no_c2r")


def test_reused_independent_arm_comes_from_the_same_settings(tmp_path: Path) -> None:
    _write(tmp_path, 1, None, independent=0.47, joint=0.46)

    arm = Q.reused_independent(tmp_path, 1, "configs/sst.yaml", 2, 0.5, [])
    assert arm["test"]["classifier"]["accuracy"] == 0.47
    assert arm["reused_from"] == "sst_quality_seed1.json"
    assert arm["reused_git_commit"] == "abc1234"

    with pytest.raises(ValueError, match="drop --reuse-independent"):
        Q.reused_independent(tmp_path, 1, "configs/sst.yaml", 3, 0.5, [])
    with pytest.raises(ValueError, match="drop --reuse-independent"):
        Q.reused_independent(tmp_path, 1, "configs/sst.yaml", 2, 0.5, ["members.x.lr=1"])
    with pytest.raises(FileNotFoundError, match="run the main comparison for seed 2"):
        Q.reused_independent(tmp_path, 2, "configs/sst.yaml", 2, 0.5, [])


def test_refuses_an_existing_run_directory(tmp_path: Path, monkeypatch, capsys) -> None:
    """A finished old run in the work dir would be resumed and reported as a new measurement."""
    (tmp_path / "joint").mkdir()
    monkeypatch.setattr("sys.argv", ["sst_quality.py", "--work-dir", str(tmp_path),
                                     "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exit_info:
        Q.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"{tmp_path}/joint already exist" in err and "--resume" in err
    assert not (tmp_path / "out").exists()


def test_rescore_needs_the_finished_run_directories(tmp_path: Path) -> None:
    _write(tmp_path, 1, None, independent=0.47, joint=0.48)
    (tmp_path / "work" / "independent").mkdir(parents=True)
    before = (tmp_path / "sst_quality_seed1.json").read_text()
    with pytest.raises(FileNotFoundError, match="holds no finished run"):
        Q.rescore(tmp_path, "sst_quality_seed1", tmp_path / "work")
    with pytest.raises(FileNotFoundError, match="run the benchmark first"):
        Q.rescore(tmp_path, "sst_quality_seed3", tmp_path / "work")
    assert (tmp_path / "sst_quality_seed1.json").read_text() == before


def test_churn_is_the_share_of_texts_whose_class_changes_between_seeds() -> None:
    by_seed = {0: [0, 1, 2, 3], 1: [0, 1, 2, 4], 2: [1, 1, 2, 4]}  # pairs: 1/4, 2/4, 1/4
    c = Q.churn(by_seed)
    rates = [0.25, 0.5, 0.25]
    assert c["pairs"] == 3 and c["mean"] == pytest.approx(sum(rates) / 3)
    assert c["se"] == pytest.approx(float(np.std(rates, ddof=1) / np.sqrt(3)))
    assert Q.churn({0: [1, 2]}) == {"mean": None, "se": None, "pairs": 0}


def test_the_summary_gives_nll_and_churn_for_both_arms_when_the_seeds_record_them(
        tmp_path: Path) -> None:
    preds = {0: ([0, 1, 2, 3], [0, 1, 2, 3]), 1: ([0, 1, 2, 4], [0, 1, 2, 3]),
             2: ([1, 1, 2, 4], [0, 1, 2, 3])}  # (independent, joint): joint never changes
    for seed, (indep, joint) in preds.items():
        r = _result(seed, None, {"independent": 0.47, "joint": 0.48})
        for arm, labels, nll in (("independent", indep, 1.20), ("joint", joint, 1.15 + seed / 100)):
            for row in r[arm]["test"].values():
                row["nll"] = nll
            r[arm]["test_predictions"] = {"classifier": labels, Q.ENSEMBLE: labels}
        (tmp_path / f"{Q.result_name(seed)}.json").write_text(json.dumps(r))

    s = Q.summarize(tmp_path)
    assert s["churn"]["classifier"]["joint"] == {"mean": 0.0, "se": 0.0, "pairs": 3}
    # paired by seed pair: 0 - 1/4, 0 - 2/4, 0 - 1/4
    assert s["churn"]["classifier"]["diff_mean"] == pytest.approx(-1 / 3)
    assert s["churn"]["classifier"]["diff_se"] == pytest.approx(
        float(np.std([0.25, 0.5, 0.25], ddof=1) / np.sqrt(3)))
    assert s["churn"][Q.ENSEMBLE]["independent"]["mean"] == pytest.approx(1 / 3)
    nll = s["nll_over_seeds"]["classifier"]
    assert nll["seeds"] == 3 and nll["diff_mean"] == pytest.approx(-0.04)
    # the ensemble chosen on dev is each arm's soft vote here: its NLL is that row's
    assert s["nll_over_seeds"][Q.ENSEMBLE]["diff_mean"] == pytest.approx(-0.04)
    assert s["joint_better"]["classifier"] == {"accuracy": True, "nll": True, "churn": True}
    md = Q.summary_markdown(s)
    assert "| classifier | 33.3 % ± 8.3 | 0.0 % ± 0.0 | -33.33 pt ± 8.33 | 3 |" in md
    assert "| classifier | 1.200 | 1.160 | -0.040 ± 0.006 | 3 |" in md
    assert "- classifier: accuracy yes, nll yes, churn yes" in md


def test_older_seed_files_without_predictions_say_churn_was_not_measured(tmp_path: Path) -> None:
    _write(tmp_path, 0, None, independent=0.47, joint=0.46)
    _write(tmp_path, 1, None, independent=0.47, joint=0.45)
    s = Q.summarize(tmp_path)
    assert s["churn"] == {} and s["nll_over_seeds"] == {}
    assert s["joint_better"]["classifier"]["churn"] is None
    assert "- classifier: accuracy no, nll not measured, churn not measured" in (
        Q.summary_markdown(s))
    assert "not measured" in Q.summary_markdown(s)
