"""Joint training for real on a local Ray: guidance, multi-stage chaining, MLM.

- with every guidance weight 0, a member trains exactly as it does alone (independent training);
  a non-zero weight changes it (so the comparison can fail);
- a fine-tune stage starts from the MLM stage's output, and the MLM stage lowers dev MLM loss.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from ensemble.cli import main

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TINY = (
    "pretrained: false, arch: {num_hidden_layers: 1, hidden_size: 32, num_attention_heads: 2,"
    " intermediate_size: 64, hidden_dropout_prob: 0.0, attention_probs_dropout_prob: 0.0},"
    " lr: 3.0e-3, warmup_ratio: 0.0, micro_batch_size: 32, cpus_per_worker: 1"
)


def _config(tmp: Path, sst: Path, members: str, guidance: str = "{}", rounds: int = 2) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "config.yaml"
    path.write_text(
        f"name: t\noutput_dir: {tmp / 'run'}\n"
        f"data: {{source: {sst}, max_train_samples: 96, max_eval_samples: 64, max_length: 16}}\n"
        f"members: {members}\ntraining: {{rounds: {rounds}, guidance: {guidance}}}\n"
    )
    return path


def _train(tmp: Path, sst: Path, members: str, guidance: str = "{}", rounds: int = 2) -> Path:
    assert main(["train", str(_config(tmp, sst, members, guidance, rounds)), "--no-progress"]) == 0
    return tmp / "run"


def _weights(run: Path, member: str) -> dict[str, torch.Tensor]:
    model = AutoModelForSequenceClassification.from_pretrained(run / "members" / member / "export")
    return model.state_dict()


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_zero_guidance_equals_independent_training(ray_local, sst_dir, tmp_path):
    alone = _train(tmp_path / "alone", sst_dir, f"{{classifier: {{kind: classifier, {TINY}}}}}")
    pair = f"{{classifier: {{kind: classifier, {TINY}}}, regressor: {{kind: regressor, {TINY}}}}}"
    zero = _train(
        tmp_path / "zero",
        sst_dir,
        pair,
        "{classifier_from_regressor: 0.0, regressor_from_classifier: 0.0}",
    )
    guided = _train(
        tmp_path / "guided",
        sst_dir,
        pair,
        "{classifier_from_regressor: 1.0, regressor_from_classifier: 0.0}",
    )
    w_alone, w_zero, w_guided = (_weights(r, "classifier") for r in (alone, zero, guided))
    assert _same(w_alone, w_zero), "weight-0 guidance changed the classifier"
    assert not _same(w_alone, w_guided), "guidance weight 1.0 had no effect"
    history = json.loads((guided / "state.json").read_text())["history"]["classifier"]
    assert any("from_regressor" in p for p in history if p["round"] == 2)
    assert not any("from_regressor" in p for p in history if p["round"] == 1)


def test_finetune_stage_starts_from_mlm_stage(ray_local, sst_dir, tmp_path):
    stages = (
        "[{name: mlm, epochs: 3, lr: 3.0e-3}, "
        "{name: finetune, epochs: 1, lr: 1.0e-12}]"
    )  # ~no change after the MLM stage
    run = _train(
        tmp_path,
        sst_dir,
        f"{{classifier: {{kind: classifier, {TINY}, stages: {stages}}}}}",
        rounds=1,
    )
    info = json.loads((run / "state.json").read_text())["member_info"]["classifier"]
    mlm, finetune = info["stages"]
    assert (mlm["stage"], finetune["stage"]) == ("mlm", "finetune")
    assert mlm["dev_mlm_loss_after"] < mlm["dev_mlm_loss_before"]
    assert "accuracy" in mlm["dev"] and "accuracy" in finetune["dev"]  # each stage evaluated
    mlm_ckpt = next((run / "ray").glob("classifier-r1-mlm0/checkpoint_*/hf")).parent
    after_mlm = AutoModelForSequenceClassification.from_pretrained(mlm_ckpt / "hf").state_dict()
    final = _weights(run, "classifier")
    encoder = [k for k in final if "encoder.layer" in k]
    assert encoder and all(torch.allclose(final[k], after_mlm[k], atol=1e-6) for k in encoder)
