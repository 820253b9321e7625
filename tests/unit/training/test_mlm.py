"""ensemble.training.mlm: the masked-LM batches and the dev masked-LM loss, on real SST texts
and a tiny random-init BERT under an MLM head (the stage itself runs in a Ray Train worker and
is covered by the e2e tests)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ensemble.models.members import build_mlm
from ensemble.training.engine import OptimSettings, make_engine
from ensemble.training.loop import encode
from ensemble.training.mlm import _mlm_batch, masked_lm_loss

TINY_ARCH = {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2,
             "intermediate_size": 64}


@pytest.fixture(scope="module")
def ids(sst_dir: Path, tokenizer) -> list[list[int]]:
    """Token ids of the first 64 SST training texts, cut at 48 tokens (lengths vary)."""
    with open(sst_dir / "train.csv", newline="", encoding="utf-8") as f:
        texts = [row["text"] for _, row in zip(range(64), csv.DictReader(f), strict=False)]
    return encode(tokenizer, texts, 48)


def _batch(ids, tokenizer, p: float = 0.15, seed: int = 0, index=None):
    index = np.arange(len(ids)) if index is None else index
    return _mlm_batch(ids, index, tokenizer, p, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("p", [0.15, 0.5])
def test_mlm_batch_masks_about_p_of_the_real_tokens(ids, tokenizer, p: float) -> None:
    batch = _batch(ids, tokenizer, p)
    original = torch.full_like(batch["input_ids"], tokenizer.pad_token_id)
    for row, seq in enumerate(ids):
        original[row, : len(seq)] = torch.tensor(seq)
    special = torch.isin(original, torch.tensor(tokenizer.all_special_ids))
    real = batch["attention_mask"].bool() & ~special  # what may be masked
    chosen = batch["labels"] != -100
    n = int(real.sum())
    assert n > 1500  # enough tokens for the rate to be within a few points of p
    assert abs(int(chosen.sum()) / n - p) < 4 * math.sqrt(p * (1 - p) / n)
    assert not (chosen & ~real).any()  # never [CLS], [SEP] or padding
    assert torch.equal(batch["labels"][chosen], original[chosen])  # labels: the original ids
    assert torch.equal(batch["input_ids"][~chosen], original[~chosen])  # the rest untouched
    replaced = batch["input_ids"][chosen] == tokenizer.mask_token_id
    assert 0.7 < float(replaced.float().mean()) < 0.9  # BERT's 80% [MASK]


def test_mlm_batch_pads_the_chosen_texts_in_index_order(ids, tokenizer) -> None:
    index = np.array([5, 0, 9])
    batch = _batch(ids, tokenizer, index=index)
    lengths = [len(ids[i]) for i in index]
    assert batch["input_ids"].shape == (3, max(lengths))
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths
    for row, i in enumerate(index):  # [CLS] and [SEP] are never masked: each row is its text
        assert batch["input_ids"][row, 0] == ids[i][0] == tokenizer.cls_token_id
        assert batch["input_ids"][row, lengths[row] - 1] == ids[i][-1] == tokenizer.sep_token_id


def test_mlm_batch_is_reproducible_with_a_seeded_generator(ids, tokenizer) -> None:
    a, b, c = (_batch(ids, tokenizer, seed=s) for s in (3, 3, 4))
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(a[key], b[key])
    assert not torch.equal(a["labels"], c["labels"])
    # one generator drawn twice gives two different masks (each step masks anew)
    g = torch.Generator().manual_seed(3)
    index = np.arange(len(ids))
    first = _mlm_batch(ids, index, tokenizer, 0.15, g)
    second = _mlm_batch(ids, index, tokenizer, 0.15, g)
    assert torch.equal(first["labels"], a["labels"])
    assert not torch.equal(second["labels"], first["labels"])


def test_masked_lm_loss_starts_at_chance_and_drops_with_training(ids, tokenizer) -> None:
    torch.manual_seed(0)
    model = build_mlm("default", pretrained=False, arch=TINY_ARCH)
    dev = ids[:16]
    before = masked_lm_loss(model, dev, tokenizer, 0.15, batch_size=8)
    assert model.training  # handed back in the mode it came in
    model.eval()
    masked_lm_loss(model, dev[:4], tokenizer, 0.15, batch_size=8)
    assert not model.training
    model.train()
    # a random init predicts ~uniformly over the vocabulary
    assert before == pytest.approx(math.log(len(tokenizer)), abs=0.3)
    torch.manual_seed(123)  # the fixed mask does not depend on the global RNG
    assert masked_lm_loss(model, dev, tokenizer, 0.15, batch_size=8) == before

    # a few steps (each predicts 30522 logits per token, so few) learn the common tokens
    engine = make_engine(model, OptimSettings(lr=1e-2, scheduler="constant", warmup_ratio=0.0,
                                              total_steps=8), backend="torch")
    g = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    for _ in range(8):
        index = rng.choice(len(ids), 8, replace=False)
        loss = engine(**_mlm_batch(ids, index, tokenizer, 0.15, g)).loss
        engine.backward(loss)
        engine.step()
    after = masked_lm_loss(model, dev, tokenizer, 0.15, batch_size=8)
    assert math.isfinite(after) and after < before - 0.5
