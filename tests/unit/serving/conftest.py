"""Shared fixtures of the serving unit tests: a run directory that needs no weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ensemble.rundir import Manifest, MemberEntry
from ensemble.testing import synthetic_predictions

KINDS = {
    "classifier": "classifier",
    "regressor": "regressor",
    "teacher": "teacher",
    "student": "student",
}


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A manifest + predictions + export dirs holding placeholder files (no weights needed)."""
    members = {}
    for name, kind in KINDS.items():
        export = tmp_path / "members" / name / "export"
        export.mkdir(parents=True)
        (export / "model.safetensors").write_bytes(name.encode())
        members[name] = MemberEntry(
            kind=kind,
            path=f"members/{name}/export",
            num_labels=1 if kind == "regressor" else 5,
            max_length=32,
        )
    Manifest(
        name="t",
        label_names=list("abcde"),
        class_intensity=[0.1, 0.3, 0.5, 0.7, 0.9],
        intensity_edges=[0.2, 0.4, 0.6, 0.8],
        intensity_range=[0, 1],
        members=members,
        combine={
            "method": "weighted",
            "weights": {"classifier": 0.4, "regressor": 0.1, "teacher": 0.4, "student": 0.1},
            "params": {},
        },
        config={"serve": {"port": 18999, "max_batch_size": 8}},
    ).save(tmp_path)
    (tmp_path / "predictions").mkdir()
    np.savez(tmp_path / "predictions" / "dev.npz", **synthetic_predictions(300, 0))
    return tmp_path
