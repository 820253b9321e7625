"""Batch prediction speed: `ensemble predict` on Ray Data vs the members one after another in one
process, same machine, same run, same texts.

* ``ray_data``: `ensemble.batch.predict_file`, what `ensemble predict RUN_DIR INPUT -o OUT`
  runs: one Ray Data actor pool per member (``--actors`` actors each), then the combiner stage,
  output written in resumable blocks and assembled. Timed from the call to the assembled file,
  so actor start-up and model loading are in it; Ray itself is started before the clock (a
  local Ray on 127.0.0.3 whose workers run at this process's niceness, so both arms compete
  for the cores on equal terms).
* ``in_process``: `Ensemble.from_run(RUN_DIR).predict(texts)`, the members called one after
  another in this process (``--threads`` torch threads). Timed end to end (loading included,
  like the other arm) and for the predict call alone.

The arms alternate (``--repeats`` rounds), since the machine's other load changes over time;
the load average is recorded around every measurement. Both arms' answers are compared (same
labels; the largest probability difference, float rounding from different padding).

Run: ``python benchmarks/batch_predict.py RUN_DIR`` (the SST-5 texts, 11,855 of them) or
``python benchmarks/batch_predict.py --tiny --limit 200`` (a tiny random-init run, a smoke test).
Results: benchmarks/results/batch_predict.{json,md}
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common

NAME = "batch_predict"


def sst_texts(data_dir: Path | None) -> list[str]:
    """Every SST-5 text: train, dev and test."""
    from ensemble.batch import read_texts

    root = common.sst_dir(data_dir)
    return [t for split in ("train", "dev", "test") for t in read_texts(root / f"{split}.csv")]


def write_input(path: Path, texts: list[str]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text"])
        writer.writerows([t] for t in texts)
    return path


def run_ray_data(run_dir: Path, source: Path, out: Path, args: argparse.Namespace) -> dict:
    from ensemble.batch import predict_file

    load = common.load_average()
    t0 = time.perf_counter()
    result = predict_file(run_dir, source, out, block_size=args.block_size,
                          batch_size=args.batch_size, actors=args.actors, num_cpus=args.actor_cpus,
                          progress=False)
    wall = time.perf_counter() - t0
    return {"arm": "ray_data", "texts": result.rows, "wall_s": wall,
            "texts_per_s": result.rows / wall, "loadavg_before": load,
            "loadavg_after": common.load_average()}


def run_in_process(run_dir: Path, texts: list[str], args: argparse.Namespace) -> tuple[dict, Any]:
    from ensemble.inference import Ensemble

    load = common.load_average()
    t0 = time.perf_counter()
    ensemble = Ensemble.from_run(run_dir, num_threads=args.threads,
                                 max_batch_size=args.batch_size)
    t1 = time.perf_counter()
    preds = ensemble.predict(texts)
    t2 = time.perf_counter()
    return {"arm": "in_process", "texts": len(texts), "wall_s": t2 - t0, "load_s": t1 - t0,
            "predict_s": t2 - t1, "texts_per_s": len(texts) / (t2 - t0),
            "predict_texts_per_s": len(texts) / (t2 - t1), "loadavg_before": load,
            "loadavg_after": common.load_average()}, preds


def agreement(out: Path, preds: list[Any]) -> dict[str, float]:
    """How far the Ray Data file is from the in-process answers."""
    with open(out, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    same = sum(r["label"] == p.label for r, p in zip(rows, preds, strict=True))
    diff = max(abs(float(r[f"probs.{k}"]) - v) for r, p in zip(rows, preds, strict=True)
               for k, v in p.probs.items())
    return {"label_agreement": same / len(rows), "max_abs_prob_diff": diff}


def markdown(data: dict[str, Any]) -> str:
    b, m = data["bench"], data["machine"]
    lines = [
        f"# Batch prediction: Ray Data vs one process ({b['texts']} texts)",
        "",
        f"Run `{b['run']}` ({', '.join(b['members'])}); commit {m['git_commit']}; "
        f"{m['cpu_count']} CPUs; torch {m['torch']}, ray {m['ray']}, transformers "
        f"{m['transformers']}; Ray with {b['ray_cpus']} CPUs, {b['actors']} actor(s) per member "
        f"pool, batch {b['batch_size']}; in-process {b['threads']} thread(s); niceness "
        f"{b['niceness']}. Load average (1/5/15 min) {data['loadavg_start']} at the start, "
        f"{data['loadavg_end']} at the end.",
        "",
        "| round | arm | wall s | texts/s (end to end) | texts/s (predict only) | load before |",
        "|---:|---|---:|---:|---:|---|",
    ]
    for r in data["runs"]:
        only = f"{r['predict_texts_per_s']:.1f}" if "predict_texts_per_s" in r else "-"
        lines.append(f"| {r['round']} | {r['arm']} | {r['wall_s']:.1f} | {r['texts_per_s']:.1f} "
                     f"| {only} | {r['loadavg_before']} |")
    s = data["summary"]
    lines += [
        "",
        f"Median end-to-end texts/s: Ray Data {s['ray_data_texts_per_s']:.1f}, in-process "
        f"{s['in_process_texts_per_s']:.1f} (ratio {s['ray_over_in_process']:.2f}); in-process "
        f"predict call alone {s['in_process_predict_texts_per_s']:.1f}. The two arms' labels "
        f"agree on {100 * s['label_agreement']:.2f}% of texts (largest probability difference "
        f"{s['max_abs_prob_diff']:.1e}).",
        "",
    ]
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", nargs="?", type=Path, help="a finished run directory")
    p.add_argument("--tiny", action="store_true", help="a tiny random-init run (smoke test)")
    p.add_argument("--input", type=Path, help="texts to predict (default: the SST-5 csv files)")
    p.add_argument("--text-column", default="text")
    p.add_argument("--data-dir", type=Path, default=None, help="SST csv dir (default ../shared)")
    p.add_argument("--limit", type=int, default=None, help="only the first N texts")
    p.add_argument("--repeats", type=int, default=2, help="rounds of both arms, alternating")
    p.add_argument("--ray-cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray")
    p.add_argument("--actors", type=int, default=1, help="actors per member pool")
    p.add_argument("--actor-cpus", type=float, default=None, help="CPUs per actor")
    p.add_argument("--batch-size", type=int, default=64, help="texts per member call (both)")
    p.add_argument("--block-size", type=int, default=10_000)
    p.add_argument("--threads", type=int, default=1, help="torch threads, in-process arm")
    p.add_argument("--out-dir", type=Path, default=None, help="default benchmarks/results")
    args = p.parse_args(argv)
    if (args.run_dir is None) == (not args.tiny):
        p.error("give RUN_DIR or --tiny")
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    import statistics

    from ensemble.batch import read_texts
    from ensemble.rundir import Manifest

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    args = parse(argv)
    start_load = common.load_average()
    with tempfile.TemporaryDirectory(prefix="batch_predict_") as scratch:
        scratch = Path(scratch)
        run_dir = args.run_dir
        if args.tiny:
            from ensemble.testing import make_run_dir

            run_dir = make_run_dir(scratch / "run", n_dev=50)
        texts = (read_texts(args.input, args.text_column) if args.input
                 else sst_texts(args.data_dir))[: args.limit]
        source = write_input(scratch / "input.csv", texts)
        runs, preds, out = [], None, scratch / "preds.csv"
        with common.local_ray(args.ray_cpus, worker_niceness=common.niceness()):
            for i in range(args.repeats):
                out.unlink(missing_ok=True)
                runs.append({"round": i + 1, **run_ray_data(run_dir, source, out, args)})
                result, preds = run_in_process(run_dir, texts, args)
                runs.append({"round": i + 1, **result})
        agree = agreement(out, preds)

        def median(arm: str, key: str = "texts_per_s") -> float:
            return statistics.median(r[key] for r in runs if r["arm"] == arm)

        summary = {"ray_data_texts_per_s": median("ray_data"),
                   "in_process_texts_per_s": median("in_process"),
                   "in_process_predict_texts_per_s": median("in_process", "predict_texts_per_s"),
                   **agree}
        summary["ray_over_in_process"] = (summary["ray_data_texts_per_s"]
                                          / summary["in_process_texts_per_s"])
        manifest = Manifest.load(run_dir)
        data = {"bench": {"run": "tiny (random init)" if args.tiny else str(run_dir),
                          "members": list(manifest.members), "texts": len(texts),
                          "input": str(args.input or "SST-5 train+dev+test"),
                          "ray_cpus": args.ray_cpus, "actors": args.actors,
                          "actor_cpus": args.actor_cpus, "batch_size": args.batch_size,
                          "block_size": args.block_size, "threads": args.threads,
                          "repeats": args.repeats, "niceness": common.niceness()},
                "machine": common.machine(), "loadavg_start": start_load,
                "loadavg_end": common.load_average(), "runs": runs, "summary": summary}
    md = markdown(data)
    paths = common.write_results(NAME, data, md, args.out_dir)
    print(md)
    print("wrote", *paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
