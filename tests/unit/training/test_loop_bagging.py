"""Member diversity settings: bagging draws, per-member seeds in the config."""

from __future__ import annotations

import numpy as np
import pytest

from ensemble import config as C
from ensemble.training.loop import Targets, bag_indices


def test_bagging_is_reproducible_per_seed_and_differs_across_seeds() -> None:
    a, b = bag_indices(1000, 3, bootstrap=True), bag_indices(1000, 3, bootstrap=True)
    assert np.array_equal(a, b) and len(a) == 1000
    assert len(np.unique(a)) < 700  # with replacement: ~63% distinct texts
    assert not np.array_equal(a, bag_indices(1000, 4, bootstrap=True))
    half = bag_indices(1000, 3, fraction=0.5)
    assert len(half) == 500 and len(np.unique(half)) == 500 and half.max() < 1000
    assert np.array_equal(bag_indices(10, 3), np.arange(10))  # no bagging: every text once


def test_targets_subset_follows_the_bag() -> None:
    t = Targets(labels=np.arange(5), intensity=np.linspace(0, 1, 5).astype(np.float32))
    bag = np.array([0, 0, 3])
    sub = t.subset(bag)
    assert sub.labels.tolist() == [0, 0, 3] and sub.intensity.tolist() == [0.0, 0.0, 0.75]
    assert sub.teacher_logits is None


def test_member_seed_and_bagging_config() -> None:
    cfg = C.load("configs/tiny.yaml", ["members.classifier.seed=7",
                                       "members.classifier.bootstrap=true",
                                       "members.teacher.data_fraction=0.8"])
    c = cfg.members["classifier"]
    assert (c.seed, c.bootstrap, cfg.members["teacher"].data_fraction) == (7, True, 0.8)
    assert cfg.members["regressor"].seed is None
    with pytest.raises(C.ConfigError, match="data_fraction"):
        C.load("configs/tiny.yaml", ["members.classifier.data_fraction=0"])


def test_member_max_length_falls_back_to_the_data_setting() -> None:
    cfg = C.load("configs/tiny.yaml", ["data.max_length=48", "members.classifier.max_length=16"])
    assert cfg.max_length("classifier") == 16
    assert cfg.max_length("regressor") == 48  # no max_length of its own
    with pytest.raises(C.ConfigError, match="max_length=4 is too short"):
        C.load("configs/tiny.yaml", ["members.classifier.max_length=4"])
