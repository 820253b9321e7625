"""Shared fixtures: a loopback-only local Ray, the real SST data, tiny random-init members.

Ray binds 127.0.0.2 (Ray swaps 127.0.0.1 for the machine's real interface, not the rest of
127/8), so nothing a test starts listens beyond loopback.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

# Ray Train's controller polls its workers every 2 s (Ray's default), so every job finishes up to
# 2 s after its training function returns and starts later too; the suite runs ~100 tiny jobs.
# A no-op TorchTrainer.fit here: 12.3 s at the default, 7.7 s at 0.2 s. Set before any Ray starts:
# the controller and the `ray start` nodes of the cluster tests inherit it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")

# one intra-op thread: on a shared 2-core machine more threads spin against each other and a
# tiny model's step gets 10-30x slower
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / ".." / "shared" / "data"  # CI clones shared/ beside the repo
RAY_NODE_IP = "127.0.0.2"

# 2 layers, hidden 32: ~1M parameters (mostly the 30522-token embedding), milliseconds a step
TINY_ARCH: dict[str, Any] = {
    "num_hidden_layers": 2,
    "hidden_size": 32,
    "num_attention_heads": 2,
    "intermediate_size": 64,
}
# the same without dropout, for tests that compare two trajectories step by step
TINY_ARCH_NO_DROPOUT: dict[str, Any] = {
    **TINY_ARCH,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}


@pytest.fixture(scope="session")
def sst_dir() -> Path:
    """The real SST-5 csv directory (train/dev/test.csv), beside the repo at ../shared/data."""
    path = (DATA / "sst").resolve()
    if not (path / "train.csv").is_file():
        pytest.skip(f"SST data not found at {path}; clone shared/ beside the repo")
    return path


@pytest.fixture(scope="session")
def tokenizer():
    """The offline MiniLM fast tokenizer (BERT vocab, 30522 tokens)."""
    from ensemble.models.members import load_tokenizer

    return load_tokenizer("default")


@pytest.fixture(scope="session")
def ray_local():
    """A session-wide local Ray with 2 CPUs on 127.0.0.2 (no dashboard); shut down at the end.

    Tests that train in-process (`ensemble.cli.main(["train", ...])`) reuse it: the orchestrator
    only starts Ray when none is running.
    """
    import ray

    started = False
    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            _node_ip_address=RAY_NODE_IP,
            include_dashboard=False,
            log_to_driver=False,
        )
        started = True
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def tiny_member():
    """Factory of tiny random-init members: `tiny_member(num_labels, layers=2, seed=0, ...)`."""
    from ensemble.models.members import build_member

    def build(num_labels: int = 5, *, layers: int = 2, regression: bool = False, seed: int = 0,
              dropout: bool = True):
        torch.manual_seed(seed)
        arch = dict(TINY_ARCH if dropout else TINY_ARCH_NO_DROPOUT, num_hidden_layers=layers)
        return build_member("default", num_labels, regression=regression, pretrained=False,
                            arch=arch)

    return build
