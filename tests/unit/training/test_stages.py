"""Stage schedules: which orders are possible, curriculum ordering and pacing, MLM masking."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from ensemble.config import MemberConfig, StageConfig
from ensemble.training import stages as S
from ensemble.training.loop import mask_tokens


def _member(kind: str = "classifier", *stages: StageConfig, **kw) -> MemberConfig:
    if kind == "student":
        kw.setdefault("teacher", "teacher")
    return MemberConfig(kind=kind, stages=list(stages), **kw)  # type: ignore[arg-type]


def test_default_plan_is_one_stage_of_the_members_kind() -> None:
    assert S.plan(_member("classifier", epochs=3.0)) == [StageConfig(name="finetune", epochs=3.0)]
    assert [s.name for s in S.plan(_member("student"))] == ["distill"]
    assert S.validate("c", _member("classifier")) == []
    assert S.validate("s", _member("student")) == []


@pytest.mark.parametrize(
    ("kind", "names"),
    [
        ("teacher", ["mlm", "finetune"]),
        ("classifier", ["mlm", "mlm", "curriculum", "finetune"]),
        ("regressor", ["curriculum"]),
        ("student", ["distill", "finetune"]),
        ("student", ["curriculum", "distill"]),
    ],
)
def test_possible_orders_pass(kind: str, names: list[str]) -> None:
    member = _member(kind, *[StageConfig(name=n) for n in names])  # type: ignore[arg-type]
    assert S.validate("m", member) == []
    assert [s.name for s in S.plan(member)] == names


@pytest.mark.parametrize(
    ("kind", "names", "message"),
    [
        ("teacher", ["finetune", "mlm", "finetune"], r"stages\[1\]: mlm must come before"),
        ("classifier", ["distill"], r"stages\[0\]: distill is for kind=student"),
        ("teacher", ["mlm", "distill"], r"stages\[1\]: distill is for kind=student"),
        ("student", ["mlm", "distill"], r"put the mlm stage on the teacher"),
        ("teacher", ["mlm"], r"must end with a supervised stage .* not 'mlm'"),
        ("classifier", ["finetune", "mlm"], r"must end with a supervised stage"),
    ],
)
def test_impossible_orders_are_named(kind: str, names: list[str], message: str) -> None:
    member = _member(kind, *[StageConfig(name=n) for n in names])  # type: ignore[arg-type]
    problems = S.validate("m", member)
    assert problems, names
    assert any(re.search(message, p) for p in problems), problems
    assert all(p.startswith("members.m.stages") for p in problems)


def test_corpus_must_exist(tmp_path: Path) -> None:
    missing = _member("teacher", StageConfig(name="mlm", corpus=str(tmp_path / "nope.txt")),
                      StageConfig(name="finetune"))
    assert any("corpus=" in p and "is not a file" in p for p in S.validate("t", missing))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a line\nanother line\n")
    ok = _member("teacher", StageConfig(name="mlm", corpus=str(corpus)),
                 StageConfig(name="finetune"))
    assert S.validate("t", ok) == []


def test_curriculum_orders_extreme_intensity_first() -> None:
    intensity = np.array([0.5, 0.0, 1.0, 0.4, 0.9, 0.55, 0.1])
    scores = S.difficulty(StageConfig(name="curriculum"), intensity, None)
    order = S.curriculum_order(scores)
    assert set(order[:2].tolist()) == {1, 2}  # the two extremes are easiest
    assert order[-1] == 0 and order[-2] == 5  # mid-scale is hardest
    distance = np.abs(intensity[order] - 0.5)
    assert (np.diff(distance) <= 1e-12).all()  # monotone: easy -> hard


def test_curriculum_orders_confident_teacher_first() -> None:
    logits = np.array([[0.0, 0.0, 0.0], [5.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 9.0, 0.0]])
    stage = StageConfig(name="curriculum", difficulty="teacher_confidence")
    scores = S.difficulty(stage, None, logits)
    assert S.curriculum_order(scores).tolist() == [3, 1, 2, 0]
    assert scores[0] == pytest.approx(2 / 3)


def test_curriculum_order_is_stable_for_ties() -> None:
    assert S.curriculum_order(np.array([1.0, 0.0, 1.0, 0.0])).tolist() == [1, 3, 0, 2]


def test_difficulty_needs_its_signal() -> None:
    with pytest.raises(ValueError, match="teacher_confidence needs a teacher's logits"):
        S.difficulty(StageConfig(name="curriculum", difficulty="teacher_confidence"), None, None)
    with pytest.raises(ValueError, match="intensity_column"):
        S.difficulty(StageConfig(name="curriculum"), None, None)


@pytest.mark.parametrize(
    ("pacing", "expected"),
    [
        ("linear", [0.3, 0.3 + 0.7 / 3, 0.3 + 1.4 / 3, 1.0]),
        ("root", [0.3, 0.3 + 0.7 * math.sqrt(1 / 3), 0.3 + 0.7 * math.sqrt(2 / 3), 1.0]),
        ("step", [0.3, 0.3, 1.0, 1.0]),
    ],
)
def test_pacing_fractions(pacing: str, expected: list[float]) -> None:
    stage = StageConfig(name="curriculum", pacing=pacing, start_fraction=0.3)  # type: ignore[arg-type]
    got = [S.pacing_fraction(stage, e, 4) for e in range(4)]
    assert got == pytest.approx(expected)
    assert S.pacing_fraction(stage, 0, 1) == 1.0  # a single epoch sees everything


def test_paced_order_draws_from_the_easiest_examples() -> None:
    order = np.arange(100)[::-1].copy()  # example 99 is easiest
    stage = StageConfig(name="curriculum", start_fraction=0.2)
    first = S.paced_order(order, stage, epoch=0, epochs=3, seed=0)
    assert len(first) == 100  # same number of steps every epoch
    assert set(first.tolist()) == set(range(80, 100))  # only the easiest 20%, each one used
    assert np.bincount(first, minlength=100)[80:].tolist() == [5] * 20
    middle = S.paced_order(order, stage, epoch=1, epochs=3, seed=0)
    assert set(middle.tolist()) == set(range(40, 100))  # 20% + 80% / 2 = 60%
    last = S.paced_order(order, stage, epoch=2, epochs=3, seed=0)
    assert sorted(last.tolist()) == list(range(100))
    assert np.array_equal(first, S.paced_order(order, stage, 0, 3, seed=0))
    assert not np.array_equal(first, S.paced_order(order, stage, 0, 3, seed=1))


def test_mask_tokens_never_touches_special_or_padding(tokenizer) -> None:
    texts = ["a fine film with a sharp script ."] * 30 + ["short"] * 34
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    ids, attention = enc["input_ids"], enc["attention_mask"]
    special = tokenizer.all_special_ids
    g = torch.Generator().manual_seed(0)
    masked, labels = mask_tokens(ids, attention, tokenizer.mask_token_id, len(tokenizer),
                                 special, probability=0.5, generator=g)
    protected = (attention == 0) | torch.isin(ids, torch.tensor(special))
    assert protected.any()
    assert torch.equal(masked[protected], ids[protected])
    assert (labels[protected] == -100).all()
    chosen = labels != -100
    assert torch.equal(labels[chosen], ids[chosen])  # predict the original token
    assert torch.equal(masked[~chosen], ids[~chosen])  # unchosen tokens are left alone
    rate = chosen.sum() / (~protected).sum()
    assert 0.4 < float(rate) < 0.6
    to_mask = (masked[chosen] == tokenizer.mask_token_id).float().mean()
    assert 0.7 < float(to_mask) < 0.9  # ~80% [MASK], the rest random or kept


def test_mask_tokens_is_reproducible(tokenizer) -> None:
    enc = tokenizer(["the movie is good"] * 4, return_tensors="pt")
    args = (enc["input_ids"], enc["attention_mask"], tokenizer.mask_token_id, len(tokenizer),
            tokenizer.all_special_ids, 0.3)
    a = mask_tokens(*args, generator=torch.Generator().manual_seed(3))
    b = mask_tokens(*args, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
