"""Early stopping end to end: a member stops mid-job, exports its best dev weights, not its last,
and trains no more in later rounds, on a local Ray with DeepSpeed and tiny random-init members.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from ensemble.cli import main
from ensemble.rundir import read_json

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
EVERY = 2  # optimizer steps between dev evaluations


@pytest.fixture(scope="module")
def run_dir(ray_local, sst_dir: Path, tmp_path_factory) -> Path:
    tiny = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    tiny["members"] = {"classifier": {"kind": "classifier"},
                       "regressor": {"kind": "regressor", "loss": "mse", "max_length": 12}}
    # min_delta beyond any possible gain: the first evaluation is the best, the second stops
    stop = {"patience": 1, "every_steps": EVERY}
    tiny["members"]["classifier"]["early_stopping"] = {**stop, "min_delta": 2.0}
    tiny["members"]["regressor"]["early_stopping"] = {**stop, "min_delta": 3.0}
    config = tmp_path_factory.mktemp("es") / "config.yaml"
    config.write_text(yaml.safe_dump(tiny))
    out = config.parent / "run"
    args = ["train", str(config), "--output-dir", str(out), "--no-progress",
            f"data.source={sst_dir}", "data.max_train_samples=128", "data.max_eval_samples=64",
            "member_defaults.lr=1e-2", "member_defaults.epochs=2",
            "member_defaults.cpus_per_worker=0.5", "training.log_every=2", "training.rounds=2"]
    assert main(args) == 0
    return out


def test_members_stop_at_patience_and_train_no_more_rounds(run_dir: Path) -> None:
    state = read_json(run_dir / "state.json")
    assert state["rounds_completed"] == 2
    for name, metric in (("classifier", "accuracy"), ("regressor", "pearson")):
        assert state["members"][name]["stopped"] is True
        stage = state["member_info"][name]["stages"][-1]
        assert stage["stopped"] is True
        evals = stage["evals"]
        # 128 texts / batch 16 = 8 steps an epoch, 16 planned: evaluated at steps 2 and 4, then
        # stopped, 12 steps short of the plan
        assert [e["step"] for e in evals] == [EVERY, 2 * EVERY]
        assert [e["best"] for e in evals] == [True, False]
        assert stage["best"]["best_step"] == EVERY and stage["best"]["stopped"] is True
        assert metric in evals[0]
    runs = sorted(p.name for p in (run_dir / "ray").iterdir() if p.is_dir())
    assert runs == ["classifier-r1-finetune", "regressor-r1-finetune"]  # no round-2 job
    rounds = json.loads((run_dir / "rounds.json").read_text())
    assert [r["round"] for r in rounds] == [1, 2]


def test_the_export_is_the_best_evaluation_not_the_last_step(run_dir: Path) -> None:
    state = read_json(run_dir / "state.json")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    best = state["member_info"]["classifier"]["stages"][-1]["evals"][0]["accuracy"]
    # the published member is scored on the same 64 dev texts as the step-2 evaluation
    assert metrics["dev"]["classifier"]["accuracy"] == pytest.approx(best, abs=1.5 / 64)

    export = load_file(str(run_dir / "members" / "classifier" / "export" / "model.safetensors"))
    ckpt = Path(state["members"]["classifier"]["checkpoint"])
    engine_files = list(ckpt.rglob("mp_rank_00_model_states.pt"))
    assert engine_files, f"no DeepSpeed model state under {ckpt}"
    latest = torch.load(engine_files[0], weights_only=False)["module"]
    key = "classifier.weight"
    # the engine holds step 4 (to resume from); the export holds step 2, the best on dev
    assert not np.allclose(export[key].numpy(), latest[key].numpy())
    same_shape = [k for k in export if k in latest and export[k].shape == latest[k].shape]
    assert len(same_shape) > 10


def test_a_member_max_length_reaches_its_manifest_entry(run_dir: Path) -> None:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    tiny = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    assert manifest["members"]["regressor"]["max_length"] == 12  # what Serve cuts texts to
    assert manifest["members"]["classifier"]["max_length"] == tiny["data"]["max_length"]
