"""Experiment tracking: a real file-store MLflow and real TensorBoard event files, no Ray.

The end-to-end run in tests/e2e/test_train.py logs a whole training run; these tests cover the
tracker's own rules: resuming the MLflow run, params that change on resume, and that a missing
package is a warning, not a crash (also for `ensemble tune`).
"""

from __future__ import annotations

import logging
import struct
import sys
from pathlib import Path

import pytest

from ensemble import config as C
from ensemble import tracking

REPO = Path(__file__).resolve().parents[2]
ROW = {
    "round": 1,
    "dev": {"classifier": {"accuracy": 0.5, "nll": 1.2}, "ensemble/soft_vote": {"accuracy": 0.6}},
    "regressor_sharpness": 3.0,
}
HISTORY = {
    "classifier": [
        {"round": 1, "stage": "finetune", "step": 2, "loss": 1.5},
        {"round": 1, "stage": "finetune", "step": 4, "loss": 1.25},
    ]
}


def tensorboard_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the event files under ``logdir``: tag -> [(step, value)], in file order.

    Event files are TFRecords: a little-endian u64 length, its CRC, the ``Event`` proto, its CRC.
    """
    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at < len(data):
            size = struct.unpack("<Q", data[at : at + 8])[0]
            event = Event.FromString(data[at + 12 : at + 12 + size])
            at += 12 + size + 4
            for v in event.summary.value:
                if v.HasField("simple_value"):
                    out.setdefault(v.tag, []).append((event.step, round(v.simple_value, 6)))
    return out


def _cfg(*overrides: str) -> C.RunConfig:
    return C.load(REPO / "configs" / "tiny.yaml", list(overrides))


@pytest.fixture()
def mlflow_uri(tmp_path, monkeypatch) -> str:
    pytest.importorskip("mlflow")
    uri = f"file:{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses file stores without
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    return uri


def test_flat_params_and_metrics_use_dotted_and_slashed_keys() -> None:
    params = tracking.flat_params({"members": {"student": {"lr": 1e-4, "stages": []}}, "x": None})
    assert params == {"members.student.lr": "0.0001", "members.student.stages": "[]", "x": "null"}
    rows = {"ensemble/soft_vote": {"accuracy": 0.5, "per_class": {"a": 1.0}, "ok": True}}
    assert tracking.flat_metrics(rows, "test") == {"test/ensemble/soft_vote/accuracy": 0.5}


def test_mlflow_and_tensorboard_log_a_run_and_a_resume_continues_it(tmp_path, mlflow_uri):
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    tracker = tracking.start(_cfg("training.rounds=1"), run_dir)
    assert [s.name for s in tracker.sinks] == ["MLflow", "TensorBoard"]
    tracker.log_round(ROW, HISTORY)
    tracker.close("FINISHED")
    run_id = tracking.read_json(run_dir / tracking.TRACKING_FILE)["mlflow"]["run_id"]

    client = MlflowClient(mlflow_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "tiny"
    assert run.data.params["training.rounds"] == "1"
    assert run.data.params["members.student.teacher"] == "teacher"
    assert run.data.metrics["dev/ensemble/soft_vote/accuracy"] == 0.6
    assert run.data.metrics["dev/regressor_sharpness"] == 3.0
    losses = client.get_metric_history(run_id, "train/classifier/finetune/loss")
    assert [(m.step, m.value) for m in losses] == [(2, 1.5), (4, 1.25)]

    # resumed with more rounds: the same MLflow run; the changed param becomes a tag
    tracker = tracking.start(_cfg("training.rounds=2"), run_dir)
    tracker.log_round({**ROW, "round": 2}, {"classifier": [{**HISTORY["classifier"][0],
                                                           "round": 2, "step": 6}]})
    tracker.close("FINISHED")
    run = client.get_run(run_id)
    assert run.data.params["training.rounds"] == "1" and run.data.tags["training.rounds"] == "2"
    history = client.get_metric_history(run_id, "dev/classifier/accuracy")
    assert sorted(m.step for m in history) == [1, 2]
    assert len(client.search_runs([run.info.experiment_id])) == 1

    scalars = tensorboard_scalars(run_dir / tracking.TENSORBOARD_DIR)
    assert sorted(scalars["train/classifier/finetune/loss"]) == [(2, 1.5), (4, 1.25), (6, 1.5)]
    # one event file per process; their order on disk is not the order they were written in
    assert sorted(scalars["dev/ensemble/soft_vote/accuracy"]) == [(1, 0.6), (2, 0.6)]


def test_missing_packages_give_a_warning_not_a_crash(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    with caplog.at_level(logging.WARNING, logger="ensemble.tracking"):
        tracker = tracking.start(_cfg(), tmp_path)
        tracker.log_round(ROW, HISTORY)
        tracker.close()
    assert tracker.sinks == []
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "MLFLOW_TRACKING_URI is set, but mlflow cannot be imported" in messages
    assert "tensorboardX cannot be imported" in messages and tracking.INSTALL in messages
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "tensorboard").exists()


def test_tune_with_mlflow_uri_and_no_mlflow_warns_instead_of_failing(tmp_path, monkeypatch,
                                                                     caplog):
    from ensemble.tuning.search import callbacks

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with caplog.at_level(logging.WARNING, logger="ensemble.tracking"):
        assert callbacks(_cfg()) == []
    assert "mlflow cannot be imported" in caplog.text


def test_a_failing_backend_is_dropped_with_a_warning(tmp_path, monkeypatch, caplog):
    # a tracking URI no store answers: the run trains on without MLflow
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "unknownscheme://nowhere")
    pytest.importorskip("mlflow")
    with caplog.at_level(logging.WARNING, logger="ensemble.tracking"):
        tracker = tracking.start(_cfg(), tmp_path)
    assert [s.name for s in tracker.sinks] == ["TensorBoard"]
    assert "MLflow tracking is off: cannot open a run at unknownscheme://nowhere" in caplog.text
    tracker.close()
