"""Resumable output of a long prediction job: numbered part files, then one file assembled.

Rows ``0..N-1`` are cut into blocks of ``block_size``. A finished block is written to
``<OUT>.parts/part-<k>.parquet`` through a temp file and a rename, so a part file on disk is
always whole; a re-run of the same job skips the blocks that have one. ``job.json`` in the parts
directory describes the job (input, run, settings); a re-run with a different job stops with an
error instead of mixing blocks of two jobs. `PartsDir.assemble` checks that the parts hold every
row exactly once, in order, streams them into ``OUT`` (CSV, JSON lines or Parquet by suffix)
through a temp file and a rename, and then removes the parts directory.

Pure module (pyarrow only): no Ray.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ensemble.rundir import atomic_write_bytes, atomic_write_json, read_json

__all__ = ["FORMATS", "JobMismatchError", "PartsDir", "output_format", "parts_dir_for"]

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".parquet": "parquet"}
JOB = "job.json"
ROW = "row"  # the input row index every part carries


class JobMismatchError(ValueError):
    """The parts directory holds blocks of another job."""


def output_format(path: str | os.PathLike) -> str:
    """``csv``, ``jsonl`` or ``parquet`` from the output path's suffix.

    Raises:
        ValueError: for another suffix, naming the ones that work.
    """
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(
            f"cannot write {Path(path).name!r}: unknown output suffix {suffix or '(none)'!r}; "
            f"name the output file *{', *'.join(FORMATS)}"
        )
    return FORMATS[suffix]


def parts_dir_for(out: str | os.PathLike) -> Path:
    """``<OUT>.parts`` beside the output file."""
    out = Path(out)
    return out.with_name(f"{out.name}.parts")


@dataclass(frozen=True)
class PartsDir:
    """The blocks of one job. Use `PartsDir.open`."""

    root: Path
    rows: int
    block_size: int

    @classmethod
    def open(
        cls, out: str | os.PathLike, job: dict[str, Any], rows: int, block_size: int
    ) -> PartsDir:
        """Create the parts directory of ``out``, or reopen it for the same job.

        Args:
            out: the final output file.
            job: JSON-safe description of the job; a re-run must describe the same job.
            rows: N, the number of input rows.
            block_size: rows per block (part file).

        Raises:
            JobMismatchError: if the directory holds blocks of another job.
            ValueError: for ``rows < 1`` or ``block_size < 1``.
        """
        if rows < 1 or block_size < 1:
            raise ValueError(f"need rows >= 1 and block_size >= 1, got {rows} and {block_size}")
        root = parts_dir_for(out)
        job = {**job, "rows": rows, "block_size": block_size}
        saved = root / JOB
        if saved.is_file():
            old = read_json(saved)
            if old != job:
                diff = sorted(k for k in set(old) | set(job) if old.get(k) != job.get(k))
                changes = "; ".join(f"{k}: {old.get(k)!r} -> {job.get(k)!r}" for k in diff)
                raise JobMismatchError(
                    f"{root} holds blocks of another job ({changes}); re-run with the same "
                    f"input, run and settings to resume it, or delete {root} to start over"
                )
        else:
            root.mkdir(parents=True, exist_ok=True)
            atomic_write_json(saved, job)
        for stale in root.glob(".*.tmp"):  # a write cut off by a kill; its block is redone
            stale.unlink(missing_ok=True)
        return cls(root, rows, block_size)

    @property
    def num_blocks(self) -> int:
        return -(-self.rows // self.block_size)

    def bounds(self, block: int) -> tuple[int, int]:
        """Rows ``[start, stop)`` of ``block``."""
        start = block * self.block_size
        return start, min(start + self.block_size, self.rows)

    def path(self, block: int) -> Path:
        return self.root / f"part-{block:05d}.parquet"

    def done(self) -> list[int]:
        """Blocks whose part file is on disk with the block's number of rows."""
        finished = []
        for block in range(self.num_blocks):
            path = self.path(block)
            start, stop = self.bounds(block)
            if path.is_file() and pq.read_metadata(path).num_rows == stop - start:
                finished.append(block)
        return finished

    def write(self, block: int, table: pa.Table) -> Path:
        """Write ``block``'s rows (any order; sorted here by ``row``) atomically.

        Raises:
            ValueError: if ``table`` does not hold exactly the block's rows.
        """
        table = table.sort_by(ROW)
        start, stop = self.bounds(block)
        if not np.array_equal(table.column(ROW).to_numpy(), np.arange(start, stop)):
            raise ValueError(f"block {block} needs rows {start}..{stop - 1} once each")
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        path = self.path(block)
        atomic_write_bytes(path, sink.getvalue().to_pybytes())
        return path

    def tables(self) -> Iterator[pa.Table]:
        """Every block's table in order, checked to hold rows 0..N-1 once each.

        Raises:
            ValueError: if a block is missing or holds other rows.
        """
        missing = sorted(set(range(self.num_blocks)) - set(self.done()))
        if missing:
            raise ValueError(f"blocks {missing[:10]} of {self.root} are not finished")
        for block in range(self.num_blocks):
            table = pq.read_table(self.path(block))
            start, stop = self.bounds(block)
            rows = table.column(ROW).to_numpy()
            if not np.array_equal(rows, np.arange(start, stop)):
                raise ValueError(f"{self.path(block)} does not hold rows {start}..{stop - 1}")
            yield table

    def assemble(self, out: str | os.PathLike) -> Path:
        """Stream the blocks into ``out`` (format by suffix) atomically; remove the parts.

        Returns:
            The output path.
        """
        out = Path(out)
        fmt = output_format(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        os.close(fd)
        try:
            _write(Path(tmp), fmt, self.tables())
            os.chmod(tmp, 0o644)
            os.replace(tmp, out)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        shutil.rmtree(self.root)
        return out


def _write(path: Path, fmt: str, tables: Iterator[pa.Table]) -> None:
    first = next(tables)
    schema = first.schema
    if fmt == "parquet":
        with pq.ParquetWriter(path, schema) as writer:
            for table in _chain(first, tables):
                writer.write_table(table.cast(schema))
    elif fmt == "csv":
        import pyarrow.csv as pacsv

        with pacsv.CSVWriter(str(path), schema) as writer:
            for table in _chain(first, tables):
                writer.write_table(table.cast(schema))
    else:
        with open(path, "w", encoding="utf-8") as f:
            for table in _chain(first, tables):
                for row in table.to_pylist():
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _chain(first: pa.Table, rest: Iterator[pa.Table]) -> Iterator[pa.Table]:
    yield first
    yield from rest
