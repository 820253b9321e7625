"""Ray Tune over joint-training runs, for real on a local Ray: PBT exploits at round boundaries.

A 2-trial population of tiny classifiers trains 2 rounds; at the synchronous round-1 barrier PBT
clones the stronger trial into the weaker one. The cloned trial must continue from the donor's
checkpoint: its state carries the donor's completed rounds (metrics identical to the donor's), not
a fresh start.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from ensemble.cli import main

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


CONFIG = """
name: tune_test
data: {{source: {data}, max_train_samples: 96, max_eval_samples: 64, max_length: 16}}
members:
  classifier:
    kind: classifier
    pretrained: false
    arch: {{num_hidden_layers: 1, hidden_size: 32, num_attention_heads: 2, intermediate_size: 64}}
    lr: 3.0e-3
    warmup_ratio: 0.0
    micro_batch_size: 32
    cpus_per_worker: 0.25
training: {{rounds: 2}}
tune:
  scheduler: pbt
  num_samples: 2
  max_concurrent_trials: 2
  cpus_per_trial: 0.1
  quantile_fraction: 0.5
  metric: classifier_dev_accuracy
  space:
    members.classifier.lr: {{kind: loguniform, low: 1.0e-5, high: 3.0e-2}}
"""


@pytest.fixture(scope="module")
def pbt_run(ray_local, sst_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tune")
    config = out / "tune.yaml"
    config.write_text(CONFIG.format(data=sst_dir))
    args = ["tune", str(config), f"output_dir={out}"]
    assert main(args) == 0
    return out, args


def _trial_states(out: Path) -> dict[str, dict]:
    """trial id -> the final state.json of that trial's run directory."""
    states = {}
    for path in (out / "tune").glob("*/*/run/state.json"):
        state = json.loads(path.read_text())
        states[state["trial_id"]] = state
    return states


def test_pbt_exploits_and_clone_continues_from_donor(pbt_run):
    out, _ = pbt_run
    summary = json.loads((out / "tune_results.json").read_text())
    assert len(summary["trials"]) == 2
    assert all(t["error"] is None for t in summary["trials"])
    assert all(len(t["metric_per_round"]) == 2 for t in summary["trials"]), summary["trials"]
    assert summary["mutations"], "PBT never exploited a trial"
    states = _trial_states(out)
    assert len(states) == 2
    clones = 0
    for trial, state in states.items():
        donor = state.get("restored_from_trial")
        if not donor or donor == trial:
            continue  # fresh, or a pause/resume from its own checkpoint
        clones += 1
        k = state["restored_from_round"]
        # the clone's first k rounds are the donor's rounds, not a fresh start of its own
        assert state["rounds"][:k] == states[donor]["rounds"][:k]
        assert state["rounds_completed"] == 2
    assert clones >= 1, "no trial continued from another trial's checkpoint"
    assert (out / "best_config.yaml").is_file()
    assert (out / "trials.png").stat().st_size > 1000
    best_run = Path(summary["best_run_dir"])
    assert (best_run / "manifest.json").is_file()


def test_rerun_resumes_and_keeps_finished_trials(pbt_run):
    out, args = pbt_run
    before = json.loads((out / "tune_results.json").read_text())
    start = time.time()
    assert main(args) == 0
    after = json.loads((out / "tune_results.json").read_text())
    def per_trial(summary: dict) -> dict[str, list[float]]:
        return {t["trial"]: t["metric_per_round"] for t in summary["trials"]}

    assert per_trial(after) == per_trial(before)  # same trials, same results, none retrained
    assert time.time() - start < 120  # nothing retrained
