"""`MemberRunner`: the Ray actor that owns one member across rounds.

It runs the member's stage jobs as Ray Train `TorchTrainer`s (DeepSpeed inside each worker),
copies each result's `save_pretrained` export into the run directory, evaluates each stage on dev
and predicts on train/dev/test. It returns plain numpy arrays and dicts, never engines.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from ensemble.models.members import count_parameters, load_exported
from ensemble.rundir import atomic_replace_dir
from ensemble.training.job import HF_DIR, MemberSpec, StageJob, train_config
from ensemble.training.loop import encode, predict_logits
from ensemble.training.worker import train_member

logger = logging.getLogger(__name__)


@ray.remote
class MemberRunner:
    """Holds its member's `MemberSpec`, given once; every job it runs gets it with the stage."""

    def __init__(self, spec: MemberSpec, run_dir: str, storage_path: str, max_failures: int,
                 eval_batch_size: int, export_dir: str | None = None):
        self.spec = spec
        self.run_dir = Path(run_dir)
        self.storage_path = storage_path
        self.max_failures = max_failures
        self.eval_batch_size = eval_batch_size
        self.export_dir = (Path(export_dir) if export_dir
                           else self.run_dir / "members" / spec.name / "export")

    def fit(self, job: StageJob, key: str) -> tuple[Any, dict[str, Any]]:
        """Run one stage job to completion; a re-run with the same key resumes its checkpoint."""
        m = self.spec.member
        resources = {"CPU": m.cpus_per_worker}
        if m.gpus_per_worker:
            resources["GPU"] = m.gpus_per_worker
        trainer = TorchTrainer(
            train_member,
            train_loop_config=train_config(self.spec, job),
            scaling_config=ScalingConfig(num_workers=m.num_workers, use_gpu=m.gpus_per_worker > 0,
                                         resources_per_worker=resources),
            run_config=RunConfig(
                name=f"{self.spec.name}-{key}",
                storage_path=self.storage_path,
                failure_config=FailureConfig(max_failures=self.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=1),
            ),
        )
        result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError(f"member {self.spec.name} job {key} finished without a checkpoint")
        return result.checkpoint, dict(result.metrics or {})

    def run_round(self, jobs: list[StageJob], predict_train: bool) -> dict[str, Any]:
        """Run the round's stage jobs in order, each starting from the last one's output."""
        t0 = time.time()
        checkpoint = jobs[0].init_checkpoint
        history: list[dict[str, Any]] = []
        stages: list[dict[str, Any]] = []
        samples_per_s = []
        stopped = False
        splits = ray.get(jobs[0].splits)
        for i, job in enumerate(jobs):
            if i > 0:
                job = dataclasses.replace(job, init_checkpoint=checkpoint, resume_optimizer=False)
            key = f"r{job.round}-{job.stage.name}{i if len(jobs) > 1 else ''}"
            checkpoint, metrics = self.fit(job, key)
            history += metrics.get("history", [])
            samples_per_s.append(metrics.get("samples_per_s", 0.0))
            self._export(checkpoint)
            stage = {"round": job.round, "stage": job.stage.name,
                     "train_loss": metrics.get("loss")}
            for k in ("dev_mlm_loss_before", "dev_mlm_loss_after", "evals", "best", "stopped"):
                if k in metrics:
                    stage[k] = metrics[k]
            if len(jobs) > 1:  # evaluate each stage of a multi-stage schedule on dev
                stage["dev"] = self._dev_summary(splits)
            stages.append(stage)
            if metrics.get("stopped"):  # early stopping ends the member's training
                stopped = True
                break
        result = self.predict(splits, predict_train)
        info = {"kind": self.spec.member.kind, "train_wall_s": time.time() - t0, "stages": stages,
                "samples_per_s": float(np.mean(samples_per_s)) if samples_per_s else 0.0,
                **result["info"]}
        return {"checkpoint": checkpoint.path, "export": str(self.export_dir),
                "history": history, "outputs": result["outputs"], "info": info,
                "stopped": stopped}

    def export_from(self, checkpoint_path: str) -> None:
        """Re-create the export from a stored checkpoint (resume, or a PBT-cloned state)."""
        self._export(ray.train.Checkpoint(checkpoint_path))

    def _export(self, checkpoint: Any) -> None:
        with checkpoint.as_directory() as d:
            tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=self.export_dir.parent
                                        if self.export_dir.parent.exists() else None))
            shutil.rmtree(tmp)
            shutil.copytree(Path(d) / HF_DIR, tmp)
        self.export_dir.parent.mkdir(parents=True, exist_ok=True)
        atomic_replace_dir(tmp, self.export_dir)

    def _model(self):
        model, tokenizer = load_exported(self.export_dir)
        return model.eval(), tokenizer

    def _outputs(self, model, tokenizer, texts: list[str], max_length: int) -> np.ndarray:
        ids = encode(tokenizer, texts, max_length)
        logits = predict_logits(model, ids, tokenizer.pad_token_id, self.eval_batch_size)
        return logits[:, 0] if self.spec.member.kind == "regressor" else logits

    def _dev_summary(self, splits: Any) -> dict[str, float]:
        """Dev accuracy (classification) / Pearson r (intensity) of the current export."""
        from ensemble.metrics import regression_metrics

        model, tokenizer = self._model()
        out = self._outputs(model, tokenizer, splits.texts["dev"], self.spec.max_length)
        if self.spec.member.kind == "regressor":
            if splits.intensity is None:
                return {}
            return {"pearson": regression_metrics(splits.intensity["dev"], out)["pearson"]}
        return {"accuracy": float((out.argmax(1) == splits.labels["dev"]).mean())}

    def predict(self, splits_ref: Any, predict_train: bool) -> dict[str, Any]:
        """Outputs on each split: logits (N, C) for classification, intensities (N,) otherwise."""
        splits = ray.get(splits_ref) if isinstance(splits_ref, ray.ObjectRef) else splits_ref
        torch.set_num_threads(max(1, int(self.spec.member.cpus_per_worker)))
        model, tokenizer = self._model()
        max_length = self.spec.max_length
        outputs: dict[str, np.ndarray] = {}
        info: dict[str, Any] = {"params": count_parameters(model)}
        for split in ("dev", "test") + (("train",) if predict_train else ()):
            if split not in splits.texts:
                continue
            t0 = time.perf_counter()
            outputs[split] = self._outputs(model, tokenizer, splits.texts[split], max_length)
            if split == "dev":
                info["infer_ms_per_text"] = 1000 * (time.perf_counter() - t0) / len(
                    splits.texts[split])
        return {"outputs": outputs, "info": info}
