"""Ensemble distillation end to end: after the last round the student learns the published
ensemble's probabilities on the training texts plus an unlabelled corpus, on a local Ray with
DeepSpeed and tiny random-init members; the cached targets are reused when the run resumes.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from ensemble import distill as D
from ensemble.cli import main
from ensemble.rundir import atomic_write_json, read_json

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
CORPUS = 48


@pytest.fixture(scope="module")
def run(ray_local, sst_dir: Path, tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("distill")
    corpus = root / "corpus.csv"
    with open(sst_dir.parent / "vader_groundtruth" / "dev.csv", newline="") as f:
        texts = [row["text"] for _, row in zip(range(CORPUS), csv.DictReader(f), strict=False)]
    with open(corpus, "w", newline="") as f:
        csv.writer(f).writerows([["sentence"]] + [[t] for t in texts])
    out = root / "run"
    args = [str(REPO / "configs" / "tiny.yaml"), "--output-dir", str(out), "--no-progress",
            f"data.source={sst_dir}", "data.max_train_samples=96", "data.max_eval_samples=64",
            "member_defaults.cpus_per_worker=0.5", "distill.student=student",
            "distill.epochs=3", "distill.alpha=1.0", f"distill.corpus={corpus}",
            "distill.corpus_text_column=sentence"]
    assert main(["train", *args]) == 0
    return out, args


def test_the_student_moves_towards_the_ensemble(run) -> None:
    out, _ = run
    d = read_json(out / "state.json")["distill"]
    assert d["done"] and d["texts"] == 96 + CORPUS and d["corpus_texts"] == CORPUS
    assert d["dev_kl_to_ensemble_after"] < d["dev_kl_to_ensemble_before"]
    runs = sorted(p.name for p in (out / "ray").iterdir() if p.is_dir())
    assert "student-r2-distill" in runs  # one job after the single round
    manifest = json.loads((out / "manifest.json").read_text())
    assert "student" in manifest["members"]  # the published student is the distilled one


def test_targets_are_the_ensembles_probabilities_and_are_reused_on_resume(run, capsys) -> None:
    out, args = run
    with np.load(out / D.CACHE) as z:
        probs, key = z["probs"], str(z["key"])
    assert probs.shape == (96 + CORPUS, 5) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    mtime = (out / D.CACHE).stat().st_mtime_ns
    # a run killed during distillation: rounds done, no manifest, distillation not finished
    (out / "manifest.json").unlink()
    state = read_json(out / "state.json")
    state["distill"]["done"] = False
    atomic_write_json(out / "state.json", state)
    capsys.readouterr()
    assert main(["train", *args]) == 0
    assert "ensemble targets for student reused" in capsys.readouterr().out
    assert (out / D.CACHE).stat().st_mtime_ns == mtime
    with np.load(out / D.CACHE) as z:
        assert str(z["key"]) == key
    assert (out / "manifest.json").is_file() and read_json(out / "state.json")["distill"]["done"]
