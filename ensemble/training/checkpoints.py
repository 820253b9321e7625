"""Where a job's model starts from, and how a job checkpoints: shared by every stage's worker.

A job starts from its own restored checkpoint, else the previous job's, else a fresh member (a
student is cut from its teacher's checkpoint). Every checkpoint holds each rank's engine shard
plus rank 0's `save_pretrained` export (`HF_DIR`), which the runner copies into the run directory.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import ray.train

from ensemble.models import members as M
from ensemble.training.job import HF_DIR, MemberSpec


def build_model(spec: MemberSpec, init_dir: str | None, teacher_checkpoint: Any = None):
    """The member's model: from ``init_dir``'s export, else fresh (a student from its teacher)."""
    m = spec.member
    if init_dir is not None:
        return M.load_exported(Path(init_dir) / HF_DIR)[0]
    if m.kind == "student":
        if teacher_checkpoint is None:
            raise ValueError(f"student {spec.name} has no trained teacher to start from")
        with teacher_checkpoint.as_directory() as teacher_dir:
            teacher, _ = M.load_exported(Path(teacher_dir) / HF_DIR)
        return M.make_student(teacher, m.student_layers)
    return M.build_member(m.model, spec.num_labels, regression=m.kind == "regressor",
                          pretrained=m.pretrained, arch=m.arch)


def load_tokenizer(spec: MemberSpec, init_dir: str | None, teacher_checkpoint: Any = None):
    """The tokenizer that goes with `build_model`'s model."""
    if init_dir is not None:
        return M.load_tokenizer(str(Path(init_dir) / HF_DIR))
    if spec.member.kind == "student" and teacher_checkpoint is not None:
        with teacher_checkpoint.as_directory() as teacher_dir:
            return M.load_tokenizer(str(Path(teacher_dir) / HF_DIR))
    return M.load_tokenizer(spec.member.model)


def report(engine, tokenizer, metrics: dict[str, Any], client_state: dict[str, Any],
           export=None, best_dir: Path | None = None) -> None:
    """Checkpoint every rank's shard plus rank 0's `save_pretrained` export, then report.

    ``export(full_state)`` gives the model to export when it is not the engine's own (the MLM
    stage exports the member around its trained encoder). With ``best_dir`` (early stopping),
    the export is the best dev weights saved there, while the engine shards hold the latest
    state to resume from.
    """
    ctx = ray.train.get_context()
    tmp = tempfile.mkdtemp(prefix="ensemble-ckpt-")
    try:
        engine.save(tmp, client_state)
        if best_dir is not None:
            if ctx.get_world_rank() == 0:
                shutil.copytree(best_dir, Path(tmp) / HF_DIR)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
            return
        state = engine.full_state_dict()  # every rank takes part under ZeRO-3
        if ctx.get_world_rank() == 0:
            model = export(state) if export is not None else engine.model
            model.save_pretrained(Path(tmp) / HF_DIR, state_dict=None if export else state)
            tokenizer.save_pretrained(Path(tmp) / HF_DIR)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
