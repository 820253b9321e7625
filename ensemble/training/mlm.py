"""The domain-adaptive masked-LM stage, run inside a Ray Train worker.

The member's encoder trains under a masked-LM head on the task's training texts (or a given
corpus); the exported checkpoint is the member's classification model with that encoder, so the
next stage starts from it. Dev masked-LM loss is measured before and after with a fixed mask.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import torch

from ensemble.models import members as M
from ensemble.training import job as J
from ensemble.training.checkpoints import build_model, load_tokenizer, report
from ensemble.training.engine import make_engine
from ensemble.training.loop import StreamStart, collate, encode, job_epochs, mask_tokens


def _corpus(job: J.StageJob, splits: Any) -> list[str]:
    if job.stage.corpus:
        lines = Path(job.stage.corpus).read_text(encoding="utf-8").splitlines()
        return [line for line in lines if line.strip()]
    return list(splits.texts["train"])


def _mlm_batch(ids, index, tokenizer, probability: float, generator: torch.Generator):
    inputs = collate([ids[i] for i in index], tokenizer.pad_token_id)
    masked, labels = mask_tokens(
        inputs["input_ids"],
        inputs["attention_mask"],
        tokenizer.mask_token_id,
        len(tokenizer),
        tokenizer.all_special_ids,
        probability,
        generator,
    )
    return {"input_ids": masked, "attention_mask": inputs["attention_mask"], "labels": labels}


@torch.no_grad()
def masked_lm_loss(model, ids, tokenizer, probability: float, batch_size: int = 64) -> float:
    """Mean masked-LM loss over `ids` with a fixed masking seed (comparable across calls).

    The model is evaluated in eval mode without gradients and handed back in the mode it came in.
    """
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(1234)
    losses, weights = [], []
    for start in range(0, len(ids), batch_size):
        index = np.arange(start, min(len(ids), start + batch_size))
        batch = _mlm_batch(ids, index, tokenizer, probability, generator)
        count = int((batch["labels"] != -100).sum())
        if count:
            losses.append(float(model(**batch).loss) * count)
            weights.append(count)
    model.train(was_training)
    return sum(losses) / max(1, sum(weights))


def train_mlm_stage(spec: J.MemberSpec, job: J.StageJob, splits: Any, rank: int,
                    world: int) -> None:
    """Train the encoder with masked-LM, then report a checkpoint holding the member model.

    The texts come in the stream every stage reads (`loop.job_epochs`), seeded by the member's
    seed alone; a checkpoint is reported at every epoch's end, and a restored job continues there.
    """
    m = spec.member
    restored = ray.train.get_checkpoint()
    with J.start_dir(restored, job.init_checkpoint) as init_dir:
        member = build_model(spec, init_dir, job.teacher_checkpoint)
        tokenizer = load_tokenizer(spec, init_dir, job.teacher_checkpoint)
        source = str(Path(init_dir) / J.HF_DIR) if init_dir else M.resolve_model_name(m.model)
        if init_dir or (m.pretrained and not m.arch):
            mlm = M.build_mlm(source, pretrained=True)
        else:
            mlm = M.build_mlm(m.model, pretrained=False, arch=m.arch)
        mlm.base_model.load_state_dict(member.base_model.state_dict(), strict=False)
        ids = encode(tokenizer, _corpus(job, splits), spec.max_length)
        dev_ids = encode(tokenizer, splits.texts["dev"][:512], spec.max_length)
        n = len(ids)
        per_epoch = J.steps_per_epoch(n, world, m.micro_batch_size, m.grad_accum)
        job_steps = J.stage_micro_steps(job.stage.epochs, per_epoch, m.grad_accum)
        engine = make_engine(
            mlm, J.optim_settings(m, job.stage, job_steps // m.grad_accum), spec.backend, world
        )
        state: dict[str, Any] = {"micro": 0, "history": []}
        if restored:
            state = engine.load(init_dir)
    p = job.stage.mlm_probability
    if "dev_mlm_loss_before" not in state:
        state["dev_mlm_loss_before"] = masked_lm_loss(engine.model, dev_ids, tokenizer, p)
    generator = torch.Generator().manual_seed(spec.seed + rank)
    micro = state["micro"]

    def export(full_state, member=member):
        mlm.load_state_dict(full_state)
        member.base_model.load_state_dict(mlm.base_model.state_dict(), strict=False)
        return member

    stream = StreamStart(spec.seed, 0)
    for group in job_epochs(n, stream, micro, job_steps, per_epoch, m.micro_batch_size,
                            rank, world):
        engine.model.train()
        for index in group:
            loss = engine(**_mlm_batch(ids, index, tokenizer, p, generator)).loss
            engine.backward(loss)
            engine.step()
            micro += 1
            if micro % spec.log_every == 0 or micro == job_steps:
                state["history"].append(
                    {"round": job.round, "stage": "mlm", "step": micro, "loss": float(loss)}
                )
        state["micro"] = micro
        metrics = {
            "round": job.round,
            "stage": "mlm",
            "micro": micro,
            "job_steps": job_steps,
            "history": state["history"],
            "done": micro >= job_steps,
            "loss": state["history"][-1]["loss"] if state["history"] else math.nan,
            "dev_mlm_loss_before": state["dev_mlm_loss_before"],
        }
        if micro >= job_steps:
            metrics["dev_mlm_loss_after"] = masked_lm_loss(engine.model, dev_ids, tokenizer, p)
        report(engine, tokenizer, metrics, dict(state), export)
    if micro < job_steps:  # an epoch gave no micro-batch at all
        raise ValueError(
            f"{spec.name}: {n} masked-LM texts give no micro-batch of {m.micro_batch_size} "
            f"on each of {world} workers; lower micro_batch_size or num_workers"
        )
