"""Ensemble distillation end to end: after the last round the student learns the published
ensemble's probabilities on the training texts plus an unlabelled corpus, on a local Ray with
DeepSpeed and tiny random-init members; the cached targets are reused when the run resumes.
`ensemble distill RUN_DIR` then cuts a new student from the finished run.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

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
    cache = out / read_json(out / "state.json")["distill"]["targets"]
    with np.load(cache) as z:
        probs, key = z["probs"], str(z["key"])
    assert probs.shape == (96 + CORPUS, 5) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    mtime = cache.stat().st_mtime_ns
    # a run killed during distillation: rounds done, no manifest, distillation not finished
    (out / "manifest.json").unlink()
    state = read_json(out / "state.json")
    state["distill"]["done"] = False
    atomic_write_json(out / "state.json", state)
    capsys.readouterr()
    assert main(["train", *args]) == 0
    assert "ensemble targets reused" in capsys.readouterr().out
    assert cache.stat().st_mtime_ns == mtime
    with np.load(cache) as z:
        assert str(z["key"]) == key
    assert (out / "manifest.json").is_file() and read_json(out / "state.json")["distill"]["done"]


def test_distill_command_cuts_a_student_from_the_finished_run(run, capsys) -> None:
    from transformers import AutoModelForSequenceClassification

    out, _ = run
    manifest = read_json(out / "manifest.json")
    capsys.readouterr()
    assert main(["distill", str(out), "--layers", "1", "--teacher", "teacher",
                 "--epochs", "2", "--alpha", "1.0"]) == 0
    printed = capsys.readouterr().out
    assert f"STUDENT_DIR={out / 'students' / 'l1'}" in printed
    row = read_json(out / "students" / "l1" / "metrics.json")
    assert row["layers"] == 1 and row["teacher_layers"] == 2 and row["corpus_texts"] == 0
    assert row["texts"] == 96 and row["params"] < row["teacher_params"]
    # the scores are the saved predictions' own: recompute accuracy and the share
    labels = np.load(out / "predictions" / "test.npz")["labels"]
    logits = np.load(out / "students" / "l1" / "predictions.npz")["test"]
    test = row["test"]
    assert test["accuracy"] == pytest.approx(float((logits.argmax(1) == labels).mean()))
    assert test["share_of_ensemble_accuracy"] == pytest.approx(
        test["accuracy"] / test["ensemble_accuracy"])
    published = manifest["metrics"][f"ensemble/{manifest['combine']['method']}"]  # test rows
    assert test["ensemble_accuracy"] == pytest.approx(published["accuracy"], abs=1e-9)
    assert 0.0 <= row["cascade"]["test"]["student_fraction"] <= 1.0
    assert row["cascade"]["max_accuracy_loss"] == 0.005
    # the targets of the training texts alone are cached beside the run's own (train + corpus)
    assert (out / row["targets"]).is_file()
    assert row["targets"] != read_json(out / "state.json")["distill"]["targets"]
    model = AutoModelForSequenceClassification.from_pretrained(out / "students" / "l1" / "export")
    assert model.config.num_hidden_layers == 1 and model.config.num_labels == 5

    # a second call reuses the finished student; a second depth reuses the targets
    assert main(["distill", str(out), "--layers", "1"]) == 0
    assert "already trained" in capsys.readouterr().out
    assert main(["distill", str(out), "--layers", "2", "--epochs", "1",
                 "--teacher", "classifier"]) == 0  # a classifier member works as a teacher
    assert "ensemble targets reused" in capsys.readouterr().out
    assert read_json(out / "students" / "l2" / "metrics.json")["teacher"] == "classifier"


def test_distill_command_rejects_what_it_cannot_do(run, tmp_path, capsys) -> None:
    out, _ = run
    assert main(["distill", str(out), "--layers", "3", "--teacher", "teacher"]) == 2
    assert "the teacher teacher has 2 layers; use 1 to 2" in capsys.readouterr().err
    assert main(["distill", str(out), "--teacher", "regressor"]) == 2
    assert "is not a classifier or teacher member" in capsys.readouterr().err
    assert main(["distill", str(tmp_path)]) == 2
    assert "is not a finished run (no manifest.json)" in capsys.readouterr().err
    assert not (out / "students" / "l3").exists()


def test_a_published_student_answers_first_in_the_cascade_and_never_votes(run, capsys) -> None:
    from ensemble.inference import Ensemble, LoadedMember

    out, _ = run
    texts = ["a gorgeous, witty film", "dull and far too long", "it is a movie",
             "not bad at all", "the worst thing i have seen this year"]
    before = Ensemble.from_run(out).predict(texts)
    assert main(["distill", str(out), "--layers", "1", "--teacher", "teacher", "--epochs", "2",
                 "--alpha", "1.0", "--publish"]) == 0
    assert "published l1 as the cascade's first stage" in capsys.readouterr().out
    manifest = read_json(out / "manifest.json")
    assert manifest["members"]["l1"]["kind"] == "student"
    assert manifest["combine"]["cascade_student"] == "l1"
    assert "l1" not in manifest["combine"]["members"]  # it does not vote
    row = read_json(out / "students" / "l1" / "metrics.json")
    assert manifest["combine"]["params"]["temperatures"]["l1"] == row["temperature"]
    with np.load(out / "predictions" / "dev.npz") as z, \
            np.load(out / "students" / "l1" / "predictions.npz") as s:
        logits = s["dev"]
        probs = np.exp(logits - logits.max(1, keepdims=True))
        np.testing.assert_allclose(z["l1"], probs / probs.sum(1, keepdims=True), rtol=1e-6)

    # the ensemble answers as it did; the cascade's first stage is the published student
    after = Ensemble.from_run(out).predict(texts)
    assert [p.probs for p in after] == [p.probs for p in before]
    student_only = Ensemble.from_run(out, cascade=True, cascade_threshold=0.0)
    assert "l1" in student_only.members and student_only.spec.student == "l1"
    answers = student_only.predict(texts)
    assert {p.answered_by for p in answers} == {"student"}
    raw = LoadedMember(str(out), "l1")(texts)
    scaled = np.exp(np.log(raw) / row["temperature"])
    scaled /= scaled.sum(1, keepdims=True)
    got = np.array([list(p.probs.values()) for p in answers])
    np.testing.assert_allclose(got, scaled, atol=1e-5)
    nobody = Ensemble.from_run(out, cascade=True, cascade_threshold=1.01).predict(texts)
    assert {p.answered_by for p in nobody} == {"ensemble"}
    np.testing.assert_allclose([list(p.probs.values()) for p in nobody],
                               [list(p.probs.values()) for p in before], atol=1e-6)
    fitted = Ensemble.from_run(out, cascade=True)  # the threshold fitted on dev, with l1
    assert fitted.settings.cascade_threshold is not None

    # publishing a name that votes, or one never trained, is refused and writes nothing
    snapshot = (out / "manifest.json").read_bytes()
    assert main(["distill", str(out), "--layers", "1", "--name", "classifier", "--publish"]) == 2
    assert "is a member of the run" in capsys.readouterr().err
    from ensemble.students import publish_student

    with pytest.raises(ValueError, match="no trained student 'l9'"):
        publish_student(out, "l9")
    assert (out / "manifest.json").read_bytes() == snapshot
