"""What a training job carries, and the step arithmetic every stage shares.

A member's fixed description (`MemberSpec`) is given to its runner once; each stage it runs is a
`StageJob` with only what changes from job to job. The runner hands both to the Ray Train workers.
Plain data and pure helpers, imported by the worker (`training.worker`) and the MLM stage
(`training.mlm`) alike.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any

from ensemble.config import MemberConfig, StageConfig
from ensemble.losses import LossWeights
from ensemble.training.engine import OptimSettings

HF_DIR = "hf"  # the save_pretrained export inside a member checkpoint


@dataclass(frozen=True)
class MemberSpec:
    """One member as its jobs see it, fixed for a run (plain, picklable)."""

    name: str
    member: MemberConfig
    num_labels: int  # 1 for a regressor
    class_intensity: list[float]
    max_length: int
    seed: int  # the member's own, else the run's
    log_every: int = 10
    progress_actor: str | None = None  # the run's progress board
    backend: str = "deepspeed"


@dataclass
class StageJob:
    """One stage of one member in one round: what changes from job to job (plain, picklable)."""

    stage: StageConfig
    round: int  # 1-based
    repeats: int  # how many rounds run this stage (sets the LR schedule's length)
    repeat: int  # 1-based index of this run of the stage
    splits: Any  # ObjectRef[Splits]
    guidance: Any = None  # ObjectRef[dict[str, np.ndarray]] aligned with the training split
    weights: LossWeights = field(default_factory=LossWeights)
    init_checkpoint: Any = None  # ray.train.Checkpoint: the previous job's final checkpoint
    resume_optimizer: bool = False  # same stage again: keep optimizer + schedule state
    teacher_checkpoint: Any = None  # ray.train.Checkpoint: a student starts from its teacher


def train_config(spec: MemberSpec, job: StageJob) -> dict[str, Any]:
    """The `train_loop_config` of the Ray Train job that runs ``job`` of ``spec``'s member."""
    return {"spec": spec, "job": job}


def steps_per_epoch(n_train: int, world: int, micro_batch: int, grad_accum: int) -> int:
    """Micro-batches per epoch on each rank, a multiple of grad_accum."""
    micro = (n_train // world) // micro_batch
    return max(grad_accum, micro - micro % grad_accum)


def stage_micro_steps(epochs: float, per_epoch: int, grad_accum: int) -> int:
    steps = math.ceil(epochs * per_epoch)
    return max(grad_accum, steps - steps % grad_accum)


def optim_settings(m: MemberConfig, stage: StageConfig, total_steps: int) -> OptimSettings:
    """The optimiser and DeepSpeed settings of member ``m``'s ``stage`` over ``total_steps``."""
    return OptimSettings(
        lr=stage.lr or m.lr,
        weight_decay=m.weight_decay,
        scheduler=m.scheduler,
        warmup_ratio=m.warmup_ratio,
        total_steps=max(1, total_steps),
        micro_batch_size=m.micro_batch_size,
        grad_accum=m.grad_accum,
        max_grad_norm=m.max_grad_norm,
        zero_stage=m.zero_stage,
        precision=m.precision,
        deepspeed_extra=dict(m.deepspeed_extra),
    )


def start_dir(restored: Any, init: Any):
    """The directory to start from: this job's own restored checkpoint, else the previous job's."""
    if restored is not None:
        return restored.as_directory()
    if init is not None:
        return init.as_directory()
    return contextlib.nullcontext(None)
