"""`ensemble predict` for real: Ray Data on a local Ray (127.0.0.2), one actor pool per member.

The run has two tiny members (a classifier with a temperature and a regressor voting through
its softened bin, combined with learned weights), so the pipeline has two actor pools. Its
answers are checked row by row against `Ensemble.from_run`, which tests/e2e/test_serve_app.py
holds equal to the server's. A predict process is SIGKILLed (driver, Ray and actors) after its
first block lands; the same command then finishes the job without redoing that block.
"""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers_procs import kill_session

from ensemble.cli import main
from ensemble.inference import Ensemble, prediction_row
from ensemble.testing import make_run_dir

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
MEMBERS = {"classifier": "classifier", "regressor": "regressor"}
COMBINE = {
    "method": "weighted",
    "weights": {"classifier": 0.7, "regressor": 0.3},
    "params": {"temperatures": {"classifier": 1.7}, "regressor_sharpness": 12.0},
}
BASE = [
    "A warm , funny , engaging film .",
    'Nothing \'s at stake , just a "twisty" double-cross you can smell a mile away .',
    "The plot is paper-thin and the acting is worse .",
    "An otherwise intense , twist-and-turn thriller .",
    "I did n't care .",
]


def _texts(n: int) -> list[str]:
    return [f"{BASE[i % len(BASE)]} take {i}" for i in range(n)]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run_dir(tmp_path_factory.mktemp("batch") / "run", n_dev=50, combine=COMBINE,
                        kinds=MEMBERS)


def _write_csv(path: Path, column: str, texts: list[str]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", column])
        writer.writerows((f"id{i}", t) for i, t in enumerate(texts))
    return path


def _read(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _assert_rows_equal(got: list[dict], texts: list[str], want: list[dict]) -> None:
    """Rows in input order, once each, with the in-process answer (float rounding aside)."""
    assert [int(r["row"]) for r in got] == list(range(len(texts)))
    assert [r["text"] for r in got] == texts
    assert set(got[0]) == {"row", "text", *want[0]}
    for g, w in zip(got, want, strict=True):
        for key, value in w.items():
            if isinstance(value, str):
                assert g[key] == value, key
            else:  # CSV cells come back as text
                assert float(g[key]) == pytest.approx(value, abs=1e-6), key


def test_predict_csv_and_parquet_inputs_on_two_actor_pools(ray_local, run_dir, tmp_path, capsys):
    texts = _texts(40)
    want = [prediction_row(p) for p in Ensemble.from_run(run_dir).predict(texts, True)]
    assert {r["label"] for r in want} and "members.regressor.intensity" in want[0]

    source = _write_csv(tmp_path / "in.csv", "sentence", texts)
    out = tmp_path / "preds.parquet"
    args = ["predict", str(run_dir), str(source), "-o", str(out), "--text-column", "sentence",
            "--members", "--block-size", "16", "--batch-size", "8", "--no-progress"]
    assert main(args) == 0
    assert "40 rows, 40 predicted now" in capsys.readouterr().out
    _assert_rows_equal(_read(out), texts, want)
    assert not (tmp_path / "preds.parquet.parts").exists()

    # Parquet in; CSV and JSON lines out, the ensemble's columns only
    source = tmp_path / "in.parquet"
    pq.write_table(pa.table({"text": texts[:25], "stars": list(range(25))}), source)
    ensemble_only = [{k: v for k, v in r.items() if not k.startswith("members.")}
                     for r in want[:25]]
    for name in ("preds.csv", "preds.jsonl"):
        out = tmp_path / name
        assert main(["predict", str(run_dir), str(source), "-o", str(out), "--block-size", "10",
                     "--batch-size", "8", "--no-progress"]) == 0
        _assert_rows_equal(_read(out), texts[:25], ensemble_only)


def test_killed_predict_resumes_without_duplicate_or_missing_rows(
    ray_local, run_dir, tmp_path, capsys
):
    n, block = 3000, 100
    texts = _texts(n)
    source = _write_csv(tmp_path / "in.csv", "text", texts)
    out = tmp_path / "preds.csv"
    args = ["predict", str(run_dir), str(source), "-o", str(out), "--block-size", str(block),
            "--batch-size", "50", "--no-progress"]
    parts = tmp_path / "preds.csv.parts"
    log = open(tmp_path / "predict.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "ensemble.cli", *args], cwd=REPO,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 1200
        while not any(parts.glob("part-*.parquet")):
            assert proc.poll() is None, (tmp_path / "predict.log").read_text()[-3000:]
            assert time.time() < deadline, "no block landed in time"
            time.sleep(0.1)
    finally:
        kill_session(proc.pid)
        proc.wait()
        log.close()
    assert proc.returncode == -signal.SIGKILL
    landed = sorted(p.name for p in parts.glob("part-*.parquet"))
    assert 1 <= len(landed) < n // block, landed  # killed mid-way
    assert not out.exists()

    assert main(args) == 0
    kept = len(landed)
    report = capsys.readouterr().out
    assert f"{n - kept * block} predicted now; {kept} of {n // block} blocks kept" in report
    rows = _read(out)
    assert [int(r["row"]) for r in rows] == list(range(n))  # no duplicate, none missing
    assert [r["text"] for r in rows] == texts
    sample = list(range(0, n, 97))  # rows of kept blocks and of blocks predicted after the kill
    want = Ensemble.from_run(run_dir).predict([texts[i] for i in sample])
    _assert_rows_equal(
        [{**rows[i], "row": j} for j, i in enumerate(sample)],
        [texts[i] for i in sample],
        [prediction_row(p) for p in want],
    )
    assert not parts.exists()
