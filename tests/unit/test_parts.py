"""Resumable block output: part files land whole, a re-run keeps them, assembly is exact."""

from __future__ import annotations

import csv
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ensemble.parts import JobMismatchError, PartsDir, output_format, parts_dir_for

JOB = {"input": "in.csv", "run_dir": "run"}


def _block(parts: PartsDir, block: int) -> pa.Table:
    start, stop = parts.bounds(block)
    rows = np.arange(start, stop)[::-1]  # any order: `write` sorts by row
    return pa.table({"row": rows, "text": [f"t{i}" for i in rows], "p": rows / 10.0})


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_blocks_written_out_of_order_assemble_into_every_row_once(tmp_path, suffix):
    out = tmp_path / f"preds{suffix}"
    parts = PartsDir.open(out, JOB, rows=10, block_size=4)
    assert parts.num_blocks == 3 and parts.bounds(2) == (8, 10)
    for block in (2, 0, 1):
        parts.write(block, _block(parts, block))
    assert parts.done() == [0, 1, 2]
    assert parts.assemble(out) == out
    assert not parts_dir_for(out).exists()  # the parts go once the output is whole
    if suffix == ".parquet":
        rows = pq.read_table(out).to_pylist()
    elif suffix == ".jsonl":
        rows = [json.loads(line) for line in out.read_text().splitlines()]
    else:
        with open(out, newline="") as f:
            rows = [{**r, "row": int(r["row"]), "p": float(r["p"])} for r in csv.DictReader(f)]
    assert [r["row"] for r in rows] == list(range(10))
    assert [r["text"] for r in rows] == [f"t{i}" for i in range(10)]
    assert [r["p"] for r in rows] == pytest.approx([i / 10 for i in range(10)])


def test_reopen_keeps_finished_blocks_and_drops_cut_off_writes(tmp_path):
    out = tmp_path / "preds.parquet"
    parts = PartsDir.open(out, JOB, rows=10, block_size=4)
    parts.write(0, _block(parts, 0))
    first = parts.path(0).stat()
    # what a kill leaves behind: a temp file mid-write, and a part of the wrong size
    (parts.root / ".part-00001.parquet.x1.tmp").write_bytes(b"half")
    pq.write_table(_block(parts, 1).slice(0, 2), parts.path(1))

    again = PartsDir.open(out, JOB, rows=10, block_size=4)
    assert again.done() == [0]  # block 1 is redone, block 0 is not
    assert not list(again.root.glob(".*.tmp"))
    assert (again.path(0).stat().st_ino, again.path(0).stat().st_mtime_ns) == (
        first.st_ino, first.st_mtime_ns)
    with pytest.raises(ValueError, match="blocks \\[1, 2\\]"):
        list(again.tables())


def test_another_job_in_the_parts_directory_is_refused(tmp_path):
    out = tmp_path / "preds.csv"
    PartsDir.open(out, JOB, rows=10, block_size=4)
    with pytest.raises(JobMismatchError, match="input: 'in.csv' -> 'other.csv'.*delete"):
        PartsDir.open(out, {**JOB, "input": "other.csv"}, rows=10, block_size=4)
    with pytest.raises(JobMismatchError, match="block_size: 4 -> 5"):
        PartsDir.open(out, JOB, rows=10, block_size=5)


def test_a_block_with_other_rows_is_not_written(tmp_path):
    parts = PartsDir.open(tmp_path / "p.parquet", JOB, rows=10, block_size=4)
    wrong = _block(parts, 1)
    with pytest.raises(ValueError, match="rows 0..3"):
        parts.write(0, wrong)
    doubled = pa.concat_tables([_block(parts, 0).slice(0, 2)] * 2)
    with pytest.raises(ValueError, match="once each"):
        parts.write(0, doubled)
    assert parts.done() == []


def test_output_suffix_must_be_known():
    assert [output_format(f"x{s}") for s in (".csv", ".JSONL", ".parquet")] == [
        "csv", "jsonl", "parquet"]
    with pytest.raises(ValueError, match=r"unknown output suffix '\.xlsx'.*\*\.csv, \*\.jsonl"):
        output_format("preds.xlsx")
