"""benchmarks/recipe_quality.py bookkeeping: derived configs and what counts as a met target."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import recipe_quality as R

ROWS = ("(d) ensemble", "(c) deep ensemble", "(b) single classifier", "classifier_s0")


def _seed_file(directory: Path, dataset: str, seed: int, d: float, diffs: dict) -> None:
    row = {"accuracy": d, "macro_f1": 0.5, "nll": 1.1, "ece": 0.03, "brier": 0.6}
    rows = {name: dict(row) for name in ROWS}
    rows["classifier_s0"].update(accuracy=d - 0.01, nll=1.2, ece=0.06)
    result = {"seed": seed, "rows": rows, "best_member": "classifier_s0",
              "accuracy_differences": {k: {"diff": v, "se": 0.005} for k, v in diffs.items()}}
    (directory / f"recipe_{dataset}_seed{seed}.json").write_text(json.dumps(result))


DIFFS = {"(d) minus best member": 0.02, "(d) minus (b)": 0.004, "(d) minus (c)": -0.001,
         "(c) minus best member": 0.01}


def test_one_seed_uses_the_paired_bootstrap_se_and_a_tie_is_not_met(tmp_path: Path) -> None:
    _seed_file(tmp_path, "sst", 0, 0.53, DIFFS)
    table = R.summarize("sst", tmp_path)
    t = table["targets"]
    assert t["(d) >= 52.5 %"] is True
    assert t["(d) >= best member + 1.5 pt and beyond one SE"] is True  # +2.0 > 0.5 SE
    assert t["(d) ahead of (b) beyond one SE"] is False  # +0.4 within its 0.5 SE: a tie
    assert t["(d) ahead of (c) beyond one SE"] is False
    assert t["(d) NLL below the best member's (as trained)"] is True
    assert (tmp_path / "recipe_sst.md").read_text().count("| no |") >= 2


def test_over_seeds_the_se_is_across_seeds(tmp_path: Path) -> None:
    _seed_file(tmp_path, "vader", 0, 0.80, {**DIFFS, "(d) minus (b)": 0.004})
    _seed_file(tmp_path, "vader", 1, 0.81, {**DIFFS, "(d) minus (b)": 0.006})
    table = R.summarize("vader", tmp_path)
    assert table["n"] == 2
    diff = table["differences"]["(d) minus (b)"]
    assert diff["mean"] == pytest.approx(0.005) and diff["se"] == pytest.approx(0.001)
    assert diff["met"] is True  # consistent over seeds: beyond its SE across seeds
    assert not any("52.5" in k for k in table["targets"])  # SST's bar is not VADER's


def test_seed_derivation_and_the_single_classifiers_budget(tmp_path: Path) -> None:
    recipe = R.recipe_config("sst", 2, tmp_path, None)
    seeds = {n: m["seed"] for n, m in recipe["members"].items()}
    assert seeds == {"classifier_s0": 20, "classifier_s1": 21, "classifier_s2": 22,
                     "regressor_s0": 20, "regressor_s1": 21}
    single = R.single_config(recipe, "sst", 2, tmp_path)
    (member,) = single["members"].values()
    assert member["kind"] == "classifier" and member["seed"] == 20
    assert member["epochs"] == 15  # 5 members x 3 epochs
    assert single["output_dir"] == str(tmp_path / "sst_single_s2")
