"""ensemble.tuning.report without Ray: PBT's mutation history and the lineage plot."""

from __future__ import annotations

import json

from matplotlib.image import imread

from ensemble.tuning.report import mutation_history, plot_trials


def test_lineage_draws_one_arrow_per_exploit_between_recorded_trials(tmp_path):
    lines = [  # Tune's pbt_global.txt: target, donor, target round, donor round, configs
        ["a1_00001", "a1_00000", 2, 2, {"lr": 0.1}, {"lr": 0.12}],
        ["a1_00002", "a1_00000", 3, 3, {"lr": 0.5}, {"lr": 0.08}],
        ["gone_0009", "a1_00000", 3, 3, {}, {}],  # a trial without a row: no arrow
    ]
    (tmp_path / "pbt_global.txt").write_text("\n".join(json.dumps(x) for x in lines))
    history = mutation_history(tmp_path / "missing", tmp_path)
    assert [(m["trial"], m["cloned_from"], m["trial_round"]) for m in history] == [
        ("a1_00001", "a1_00000", 2), ("a1_00002", "a1_00000", 3), ("gone_0009", "a1_00000", 3)]
    rows = [
        {"trial": "objective_a1_00000_0_lr=0.1", "trial_id": None,
         "metric_per_round": [0.40, 0.45, 0.47, 0.48]},
        {"trial": "objective_a1_00001_1_lr=0.5", "trial_id": "a1_00001",
         "metric_per_round": [0.35, 0.44, 0.46, 0.47]},
        {"trial": "objective_a1_00002_2_lr=0.9", "trial_id": None,
         "metric_per_round": [0.30, 0.33, 0.46, 0.48]},
    ]
    path = tmp_path / "out" / "trials.png"
    assert plot_trials(rows, "acc", path, history) == 2
    assert imread(path).std() > 0.05
    assert plot_trials(rows, "acc", tmp_path / "plain.png") == 0
