"""ensemble.runner.MemberRunner on the session's local Ray, without a training job.

A member checkpoint is what a Ray Train job leaves: a directory whose `hf/` holds the member's
`save_pretrained` export. The actor re-creates its export from one (`export_from`, as on resume)
and predicts every split; its outputs must be the exported model's own logits. `run_round` and
`fit` start a TorchTrainer per stage and are covered by the e2e training tests.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ensemble.config import MemberConfig
from ensemble.data import Splits
from ensemble.models.members import count_parameters
from ensemble.runner import MemberRunner
from ensemble.training.job import HF_DIR, MemberSpec

# two actors, each importing torch, transformers and Ray Train: ~40 s on a busy 2-core machine
pytestmark = pytest.mark.slow

MAX_LENGTH = 12
TEXTS = ["a gripping , funny film", "dull", "not bad at all , really",
         "the plot drags on and on and on and never finds its footing in the last hour"]


def _splits() -> Splits:
    texts = {"train": TEXTS[:3], "dev": TEXTS, "test": TEXTS[1:]}
    labels = {s: np.arange(len(t)) % 3 for s, t in texts.items()}
    return Splits(texts=texts, labels=labels, intensity=None, label_names=["neg", "neu", "pos"])


def _checkpoint(path: Path, model, tokenizer) -> Path:
    model.save_pretrained(path / HF_DIR)
    tokenizer.save_pretrained(path / HF_DIR)
    return path


@torch.no_grad()
def _logits(model, tokenizer, texts: list[str]) -> np.ndarray:
    """The model's logits for the texts, padded together in one batch."""
    batch = tokenizer(texts, truncation=True, max_length=MAX_LENGTH, padding=True,
                      return_tensors="pt")
    return model.eval()(**batch).logits.numpy()


@pytest.fixture(scope="module")
def runners(ray_local, tmp_path_factory):
    """A fresh classifier and regressor runner, one per test; both actors start at once, as
    their processes take seconds to import torch, transformers and Ray Train."""
    root = tmp_path_factory.mktemp("runners")
    actors = {
        name: MemberRunner.options(num_cpus=0).remote(
            MemberSpec(name=name, member=MemberConfig(kind=kind, pretrained=False),
                       num_labels=1 if kind == "regressor" else 3,
                       class_intensity=[0.0, 0.5, 1.0], max_length=MAX_LENGTH, seed=0),
            str(root / "run"), str(root / "ray"), 0, 2)  # eval batches of 2: order is restored
        for name, kind in (("clf", "classifier"), ("reg", "regressor"))
    }
    yield root / "run" / "members", actors
    for actor in actors.values():
        ray_local.kill(actor)


def test_classifier_runner_exports_a_checkpoint_and_predicts_its_logits(
    ray_local, runners, tiny_member, tokenizer, tmp_path: Path
) -> None:
    ray = ray_local
    members, actors = runners
    models = [tiny_member(3, seed=s) for s in (1, 2)]
    ckpts = [_checkpoint(tmp_path / f"ckpt{i}", m, tokenizer) for i, m in enumerate(models)]
    runner = actors["clf"]
    with pytest.raises(ray.exceptions.RayTaskError, match="export"):  # nothing exported yet
        ray.get(runner.predict.remote(_splits(), False))
    ray.get(runner.export_from.remote(str(ckpts[0])))
    export = members / "clf" / "export"
    assert (export / "config.json").is_file() and list(export.glob("*.safetensors"))
    assert (export / "tokenizer.json").is_file()

    splits = _splits()
    result = ray.get(runner.predict.remote(splits, False))
    assert set(result["outputs"]) == {"dev", "test"}  # train only when asked
    for split in ("dev", "test"):
        out = result["outputs"][split]
        assert out.shape == (len(splits.texts[split]), 3)
        np.testing.assert_allclose(out, _logits(models[0], tokenizer, splits.texts[split]),
                                   atol=1e-5)
    assert result["info"]["params"] == count_parameters(models[0])
    assert result["info"]["infer_ms_per_text"] > 0

    # a new checkpoint replaces the export; the splits may come as an object ref
    ray.get(runner.export_from.remote(str(ckpts[1])))
    result = ray.get(runner.predict.remote(ray.put(splits), True))
    assert set(result["outputs"]) == {"train", "dev", "test"}
    np.testing.assert_allclose(result["outputs"]["train"],
                               _logits(models[1], tokenizer, splits.texts["train"]), atol=1e-5)
    assert not np.allclose(result["outputs"]["train"],
                           _logits(models[0], tokenizer, splits.texts["train"]), atol=1e-3)
    assert not list(export.parent.glob(".export-*"))  # no temporary copy left behind


def test_regressor_runner_predicts_one_intensity_per_text(
    ray_local, runners, tiny_member, tokenizer, tmp_path: Path
) -> None:
    ray = ray_local
    members, actors = runners
    model = tiny_member(1, regression=True, seed=3)
    ckpt = _checkpoint(tmp_path / "ckpt", model, tokenizer)
    runner = actors["reg"]
    ray.get(runner.export_from.remote(str(ckpt)))
    assert (members / "reg" / "export" / "config.json").is_file()
    out = ray.get(runner.predict.remote(_splits(), False))["outputs"]["dev"]
    assert out.shape == (len(TEXTS),)
    np.testing.assert_allclose(out, _logits(model, tokenizer, TEXTS)[:, 0], atol=1e-5)

