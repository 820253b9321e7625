"""The per-worker training function that Ray Train runs for one member and one round.

Every worker builds the member, wraps it in a DeepSpeed engine, trains its shard of the data and
checkpoints at every epoch end: each rank writes its own ZeRO shard into the checkpoint, rank 0
adds a `save_pretrained` export, and `ray.train.report` merges them in storage. On a restart (a
lost worker, or the same command run again) training continues from the last checkpoint.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import zlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import torch

from ensemble.config import LOWER_IS_BETTER
from ensemble.models import members as M
from ensemble.training import stages as S
from ensemble.training.checkpoints import build_model, load_tokenizer, report
from ensemble.training.engine import make_engine
from ensemble.training.job import (
    HF_DIR,
    MemberSpec,
    StageJob,
    optim_settings,
    stage_micro_steps,
    start_dir,
    steps_per_epoch,
)
from ensemble.training.loop import (
    EarlyStopper,
    Targets,
    Throughput,
    bag_indices,
    dev_score,
    encode,
    eval_chunks,
    job_epochs,
    predict_logits,
    stream_start,
    train_step,
)
from ensemble.training.mlm import train_mlm_stage

logger = logging.getLogger(__name__)


def _targets(splits: Any, guidance: dict[str, np.ndarray] | None) -> Targets:
    intensity = splits.intensity["train"] if splits.intensity is not None else None
    g = guidance or {}
    return Targets(
        labels=splits.labels["train"],
        intensity=intensity,
        teacher_logits=g.get("teacher_logits"),
        regressor_intensity=g.get("regressor_intensity"),
        classifier_probs=g.get("classifier_probs"),
        ensemble_probs=g.get("ensemble_probs"),
    )


def train_member(config: dict[str, Any]) -> None:
    """Ray Train entry point: run `config["job"]`, one stage of `config["spec"]`'s member, to
    completion (`job.train_config` builds the config)."""
    spec: MemberSpec = config["spec"]
    job: StageJob = config["job"]
    m = spec.member
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(m.cpus_per_worker)))
    # per-member seed: two members of the same shape still start (and shuffle) differently
    torch.manual_seed(spec.seed + 1000 * job.round + zlib.crc32(spec.name.encode()) % 997)
    splits = ray.get(job.splits)
    guidance = ray.get(job.guidance) if job.guidance is not None else None
    if job.stage.name == "mlm":
        return train_mlm_stage(spec, job, splits, rank, world)

    restored = ray.train.get_checkpoint()  # same job, after a failure or a re-run
    with start_dir(restored, job.init_checkpoint) as init_dir:
        model = build_model(spec, init_dir, job.teacher_checkpoint)
        M.name_labels(model, splits.label_names, m.kind == "regressor")
        tokenizer = load_tokenizer(spec, init_dir, job.teacher_checkpoint)
        bag = bag_indices(len(splits.texts["train"]), spec.seed, m.bootstrap,
                          m.data_fraction)
        ids = encode(tokenizer, [splits.texts["train"][i] for i in bag], spec.max_length)
        n = len(ids)
        per_epoch = steps_per_epoch(n, world, m.micro_batch_size, m.grad_accum)
        job_steps = stage_micro_steps(job.stage.epochs, per_epoch, m.grad_accum)
        settings = optim_settings(m, job.stage, job.repeats * job_steps // m.grad_accum)
        engine = make_engine(
            model, settings, spec.backend, world,
            lr_scale=S.layer_lr_scale(model, job.stage.layer_lr_decay),
            unfreeze_step=S.unfreeze_steps(model, job.stage, per_epoch // m.grad_accum),
        )
        state: dict[str, Any] = {"micro": 0, "history": [], "early": None, "evals": []}
        if init_dir is not None and (restored or job.resume_optimizer):
            loaded = engine.load(init_dir)
            # the early-stopping record continues over the rounds of one stage
            state["early"] = loaded.get("early")
            state["evals"] = list(loaded.get("evals", []))
            if restored:
                # only our keys: DeepSpeed's load returns its own checkpoint metadata with the
                # client state, and saving that again fails (reserved keys) or goes stale
                state["micro"] = int(loaded["micro"])
                state["history"] = list(loaded["history"])
                if rank == 0:
                    logger.info("%s %s round %d: resuming at micro-step %d of %d", spec.name,
                                job.stage.name, job.round, state["micro"], job_steps)
        early = _early_stopping(spec, job, state, init_dir, rank, splits, tokenizer)
    targets = _targets(splits, guidance).subset(bag)
    weights = (
        job.weights if job.stage.name == "distill" else replace(job.weights, distill_alpha=0.0)
    )
    ci = torch.tensor(spec.class_intensity, dtype=torch.float32)
    order = None
    if job.stage.name == "curriculum":
        g = guidance or {}
        scores = S.difficulty(job.stage, targets.intensity, g.get("teacher_logits"))
        order = S.curriculum_order(scores)
    epochs = math.ceil(job_steps / per_epoch)
    board = _progress(spec.progress_actor) if rank == 0 else None
    speed = Throughput()
    micro = state["micro"]
    offset_steps = (job.repeat - 1) * job_steps
    # a stage repeated over rounds reads one shuffled stream: round r continues where round r-1
    # stopped, so 2 rounds x 0.5 epoch is one pass and round r's texts are new to the models
    # whose predictions guide it. A curriculum restarts its pacing every round instead.
    stream = stream_start(
        spec.seed, job.round, job.repeat, offset_steps, curriculum=order is not None
    )
    paced = None if order is None else (
        lambda epoch: S.paced_order(order, job.stage, epoch, epochs, stream.seed)
    )
    every = early.every_micro if early is not None else None
    stopped = early is not None and early.stopper.stopped
    if stopped:  # a re-run of a job that had stopped: its last checkpoint is the result
        return
    for group in job_epochs(n, stream, micro, job_steps, per_epoch, m.micro_batch_size,
                            rank, world, paced):
        for chunk in eval_chunks(group, micro, every):
            engine.model.train()
            for index in chunk:
                result = train_step(engine, ids, tokenizer.pad_token_id, targets, index,
                                    m.kind, m.task_loss, weights, ci)
                micro += 1
                speed.update(result.samples * world)
                # an evaluation point is logged too: a job that stops early has its losses
                last_in_chunk = early is not None and index is chunk[-1]
                if micro % spec.log_every == 0 or micro == job_steps or last_in_chunk:
                    point = {"round": job.round, "stage": job.stage.name,
                             "step": offset_steps + micro, "loss": result.loss, **result.parts}
                    state["history"].append(point)
                    if board is not None:
                        board.update.remote(spec.name, {**point, "lr": engine.lr(),
                                                       "samples_per_s": speed.rate(),
                                                       "progress": micro / job_steps})
            state["micro"] = micro
            if early is not None:
                stopped = early.evaluate(engine, tokenizer, offset_steps + micro, state)
            last = state["history"][-1]["loss"] if state["history"] else float("nan")
            metrics = {"round": job.round, "stage": job.stage.name, "micro": micro,
                       "job_steps": job_steps, "samples_per_s": speed.rate(), "loss": last,
                       "history": state["history"], "world_size": world,
                       "done": micro >= job_steps or stopped, "stopped": stopped}
            if early is not None:
                metrics.update(evals=state["evals"], best=early.stopper.as_dict())
            report(engine, tokenizer, metrics, dict(state),
                    best_dir=early.best_dir if early is not None else None)
            if stopped:
                if rank == 0:
                    logger.info("%s stops early at step %d: best dev %s %.4f at step %s",
                                spec.name, offset_steps + micro, early.metric,
                                early.stopper.best, early.stopper.best_step)
                return
    if micro < job_steps:  # an epoch gave no micro-batch at all
        raise ValueError(
            f"{spec.name}: {n} training texts give no micro-batch of "
            f"{m.micro_batch_size} x grad_accum {m.grad_accum} on each of "
            f"{world} workers; lower micro_batch_size, grad_accum or num_workers"
        )


class _EarlyStopping:
    """A job's early stopping: dev evaluation, the stopper, and rank 0's best-weights copy."""

    def __init__(self, spec: MemberSpec, job: StageJob, stopper: EarlyStopper, ids: list[list[int]],
                 labels: np.ndarray | None, intensity: np.ndarray | None, best_dir: Path,
                 every_micro: int | None, rank: int, world: int):
        self.spec, self.job, self.stopper, self.ids = spec, job, stopper, ids
        self.labels, self.intensity = labels, intensity
        self.best_dir, self.every_micro, self.rank, self.world = best_dir, every_micro, rank, world
        self.metric = spec.member.early_stopping.metric_for(spec.member.kind)

    def evaluate(self, engine, tokenizer, step: int, state: dict[str, Any]) -> bool:
        """Score dev, keep the weights if they are the best so far; True when the job stops."""
        logits = predict_logits(engine.model, self.ids, tokenizer.pad_token_id, 64)
        if self.spec.member.kind == "regressor":
            logits = logits[:, 0]
        value = dev_score(self.metric, logits, self.labels, self.intensity)
        value = _from_rank0(value, self.world)  # every rank takes the same decision
        improved = self.stopper.update(value, step)
        if improved:
            full = engine.full_state_dict()  # every rank takes part under ZeRO-3
            if self.rank == 0:
                tmp = self.best_dir.with_name(self.best_dir.name + ".tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                engine.model.save_pretrained(tmp, state_dict=full)
                tokenizer.save_pretrained(tmp)
                shutil.rmtree(self.best_dir, ignore_errors=True)
                tmp.rename(self.best_dir)
        state["early"] = self.stopper.as_dict()
        state["evals"].append({"round": self.job.round, "stage": self.job.stage.name,
                               "step": step, self.metric: value, "best": improved})
        return self.stopper.stopped


def _early_stopping(spec: MemberSpec, job: StageJob, state: dict[str, Any], init_dir: str | None,
                    rank: int, splits: Any, tokenizer: Any) -> _EarlyStopping | None:
    """The job's early stopping, carried on from `state`; None when the member has none.

    The best weights so far are the export of the checkpoint the job starts from (a restored
    job's own, or the previous round's), so rank 0 copies them to its best-weights directory.
    """
    es = spec.member.early_stopping
    if es is None or job.stage.name not in S.SUPERVISED:
        return None
    metric = es.metric_for(spec.member.kind)
    stopper = (EarlyStopper.from_dict(state["early"]) if state.get("early") else
               EarlyStopper(metric in LOWER_IS_BETTER, es.patience, es.min_delta))
    if "dev" not in splits.texts:
        raise ValueError(f"{spec.name}: early_stopping needs a dev split; give the data one")
    ids = encode(tokenizer, splits.texts["dev"], spec.max_length)
    labels = splits.labels.get("dev") if splits.labels is not None else None
    intensity = splits.intensity.get("dev") if splits.intensity is not None else None
    best_dir = Path(tempfile.mkdtemp(prefix="ensemble-best-")) / "hf"
    if rank == 0 and stopper.best is not None and init_dir is not None:
        shutil.copytree(Path(init_dir) / HF_DIR, best_dir)
    every = es.every_steps * spec.member.grad_accum if es.every_steps else None
    return _EarlyStopping(spec, job, stopper, ids, labels, intensity, best_dir, every, rank,
                          ray.train.get_context().get_world_size())


def _from_rank0(value: float, world: int) -> float:
    if world == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return float(box[0])


def _progress(name: str | None):
    from ensemble.progress import get_board

    return get_board(name)
