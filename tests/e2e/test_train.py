"""`ensemble train` end to end on a local Ray with the real SST data and tiny random-init members.

One run is trained for one round, then resumed to two rounds, then run a third time when it is
already finished; the tests below inspect what each step left in the run directory. A second run
is SIGKILLed mid-round (driver, Ray and workers) and then completed by the same command.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers_procs import kill_session, session_pids

from ensemble.cli import main
from ensemble.rundir import Manifest, read_json

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"
MEMBERS = {
    "classifier": "classifier",
    "regressor": "regressor",
    "teacher": "teacher",
    "student": "student",
}


def _train_args(run_dir: Path, sst_dir: Path, rounds: int) -> list[str]:
    return [
        "train",
        str(TINY),
        "--output-dir",
        str(run_dir),
        "--no-progress",
        f"data.source={sst_dir}",
        "data.max_train_samples=128",
        "data.max_eval_samples=64",
        # lr 1e-2 for a few epochs: a random-init encoder needs it to get past the class prior
        "member_defaults.lr=1e-2",
        "member_defaults.epochs=3",
        "member_defaults.cpus_per_worker=0.5",  # the three first-phase members run together
        "training.log_every=2",
        f"training.rounds={rounds}",
    ]


def _ray_runs(run_dir: Path) -> dict[str, dict[str, float]]:
    """Ray Train run name -> {checkpoint file: mtime} under the run's storage."""
    out = {}
    for run in sorted((run_dir / "ray").iterdir()):
        if run.is_dir():
            out[run.name] = {
                str(p.relative_to(run)): p.stat().st_mtime_ns
                for p in run.rglob("*")
                if p.is_file() and "checkpoint_" in str(p)
            }
    return out


@dataclass
class Trained:
    run_dir: Path
    state1: dict[str, Any]
    runs1: dict[str, dict[str, float]]
    state2: dict[str, Any]
    runs2: dict[str, dict[str, float]]
    manifest2_mtime: int
    wall: dict[str, float]
    runs3: dict[str, dict[str, float]]
    manifest3_mtime: int
    mlflow_uri: str


@pytest.fixture(scope="module")
def mlflow_env(tmp_path_factory):
    """Every `ensemble train` of the module logs to a file-store MLflow (the `tracking` extra)."""
    pytest.importorskip("mlflow", reason='the tracking extra: pip install -e ".[tracking]"')
    uri = f"file:{tmp_path_factory.mktemp('mlflow') / 'mlruns'}"
    env = {"MLFLOW_TRACKING_URI": uri, "MLFLOW_ALLOW_FILE_STORE": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield uri
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def trained(ray_local, sst_dir: Path, tmp_path_factory, mlflow_env: str) -> Trained:
    run_dir = tmp_path_factory.mktemp("train") / "run"
    wall = {}
    t0 = time.perf_counter()
    assert main(_train_args(run_dir, sst_dir, rounds=1)) == 0
    wall["round1"] = time.perf_counter() - t0
    state1, runs1 = read_json(run_dir / "state.json"), _ray_runs(run_dir)

    t0 = time.perf_counter()
    assert main(_train_args(run_dir, sst_dir, rounds=2)) == 0  # resumes after round 1
    wall["round2"] = time.perf_counter() - t0
    state2, runs2 = read_json(run_dir / "state.json"), _ray_runs(run_dir)
    mtime2 = (run_dir / "manifest.json").stat().st_mtime_ns

    t0 = time.perf_counter()
    assert main(_train_args(run_dir, sst_dir, rounds=2)) == 0  # already finished
    wall["rerun"] = time.perf_counter() - t0
    return Trained(
        run_dir,
        state1,
        runs1,
        state2,
        runs2,
        mtime2,
        wall,
        _ray_runs(run_dir),
        (run_dir / "manifest.json").stat().st_mtime_ns,
        mlflow_env,
    )


def test_run_directory_holds_metrics_plots_predictions_and_exports(trained: Trained) -> None:
    run_dir = trained.run_dir
    manifest = Manifest.load(run_dir)
    assert manifest.rounds_completed == 2 and manifest.rounds_planned == 2
    assert {n: m.kind for n, m in manifest.members.items()} == MEMBERS
    assert manifest.combine.method in ("soft_vote", "weighted", "caruana", "stacking")

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["rounds"] == 2
    for split in ("dev", "test"):
        for name in ("classifier", "teacher", "student"):
            row = metrics[split][name]
            assert {"accuracy", "macro_f1", "per_class", "confusion"} <= set(row)
            assert 0.0 <= row["accuracy"] <= 1.0 and len(row["confusion"]) == 5
            assert sum(map(sum, row["confusion"])) == 64
        assert {"pearson", "spearman", "mae"} <= set(metrics[split]["regressor"])
        assert any(k.startswith("ensemble/") for k in metrics[split])
    student = metrics["members"]["student"]
    assert 0 < student["size_ratio"] < 1 and student["speedup"] > 0

    plots = sorted(p.name for p in (run_dir / "plots").glob("*.png"))
    assert {"learning_curves.png", "rounds.png", "confusion_classifier.png", "reliability.png",
            "disagreement.png", "intensity.png", "cascade.png"} <= set(plots)
    assert all((run_dir / "plots" / p).stat().st_size > 1000 for p in plots)
    page = (run_dir / "index.html").read_text()  # every plot beside the metrics table
    assert all(f'<img src="plots/{p}"' in page for p in plots)
    assert f'<tr class="published"><td>ensemble/{manifest.combine.method}</td>' in page

    with np.load(run_dir / "predictions" / "dev.npz") as dev:
        assert dev["labels"].shape == (64,) and dev["intensity"].shape == (64,)
        assert dev["regressor"].shape == (64,)
        for name in ("classifier", "teacher", "student"):
            assert dev[name].shape == (64, 5)
            np.testing.assert_allclose(dev[name].sum(1), 1.0, rtol=1e-4)  # probabilities


def test_exports_load_with_plain_transformers(trained: Trained) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    manifest = Manifest.load(trained.run_dir)
    texts = ["a gorgeous , witty film", "dull and far too long"]
    for name, entry in manifest.members.items():
        path = manifest.member_path(trained.run_dir, name)
        model = AutoModelForSequenceClassification.from_pretrained(path).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        with torch.no_grad():
            logits = model(**dict(tokenizer(texts, padding=True, return_tensors="pt"))).logits
        assert logits.shape == (2, entry.num_labels) and torch.isfinite(logits).all()
        assert model.config.num_hidden_layers == (1 if name == "student" else 2)


def test_exports_carry_a_model_card_and_name_their_labels_in_a_pipeline(
    trained: Trained,
) -> None:
    from transformers import pipeline

    manifest = Manifest.load(trained.run_dir)
    metrics = json.loads((trained.run_dir / "metrics.json").read_text())
    for name, entry in manifest.members.items():
        card = (manifest.member_path(trained.run_dir, name) / "README.md").read_text()
        assert card.startswith("---\nlibrary_name: transformers\n")
        assert f"# tiny: {name}" in card and "round 2 " in card  # both rounds' stages
        key = "pearson" if entry.kind == "regressor" else "accuracy"
        for split in ("dev", "test"):
            assert f"{metrics[split][name][key]:.4f}" in card  # the run's own numbers
        assert "128 texts" in card and "## Training" in card  # the data, how it trained
    text = "a gorgeous , witty film"
    export = str(manifest.member_path(trained.run_dir, "classifier"))
    (scores,) = pipeline("text-classification", model=export, top_k=None)([text])
    assert sorted(s["label"] for s in scores) == sorted(manifest.label_names)
    assert sum(s["score"] for s in scores) == pytest.approx(1.0, abs=1e-5)
    export = str(manifest.member_path(trained.run_dir, "regressor"))
    (out,) = pipeline("text-classification", model=export, function_to_apply="none")(text)
    assert out["label"] == "intensity" and np.isfinite(out["score"])


def test_training_is_tracked_in_mlflow_and_tensorboard(trained: Trained) -> None:
    from mlflow.tracking import MlflowClient

    run_dir = trained.run_dir
    run_id = read_json(run_dir / "tracking.json")["mlflow"]["run_id"]
    client = MlflowClient(trained.mlflow_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert len(client.search_runs([run.info.experiment_id])) == 1  # the resume logged here too
    params, tags, values = run.data.params, run.data.tags, run.data.metrics
    assert params["members.student.teacher"] == "teacher" and params["data.max_length"] == "32"
    assert params["training.rounds"] == "1" and tags["training.rounds"] == "2"  # set on resume
    for name, kind in MEMBERS.items():
        key = "pearson" if kind == "regressor" else "accuracy"
        rounds = client.get_metric_history(run_id, f"dev/{name}/{key}")
        assert sorted(m.step for m in rounds) == [1, 2]
        stage = trained.state2["history"][name][0]["stage"]
        steps = client.get_metric_history(run_id, f"train/{name}/{stage}/loss")
        assert sorted(m.step for m in steps) == [p["step"] for p in trained.state2["history"][name]]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert values["final_test/classifier/accuracy"] == pytest.approx(
        metrics["test"]["classifier"]["accuracy"]
    )
    assert values["member/student/size_ratio"] == pytest.approx(
        metrics["members"]["student"]["size_ratio"]
    )
    assert params["published.combine_method"] == metrics["combine"]["method"]
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"manifest.json", "metrics.json", "index.html", "plots", "cards"} <= artifacts
    plots = {Path(a.path).name for a in client.list_artifacts(run_id, "plots")}
    assert plots == {p.name for p in (run_dir / "plots").glob("*.png")}
    card = client.download_artifacts(run_id, "cards/student/README.md")
    assert Path(card).read_text() == (run_dir / "members/student/export/README.md").read_text()
    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 2  # one per training command; the finished re-run logs nothing
    logged = b"".join(e.read_bytes() for e in events)
    assert b"dev/ensemble/" in logged and b"train/student/distill/loss" in logged


def test_each_members_training_loss_goes_down(trained: Trained) -> None:
    for name in MEMBERS:
        points = trained.state2["history"][name]
        assert {p["round"] for p in points} == {1, 2}
        steps = [p["step"] for p in points]
        assert steps == sorted(steps) and len(set(steps)) == len(steps)  # one curve over rounds
        losses = [p["loss"] for p in points]
        first, last = np.mean(losses[:3]), np.mean(losses[-3:])
        assert last < first, (name, losses)


def test_resume_trains_round_two_only(trained: Trained) -> None:
    s1, s2 = trained.state1, trained.state2
    assert s1["rounds_completed"] == 1 and s2["rounds_completed"] == 2
    assert [row["round"] for row in s2["rounds"]] == [1, 2]
    assert read_json(trained.run_dir / "rounds.json") == s2["rounds"]
    for name in MEMBERS:
        round1 = [p for p in s2["history"][name] if p["round"] == 1]
        assert round1 == s1["history"][name]  # round 1's curve is not appended again
    # round 1's Ray Train runs are untouched: same checkpoint files, same mtimes
    r1 = {k: v for k, v in trained.runs2.items() if "-r1-" in k}
    assert r1 == trained.runs1
    r2 = sorted(k for k in trained.runs2 if "-r2-" in k)
    assert r2 == [
        "classifier-r2-finetune",
        "regressor-r2-finetune",
        "student-r2-distill",
        "teacher-r2-finetune",
    ]
    assert all(trained.runs2[k] for k in r2)  # each holds a checkpoint


def test_a_finished_run_returns_without_training(trained: Trained) -> None:
    assert trained.runs3 == trained.runs2
    assert trained.manifest3_mtime == trained.manifest2_mtime
    assert trained.wall["rerun"] < min(trained.wall["round1"], trained.wall["round2"]) / 3


KILL_CONFIG = """\
name: killed
output_dir: unused
data: {{source: {source}, max_train_samples: 64, max_eval_samples: 32, max_length: 32}}
member_defaults:
  pretrained: false
  arch: {{num_hidden_layers: 2, hidden_size: 32, num_attention_heads: 2, intermediate_size: 64}}
  lr: 1.0e-3
  micro_batch_size: 16
  warmup_ratio: 0.0
  cpus_per_worker: 1
members:
  teacher: {{kind: teacher, epochs: 1}}
  # trains after its teacher: 4 steps and a checkpoint an epoch
  student: {{kind: student, teacher: teacher, student_layers: 1, epochs: 30}}
training: {{rounds: 1, log_every: 4}}
ray: {{num_cpus: 2, node_ip_address: 127.0.0.2}}
"""


def _wait_for(predicate, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            pytest.fail(f"training exited early with {proc.returncode}")
        time.sleep(0.5)
    pytest.fail("training did not reach the kill point in time")


def test_killed_run_resumes_and_completes(ray_local, sst_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "killed.yaml"
    config.write_text(KILL_CONFIG.format(source=sst_dir))
    run_dir = tmp_path / "run"
    args = ["train", str(config), "--output-dir", str(run_dir), "--no-progress"]
    log = open(tmp_path / "driver.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ensemble.cli", *args],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    state = run_dir / "state.json"
    student_run = run_dir / "ray" / "student-r1-distill"
    try:
        # kill once the teacher is done and its student is mid-job with a checkpoint
        _wait_for(lambda: state.is_file() and any(student_run.glob("checkpoint_*/hf")), proc,
                  900)
    finally:
        kill_session(proc.pid)
        proc.wait()
        log.close()
    assert proc.returncode == -signal.SIGKILL
    assert not session_pids(proc.pid)  # Ray and its workers went down with the driver
    assert not (run_dir / "manifest.json").exists()
    for path in run_dir.rglob("*.json"):  # every file written so far is whole
        json.loads(path.read_text())
    killed = read_json(state)
    assert killed["rounds_completed"] == 0 and killed["round_done"] == {"1": {"teacher": True}}
    teacher_before = _ray_runs(run_dir)["teacher-r1-finetune"]

    assert main(args) == 0
    manifest = Manifest.load(run_dir)  # valid JSON, complete
    assert manifest.rounds_completed == 1 and set(manifest.members) == {"teacher", "student"}
    done = read_json(state)
    assert done["rounds_completed"] == 1
    # the finished teacher was not trained again; the student ran to its last step
    assert _ray_runs(run_dir)["teacher-r1-finetune"] == teacher_before
    assert done["history"]["student"][-1]["step"] == 30 * 4
