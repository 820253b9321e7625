"""Growing a finished one-round run: `ensemble train` with a config that adds a member trains only
the added member, keeps the others' weights, and publishes the combination of all of them.

Tiny random-init members on the real SST data, on the session's local Ray.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from ensemble.cli import main
from ensemble.rundir import Manifest, read_json

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def _config(path: Path, sst_dir: Path, run_dir: Path, members: dict) -> Path:
    cfg = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    cfg["data"].update(source=str(sst_dir), max_train_samples=64, max_eval_samples=48)
    cfg["output_dir"] = str(run_dir)
    cfg["members"] = members
    path.write_text(yaml.safe_dump(cfg))
    return path


def _digest(directory: Path) -> str:
    """Of the weights (the model card beside them describes the ensemble, so it changes)."""
    h = hashlib.sha256()
    files = sorted(directory.rglob("*.safetensors"))
    assert files, f"no weights in {directory}"
    for f in files:
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def test_adding_a_member_trains_only_that_member(ray_local, sst_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = {"classifier_a": {"kind": "classifier", "seed": 1}}
    grown = {**first, "classifier_b": {"kind": "classifier", "seed": 2}}
    one = _config(tmp_path / "one.yaml", sst_dir, run_dir, first)
    two = _config(tmp_path / "two.yaml", sst_dir, run_dir, grown)

    assert main(["train", str(one), "--no-progress"]) == 0
    before = read_json(run_dir / "state.json")
    export_a = _digest(run_dir / "members" / "classifier_a" / "export")
    assert list(Manifest.load(run_dir).members) == ["classifier_a"]

    assert main(["train", str(two), "--no-progress"]) == 0
    after = read_json(run_dir / "state.json")
    assert after["rounds_completed"] == 1 and len(after["rounds"]) == 1
    assert after["history"]["classifier_a"] == before["history"]["classifier_a"]  # not retrained
    assert after["members"]["classifier_a"] == before["members"]["classifier_a"]
    assert _digest(run_dir / "members" / "classifier_a" / "export") == export_a
    assert after["history"]["classifier_b"]  # the added member trained
    manifest = Manifest.load(run_dir)
    assert list(manifest.members) == ["classifier_a", "classifier_b"]
    assert set(manifest.combine.members) == {"classifier_a", "classifier_b"}
    assert set(after["rounds"][0]["dev"]) >= {"classifier_a", "classifier_b"}

    # a changed member is not a growth: the run refuses and says how to start over
    changed = {**grown, "classifier_a": {"kind": "classifier", "seed": 3}}
    bad = _config(tmp_path / "bad.yaml", sst_dir, run_dir, changed)
    assert main(["train", str(bad), "--no-progress"]) == 2
    assert read_json(run_dir / "state.json") == after  # nothing written
