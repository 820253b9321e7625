"""Training and inference steps against an `Engine`. No Ray, no DeepSpeed imports.

Token ids are kept ragged (one list per text) and padded per micro-batch, which on CPU is worth
more than any other trick: SST sentences average ~20 tokens.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ensemble.losses import LossWeights, member_loss


def encode(tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids per text, truncated to max_length (no padding)."""
    out = tokenizer(list(texts), truncation=True, max_length=max_length, padding=False)
    return out["input_ids"]


def collate(ids: Sequence[Sequence[int]], pad_id: int) -> dict[str, Tensor]:
    """Pad a micro-batch to its longest text. Returns input_ids and attention_mask, (B, T)."""
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, seq in enumerate(ids):
        input_ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


@dataclass(frozen=True)
class StreamStart:
    """Where a training job reads its shuffled data stream: epoch e of it is the permutation
    seeded (seed, e), and the job's first micro-batch is number `position` of the stream."""

    seed: int
    position: int


def stream_start(
    seed: int, round: int, repeat: int, offset_steps: int, curriculum: bool = False
) -> StreamStart:
    """The stream of a stage's `repeat`-th run (in round `round`), `offset_steps` micro-steps in.

    Repeats of one stage share a stream and continue it, so their examples do not overlap until
    a whole epoch has been read. A curriculum orders every run afresh: it starts at 0 with a seed
    of its own round.
    """
    if curriculum:
        return StreamStart(seed + 7919 * round, 0)
    return StreamStart(seed + 7919 * (round - repeat + 1), offset_steps)


def epoch_order(
    n: int, seed: int, epoch: int, rank: int = 0, world: int = 1, ordered: np.ndarray | None = None
) -> np.ndarray:
    """This rank's example indices for one epoch.

    A seeded shuffle (or the given curriculum order), cut to a multiple of `world` so every rank
    runs the same number of steps (ZeRO collectives need that), then strided across ranks.
    """
    order = ordered if ordered is not None else np.random.default_rng([seed, epoch]).permutation(n)
    usable = len(order) - len(order) % world
    return order[:usable][rank::world]


def bag_indices(n: int, seed: int, bootstrap: bool = False, fraction: float = 1.0) -> np.ndarray:
    """The training texts a bagged member sees: `round(fraction * n)` of the n texts, drawn
    with replacement when `bootstrap`, else without. Reproducible for a seed; sorted, so it
    is a multiset of text indices, not an order (the data stream shuffles it)."""
    size = max(1, round(fraction * n))
    if not bootstrap and size == n:
        return np.arange(n)
    rng = np.random.default_rng([seed, 0xBA6])
    return np.sort(rng.choice(n, size=size, replace=bootstrap))


@dataclass
class Targets:
    """Per-example training targets aligned with the training split (numpy, on CPU)."""

    labels: np.ndarray  # (N,) int64
    intensity: np.ndarray | None = None  # (N,) float32
    teacher_logits: np.ndarray | None = None  # (N, C)
    regressor_intensity: np.ndarray | None = None  # (N,)
    classifier_probs: np.ndarray | None = None  # (N, C)
    ensemble_probs: np.ndarray | None = None  # (N, C)

    def subset(self, index: np.ndarray) -> Targets:
        """The targets of the texts `index` (e.g. a bagged member's resample), in that order."""
        return Targets(**{f.name: None if getattr(self, f.name) is None
                          else getattr(self, f.name)[index]
                          for f in dataclasses.fields(self)})

    def batch(self, index: np.ndarray) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {"labels": torch.as_tensor(self.labels[index], dtype=torch.long)}
        for name in (
            "intensity",
            "teacher_logits",
            "regressor_intensity",
            "classifier_probs",
            "ensemble_probs",
        ):
            value = getattr(self, name)
            if value is not None:
                out[name] = torch.as_tensor(value[index], dtype=torch.float32)
        return out


@dataclass
class StepResult:
    loss: float
    parts: dict[str, float]
    samples: int


def train_step(
    engine,
    ids: list[list[int]],
    pad_id: int,
    targets: Targets,
    index: np.ndarray,
    kind: str,
    loss: str,
    weights: LossWeights,
    class_intensity: Tensor | None,
) -> StepResult:
    """Forward, one combined loss, one backward, and an (accumulation-aware) optimizer step."""
    inputs = collate([ids[i] for i in index], pad_id)
    logits = engine(**inputs).logits  # (B, C) or (B, 1)
    total, parts = member_loss(kind, loss, logits, targets.batch(index), weights, class_intensity)
    engine.backward(total)
    engine.step()
    return StepResult(float(total.detach()), parts, len(index))


def micro_batches(order: np.ndarray, size: int, skip: int = 0) -> Iterator[np.ndarray]:
    """Consecutive micro-batches of `order`, dropping a ragged tail; the first `skip` omitted."""
    for b in range(skip, len(order) // size):
        yield order[b * size : (b + 1) * size]


def epoch_batches(
    n: int,
    stream: StreamStart,
    micro: int,
    per_epoch: int,
    size: int,
    rank: int = 0,
    world: int = 1,
    ordered: np.ndarray | None = None,
) -> Iterator[np.ndarray]:
    """This rank's micro-batches from the job's step `micro` to the end of the current epoch.

    The stream position is ``stream.position + micro``; its epoch is the seeded shuffle (or the
    given curriculum order) `epoch_order` returns, of which `per_epoch` micro-batches count.
    """
    epoch, skip = divmod(stream.position + micro, per_epoch)
    order = epoch_order(n, stream.seed, epoch, rank, world, ordered)
    yield from itertools.islice(micro_batches(order, size, skip=skip), per_epoch - skip)


def job_epochs(
    n: int,
    stream: StreamStart,
    micro: int,
    job_steps: int,
    per_epoch: int,
    size: int,
    rank: int = 0,
    world: int = 1,
    paced: Callable[[int], np.ndarray] | None = None,
) -> Iterator[list[np.ndarray]]:
    """This rank's micro-batches of a job from its step `micro` to `job_steps`, one list per epoch.

    The worker trains through each list and checkpoints after it; a job restored at step `micro`
    continues exactly where it stopped. `paced(epoch)` gives a curriculum's order of an epoch.
    Stops early (fewer than `job_steps` steps) when an epoch gives no micro-batch at all.
    """
    while micro < job_steps:
        epoch = (stream.position + micro) // per_epoch
        ordered = paced(epoch) if paced is not None else None
        batches = epoch_batches(n, stream, micro, per_epoch, size, rank, world, ordered)
        group = list(itertools.islice(batches, job_steps - micro))
        if not group:
            return
        yield group
        micro += len(group)


@torch.no_grad()  # not inference_mode: ZeRO-3 gathers parameters in place during the forward
def predict_logits(
    model: nn.Module,
    ids: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Logits for every text, in input order. Sorted by length inside so padding stays small."""
    model.eval()
    order = np.argsort([len(x) for x in ids], kind="stable")
    chunks: list[np.ndarray] = []
    for start in range(0, len(order), batch_size):
        batch = collate([ids[i] for i in order[start : start + batch_size]], pad_id)
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
        chunks.append(logits.float().cpu().numpy())
    out = (
        np.empty((len(ids), chunks[0].shape[-1]), dtype=np.float32) if chunks else np.zeros((0, 1))
    )
    if chunks:
        out[order] = np.concatenate(chunks)
    return out


def eval_chunks(
    group: list[np.ndarray], micro: int, every: int | None
) -> Iterator[list[np.ndarray]]:
    """An epoch's micro-batches (the first being job step `micro`) cut at evaluation points.

    With `every` set, a chunk ends after each job step that is a multiple of `every`; the
    epoch's end always ends one. A job restored at any step cuts at the same points.
    """
    if not every:
        yield group
        return
    start = 0
    for i in range(len(group)):
        if (micro + i + 1) % every == 0:
            yield group[start : i + 1]
            start = i + 1
    if start < len(group):
        yield group[start:]


def dev_score(metric: str, outputs: np.ndarray, labels: np.ndarray | None,
              intensity: np.ndarray | None) -> float:
    """A member's dev metric from its raw outputs: logits (N, C), or intensities (N,) / (N, 1).

    accuracy, macro_f1 and nll score class logits against `labels`; pearson and mae score
    intensities against `intensity`.
    """
    if metric in ("pearson", "mae"):
        if intensity is None:
            raise ValueError(f"early stopping on {metric} needs an intensity column in dev")
        pred = np.asarray(outputs, dtype=np.float64).reshape(len(intensity))
        if metric == "mae":
            return float(np.mean(np.abs(pred - intensity)))
        if np.std(pred) == 0 or np.std(intensity) == 0:
            return 0.0
        return float(np.corrcoef(pred, intensity)[0, 1])
    if labels is None:
        raise ValueError(f"early stopping on {metric} needs labels in dev")
    logits = np.asarray(outputs, dtype=np.float64)
    if metric == "accuracy":
        return float(np.mean(logits.argmax(1) == labels))
    if metric == "macro_f1":
        from sklearn.metrics import f1_score

        return float(f1_score(labels, logits.argmax(1), average="macro", zero_division=0))
    if metric == "nll":
        shifted = logits - logits.max(1, keepdims=True)
        log_p = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
        return float(-np.mean(log_p[np.arange(len(labels)), labels]))
    raise ValueError(f"unknown early-stopping metric {metric!r}")


@dataclass
class EarlyStopper:
    """Tracks a dev metric across evaluations: the best value and step, and when to stop.

    Plain values only, so it travels in a checkpoint's client state (`as_dict`/`from_dict`).
    """

    lower_is_better: bool
    patience: int
    min_delta: float = 0.0
    best: float | None = None
    best_step: int | None = None
    bad: int = 0
    stopped: bool = False

    def update(self, value: float, step: int) -> bool:
        """Record one evaluation at `step`; True when it is a new best (beyond min_delta)."""
        if self.best is None:
            gain = float("inf")
        else:
            gain = self.best - value if self.lower_is_better else value - self.best
        if gain > self.min_delta:
            self.best, self.best_step, self.bad = value, step, 0
            return True
        self.bad += 1
        self.stopped = self.bad >= self.patience
        return False

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EarlyStopper:
        return cls(**d)


class Throughput:
    """Samples/s over a sliding window that skips the first (warm-up) steps."""

    def __init__(self, warmup_steps: int = 2, clock: Callable[[], float] = time.perf_counter):
        self.warmup_steps = warmup_steps
        self.clock = clock
        self.steps = 0
        self.samples = 0
        self.start: float | None = None

    def update(self, samples: int) -> None:
        self.steps += 1
        if self.steps == self.warmup_steps:
            self.start = self.clock()
        elif self.steps > self.warmup_steps:
            self.samples += samples

    def rate(self) -> float:
        if self.start is None or self.samples == 0:
            return 0.0
        return self.samples / max(1e-9, self.clock() - self.start)


def mask_tokens(
    input_ids: Tensor,
    attention_mask: Tensor,
    mask_id: int,
    vocab_size: int,
    special_ids: Sequence[int],
    probability: float,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """BERT-style masking: of the chosen tokens 80% [MASK], 10% random, 10% kept.

    Returns (masked input_ids, labels with -100 where no prediction is made). Shapes (B, T).
    """
    labels = input_ids.clone()
    candidates = attention_mask.bool()
    for sid in special_ids:
        candidates &= input_ids != sid
    chosen = (torch.rand(input_ids.shape, generator=generator) < probability) & candidates
    labels[~chosen] = -100
    masked = input_ids.clone()
    replace = chosen & (torch.rand(input_ids.shape, generator=generator) < 0.8)
    masked[replace] = mask_id
    randomize = chosen & ~replace & (torch.rand(input_ids.shape, generator=generator) < 0.5)
    masked[randomize] = torch.randint(vocab_size, input_ids.shape, generator=generator)[randomize]
    return masked, labels
