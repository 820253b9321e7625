"""`ensemble distill RUN_DIR`: distil a finished run's published ensemble into a new student.

A run's `distill:` section trains the student it was configured with; this command compresses a
run that has already been trained, at any depth, as often as wanted, without training its
members again. The student is the chosen teacher's encoder cut to ``layers`` evenly spaced
layers (`models.members.make_student`) and learns, through the same Ray Train + DeepSpeed
worker as every member, ``(1 - alpha) * CE(label) + alpha * T^2 * KL(ensemble || student)`` on
the training texts plus an optional unlabelled corpus (whose labels are the ensemble's classes).

The ensemble's targets are the run's members predicting the texts through Ray once, combined as
published (manifest's combiner, member temperatures, output temperature), and cached in
``RUN_DIR/distill/targets-<texts' fingerprint>.npz``: every student distilled on the same texts
reuses them, and so does the run's own distillation stage. Corpus texts that also occur in dev
or test are dropped, so the student never learns the ensemble's answer on a text it is scored on.

Output, ``RUN_DIR/students/<name>/``: ``export/`` (a `save_pretrained` model and tokenizer that
`transformers.pipeline` loads), ``predictions.npz`` (dev/test logits) and ``metrics.json``: the
student's dev/test accuracy, macro-F1, NLL/ECE/Brier (raw and temperature-scaled), its KL to the
ensemble, its share of the ensemble's accuracy, its size, and the cascade it allows (threshold
fitted on dev with a bootstrap bound, loss checked on test). A finished student is not redone.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np

from ensemble import combine
from ensemble import config as C
from ensemble import distill as D
from ensemble.data import Splits
from ensemble.rundir import Manifest, atomic_write_json, read_json

__all__ = ["add_commands", "distill_run", "evaluate_student", "publish_student"]

METRICS = "metrics.json"
PREDICTIONS = "predictions.npz"
CASCADE_BUDGET = 0.005  # the accuracy the cascade may lose against the ensemble (half a point)


def _finished_run(run_dir: Path, overrides: list[str] | None,
                  ) -> tuple[C.RunConfig, Manifest, dict[str, Any]]:
    """The run's config (with ``overrides``), manifest and metrics."""
    if not (run_dir / "manifest.json").is_file():
        raise C.ConfigError(
            f"{run_dir} is not a finished run (no manifest.json); train it first with "
            "`ensemble train CONFIG`, or pass the run directory it printed (RUN_DIR=...)"
        )
    return (C.load(run_dir / "config.yaml", overrides), Manifest.load(run_dir),
            read_json(run_dir / "metrics.json"))


def _default_teacher(manifest: Manifest, metrics: dict[str, Any]) -> str:
    """The classification member with the best dev accuracy."""
    candidates = [n for n, m in manifest.members.items() if m.kind in ("classifier", "teacher")]
    if not candidates:
        raise C.ConfigError("the run has no classifier or teacher member to cut a student from")
    return max(candidates, key=lambda n: metrics["dev"][n]["accuracy"])


def _teacher_layers(export: Path) -> int:
    cfg = read_json(export / "config.json")
    for key in ("num_hidden_layers", "n_layers", "num_layers"):
        if key in cfg:
            return int(cfg[key])
    raise C.ConfigError(f"{export / 'config.json'} names no layer count; cannot cut a student")


def _teacher_checkpoint(out_dir: Path, export: Path) -> Any:
    """A checkpoint directory whose `hf/` is the teacher's export, as the worker expects."""
    import ray

    from ensemble.training.job import HF_DIR

    holder = out_dir / "teacher"
    holder.mkdir(parents=True, exist_ok=True)
    link = holder / HF_DIR
    if not link.exists():
        link.symlink_to(export.resolve(), target_is_directory=True)
    return ray.train.Checkpoint(str(holder))


def _scores(labels: np.ndarray, probs: np.ndarray, target: np.ndarray) -> dict[str, float]:
    from ensemble.metrics import calibration_metrics, classification_metrics

    row = classification_metrics(labels, probs, [str(c) for c in range(probs.shape[1])])
    return {"accuracy": row["accuracy"], "macro_f1": row["macro_f1"],
            **calibration_metrics(labels, probs), "kl_to_ensemble": D.mean_kl(target, probs)}


def evaluate_student(run_dir: Path, manifest: Manifest, splits: Splits,
                     logits: dict[str, np.ndarray]) -> dict[str, Any]:
    """The student's scores on dev/test beside the published ensemble's, and its cascade."""
    from ensemble.calibration import fit_temperature
    from ensemble.serving.cascade import cascade_accuracy, fit_cascade, load_predictions

    kinds = manifest.combine.members  # the voting members: a published student is not one
    ens, labels = {}, {}
    for split in ("dev", "test"):
        preds = load_predictions(run_dir, split)
        labels[split] = np.asarray(preds["labels"]).astype(np.int64)
        ens[split] = manifest.combine.probs({n: preds[n] for n in kinds})
    t = fit_temperature(logits["dev"], labels["dev"])
    out: dict[str, Any] = {"temperature": t}
    for split in ("dev", "test"):
        raw = combine.softmax(logits[split])
        scaled = combine.softmax(logits[split] / t)
        row = _scores(labels[split], raw, ens[split])
        row.update({f"{k}_calibrated": v for k, v in _scores(labels[split], scaled, ens[split])
                    .items() if k in ("nll", "ece", "brier")})
        ens_acc = float((ens[split].argmax(1) == labels[split]).mean())
        row["ensemble_accuracy"] = ens_acc
        row["share_of_ensemble_accuracy"] = row["accuracy"] / ens_acc
        out[split] = row
    student = {s: combine.softmax(logits[s] / t) for s in ("dev", "test")}
    threshold, measure, stats = fit_cascade(student["dev"], ens["dev"], labels["dev"], "auto",
                                            CASCADE_BUDGET)
    stats["test"] = cascade_accuracy(student["test"], ens["test"], labels["test"], threshold,
                                     measure)
    out["cascade"] = stats
    return out


def distill_run(
    run_dir: str | Path,
    layers: int = 3,
    *,
    teacher: str | None = None,
    name: str | None = None,
    distill: C.DistillConfig | None = None,
    lr: float | None = None,
    overrides: list[str] | None = None,
    address: str | None = None,
) -> dict[str, Any]:
    """Train a ``layers``-layer student on a finished run's ensemble; returns its metrics.

    Args:
        run_dir: a finished run (manifest.json, members/*/export, predictions/).
        layers: the student's encoder layers, taken evenly from the teacher's.
        teacher: the member it is cut from (default: the best classifier on dev).
        name: its directory under ``RUN_DIR/students`` (default ``l<layers>``).
        distill: epochs, alpha, temperature and corpus (`DistillConfig`; ``student`` unused).
        lr: its learning rate (default the teacher's).
        overrides: dotted overrides of the run's config, e.g. ``data.source=/path``.
        address: Ray cluster to join (default RAY_ADDRESS, else a local Ray).

    Raises:
        ConfigError: not a finished run, an unknown teacher, a depth the teacher lacks.
        DataError: the data or the corpus cannot be read.
    """
    import ray

    from ensemble.data import load_splits
    from ensemble.orchestrate import (
        check_config,
        ensemble_targets,
        init_ray,
        member_runners,
        member_spec,
        student_job,
    )
    from ensemble.runner import MemberRunner

    run_dir = Path(run_dir).resolve()
    cfg, manifest, metrics = _finished_run(run_dir, overrides)
    d = distill or C.DistillConfig()
    teacher = teacher or _default_teacher(manifest, metrics)
    if teacher not in manifest.combine.members or manifest.members[teacher].kind not in (
            "classifier", "teacher"):
        members = ", ".join(f"{n} ({m.kind})" for n, m in manifest.members.items())
        raise C.ConfigError(
            f"--teacher {teacher!r} is not a classifier or teacher member of the run; "
            f"members: {members}"
        )
    export = manifest.member_path(run_dir, teacher)
    depth = _teacher_layers(export)
    if not 1 <= layers <= depth:
        raise C.ConfigError(f"--layers {layers}: the teacher {teacher} has {depth} layers; "
                            f"use 1 to {depth}")
    name = name or f"l{layers}"
    if name in manifest.combine.members:
        raise C.ConfigError(f"--name {name} is a member of the run; name the student otherwise")
    out_dir = run_dir / "students" / name
    if (out_dir / METRICS).is_file():
        print(f"student {name} already trained: {out_dir / METRICS}", flush=True)
        return read_json(out_dir / METRICS)

    base = cfg.members[teacher]
    member = dataclasses.replace(
        base, kind="student", teacher=teacher, student_layers=layers, stages=[],
        lr=lr if lr is not None else base.lr, bootstrap=False, data_fraction=1.0,
    )
    run_cfg = cfg
    # the teacher is read, not trained: it counts as a teacher for the student's checks
    members = {**cfg.members, teacher: dataclasses.replace(base, kind="teacher"), name: member}
    cfg = dataclasses.replace(cfg, members=members, distill=dataclasses.replace(d, student=name))
    check_config(cfg)
    splits = load_splits(cfg.data)
    corpus = D.held_out_corpus(D.read_corpus(cfg), splits)
    kinds = manifest.combine.members

    t0 = time.time()
    init_ray(cfg.ray, address)
    predictors = member_runners(run_cfg, run_dir, splits)  # the run's members, on their exports
    probs, key = ensemble_targets(run_dir, predictors, kinds, manifest.combine, splits, corpus)
    for actor in predictors.values():
        ray.kill(actor)
    runner = MemberRunner.options(num_cpus=0).remote(
        member_spec(cfg, name, splits), str(out_dir), str(out_dir / "ray"),
        cfg.training.max_failures, cfg.training.eval_batch_size,
        export_dir=str(out_dir / "export"))
    job = student_job(member, splits, corpus, probs, cfg.distill, 1,
                      teacher_checkpoint=_teacher_checkpoint(out_dir, export))
    print(f"distilling the ensemble into {name} ({layers} of {teacher}'s {depth} layers): "
          f"{len(probs)} texts ({len(corpus)} from the corpus), up to {d.epochs:g} epochs",
          flush=True)
    result = ray.get(runner.run_round.remote([job], False))
    ray.kill(runner)
    logits = result["outputs"]
    scores = evaluate_student(run_dir, manifest, splits, logits)
    info = result["info"]
    row = {
        "name": name, "teacher": teacher, "layers": layers, "teacher_layers": depth,
        "params": info["params"], "teacher_params": manifest.members[teacher].params,
        "texts": int(len(probs)), "corpus_texts": len(corpus),
        "targets": str(D.cache_path(key)), "epochs": d.epochs,
        "alpha": d.alpha, "temperature": d.temperature, "lr": member.lr,
        "train_wall_s": info["train_wall_s"], "wall_s": time.time() - t0,
        "stages": info["stages"], "export": str(out_dir / "export"), **scores,
    }
    from ensemble.publish import save_npz

    save_npz(out_dir / PREDICTIONS, {s: logits[s] for s in ("dev", "test")})
    atomic_write_json(out_dir / METRICS, row)  # written last: it marks the student finished
    return row


def publish_student(run_dir: str | Path, name: str) -> Manifest:
    """Make student ``name`` (trained by `distill_run`) the run's cascade-only first stage.

    The student joins the manifest as a member of kind ``student`` that does not vote
    (`Combination.cascade_student`), with its dev-fitted temperature; its dev/test probabilities
    join ``predictions/`` so that serving fits the cascade threshold on them (`ensemble serve
    RUN_DIR --cascade`, `Ensemble.from_run(RUN_DIR, cascade=True)`). The ensemble's own answers
    are unchanged. A student published before is replaced (its files stay under ``students/``).
    The predictions are written first and the manifest last, so an interrupted publish leaves
    the run as it was.

    Raises:
        ConfigError: if the run is not finished, the student is not trained, or ``name`` is
            one of the voting members.
    """
    from ensemble.publish import save_npz
    from ensemble.rundir import MemberEntry
    from ensemble.serving.cascade import load_predictions

    run_dir = Path(run_dir).resolve()
    manifest = Manifest.load(run_dir)
    out_dir = run_dir / "students" / name
    if not (out_dir / METRICS).is_file():
        trained = sorted(p.parent.name for p in (run_dir / "students").glob(f"*/{METRICS}"))
        raise C.ConfigError(
            f"no trained student {name!r} in {run_dir / 'students'} (trained: "
            f"{trained or 'none'}); train it with `ensemble distill {run_dir} --name {name} "
            "--layers N --publish`"
        )
    spec = manifest.combine
    if name in spec.members:
        raise C.ConfigError(f"{name} is a voting member of the run; a student needs its own name")
    row = read_json(out_dir / METRICS)
    with np.load(out_dir / PREDICTIONS) as z:
        logits = {s: z[s] for s in ("dev", "test")}
    preds = {split: load_predictions(run_dir, split) for split in logits}
    for split, values in logits.items():
        if len(values) != len(preds[split]["labels"]):
            raise C.ConfigError(
                f"student {name} has {len(values)} {split} predictions, the run "
                f"{len(preds[split]['labels'])}: it was distilled on other data; train it "
                "again on this run's data"
            )
    for split, values in logits.items():
        save_npz(run_dir / "predictions" / f"{split}.npz",
                 {**preds[split], name: combine.softmax(values)})

    members = {n: m for n, m in manifest.members.items() if n != spec.cascade_student}
    teacher = manifest.members[row["teacher"]]
    members[name] = MemberEntry(
        kind="student", path=str((out_dir / "export").relative_to(run_dir)),
        num_labels=spec.num_classes, max_length=teacher.max_length,
        metrics={k: row["test"][k] for k in ("accuracy", "macro_f1", "nll", "ece")},
        params=int(row["params"]))
    temps = {n: t for n, t in (spec.params.get("temperatures") or {}).items()
             if n != spec.cascade_student}
    params = {**spec.params, "temperatures": {**temps, name: float(row["temperature"])}}
    manifest.members = members
    manifest.combine = dataclasses.replace(spec, params=params, cascade_student=name)
    manifest.save(run_dir)  # written last: the run serves the student from here on
    return manifest


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``distill`` on the main CLI's subparsers."""
    p = subparsers.add_parser(
        "distill",
        help="distil a finished run's ensemble into a new, shallower student",
        description="Train a student cut from one of the run's classifiers on the published "
        "ensemble's calibrated probabilities; writes RUN_DIR/students/NAME/ (export, "
        "metrics.json with test accuracy, share of the ensemble's accuracy and the cascade).",
    )
    p.add_argument("run_dir", help="a finished run directory (with manifest.json)")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the run's config, e.g. "
                   "data.source=/path/to/sst")
    p.add_argument("--layers", type=int, default=3, help="the student's encoder layers")
    p.add_argument("--teacher", help="the member it is cut from (default: best classifier on dev)")
    p.add_argument("--name", help="its directory under RUN_DIR/students (default l<layers>)")
    p.add_argument("--epochs", type=float, default=3.0, help="training epochs (default 3)")
    p.add_argument("--alpha", type=float, default=0.9, help="weight of the KL to the ensemble")
    p.add_argument("--temperature", type=float, default=2.0, help="distillation temperature")
    p.add_argument("--lr", type=float, help="learning rate (default: the teacher's)")
    p.add_argument("--corpus", help="extra unlabelled texts (csv/tsv/json/jsonl/parquet)")
    p.add_argument("--corpus-text-column", help="the corpus's text column (default: the run's)")
    p.add_argument("--max-corpus-texts", type=int, help="use at most this many corpus texts")
    p.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else local)")
    p.add_argument("--publish", action="store_true",
                   help="make the student the run's cascade first stage (it does not vote): "
                   "`ensemble serve RUN_DIR --cascade` then answers confident texts with it")
    p.set_defaults(func=_distill)


def _distill(args: argparse.Namespace) -> int:
    d = C.DistillConfig(epochs=args.epochs, alpha=args.alpha, temperature=args.temperature,
                        corpus=args.corpus, corpus_text_column=args.corpus_text_column,
                        max_corpus_texts=args.max_corpus_texts)
    row = distill_run(args.run_dir, args.layers, teacher=args.teacher, name=args.name,
                      distill=d, lr=args.lr, overrides=args.overrides, address=args.address)
    test, cascade = row["test"], row["cascade"]
    print(f"student {row['name']}: {row['params'] / 1e6:.1f} M params "
          f"({row['params'] / row['teacher_params']:.2f} of {row['teacher']}), test accuracy "
          f"{test['accuracy']:.4f} ({test['share_of_ensemble_accuracy']:.1%} of the ensemble's "
          f"{test['ensemble_accuracy']:.4f}); the cascade answers "
          f"{cascade['test']['student_fraction']:.0%} of test at a loss of "
          f"{100 * cascade['test']['accuracy_loss']:.2f} pt (dev "
          f"{100 * cascade['accuracy_loss']:.2f} pt)", flush=True)
    print(f"STUDENT_DIR={Path(row['export']).parent}", flush=True)
    if args.publish:
        publish_student(args.run_dir, row["name"])
        print(f"published {row['name']} as the cascade's first stage of {args.run_dir}; serve "
              f"it with `ensemble serve {args.run_dir} --cascade`", flush=True)
    return 0

