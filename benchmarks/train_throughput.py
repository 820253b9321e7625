"""Training throughput of one member through `ensemble` against a plain PyTorch loop.

`ensemble` side: a Ray Train `TorchTrainer` (one worker, `cpus_per_worker` CPUs, so the worker runs
`torch.set_num_threads(cpus_per_worker)`) runs `ensemble.training.worker.train_member` with
DeepSpeed at each requested ZeRO stage. Its speed is the `samples_per_s` the worker reports
(`ensemble.training.loop.Throughput`: the clock starts when step 2 ends, so the window is steps
3..N); the end-to-end `trainer.fit()` wall time (Ray Train start, model build, tokenisation,
DeepSpeed init, the steps, checkpoint + report) is reported separately.

Plain side: the same model, data, order, micro-batch, padding (`encode`/`collate`), torch threads
and step count, trained in this process with AdamW + `loss.backward()` + `step()`, nothing else.
Its rate is computed over the same window as the worker's (steps 3..N) and also after
`--warmup` steps.

The machine may be busy, so the runs interleave: plain, ensemble ZeRO-a, plain, ensemble ZeRO-b,
plain...; each ensemble run is compared with the mean of the two plain runs around it, and the
load average is recorded before every run.

A second part measures inference (texts/s on SST dev, `predict_logits`, batch 64) of the teacher
(MiniLM, 6 layers) against its 3-layer student from `make_student`.

Run: `python benchmarks/train_throughput.py` (MiniLM, ~10 min on 2 busy cores) or `--tiny`
(random 2-layer model, a smoke test of the script). Results: benchmarks/results/train_throughput.*
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

try:
    from benchmarks import common
except ModuleNotFoundError:  # run as a script: benchmarks/ is on sys.path
    import common  # type: ignore[no-redef]

from ensemble.config import DataConfig, MemberConfig, StageConfig
from ensemble.data import Splits, load_splits
from ensemble.losses import LossWeights, member_loss
from ensemble.models import members as M
from ensemble.training.engine import OptimSettings, make_engine
from ensemble.training.job import MemberSpec, StageJob, steps_per_epoch, train_config
from ensemble.training.loop import (
    Targets,
    collate,
    encode,
    epoch_order,
    micro_batches,
    predict_logits,
)
from ensemble.training.worker import train_member

logger = logging.getLogger("train_throughput")
NAME = "train_throughput"
TINY_ARCH = {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2,
             "intermediate_size": 64}
SEED, ROUND = 0, 1
LR = 5e-5
WORKER_WARMUP = 2  # Throughput() default in the worker: the clock starts when step 2 ends


@dataclass(frozen=True)
class Bench:
    """What every run shares."""

    model: str
    arch: dict[str, Any]
    pretrained: bool
    micro_batch: int
    max_length: int
    threads: int
    steps: int  # measured steps after `warmup`
    warmup: int

    @property
    def total(self) -> int:
        return self.steps + self.warmup


def build(b: Bench, num_labels: int, layers: int | None = None):
    arch = dict(b.arch)
    if layers is not None:
        arch["num_hidden_layers"] = layers
    return M.build_member(b.model, num_labels, pretrained=b.pretrained, arch=arch)


def train_order(n: int, b: Bench) -> list[np.ndarray]:
    """The micro-batches the worker trains on: its epoch-0 order (same seed formula)."""
    order = epoch_order(n, SEED + 7919 * ROUND, 0)
    batches = list(micro_batches(order, b.micro_batch))[: b.total]
    if len(batches) < b.total:
        raise ValueError(f"{n} training texts give {len(batches)} micro-batches; "
                         f"lower --steps/--warmup or --micro-batch")
    return batches


def window_rate(stamps: list[float], batch: int, skip: int) -> float:
    """Samples/s over steps skip+1..N; stamps[k] is when step k+1 ended."""
    return batch * (len(stamps) - skip) / (stamps[-1] - stamps[skip - 1])


def plain_run(b: Bench, splits: Splits) -> dict[str, Any]:
    """The baseline: the same model and batches, AdamW + backward + step in this process."""
    torch.set_num_threads(b.threads)
    t0 = time.perf_counter()
    torch.manual_seed(SEED + 1000 * ROUND)  # the worker's seed, so the head starts the same
    model = build(b, splits.num_labels())
    tokenizer = M.load_tokenizer(b.model)
    ids = encode(tokenizer, splits.texts["train"], b.max_length)
    labels = torch.as_tensor(splits.labels["train"], dtype=torch.long)
    batches = train_order(len(ids), b)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    stamps, widths = [], []
    for index in batches:
        inputs = collate([ids[i] for i in index], tokenizer.pad_token_id)
        loss = F.cross_entropy(model(**inputs).logits, labels[index])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stamps.append(time.perf_counter())
        widths.append(inputs["input_ids"].shape[1])
    steps_s = np.diff(stamps[WORKER_WARMUP - 1 :])
    return {
        "samples_per_s": window_rate(stamps, b.micro_batch, WORKER_WARMUP),
        "samples_per_s_after_warmup": window_rate(stamps, b.micro_batch, b.warmup),
        "step_ms_median": 1000 * float(np.median(steps_s)),
        "mean_padded_width": float(np.mean(widths)),
        "wall_s": time.perf_counter() - t0,
        "steps": len(stamps),
        "final_loss": float(loss.detach()),
    }


def ensemble_run(b: Bench, splits: Splits, splits_ref: Any, zero: int, backend: str,
                 storage: str, tag: str) -> dict[str, Any]:
    """One member job through Ray Train + `train_member`; its reported rate and fit() wall time."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    n = len(splits.texts["train"])
    per_epoch = steps_per_epoch(n, 1, b.micro_batch, 1)
    member = MemberConfig(kind="classifier", model=b.model, pretrained=b.pretrained,
                          arch=dict(b.arch), lr=LR, micro_batch_size=b.micro_batch,
                          zero_stage=zero, num_workers=1, cpus_per_worker=float(b.threads))
    # epochs chosen so that the job runs exactly b.total micro-steps (ceil(epochs*per_epoch))
    stage = StageConfig(name="finetune", epochs=(b.total - 0.5) / per_epoch)
    spec = MemberSpec(name="bench", member=member, num_labels=splits.num_labels(),
                      class_intensity=splits.class_intensity(), max_length=b.max_length,
                      seed=SEED, backend=backend)
    job = StageJob(stage=stage, round=ROUND, repeats=1, repeat=1, splits=splits_ref)
    trainer = TorchTrainer(
        train_member,
        train_loop_config=train_config(spec, job),
        scaling_config=ScalingConfig(num_workers=1, use_gpu=False,
                                     resources_per_worker={"CPU": b.threads}),
        run_config=RunConfig(name=f"bench-{tag}", storage_path=storage),
    )
    t0 = time.perf_counter()
    result = trainer.fit()
    wall = time.perf_counter() - t0
    metrics = dict(result.metrics or {})
    if metrics.get("micro") != b.total:
        raise RuntimeError(f"the worker ran {metrics.get('micro')} steps, expected {b.total}")
    rate = float(metrics["samples_per_s"])
    steps_s = b.micro_batch * (b.total - WORKER_WARMUP) / rate
    return {"samples_per_s": rate, "wall_s": wall, "steps": int(metrics["micro"]),
            "window_s": steps_s, "final_loss": metrics.get("loss")}


def inference(b: Bench, splits: Splits, repeats: int, batch: int) -> dict[str, Any]:
    """Texts/s of the teacher and its 3-layer student on dev (alternating, median of repeats)."""
    torch.set_num_threads(b.threads)
    torch.manual_seed(SEED)
    teacher_layers = None if b.pretrained else 6
    teacher = build(b, splits.num_labels(), teacher_layers).eval()
    student = M.make_student(teacher, 3).eval()
    tokenizer = M.load_tokenizer(b.model)
    ids = encode(tokenizer, splits.texts["dev"], b.max_length)
    models = {"teacher": teacher, "student": student}
    rates: dict[str, list[float]] = {name: [] for name in models}
    for model in models.values():  # warm-up (allocator, kernels)
        predict_logits(model, ids[: 2 * batch], tokenizer.pad_token_id, batch)
    for _ in range(repeats):
        for name, model in models.items():
            t0 = time.perf_counter()
            predict_logits(model, ids, tokenizer.pad_token_id, batch)
            rates[name].append(len(ids) / (time.perf_counter() - t0))
    out: dict[str, Any] = {
        "texts": len(ids), "batch": batch, "repeats": repeats,
        "layers": {k: M.encoder_layers(m) for k, m in models.items()},
        "params": {k: M.count_parameters(m) for k, m in models.items()},
        "texts_per_s": {k: common.summary(v) for k, v in rates.items()},
        "all_texts_per_s": rates,
    }
    out["speedup"] = (out["texts_per_s"]["student"]["median"]
                      / out["texts_per_s"]["teacher"]["median"])
    return out


PHASES = ("collate", "targets", "forward", "loss", "backward", "grad_reduce", "step", "clip")


class _Variant:
    """One training setup of the profile: the plain loop (engine None) or an `Engine`.

    `step` follows `train_step` call for call (collate, Targets.batch, forward, member_loss,
    backward, step); the plain loop replaces Targets.batch/member_loss with labels[index] and
    cross_entropy, and backward/step with loss.backward(), AdamW.step(), zero_grad().
    """

    def __init__(self, model: Any, engine: Any, data: dict[str, Any]):
        self.model, self.engine, self.data = model, engine, data
        self.t: dict[str, list[float]] = {k: [] for k in (*PHASES, "total", "cpu")}
        if engine is None:
            self.optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
            model.train()
        else:
            engine.model.train()
            if hasattr(engine, "engine"):  # DeepSpeed: time its all-reduce and fp32 clipping
                common.time_method(engine.engine, "allreduce_gradients", self.t, "grad_reduce")
                common.time_method(engine.engine, "clip_fp32_gradients", self.t, "clip")

    def step(self, index: np.ndarray) -> None:
        d, t = self.data, self.t
        for v in t.values():
            v.append(0.0)
        cpu0, marks = time.process_time(), [time.perf_counter()]

        def mark(key: str) -> None:
            marks.append(time.perf_counter())
            t[key][-1] += marks[-1] - marks[-2]

        inputs = collate([d["ids"][i] for i in index], d["pad"])
        mark("collate")
        if self.engine is None:
            labels = d["labels"][index]
            mark("targets")
            logits = self.model(**inputs).logits
            mark("forward")
            loss = F.cross_entropy(logits, labels)
            mark("loss")
            loss.backward()
            mark("backward")
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        else:
            batch = d["targets"].batch(index)
            mark("targets")
            logits = self.engine(**inputs).logits
            mark("forward")
            loss, _ = member_loss("classifier", "cross_entropy", logits, batch, d["weights"],
                                  d["ci"])
            mark("loss")
            self.engine.backward(loss)
            mark("backward")
            self.engine.step()
        float(loss.detach())
        mark("step")
        t["total"][-1] = marks[-1] - marks[0]
        t["cpu"][-1] = time.process_time() - cpu0


def profile(b: Bench, splits: Splits, zeros: list[int], steps: int) -> dict[str, Any]:
    """Where a step's time goes, in this process, with steps interleaved across variants.

    Variants: the plain loop, `train_step`'s calls on the TorchEngine, and on DeepSpeed at each
    ZeRO stage. Step i of every variant runs back to back (rotating who goes first), so a busy
    machine slows them alike. DeepSpeed's gradient all-reduce (inside backward) and fp32
    clipping (inside step) are also timed on their own.
    """
    common.single_process_group()
    torch.set_num_threads(b.threads)
    tokenizer = M.load_tokenizer(b.model)
    ids = encode(tokenizer, splits.texts["train"], b.max_length)
    data = {"ids": ids, "pad": tokenizer.pad_token_id, "weights": LossWeights(),
            "labels": torch.as_tensor(splits.labels["train"], dtype=torch.long),
            "targets": Targets(labels=splits.labels["train"], intensity=splits.intensity["train"]),
            "ci": torch.tensor(splits.class_intensity(), dtype=torch.float32)}

    def variant(backend: str | None, zero: int = 0) -> _Variant:
        torch.manual_seed(SEED + 1000 * ROUND)
        model = build(b, splits.num_labels())
        if backend is None:
            return _Variant(model, None, data)
        settings = OptimSettings(lr=LR, micro_batch_size=b.micro_batch, zero_stage=zero,
                                 total_steps=b.total)
        return _Variant(model, make_engine(model, settings, backend, 1), data)

    runs = {"plain": variant(None), "ensemble torch engine": variant("torch")}
    runs.update({f"ensemble ZeRO-{z}": variant("deepspeed", z) for z in zeros})
    names = list(runs)
    for i, index in enumerate(train_order(len(ids), b)[:steps]):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            runs[name].step(index)
    skip = min(WORKER_WARMUP, steps - 1)
    out = {name: {"ms_per_step": {k: 1000 * statistics.fmean(v[skip:]) for k, v in r.t.items()}}
           for name, r in runs.items()}
    for v in out.values():
        v["ratio"] = out["plain"]["ms_per_step"]["total"] / v["ms_per_step"]["total"]
    return {"steps": steps, "skipped": skip, "loadavg_end": common.load_average(),
            "variants": out}


def schedule(zeros: list[int], backends: list[str], repeats: int) -> list[tuple[str, int]]:
    """plain, ens, plain, ens, ..., plain: every ensemble run sits between two plain runs."""
    plan: list[tuple[str, int]] = [("plain", -1)]
    for _ in range(repeats):
        for backend in backends:
            for zero in zeros if backend == "deepspeed" else [0]:
                plan += [(backend, zero), ("plain", -1)]
    return plan


def ray_runs(b: Bench, splits: Splits, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The interleaved plain / ensemble runs (see `schedule`), on a local loopback Ray."""
    import ray

    runs: list[dict[str, Any]] = []
    with (common.local_ray(args.ray_cpus, args.node_ip, args.worker_niceness),
          common.scratch_dir("bench-") as storage):
        splits_ref = ray.put(splits)
        for i, (kind, zero) in enumerate(schedule(args.zero, args.backends, args.repeats)):
            label = "plain" if kind == "plain" else (
                f"ensemble ZeRO-{zero}" if kind == "deepspeed" else "ensemble torch engine")
            load = common.load_average()
            logger.info("run %d: %s (load %s)", i, label, load)
            if kind == "plain":
                res = plain_run(b, splits)
            else:
                res = ensemble_run(b, splits, splits_ref, zero, kind, storage, f"{i}-{kind}{zero}")
            runs.append({"index": i, "run": label, "backend": kind, "zero": zero,
                         "loadavg_before": load, **res})
            logger.info("  %.1f samples/s, wall %.1f s", res["samples_per_s"], res["wall_s"])
    return runs


def run_all(b: Bench, args: argparse.Namespace) -> dict[str, Any]:
    splits = load_splits(DataConfig(source=str(common.sst_dir(args.data_dir)),
                                    max_length=b.max_length))
    runs = [] if args.skip_ray else ray_runs(b, splits, args)
    comparisons = compare(runs)
    infer = None
    if not args.skip_inference:
        load = common.load_average()
        infer = inference(b, splits, args.infer_repeats, args.infer_batch)
        infer["loadavg_before"] = load
    prof = None
    if args.profile_steps:
        load = common.load_average()
        prof = profile(b, splits, args.zero, args.profile_steps)
        prof["loadavg_before"] = load
    return {"runs": runs, "comparisons": comparisons, "inference": infer, "profile": prof}


def compare(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each ensemble run against the mean of the plain runs just before and after it."""
    per_run, by_label = [], {}
    for i, r in enumerate(runs):
        if r["backend"] == "plain":
            continue
        near = [runs[j]["samples_per_s"] for j in (i - 1, i + 1)
                if 0 <= j < len(runs) and runs[j]["backend"] == "plain"]
        plain = statistics.fmean(near)
        ratio = r["samples_per_s"] / plain
        per_run.append({"index": r["index"], "run": r["run"], "ratio": ratio,
                        "plain_samples_per_s": plain})
        by_label.setdefault(r["run"], []).append(r | {"ratio": ratio, "plain": plain})
    summary = {}
    for label, rs in by_label.items():
        summary[label] = {
            "samples_per_s": statistics.median(r["samples_per_s"] for r in rs),
            "plain_samples_per_s": statistics.median(r["plain"] for r in rs),
            "ratio": statistics.median(r["ratio"] for r in rs),
            "wall_s": statistics.median(r["wall_s"] for r in rs),
            "overhead_s": statistics.median(r["wall_s"] - r["window_s"] for r in rs),
            "n": len(rs),
        }
    return {"per_run": per_run, "summary": summary}


def markdown(data: dict[str, Any]) -> str:
    b = data["bench"]
    lines = [
        "# Training throughput: `ensemble` (Ray Train + DeepSpeed) vs a plain PyTorch loop",
        "",
        f"Model `{b['model']}`{' (tiny, random)' if not b['pretrained'] else ''}, micro-batch "
        f"{b['micro_batch']}, max length {b['max_length']}, {b['threads']} torch threads, SST-5 "
        f"train, one worker. Load average at start {data['loadavg_start']}, at end "
        f"{data['loadavg_end']} on {data['machine']['cpu_count']} CPUs.",
    ]
    if data["runs"]:
        lines += _md_train(data["runs"], data["comparisons"]["summary"], b)
    if data.get("inference"):
        lines += _md_inference(data["inference"])
    if data.get("profile"):
        lines += _md_profile(data["profile"])
    return "\n".join(lines) + "\n"


def _md_train(runs: list[dict[str, Any]], summary: dict[str, Any], b: dict[str, Any]) -> list[str]:
    plain = [r for r in runs if r["backend"] == "plain"]
    lines = [
        "",
        f"## Ray Train runs ({b['warmup']} + {b['steps']} steps each)",
        "",
        "Rates are over steps 3..N on both sides (the worker's `Throughput` window); each ensemble "
        "run is compared with the plain runs just before and after it. `fit() wall` is the whole "
        "`TorchTrainer.fit()`; `startup + checkpoint` is that minus the measured steps.",
        "",
        "| run | samples/s | plain samples/s | ratio ensemble/plain | fit() wall s | "
        "startup + checkpoint s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, v in summary.items():
        lines.append(f"| {label} | {v['samples_per_s']:.1f} | {v['plain_samples_per_s']:.1f} | "
                     f"**{v['ratio']:.2f}×** | {v['wall_s']:.1f} | {v['overhead_s']:.1f} |")
    rates = ", ".join(f"{r['samples_per_s']:.1f}" for r in plain)
    after = ", ".join(f"{r['samples_per_s_after_warmup']:.1f}" for r in plain)
    loads = ", ".join(f"{r['loadavg_before'][0]:.1f}" for r in runs)
    return lines + [
        "",
        f"Plain runs: {rates} samples/s (after {b['warmup']} warm-up steps: {after}); plain wall "
        f"(model build + tokenise + steps) median "
        f"{statistics.median(r['wall_s'] for r in plain):.1f} s. 1-min load before each run, in "
        f"order: {loads}. Target: ratio ≥ 0.9×.",
    ]


def _md_inference(inf: dict[str, Any]) -> list[str]:
    t, st = inf["texts_per_s"]["teacher"], inf["texts_per_s"]["student"]
    return [
        "",
        f"## Inference: teacher vs student (SST dev, {inf['texts']} texts, batch {inf['batch']}, "
        f"median of {inf['repeats']}, load before {inf['loadavg_before']})",
        "",
        "| model | layers | params | texts/s |",
        "|---|---:|---:|---:|",
        f"| teacher | {inf['layers']['teacher']} | {inf['params']['teacher']:,} | "
        f"{t['median']:.0f} |",
        f"| student | {inf['layers']['student']} | {inf['params']['student']:,} | "
        f"{st['median']:.0f} |",
        "",
        f"Student speed-up: **{inf['speedup']:.2f}×**.",
    ]


def _md_profile(prof: dict[str, Any]) -> list[str]:
    variants = prof["variants"]
    cols = [k for k in (*PHASES, "total", "cpu")
            if any(v["ms_per_step"][k] for v in variants.values())]
    lines = [
        "",
        f"## Where a step's time goes (in-process, ms per step, mean of steps "
        f"{prof['skipped'] + 1}..{prof['steps']}, variants interleaved step by step)",
        "",
        "`backward` includes `grad_reduce` (DeepSpeed's gradient all-reduce epilogue) and `step` "
        "includes `clip`; `cpu` is process CPU time. Load average before "
        f"{prof['loadavg_before']}, after {prof['loadavg_end']}.",
        "",
        "| variant | " + " | ".join(cols) + " | ratio vs plain |",
        "|---|" + "---:|" * (len(cols) + 1),
    ]
    for name, v in variants.items():
        ms = v["ms_per_step"]
        lines.append(f"| {name} | " + " | ".join(f"{ms[k]:.1f}" for k in cols)
                     + f" | {v['ratio']:.2f}× |")
    return lines


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="random 2-layer model (smoke test)")
    p.add_argument("--model", default=M.DEFAULT_MODEL)
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="torch threads = cpus_per_worker")
    p.add_argument("--steps", type=int, default=60, help="measured steps after --warmup")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--zero", type=int, nargs="+", default=[0, 2], choices=[0, 1, 2, 3])
    p.add_argument("--backends", nargs="+", default=["deepspeed"],
                   choices=["deepspeed", "torch"],
                   help="add 'torch' to also time the worker with the plain TorchEngine")
    p.add_argument("--repeats", type=int, default=1, help="interleaved rounds of ensemble runs")
    p.add_argument("--infer-batch", type=int, default=64)
    p.add_argument("--infer-repeats", type=int, default=3)
    p.add_argument("--skip-inference", action="store_true")
    p.add_argument("--profile-steps", type=int, default=12,
                   help="steps of the in-process per-phase profile (0: skip it)")
    p.add_argument("--skip-ray", action="store_true", help="only inference and the profile")
    p.add_argument("--ray-cpus", type=int, default=2)
    p.add_argument("--node-ip", default="127.0.0.3", help="loopback address for the local Ray")
    p.add_argument("--worker-niceness", type=int, default=None,
                   help="nice value of Ray's workers; default: this process's, so that the plain "
                        "loop and the worker get the same CPU share on a busy machine (Ray's own "
                        "default is 15)")
    p.add_argument("--data-dir", type=Path, default=None, help="SST csv dir (default ../shared)")
    p.add_argument("--out-dir", type=Path, default=None, help="default benchmarks/results")
    args = p.parse_args(argv)
    if args.worker_niceness is None:
        args.worker_niceness = common.niceness()
    if args.warmup < WORKER_WARMUP or args.steps < 2:
        p.error(f"--warmup must be >= {WORKER_WARMUP} and --steps >= 2")
    if args.threads > args.ray_cpus:
        p.error("--threads (the worker's CPUs) cannot exceed --ray-cpus")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = parse(argv)
    b = Bench(model=args.model, arch=TINY_ARCH if args.tiny else {}, pretrained=not args.tiny,
              micro_batch=args.micro_batch, max_length=args.max_length, threads=args.threads,
              steps=args.steps, warmup=args.warmup)
    start_load = common.load_average()
    t0 = time.perf_counter()
    results = run_all(b, args)
    data = {"bench": {**b.__dict__, "lr": LR, "worker_warmup": WORKER_WARMUP,
                      "driver_niceness": common.niceness(),
                      "ray_worker_niceness": args.worker_niceness},
            "machine": common.machine(), "loadavg_start": start_load,
            "loadavg_end": common.load_average(), "total_s": time.perf_counter() - t0, **results}
    md = markdown(data)
    paths = common.write_results(NAME, data, md, args.out_dir)
    print(md)
    print("wrote", *paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
