"""benchmarks/grow_quality.py bookkeeping: which members were added, paired differences, targets."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import grow_quality as G

NAMES = ["neg", "neu", "pos"]


def _onehot(pred: np.ndarray) -> np.ndarray:
    p = np.full((pred.size, 3), 0.1)
    p[np.arange(pred.size), pred] = 0.8
    return p


def _run(labels: np.ndarray, members: dict[str, np.ndarray], published: np.ndarray) -> dict:
    probs = {n: _onehot(p) for n, p in members.items()}
    return {"names": list(members), "kinds": dict.fromkeys(members, "classifier"),
            "labels": labels, "label_names": NAMES, "raw": probs, "scaled": probs,
            "published": _onehot(published), "method": "soft_vote",
            "info": {n: {"params": 1e6, "infer_ms_per_text": 2.0} for n in members}}


def test_a_grown_run_is_compared_with_its_best_member_its_added_member_and_its_base():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 2000)

    def right(share: float) -> np.ndarray:  # predictions right on a share of the texts
        wrong = rng.random(labels.size) > share
        return np.where(wrong, (labels + 1) % 3, labels)

    a, b, c = right(0.50), right(0.50), right(0.60)
    base = _run(labels, {"a": a, "b": b}, right(0.52))
    grown_pred = right(0.63)
    grown = _run(labels, {"a": a, "b": b, "c": c}, grown_pred)
    res = G.compare(base, grown)
    assert res["added"] == ["c"] and res["best_member"] == "c"
    d = res["differences"]
    acc = (grown_pred == labels).mean()
    assert d["grown_minus_c"]["mean"] == pytest.approx(acc - (c == labels).mean())
    assert d["grown_minus_best_member"] == d["grown_minus_c"]
    assert 0 < d["grown_minus_base"]["se"] < 0.02
    assert res["targets"]["accuracy_52_5"] and res["targets"]["ahead_of_base"]
    assert res["targets"]["best_member_plus_1_5"]  # +3 pt with an SE near 1.5
    assert res["cost"]["params_grown"] == 3e6 and res["cost"]["infer_ms_base"] == 4.0
    md = G.markdown(res, "base", "grown", "commit x.")
    assert "| c (added) |" in md and "**grown ensemble**" in md

    with pytest.raises(SystemExit, match="plus new members"):
        G.compare(grown, base)  # the "grown" run lost a member
