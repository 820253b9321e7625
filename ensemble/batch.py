"""`ensemble predict RUN_DIR INPUT --output OUT`: batch inference over a file with Ray Data.

The texts go through one Ray Data ``map_batches`` stage per member, each on its own actor pool
(``concurrency`` actors that load the member's export once, `inference.LoadedMember`), then a
combiner stage that turns the member outputs into the served answer (`cascade.ensemble_answer`,
`schemas.predictions`, flattened by `inference.prediction_row`). On a cluster the pools spread
over its nodes; locally the same code runs on a local Ray on a loopback address
(`raystart.init_ray`).
Every member answers every text: the cascade is a serving latency device, not used here.

Output is resumable (`ensemble.parts`): blocks of ``block_size`` rows land as part files as
they finish; a re-run after a kill predicts only the blocks without one, then assembles ``OUT``
with every row exactly once, in input order.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import logging
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ensemble.combination import Combination
from ensemble.inference import LoadedMember, combiner_for, prediction_row
from ensemble.parts import ROW, PartsDir, output_format
from ensemble.serving.cascade import ensemble_answer
from ensemble.serving.schemas import predictions

__all__ = ["BatchResult", "add_commands", "predict_file", "read_texts"]

logger = logging.getLogger(__name__)

TEXT = "text"
_OUT = "__out__"  # prefix of the member-output columns between the stages


@dataclass(frozen=True)
class BatchResult:
    output: Path
    rows: int
    blocks: int
    resumed_blocks: int  # blocks an earlier, interrupted run had finished
    predicted_rows: int  # texts predicted by this run
    wall_s: float


def read_texts(path: str | os.PathLike, column: str = TEXT) -> list[str]:
    """The texts of ``column`` in a file the data layer reads (csv, tsv, json, jsonl, parquet).

    Raises:
        DataError: a missing, empty or unreadable file, a missing column or empty texts; the
            message names the fix.
    """
    from ensemble.data import DataError, read_file
    from ensemble.data.sources import _EXTENSIONS, _has_rows

    path = Path(path)
    if not path.is_file():
        raise DataError(f"input file {str(path)!r} not found; pass the path of a file to predict")
    if path.suffix.lower() not in _EXTENSIONS:
        raise DataError(
            f"cannot tell the format of input {path.name!r}; name it *{', *'.join(_EXTENSIONS)}"
        )
    if not _has_rows(path, _EXTENSIONS[path.suffix.lower()]):
        raise DataError(f"input {path} has no rows; give it at least one text to predict")
    table = read_file(path)
    if column not in table.columns:
        have = list(table.columns)
        close = difflib.get_close_matches(column, have, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise DataError(
            f"input {path} has no column {column!r}{hint}; its columns are {have}. Pass "
            "--text-column NAME"
        )
    values = table.columns[column]
    bad = [i for i, v in enumerate(values) if not isinstance(v, str) or not v.strip()]
    if bad:
        raise DataError(
            f"input {path}: {len(bad)} empty or null text(s) in {column!r} at rows {bad[:8]}"
            f"{' ...' if len(bad) > 8 else ''} (0-based data rows); fill or drop those rows"
        )
    return list(values)


class MemberStage:
    """A Ray Data actor: one member's export, loaded once, adds that member's output column."""

    def __init__(self, run_dir: str, name: str, num_threads: int, gpu: bool, chunk: int) -> None:
        self._name, self._chunk = name, chunk
        self._member = LoadedMember(run_dir, name, num_threads=num_threads, gpu=gpu)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch[_OUT + self._name] = self._member([str(t) for t in batch[TEXT]], self._chunk)
        return batch  # (B, C) probabilities, or (B,) intensities


def combine_stage(
    batch: dict[str, np.ndarray], spec: Combination, return_members: bool
) -> dict[str, np.ndarray]:
    """Ray Data stage: member outputs -> the served answer's columns (`prediction_row`)."""
    outputs = {n: batch[_OUT + n] for n in spec.members}
    rows = [prediction_row(p) for p in predictions(ensemble_answer(outputs, spec), spec,
                                                   return_members)]
    columns = {k: np.array([r[k] for r in rows]) for k in rows[0]}
    return {ROW: batch[ROW], TEXT: batch[TEXT], **columns}


def job_description(
    run_dir: Path, input_path: Path, text_column: str, members: bool, spec: Combination
) -> dict[str, Any]:
    """What must not change between a run and its resumption (`PartsDir.open`)."""
    from ensemble.rundir import MANIFEST, Manifest
    from ensemble.serving.deploy import members_fingerprint

    stat = input_path.stat()
    manifest_hash = hashlib.sha1((run_dir / MANIFEST).read_bytes()).hexdigest()[:16]
    return {
        "input": str(input_path.resolve()),
        "input_size": stat.st_size,
        "input_mtime_ns": stat.st_mtime_ns,
        "text_column": text_column,
        "run_dir": str(run_dir.resolve()),
        "manifest": manifest_hash,
        "members_fingerprint": members_fingerprint(run_dir, Manifest.load(run_dir)),
        "method": spec.method,
        "return_members": members,
    }


def predict_file(
    run_dir: str | os.PathLike,
    input_path: str | os.PathLike,
    output: str | os.PathLike,
    text_column: str = TEXT,
    members: bool = False,
    method: str | None = None,
    block_size: int = 10_000,
    batch_size: int = 64,
    actors: int = 1,
    num_cpus: float | None = None,
    num_gpus: float = 0.0,
    address: str | None = None,
    progress: bool = True,
) -> BatchResult:
    """Predict every text of ``input_path`` with the run's ensemble into ``output``.

    Args:
        run_dir: the finished run.
        input_path: csv/tsv/json/jsonl/parquet with a ``text_column``.
        output: ``.csv``, ``.jsonl`` or ``.parquet``; one row per input row: ``row`` (0-based
            input row), ``text``, and the fields of ``POST /predict`` flattened
            (`inference.prediction_row`).
        text_column: the column holding the texts.
        members: add each member's columns (``members.<name>.*``).
        method: override of the manifest's combine method.
        block_size: rows per resumable block (part file).
        batch_size: texts per ``map_batches`` call of a member actor.
        actors: actors in each member's pool.
        num_cpus: CPUs per actor; None: 1, or less on a local Ray too small for every pool.
        num_gpus: GPUs per actor.
        address: Ray cluster to join; None starts a local Ray (or uses RAY_ADDRESS).
        progress: show a progress bar on stderr.

    Raises:
        FileNotFoundError: no finished run at ``run_dir``.
        DataError: a bad input file. ValueError: bad settings or a parts directory of another
            job (`JobMismatchError`).
    """
    t0 = time.perf_counter()
    run_dir, input_path, output = Path(run_dir), Path(input_path), Path(output)
    output_format(output)  # an unknown suffix fails before any work
    for name, value in (("--block-size", block_size), ("--batch-size", batch_size),
                        ("--actors", actors)):
        if value < 1:
            raise ValueError(f"{name}={value} must be >= 1")
    _, spec, cfg = combiner_for(run_dir, method, cascade=False)
    texts = read_texts(input_path, text_column)
    job = job_description(run_dir, input_path, text_column, members, spec)
    parts = PartsDir.open(output, job, len(texts), block_size)
    done = set(parts.done())
    todo = [b for b in range(parts.num_blocks) if b not in done]
    if done:
        logger.info("resuming %s: %d of %d blocks already written", output, len(done),
                    parts.num_blocks)
    predicted = sum(parts.bounds(b)[1] - parts.bounds(b)[0] for b in todo)
    if todo:
        stages = _Stages(str(run_dir.resolve()), spec, members, batch_size, actors, num_cpus,
                         num_gpus, cfg.forward_chunk_size)
        _run(parts, todo, texts, stages, address, progress)
    parts.assemble(output)
    return BatchResult(output, len(texts), parts.num_blocks, len(done), predicted,
                       time.perf_counter() - t0)


@dataclass(frozen=True)
class _Stages:
    """How the pipeline's stages run (see `predict_file`'s arguments)."""

    run_dir: str
    spec: Combination
    members: bool
    batch_size: int
    actors: int
    num_cpus: float | None
    num_gpus: float
    chunk_size: int  # texts per forward pass inside a batch (serve.forward_chunk_size)


def _run(parts: PartsDir, todo: list[int], texts: list[str], stages: _Stages,
         address: str | None, progress: bool) -> None:
    """Predict the rows of ``todo``; each block is written as soon as all its rows are back."""
    import ray
    from tqdm import tqdm

    started = _init_ray(Path(stages.run_dir), address)
    try:
        ds = _pipeline(parts, todo, texts, stages)
        pending: dict[int, list[pa.Table]] = defaultdict(list)
        have: dict[int, int] = defaultdict(int)
        left = sum(parts.bounds(b)[1] - parts.bounds(b)[0] for b in todo)
        with tqdm(total=parts.rows, initial=parts.rows - left, unit="text", desc="predict",
                  disable=not progress, file=sys.stderr) as bar:
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                blocks = batch.column(ROW).to_numpy() // parts.block_size
                for block in np.unique(blocks):
                    piece = batch.filter(pa.array(blocks == block))
                    pending[int(block)].append(piece)
                    have[int(block)] += piece.num_rows
                    start, stop = parts.bounds(int(block))
                    if have[int(block)] == stop - start:  # the block is complete: it lands now
                        parts.write(int(block), pa.concat_tables(pending.pop(int(block))))
                bar.update(batch.num_rows)
        if pending:
            raise RuntimeError(f"blocks {sorted(pending)} came back incomplete from Ray Data")
    finally:
        if started:
            ray.shutdown()


def _init_ray(run_dir: Path, address: str | None) -> bool:
    """Join ``address`` (or RAY_ADDRESS) or start a local Ray the way `ensemble train` does."""
    from ensemble.raystart import init_ray, run_ray_config

    return init_ray(run_ray_config(run_dir), address)


def _pipeline(parts: PartsDir, todo: list[int], texts: list[str], st: _Stages) -> Any:
    """The Ray Data plan: input blocks -> one actor pool per member -> the combiner."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # one bar: ours, counting texts
    tables = []
    for block in todo:
        start, stop = parts.bounds(block)
        for i in range(start, stop, st.batch_size):
            rows = np.arange(i, min(i + st.batch_size, stop))
            tables.append(pa.table({ROW: rows, TEXT: [texts[j] for j in rows]}))
    ds = ray.data.from_arrow(tables)
    cpus = st.num_cpus
    if cpus is None:
        cpus = _cpus_per_actor(len(st.spec.members) * st.actors)
    threads = max(1, round(cpus))
    for name in st.spec.members:
        ds = ds.map_batches(
            MemberStage,
            fn_constructor_args=(st.run_dir, name, threads, st.num_gpus > 0, st.chunk_size),
            batch_size=st.batch_size,
            batch_format="numpy",
            concurrency=st.actors,  # an actor pool of this size per member
            num_cpus=cpus,
            num_gpus=st.num_gpus,
        )
    return ds.map_batches(
        combine_stage,
        fn_kwargs={"spec": st.spec, "return_members": st.members},
        batch_size=st.batch_size,
        batch_format="numpy",
        num_cpus=min(cpus, 0.25),
    )


def _cpus_per_actor(pool_actors: int) -> float:
    """1 CPU per actor, or an equal share of a smaller Ray so that every pool can start."""
    import ray

    total = float(ray.cluster_resources().get("CPU", 1.0))
    # leave a share for the combiner tasks; floor to 0.05 so the shares fit
    return max(0.05, min(1.0, int(20 * total / (pool_actors + 1)) / 20))


# ---------------------------------------------------------------- CLI hook (ensemble.cli)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``predict`` on the main CLI's subparsers."""
    p = subparsers.add_parser(
        "predict",
        help="predict every text of a file with a run's ensemble (Ray Data batch inference)",
        description="One row per input text with the ensemble's answer (the fields of POST "
        "/predict, flattened) and, with --members, each member's. Resumable: re-run the same "
        "command after an interruption and finished blocks are kept.",
    )
    p.add_argument("run_dir", help="run directory with manifest.json and members/*/export")
    p.add_argument("input", help="csv, tsv, json, jsonl or parquet file with a text column")
    p.add_argument("--output", "-o", required=True, help="output file: .csv, .jsonl or .parquet")
    p.add_argument("--text-column", default=TEXT, help="column holding the texts (default text)")
    p.add_argument("--members", action="store_true", help="add each member's columns")
    p.add_argument("--method", help="combine method override (default: the manifest's)")
    p.add_argument("--block-size", type=int, default=10_000,
                   help="rows per resumable output block (default 10000)")
    p.add_argument("--batch-size", type=int, default=64, help="texts per member call")
    p.add_argument("--actors", type=int, default=1, help="actors per member pool (default 1)")
    p.add_argument("--num-cpus", type=float, default=None,
                   help="CPUs per actor (default 1, shared out on a small local Ray)")
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per actor (default 0)")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_predict)


def _predict(args: argparse.Namespace) -> int:
    try:
        result = predict_file(
            args.run_dir, args.input, args.output, text_column=args.text_column,
            members=args.members, method=args.method, block_size=args.block_size,
            batch_size=args.batch_size, actors=args.actors, num_cpus=args.num_cpus,
            num_gpus=args.num_gpus, address=args.address, progress=not args.no_progress,
        )  # fmt: skip
    except (FileNotFoundError, ValueError) as err:  # DataError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 2
    resumed = (f"; {result.resumed_blocks} of {result.blocks} blocks kept from an earlier run"
               if result.resumed_blocks else "")
    print(f"wrote {result.output}: {result.rows} rows, {result.predicted_rows} predicted now"
          f"{resumed} ({result.wall_s:.1f} s)")
    return 0
