"""Experiment tracking of `ensemble train`: MLflow and TensorBoard, both optional.

* **MLflow**, when ``MLFLOW_TRACKING_URI`` is set (experiment ``MLFLOW_EXPERIMENT_NAME``, else the
  config's ``name``). The run directory keeps its MLflow run id in ``tracking.json``, so a resumed
  run logs into the same MLflow run.
* **TensorBoard** event files under ``<run_dir>/tensorboard/`` (tensorboardX).

`orchestrate.train` calls a `Tracker` at three points:

1. `Tracker.start_run`: the resolved config as parameters (dotted keys: ``members.student.lr``);
2. `Tracker.log_round`, after every round: each member's training losses (step: optimizer step)
   and the round's dev metrics of every member and the ensemble (step: round);
3. `Tracker.log_published`, after publish: the final dev/test metrics, each member's size and
   speed, the combiner, the plots, the model cards and the run's JSON files.

A missing package, an unreachable server or a refused call logs a warning naming the cause and
turns that backend off: tracking never stops a training run.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import uuid
from pathlib import Path
from typing import Any, Protocol

from ensemble import config as C
from ensemble.rundir import atomic_write_json, read_json

logger = logging.getLogger(__name__)

TRACKING_FILE = "tracking.json"
TENSORBOARD_DIR = "tensorboard"
INSTALL = 'pip install -e ".[tracking]"'
_KEY_RE = re.compile(r"[^A-Za-z0-9_\-./ ]")  # the characters MLflow takes in a key
_MAX_PARAM = 500  # characters of a param value (the limit of older MLflow servers)
_RUN_FILES = ("metrics.json", "manifest.json", "rounds.json", "config.yaml", "index.html")
_MEMBER_INFO = ("params", "samples_per_s", "train_wall_s", "infer_ms_per_text", "size_ratio",
                "speedup")


def package_available(package: str, purpose: str) -> bool:
    """True when ``package`` imports; else a warning naming ``purpose``, the error and the fix."""
    try:
        importlib.import_module(package)
    except ImportError as err:
        logger.warning("%s, but %s cannot be imported (%s), so nothing is logged there; install "
                       "it with %s", purpose, package, err, INSTALL)
        return False
    return True


class Sink(Protocol):
    """One tracking backend."""

    name: str

    def params(self, values: dict[str, str]) -> None: ...

    def scalars(self, values: dict[str, float], step: int) -> None: ...

    def files(self, paths: list[Path], folder: str) -> None: ...

    def close(self, status: str) -> None: ...


class MLflowSink:
    """One MLflow run per run directory, resumed through ``tracking.json``."""

    name = "MLflow"

    def __init__(self, uri: str, experiment: str, run_dir: Path) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(uri)
        saved = run_dir / TRACKING_FILE
        previous = read_json(saved).get("mlflow", {}) if saved.is_file() else {}
        self.run_id = previous.get("run_id") if previous.get("tracking_uri") == uri else None
        if self.run_id is not None:
            self.client.update_run(self.run_id, status="RUNNING")
            self.logged = dict(self.client.get_run(self.run_id).data.params)
            logger.info("MLflow: resuming run %s at %s", self.run_id, uri)
        else:
            found = self.client.get_experiment_by_name(experiment)
            exp_id = found.experiment_id if found else self.client.create_experiment(experiment)
            run = self.client.create_run(exp_id, run_name=run_dir.name,
                                         tags={"run_dir": str(run_dir)})
            self.run_id, self.logged = run.info.run_id, {}
            atomic_write_json(saved, {"mlflow": {"tracking_uri": uri, "experiment": experiment,
                                                 "run_id": self.run_id}})
            logger.info("MLflow: run %s in experiment %r at %s", self.run_id, experiment, uri)

    def params(self, values: dict[str, str]) -> None:
        from mlflow.entities import Param, RunTag

        new = {k: v for k, v in values.items() if k not in self.logged}
        # MLflow params cannot change: a value changed on resume (e.g. training.rounds) is a tag
        changed = {k: v for k, v in values.items() if k in self.logged and self.logged[k] != v}
        items = list(new.items())
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in items[i:i + 100]])
        if changed:
            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in changed.items()])
        self.logged.update(new)

    def scalars(self, values: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, step) for k, v in values.items()]
        for i in range(0, len(items), 1000):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def files(self, paths: list[Path], folder: str) -> None:
        for path in paths:
            self.client.log_artifact(self.run_id, str(path), folder or None)

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)


class TensorBoardSink:
    """Event files under ``<run_dir>/tensorboard``: scalars, the config, plots, the manifest."""

    name = "TensorBoard"

    def __init__(self, run_dir: Path) -> None:
        from tensorboardX import SummaryWriter

        # the default file name has whole seconds only: a resume within the same second would
        # overwrite the first file
        suffix = f".{uuid.uuid4().hex[:8]}"
        self.writer = SummaryWriter(str(run_dir / TENSORBOARD_DIR), filename_suffix=suffix)

    def params(self, values: dict[str, str]) -> None:
        lines = "\n".join(f"    {k}: {v}" for k, v in sorted(values.items()))
        self.writer.add_text("config", lines)  # indented: a code block in TensorBoard's markdown

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def files(self, paths: list[Path], folder: str) -> None:
        import matplotlib.image

        for path in paths:
            tag = f"{folder}/{path.stem}" if folder else path.stem
            if path.suffix == ".png":
                image = matplotlib.image.imread(str(path))[..., :3]  # (H, W, 3), RGBA -> RGB
                self.writer.add_image(tag, image, dataformats="HWC")
            else:
                text = "\n".join("    " + line for line in path.read_text().splitlines())
                self.writer.add_text(tag, text)
        self.writer.flush()

    def close(self, status: str) -> None:
        self.writer.close()


class Tracker:
    """Fans each call out to the sinks; a sink whose call fails is warned about and dropped."""

    def __init__(self, sinks: list[Sink]) -> None:
        self.sinks = list(sinks)

    def _each(self, what: str, call: Any) -> None:
        for sink in list(self.sinks):
            try:
                call(sink)
            except Exception as err:  # tracking must never end a training run
                logger.warning("%s tracking is off for the rest of this run: logging %s failed "
                               "with %s: %s", sink.name, what, type(err).__name__, err)
                self.sinks.remove(sink)

    def start_run(self, cfg: C.RunConfig) -> None:
        """Log the resolved config as parameters."""
        values = flat_params(C.to_dict(cfg))
        self._each("the config", lambda s: s.params(values))

    def log_round(self, row: dict[str, Any], history: dict[str, list[dict[str, Any]]]) -> None:
        """Log round ``row["round"]``: the members' training losses and the round's dev metrics.

        Args:
            row: the round's row of ``rounds.json`` (``dev`` metrics per model, temperatures).
            history: member -> its training points (``round``, ``stage``, ``step``, losses).
        """
        r = int(row["round"])
        for name, points in history.items():
            for p in (p for p in points if p.get("round") == r):
                losses = {f"train/{name}/{p['stage']}/{k}": float(v) for k, v in p.items()
                          if k not in ("round", "stage", "step") and _number(v)}
                self._each("training losses", lambda s, v=losses, t=p["step"]: s.scalars(v, t))
        values = flat_metrics(row.get("dev", {}), "dev")
        if row.get("regressor_sharpness") is not None:
            values["dev/regressor_sharpness"] = float(row["regressor_sharpness"])
        self._each(f"round {r}", lambda s: s.scalars(values, r))

    def log_published(self, run_dir: Path) -> None:
        """Log the finished run: final metrics, member info, combiner, plots, cards, run files."""
        metrics = read_json(run_dir / "metrics.json")
        step = int(metrics.get("rounds", 0))
        values: dict[str, float] = {}
        for split in ("dev", "test"):
            values.update(flat_metrics(metrics.get(split, {}), f"final_{split}"))
        for name, info in metrics.get("members", {}).items():
            values.update({f"member/{name}/{k}": float(info[k]) for k in _MEMBER_INFO
                           if _number(info.get(k))})
        self._each("the final metrics", lambda s: s.scalars(values, step))
        combine = metrics.get("combine", {})
        chosen = {"published.combine_method": str(combine.get("method"))}
        chosen.update({f"published.weight.{k}": f"{v:.6g}"
                       for k, v in (combine.get("weights") or {}).items()})
        self._each("the combiner", lambda s: s.params(chosen))
        plots = sorted((run_dir / "plots").glob("*.png"))
        cards = sorted((run_dir / "members").glob("*/export/README.md"))
        files = [run_dir / f for f in _RUN_FILES if (run_dir / f).is_file()]
        self._each("the plots", lambda s: s.files(plots, "plots"))
        for card in cards:  # members/<name>/export/README.md -> cards/<name>/README.md
            self._each("a model card", lambda s, c=card: s.files([c], f"cards/{c.parts[-3]}"))
        self._each("the run files", lambda s: s.files(files, ""))

    def close(self, status: str = "FINISHED") -> None:
        """End the tracked run: ``FINISHED``, ``FAILED`` or ``KILLED``."""
        self._each("the end of the run", lambda s: s.close(status))


def start(cfg: C.RunConfig, run_dir: Path) -> Tracker:
    """A `Tracker` with MLflow (when ``MLFLOW_TRACKING_URI`` is set) and TensorBoard.

    Each backend whose package is missing or that cannot open its run is left out with a warning.
    """
    sinks: list[Sink] = []
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri and package_available("mlflow", "MLFLOW_TRACKING_URI is set"):
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or cfg.name
        try:
            sinks.append(MLflowSink(uri, experiment, run_dir))
        except Exception as err:  # a bad URI or an unreachable server: train without it
            logger.warning("MLflow tracking is off: cannot open a run at %s (%s: %s)", uri,
                           type(err).__name__, err)
    if package_available("tensorboardX", f"TensorBoard files go to {run_dir / TENSORBOARD_DIR}"):
        sinks.append(TensorBoardSink(run_dir))
    tracker = Tracker(sinks)
    tracker.start_run(cfg)
    return tracker


def flat_params(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> ``{"members.student.lr": "0.0001"}``; lists as JSON, values cut to 500."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = _KEY_RE.sub("_", f"{prefix}{key}")
        if isinstance(value, dict) and value:
            out.update(flat_params(value, f"{name}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            out[name] = text[:_MAX_PARAM]
    return out


def flat_metrics(rows: dict[str, Any], prefix: str) -> dict[str, float]:
    """``{model: {metric: x}}`` -> ``{"<prefix>/<model>/<metric>": x}``, numbers only."""
    return {
        _KEY_RE.sub("_", f"{prefix}/{model}/{key}"): float(value)
        for model, row in rows.items() if isinstance(row, dict)
        for key, value in row.items() if _number(value)
    }


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
