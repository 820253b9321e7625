"""One training job of one member (`MemberJob`) and the step arithmetic every stage shares.

Plain data and pure helpers, imported by the Ray Train worker (`training.worker`) and the MLM
stage (`training.mlm`) alike, so neither imports the other.
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


@dataclass
class MemberJob:
    """Everything a worker needs for one stage of one member in one round (plain, picklable)."""

    name: str
    member: MemberConfig
    stage: StageConfig
    num_labels: int
    class_intensity: list[float]
    max_length: int
    seed: int
    round: int  # 1-based
    repeats: int  # how many rounds run this stage (sets the LR schedule's length)
    repeat: int  # 1-based index of this run of the stage
    splits: Any  # ObjectRef[Splits]
    guidance: Any = None  # ObjectRef[dict[str, np.ndarray]] aligned with the training split
    weights: LossWeights = field(default_factory=LossWeights)
    init_checkpoint: Any = None  # ray.train.Checkpoint: the previous job's final checkpoint
    resume_optimizer: bool = False  # same stage again: keep optimizer + schedule state
    teacher_checkpoint: Any = None  # ray.train.Checkpoint: a student starts from its teacher
    backend: str = "deepspeed"
    progress_actor: str | None = None
    log_every: int = 10


def steps_per_epoch(n_train: int, world: int, micro_batch: int, grad_accum: int) -> int:
    """Micro-batches per epoch on each rank, a multiple of grad_accum."""
    micro = (n_train // world) // micro_batch
    return max(grad_accum, micro - micro % grad_accum)


def stage_micro_steps(epochs: float, per_epoch: int, grad_accum: int) -> int:
    steps = math.ceil(epochs * per_epoch)
    return max(grad_accum, steps - steps % grad_accum)


def optim_settings(job: MemberJob, total_steps: int) -> OptimSettings:
    """The optimiser and DeepSpeed settings of ``job`` over ``total_steps`` optimiser steps."""
    m = job.member
    return OptimSettings(
        lr=job.stage.lr or m.lr,
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
