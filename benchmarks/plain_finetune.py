"""A plain `transformers` fine-tune: the single model a user gets without `ensemble`.

    python benchmarks/plain_finetune.py --epochs 1 --seed 0 [--max-length 128] [--threads 1]

`AutoModelForSequenceClassification` on the member's encoder, AdamW (lr 5e-5, weight decay 0.01),
batch 32, a linear decay without warm-up, gradient clipping at 1.0, texts padded per batch. No
Ray, no DeepSpeed, nothing from this project's training code: only the data loader, so both
sides read the same texts. Dev and test accuracy, macro-F1 and NLL are recorded after every
epoch; the model after the last epoch is the answer (no early stopping, as a plain loop does).
`benchmarks/sst_quality.py --parity` runs this beside an `ensemble` classifier with the same
settings; as a script it writes one JSON line to stdout (or --out FILE).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def fine_tune(
    data: str,
    *,
    epochs: int = 1,
    seed: int = 0,
    lr: float = 5e-5,
    batch_size: int = 32,
    max_length: int = 128,
    warmup_ratio: float = 0.0,
    threads: int = 1,
    model: str = "default",
) -> dict:
    """Train one classifier the plain way; returns per-epoch dev/test metrics and test probs."""
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        get_linear_schedule_with_warmup,
    )

    from ensemble import config as C
    from ensemble.data import load_splits
    from ensemble.metrics import classification_metrics
    from ensemble.models.members import resolve_model_name

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    splits = load_splits(C.DataConfig(source=data))
    path = resolve_model_name(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    net = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=splits.num_labels()
    )
    texts, labels = splits.texts["train"], np.asarray(splits.labels["train"])
    steps = epochs * (len(texts) // batch_size)
    decay = [p for n, p in net.named_parameters() if p.ndim >= 2 and "norm" not in n.lower()]
    rest = [p for n, p in net.named_parameters() if not (p.ndim >= 2 and "norm" not in n.lower())]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                             {"params": rest, "weight_decay": 0.0}], lr=lr)
    sched = get_linear_schedule_with_warmup(opt, int(warmup_ratio * steps), steps)
    rng = np.random.default_rng(seed)

    def probs_of(split: str) -> np.ndarray:
        net.eval()
        out = []
        with torch.inference_mode():
            for i in range(0, len(splits.texts[split]), 128):
                batch = tokenizer(list(splits.texts[split][i:i + 128]), truncation=True,
                                  max_length=max_length, padding=True, return_tensors="pt")
                out.append(torch.softmax(net(**batch).logits, -1).numpy())
        return np.concatenate(out)

    history = []
    start = time.time()
    for epoch in range(epochs):
        net.train()
        order = rng.permutation(len(texts))
        for b in range(len(texts) // batch_size):
            index = order[b * batch_size:(b + 1) * batch_size]
            batch = tokenizer([texts[i] for i in index], truncation=True, max_length=max_length,
                              padding=True, return_tensors="pt")
            loss = net(**batch, labels=torch.as_tensor(labels[index])).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        row = {"epoch": epoch + 1, "train_s": round(time.time() - start, 1)}
        probs: dict[str, np.ndarray] = {}
        for split in ("dev", "test"):
            p = probs_of(split)
            m = classification_metrics(splits.labels[split], p, splits.label_names)
            row[split] = {k: m[k] for k in ("accuracy", "macro_f1", "nll", "ece", "brier")
                          if k in m}
            probs[split] = p
        history.append(row)
    return {"epochs": epochs, "seed": seed, "lr": lr, "batch_size": batch_size,
            "max_length": max_length, "warmup_ratio": warmup_ratio, "threads": threads,
            "model": model, "history": history, "test": history[-1]["test"],
            "dev": history[-1]["dev"], "wall_s": round(time.time() - start, 1),
            # the last epoch's probabilities, to combine plain models into a deep ensemble
            "dev_probs": probs["dev"].round(6).tolist(),
            "test_probs": probs["test"].round(6).tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sst"))
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--warmup-ratio", type=float, default=0.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", default="default")
    parser.add_argument("--out", help="write the JSON here instead of stdout")
    a = parser.parse_args()
    result = fine_tune(a.data, epochs=a.epochs, seed=a.seed, lr=a.lr, max_length=a.max_length,
                       warmup_ratio=a.warmup_ratio, threads=a.threads, model=a.model)
    text = json.dumps(result)
    if a.out:
        Path(a.out).write_text(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
