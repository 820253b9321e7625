"""Ensemble distillation's targets: what the published ensemble says about each training text.

Pure numpy (no Ray): `orchestrate.ensemble_targets` has the members predict the texts through
Ray (for a run's `distill:` stage and for `ensemble distill`), and this module turns their
outputs into the student's targets, caches them in the run directory, keeps dev/test texts out
of the corpus and builds the student's training split. See `config.DistillConfig`.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np

from ensemble import combine
from ensemble.combination import Combination
from ensemble.config import RunConfig
from ensemble.data import Splits
from ensemble.data.sources import DataError, read_file
from ensemble.rundir import atomic_write_bytes

CACHE = Path("distill")  # targets-<key>.npz, one file per set of texts


def cache_path(key: str) -> Path:
    """Where the targets of the texts fingerprinted ``key`` are cached, under the run dir."""
    return CACHE / f"targets-{key[:16]}.npz"


def read_corpus(cfg: RunConfig) -> list[str]:
    """The extra unlabelled texts of ``distill.corpus`` (empty without one)."""
    d = cfg.distill
    if d is None or not d.corpus:
        return []
    column = d.corpus_text_column or cfg.data.text_column
    table = read_file(Path(d.corpus))
    if column not in table.columns:
        raise DataError(
            f"distill.corpus {d.corpus} has no column {column!r} (it has "
            f"{', '.join(table.columns)}); set distill.corpus_text_column"
        )
    texts = [str(t) for t in table.columns[column] if t is not None and str(t).strip()]
    return texts[: d.max_corpus_texts] if d.max_corpus_texts else texts


def texts_key(texts: list[str]) -> str:
    """A fingerprint of the texts the targets belong to (the cache is reused only for them)."""
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def prediction_splits(splits: Splits, corpus: list[str]) -> Splits:
    """The splits with the corpus appended to train, for the members to predict (labels unused)."""
    n = len(corpus)
    return _with_corpus(splits, corpus, np.zeros(n, np.int64), np.zeros(n, np.float32))


def _with_corpus(
    splits: Splits, corpus: list[str], labels: np.ndarray, intensity: np.ndarray
) -> Splits:
    """``splits`` with the corpus texts, their labels and intensities appended to train."""
    if not corpus:
        return splits
    return Splits(
        texts={**splits.texts, "train": splits.texts["train"] + corpus},
        labels={**splits.labels, "train": np.concatenate([splits.labels["train"], labels])},
        intensity=None if splits.intensity is None else {
            **splits.intensity,
            "train": np.concatenate([splits.intensity["train"], intensity]),
        },
        label_names=splits.label_names,
    )


def ensemble_probs(
    outputs: dict[str, np.ndarray], kinds: dict[str, str], spec: Combination
) -> np.ndarray:
    """The published ensemble ``spec`` applied to members' raw outputs.

    Args:
        outputs: member -> logits (N, C), or intensities (N,) for a regressor.
        kinds: member -> kind.
        spec: the combination (`publish.fit_combiner`'s, or a run's `Manifest.combine`).

    Returns:
        (N, C) probabilities, as the published ensemble would answer.
    """
    return spec.probs(combine.to_probs(outputs, kinds))


def load_cached(run_dir: Path, key: str) -> np.ndarray | None:
    """The cached targets for these texts, or None (no cache, or it belongs to other texts)."""
    path = run_dir / cache_path(key)
    if not path.is_file():
        return None
    with np.load(path) as z:
        if str(z["key"]) != key:
            return None
        return z["probs"]


def save(run_dir: Path, key: str, probs: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez(buf, key=np.array(key), probs=probs.astype(np.float32))
    atomic_write_bytes(run_dir / cache_path(key), buf.getvalue())


def training_splits(splits: Splits, corpus: list[str], probs: np.ndarray) -> Splits:
    """The student's training split: train plus the corpus, whose labels are the ensemble's."""
    extra = probs[len(splits.texts["train"]):]
    ci = np.asarray(splits.class_intensity(), dtype=np.float32)
    return _with_corpus(splits, corpus, extra.argmax(axis=1), (extra @ ci).astype(np.float32))


def teacher_logits(probs: np.ndarray) -> np.ndarray:
    """Log-probabilities as logits: softmax(log p / T) is p tempered by T, as the loss expects."""
    return combine.log_probs(probs).astype(np.float32)


def mean_kl(target: np.ndarray, probs: np.ndarray) -> float:
    """Mean KL(target || probs) over rows."""
    t = np.maximum(np.asarray(target, np.float64), 1e-12)
    p = np.maximum(np.asarray(probs, np.float64), 1e-12)
    return float(np.mean(np.sum(t * (np.log(t) - np.log(p)), axis=1)))


def held_out_corpus(corpus: list[str], splits: Splits) -> list[str]:
    """The corpus without texts that are also dev or test texts, so the student is not taught
    the ensemble's answer on its exam. Texts are compared on their lower-cased letters and digits
    only: the same sentence often comes tokenized one way in a benchmark and another in a corpus
    (``too-tepid`` / ``too - tepid``, ``''Conan''`` / ```` `` Conan '' ````)."""
    if not corpus:
        return corpus

    def norm(t: str) -> str:
        return "".join(c for c in t.lower() if c.isalnum())

    scored = {norm(t) for s in ("dev", "test") for t in splits.texts.get(s, [])} - {""}
    kept = [t for t in corpus if norm(t) not in scored]
    if len(kept) < len(corpus):
        print(f"distill corpus: {len(corpus) - len(kept)} of {len(corpus)} texts are dev/test "
              "texts and are left out", flush=True)
    return kept
