"""TorchEngine and the training loop, no Ray: learning, accumulation, schedules, resume."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ensemble.config import StageConfig
from ensemble.losses import LossWeights
from ensemble.models.members import make_student
from ensemble.training import stages as S
from ensemble.training.engine import (
    OptimSettings,
    TorchEngine,
    deepspeed_config,
    lr_lambda,
    make_engine,
    param_groups,
)
from ensemble.training.job import stage_micro_steps, steps_per_epoch
from ensemble.training.loop import (
    StepResult,
    StreamStart,
    Targets,
    Throughput,
    collate,
    encode,
    epoch_order,
    job_epochs,
    micro_batches,
    predict_logits,
    stream_start,
    train_step,
)

TEXTS = [
    "a gorgeous , witty , seductive movie .", "the plot is nothing but boilerplate clichés .",
    "it 's a charming and often affecting journey .", "unfunny and lame .",
    "an utterly compelling ` who wrote it ' .", "the acting is fine , the script is not .",
    "a masterpiece four years in the making .", "too slow , too long and too little happens .",
    "this is a film well worth seeing .", "it never finds its footing .",
    "a well-made and often lovely depiction .", "the movie is just a plain old monster .",
    "an exquisitely crafted and acted tale .", "a dull , simple-minded and stereotypical tale .",
    "it is what it is .", "one of the best films of the year .",
]
LABELS = np.array([4, 0, 3, 0, 4, 2, 4, 1, 3, 1, 3, 1, 4, 0, 2, 4])
INTENSITY = np.array([0.9, 0.1, 0.7, 0.05, 0.85, 0.5, 0.95, 0.3, 0.7, 0.3, 0.75, 0.25, 0.9,
                      0.1, 0.5, 0.95], dtype=np.float32)
CI = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9])
ALL = np.arange(16)


@pytest.fixture(scope="module")
def ids(tokenizer) -> list[list[int]]:
    return encode(tokenizer, TEXTS, max_length=32)


@pytest.fixture(scope="module")
def pad(tokenizer) -> int:
    return tokenizer.pad_token_id


def _settings(**kw) -> OptimSettings:
    base = {"lr": 1e-3, "warmup_ratio": 0.0, "total_steps": 100, "scheduler": "constant",
            "micro_batch_size": 16}
    return OptimSettings(**{**base, **kw})


def _steps(engine, ids, pad, targets, index, kind, loss, weights, n) -> list[float]:
    return [train_step(engine, ids, pad, targets, index, kind, loss, weights, CI).loss
            for _ in range(n)]


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("kind", ["classifier", "regressor", "student"])
def test_loss_drops_on_one_fixed_batch(kind, tiny_member, ids, pad) -> None:
    targets = Targets(labels=LABELS, intensity=INTENSITY)
    weights, loss = LossWeights(), "cross_entropy"
    if kind == "regressor":
        model, loss = tiny_member(1, regression=True, seed=1), "mse"
    elif kind == "student":
        model = make_student(tiny_member(5, seed=2), 1)
        noise = np.random.default_rng(0).standard_normal((16, 5))
        targets.teacher_logits = (4 * np.eye(5)[LABELS] + noise).astype(np.float32)
        weights = LossWeights(distill_alpha=0.5, distill_temperature=2.0)
    else:
        model = tiny_member(5, seed=0)
    engine = make_engine(model, _settings(lr=1e-2), backend="torch")
    losses = _steps(engine, ids, pad, targets, ALL, kind, loss, weights, 20)
    assert all(math.isfinite(x) for x in losses)
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses


def test_train_step_reports_parts_and_samples(tiny_member, ids, pad) -> None:
    engine = make_engine(make_student(tiny_member(5, seed=2), 1), _settings(), backend="torch")
    targets = Targets(labels=LABELS, teacher_logits=np.zeros((16, 5), dtype=np.float32))
    result = train_step(engine, ids, pad, targets, ALL[:4], "student", "cross_entropy",
                        LossWeights(distill_alpha=0.5, distill_temperature=2.0), CI)
    assert isinstance(result, StepResult) and result.samples == 4
    assert set(result.parts) == {"task", "distill"}
    assert result.loss == pytest.approx(0.5 * result.parts["task"] + 0.5 * result.parts["distill"],
                                        rel=1e-5)


def _grad_capture(engine) -> list[dict[str, torch.Tensor]]:
    """The gradients each optimizer step sees (after accumulation and clipping)."""
    seen: list[dict[str, torch.Tensor]] = []
    names = {id(p): n for n, p in engine.model.named_parameters()}

    def hook(optimizer, args, kwargs):
        seen.append({names[id(p)]: p.grad.clone() for g in optimizer.param_groups
                     for p in g["params"] if p.grad is not None})

    engine.optimizer.register_step_pre_hook(hook)
    return seen


def test_grad_accumulation_equals_one_big_batch(tiny_member, ids, pad) -> None:
    targets = Targets(labels=LABELS)
    args = (ids, pad, targets)
    accum = make_engine(tiny_member(5, seed=0, dropout=False), _settings(grad_accum=2), "torch")
    whole = make_engine(tiny_member(5, seed=0, dropout=False), _settings(grad_accum=1), "torch")
    start = _params(accum.model)
    g_accum, g_whole = _grad_capture(accum), _grad_capture(whole)

    train_step(accum, *args, ALL[:8], "classifier", "cross_entropy", LossWeights(), CI)
    assert not g_accum  # first micro-batch: no optimizer step yet, weights untouched
    assert all(torch.equal(p, start[n]) for n, p in accum.model.named_parameters())
    assert accum.lr() == pytest.approx(1e-3)
    train_step(accum, *args, ALL[8:], "classifier", "cross_entropy", LossWeights(), CI)
    train_step(whole, *args, ALL, "classifier", "cross_entropy", LossWeights(), CI)
    assert len(g_accum) == len(g_whole) == 1
    assert g_accum[0].keys() == g_whole[0].keys()
    for name, grad in g_whole[0].items():
        torch.testing.assert_close(g_accum[0][name], grad, rtol=1e-4, atol=1e-7, msg=name)
    moved = [n for n, p in accum.model.named_parameters() if not torch.equal(p, start[n])]
    assert len(moved) == len(start)


@pytest.mark.parametrize(
    ("scheduler", "expected"),
    [
        # warmup 4 of 20 steps: (s+1)/(w+1), then decay over the remaining 16
        ("linear", {0: 0.2, 3: 0.8, 4: 1.0, 12: 0.5, 20: 0.0, 25: 0.0}),
        ("cosine", {0: 0.2, 3: 0.8, 4: 1.0, 8: 0.5 * (1 + math.cos(math.pi / 4)), 12: 0.5,
                    20: 0.0}),
        ("constant", {0: 0.2, 3: 0.8, 4: 1.0, 12: 1.0, 20: 1.0}),
    ],
)
def test_lr_schedule_values(scheduler: str, expected: dict[int, float]) -> None:
    fn = lr_lambda(scheduler, warmup=4, total=20)
    for step, value in expected.items():
        assert fn(step) == pytest.approx(value, abs=1e-9), step
    no_warmup = lr_lambda(scheduler, warmup=0, total=20)
    assert no_warmup(0) == pytest.approx(1.0)


def test_engine_follows_the_schedule_per_optimizer_step(tiny_member, ids, pad) -> None:
    s = _settings(scheduler="linear", warmup_ratio=0.2, total_steps=10, grad_accum=2,
                  micro_batch_size=2)
    engine = make_engine(tiny_member(5), s, backend="torch")
    fn = lr_lambda("linear", warmup=2, total=10)
    seen = [engine.lr()]
    for i in range(8):
        train_step(engine, ids, pad, Targets(labels=LABELS), ALL[2 * i:2 * i + 2], "classifier",
                   "cross_entropy", LossWeights(), CI)
        seen.append(engine.lr())
    # the LR moves once per optimizer step, i.e. every grad_accum=2 micro-batches
    expected = [1e-3 * fn(k // 2) for k in range(9)]
    assert seen == pytest.approx(expected)
    assert seen[:3] == pytest.approx([1e-3 / 3, 1e-3 / 3, 2e-3 / 3])


def test_gradual_unfreezing_trains_layers_from_their_step(tiny_member, ids, pad) -> None:
    model = tiny_member(5, seed=0)
    stage = StageConfig(gradual_unfreeze=True)
    start = S.unfreeze_steps(model, stage, steps_per_epoch=2)
    assert start["classifier.weight"] == 0 and start["bert.pooler.dense.weight"] == 0
    assert start["bert.encoder.layer.1.attention.self.query.weight"] == 2
    assert start["bert.encoder.layer.0.output.dense.weight"] == 4
    assert start["bert.embeddings.word_embeddings.weight"] == 6
    assert S.unfreeze_steps(model, StageConfig(), 2) == {}

    engine = make_engine(model, _settings(weight_decay=0.01), "torch", unfreeze_step=start)
    snapshots = [_params(model)]
    for _ in range(7):
        train_step(engine, ids, pad, Targets(labels=LABELS), ALL[:8], "classifier",
                   "cross_entropy", LossWeights(), CI)
        snapshots.append(_params(model))
    for name, first in start.items():
        # optimizer step k (0-based) is the (k+1)-th train_step: frozen before `first`
        for k in range(7):
            changed = not torch.equal(snapshots[k + 1][name], snapshots[k][name])
            assert changed == (k >= first), (name, k, first)


def test_layer_wise_lr_decay_scales_each_depth(tiny_member) -> None:
    model = tiny_member(5)
    scale = S.layer_lr_scale(model, 0.5)
    assert scale["classifier.weight"] == 1.0 and scale["bert.pooler.dense.bias"] == 1.0
    assert scale["bert.encoder.layer.1.output.dense.weight"] == 0.5
    assert scale["bert.encoder.layer.0.output.dense.weight"] == 0.25
    assert scale["bert.embeddings.word_embeddings.weight"] == 0.125
    assert S.layer_lr_scale(model, 1.0) == {}

    engine = TorchEngine(model, _settings(scheduler="linear"), lr_scale=scale)
    names = {id(p): n for n, p in model.named_parameters()}
    covered = 0
    for group in engine.optimizer.param_groups:
        for p in group["params"]:
            assert group["lr"] == pytest.approx(1e-3 * scale[names[id(p)]])
            covered += 1
    assert covered == len(names)  # every parameter stays in the optimizer


def test_no_weight_decay_on_biases_and_norms(tiny_member) -> None:
    model = tiny_member(5)
    names = {id(p): n for n, p in model.named_parameters()}
    for group in param_groups(model, weight_decay=0.1):
        for p in group["params"]:
            name = names[id(p)]
            no_decay = name.endswith("bias") or "LayerNorm" in name
            assert group["weight_decay"] == (0.0 if no_decay else 0.1), name


def test_save_load_resumes_identically(tiny_member, ids, pad, tmp_path: Path) -> None:
    targets = Targets(labels=LABELS)
    s = _settings(scheduler="linear", warmup_ratio=0.25, total_steps=8, micro_batch_size=8)
    args = (ids, pad, targets, ALL[:8], "classifier", "cross_entropy", LossWeights())
    first = make_engine(tiny_member(5, seed=0, dropout=False), s, "torch")
    _steps(first, *args, 3)
    first.save(tmp_path / "ckpt", {"micro": 3, "history": [{"loss": 1.0}]})
    expected = _steps(first, *args, 3)

    other = make_engine(tiny_member(5, seed=9, dropout=False), s, "torch")  # different init
    assert other.load(tmp_path / "ckpt") == {"micro": 3, "history": [{"loss": 1.0}]}
    assert other.lr() == pytest.approx(1e-3 * lr_lambda("linear", 2, 8)(3))
    assert _steps(other, *args, 3) == expected
    for (name, a), b in zip(first.model.named_parameters(), other.model.parameters(), strict=True):
        assert torch.equal(a, b), name
    full = other.full_state_dict()
    assert full is not None
    assert torch.equal(full["classifier.weight"], other.model.classifier.weight)


def test_make_engine_rejects_unknown_backend(tiny_member) -> None:
    with pytest.raises(ValueError, match="use 'torch' or 'deepspeed'"):
        make_engine(tiny_member(5), _settings(), backend="jax")


def test_deepspeed_config() -> None:
    s = _settings(micro_batch_size=8, grad_accum=2, zero_stage=3, max_grad_norm=0.5,
                  deepspeed_extra={"zero_optimization": {"overlap_comm": False}, "bf16": {
                      "enabled": True}})
    cfg = deepspeed_config(s, world_size=2)
    assert cfg["train_batch_size"] == 8 * 2 * 2
    assert cfg["train_micro_batch_size_per_gpu"] == 8 and cfg["gradient_accumulation_steps"] == 2
    assert cfg["gradient_clipping"] == 0.5
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert zero["overlap_comm"] is False  # extra merged into the nested dict, not replacing it
    assert cfg["bf16"] == {"enabled": True} and cfg["fp16"] == {"enabled": False}
    assert "stage3_gather_16bit_weights_on_model_save" not in deepspeed_config(
        _settings(zero_stage=2), 1)["zero_optimization"]


def test_collate_pads_to_the_longest(pad) -> None:
    batch = collate([[101, 5, 102], [101, 102]], pad)
    assert batch["input_ids"].tolist() == [[101, 5, 102], [101, 102, pad]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def test_encode_truncates(tokenizer) -> None:
    out = encode(tokenizer, ["word " * 100, "short"], max_length=12)
    assert len(out[0]) == 12 and out[0][-1] == tokenizer.sep_token_id
    assert out[1][0] == tokenizer.cls_token_id


def test_epoch_order_shards_evenly_and_reshuffles() -> None:
    shards = [epoch_order(103, seed=1, epoch=0, rank=r, world=4) for r in range(4)]
    assert {len(s) for s in shards} == {25}  # cut to a multiple of world: equal steps per rank
    joined = np.concatenate(shards)
    assert len(set(joined.tolist())) == 100 and joined.max() < 103
    assert np.array_equal(epoch_order(103, 1, 0), epoch_order(103, 1, 0))
    assert not np.array_equal(epoch_order(103, 1, 0), epoch_order(103, 1, 1))
    ordered = np.arange(10)[::-1]
    assert epoch_order(10, 1, 0, rank=1, world=2, ordered=ordered).tolist() == [8, 6, 4, 2, 0]


def test_micro_batches_drop_the_tail_and_skip() -> None:
    batches = list(micro_batches(np.arange(10), 3))
    assert [b.tolist() for b in batches] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert [b.tolist() for b in micro_batches(np.arange(10), 3, skip=2)] == [[6, 7, 8]]


def _job_batches(stream: StreamStart, n: int, job_steps: int, per_epoch: int, size: int,
                 rank: int = 0, world: int = 1) -> list[list[int]]:
    """What the worker's loop trains on, in order, as plain lists."""
    groups = job_epochs(n, stream, 0, job_steps, per_epoch, size, rank, world)
    return [b.tolist() for group in groups for b in group]


def test_rounds_of_a_repeated_stage_continue_one_stream() -> None:
    n, size, per_epoch, half = 100, 10, 10, 5  # 2 rounds x 0.5 epoch
    rounds = [
        _job_batches(stream_start(7, r, r, (r - 1) * half), n, half, per_epoch, size)
        for r in (1, 2)
    ]
    seen = [i for batches in rounds for b in batches for i in b]
    assert sorted(seen) == list(range(100))  # one pass: every text exactly once
    # round 1 is what it always was: the first half of the round-1 shuffle
    assert [i for b in rounds[0] for i in b] == epoch_order(n, 7 + 7919, 0)[:50].tolist()
    # three rounds of 0.5 epoch: the third starts the next epoch's shuffle
    third = _job_batches(stream_start(7, 3, 3, 2 * half), n, half, per_epoch, size)
    assert [i for b in third for i in b] == epoch_order(n, 7 + 7919, 1)[:50].tolist()


def test_a_round_crossing_an_epoch_boundary_and_ranks() -> None:
    n, size, per_epoch, steps = 40, 5, 4, 3  # per rank: 20 texts, 4 batches; 3 steps per round
    for rank in (0, 1):
        r1 = _job_batches(stream_start(0, 1, 1, 0), n, steps, per_epoch, size, rank, 2)
        r2 = _job_batches(stream_start(0, 2, 2, steps), n, steps, per_epoch, size, rank, 2)
        assert len(r1) == len(r2) == steps
        first_epoch = epoch_order(n, 7919, 0, rank, 2).tolist()
        assert [i for b in r1 + r2[:1] for i in b] == first_epoch  # epoch 0 read once, in order
        assert r2[1] == epoch_order(n, 7919, 1, rank, 2)[:size].tolist()  # then epoch 1


def test_a_restored_job_continues_at_its_step_in_epoch_groups() -> None:
    n, size, per_epoch, steps = 40, 5, 4, 7  # the job starts mid-epoch and crosses a boundary
    stream = stream_start(0, 2, 2, 2)
    whole = list(job_epochs(n, stream, 0, steps, per_epoch, size))
    assert [len(g) for g in whole] == [2, 4, 1]  # checkpoints at each epoch's end and the job's
    flat = [b.tolist() for g in whole for b in g]
    for micro in range(steps + 1):
        rest = list(job_epochs(n, stream, micro, steps, per_epoch, size))
        assert [b.tolist() for g in rest for b in g] == flat[micro:]
    paced = list(job_epochs(n, stream, 0, 3, per_epoch, size, paced=lambda e: np.arange(n)[::-1]))
    assert paced[0][0].tolist() == [29, 28, 27, 26, 25]  # a curriculum's order (epoch 0, skip 2)
    assert list(job_epochs(3, stream, 0, steps, per_epoch, size)) == []  # too few texts: no batch


def test_earlier_stages_and_curricula_keep_their_own_start() -> None:
    assert stream_start(3, 1, 1, 0) == StreamStart(3 + 7919, 0)
    assert stream_start(3, 2, 2, 50) == StreamStart(3 + 7919, 50)
    # a curriculum restarts its pacing each round, with that round's seed
    assert stream_start(3, 2, 2, 50, curriculum=True) == StreamStart(3 + 2 * 7919, 0)


def test_steps_per_epoch_and_stage_steps() -> None:
    assert steps_per_epoch(128, world=1, micro_batch=16, grad_accum=1) == 8
    assert steps_per_epoch(128, world=2, micro_batch=16, grad_accum=1) == 4
    assert steps_per_epoch(112, world=1, micro_batch=16, grad_accum=2) == 6  # multiple of accum
    assert steps_per_epoch(8, world=1, micro_batch=16, grad_accum=2) == 2  # at least one step
    assert stage_micro_steps(1.0, 8, 1) == 8
    assert stage_micro_steps(0.5, 8, 1) == 4
    assert stage_micro_steps(1.5, 6, 4) == 8


def test_predict_logits_keeps_input_order(tiny_member, ids, pad) -> None:
    model = tiny_member(5, seed=3)
    out = predict_logits(model, ids, pad, batch_size=5)
    assert out.shape == (16, 5) and out.dtype == np.float32
    with torch.no_grad():
        for i in (0, 7, 15):
            one = model(**collate([ids[i]], pad)).logits[0].numpy()
            np.testing.assert_allclose(out[i], one, rtol=1e-4, atol=1e-5)
    assert not model.training


def test_throughput_skips_warmup_steps() -> None:
    now = [0.0]
    speed = Throughput(warmup_steps=2, clock=lambda: now[0])
    speed.update(16)
    assert speed.rate() == 0.0
    now[0] = 10.0
    speed.update(16)  # the clock starts here
    for _ in range(4):
        now[0] += 0.5
        speed.update(16)
    assert speed.rate() == pytest.approx(64 / 2.0)
