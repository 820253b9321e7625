"""Write a finished run: evaluation on dev and test, learned combiner, plots, manifest.

Everything lands atomically; the manifest is written last, so a run directory with a manifest is
complete.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import numpy as np

from ensemble import config as C
from ensemble import evaluate as E
from ensemble import report
from ensemble.calibration import fit_temperature
from ensemble.cards import write_cards
from ensemble.combination import Combination
from ensemble.combine import OUTPUT_TEMPERATURE, log_probs, member_votes, to_probs
from ensemble.data import Splits
from ensemble.metrics import roc_curves
from ensemble.rundir import Manifest, MemberEntry, atomic_write_bytes, atomic_write_json
from ensemble.tuning.weights import candidates, choose

logger = logging.getLogger(__name__)


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez through a temp file + rename."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def fit_combiner(
    dev_probs: dict[str, np.ndarray],
    kinds: dict[str, str],
    splits: Splits,
    seed: int,
    regressor_vote: str = "calibrated",
    method: str = "auto",
    select: str = "one_se",
    calibrate: bool = True,
) -> Combination:
    """Fit the combination ``method`` on dev, or with ``auto`` choose one (`weights.choose`).

    Learned methods are scored out-of-fold. The regressor vote's fitted sharpness goes into
    ``params["regressor_sharpness"]`` and, with ``calibrate``, each classification member's
    dev-fitted temperature into ``params["temperatures"]``; Serve reads both there, so served
    votes equal the evaluated ones. The combiner is fitted on the temperature-scaled votes.

    With ``calibrate``, the combined output gets a temperature of its own, fitted on the chosen
    combiner's dev output (out-of-fold for a learned one), in ``params["output_temperature"]``:
    an average of calibrated members is less confident than it is accurate, and this undoes it.
    A hard vote has none (its vote shares are not probabilities to scale).
    """
    edges, num_classes = splits.intensity_edges(), splits.num_labels()
    sharpness = E.regressor_sharpness(
        dev_probs, kinds, splits.labels["dev"], edges, num_classes, regressor_vote
    )
    temperatures = E.member_temperatures(dev_probs, kinds, splits.labels["dev"], calibrate)
    names = list(dev_probs)
    probs = member_votes(dev_probs, kinds, edges, num_classes, sharpness, temperatures)
    best, results = choose(
        probs, splits.labels["dev"], methods=candidates(method), seed=seed, rule=select
    )
    entry = best.to_manifest(names)
    entry["select"] = select if method == "auto" else "fixed"
    if sharpness is not None:
        entry["params"] = {**entry["params"], "regressor_sharpness": sharpness}
    if temperatures:
        entry["params"] = {**entry["params"], "temperatures": temperatures}
    if calibrate and best.method != "hard_vote":
        dev_out = best.dev_probs if best.dev_probs is not None else best.apply(probs)
        t = fit_temperature(log_probs(dev_out), splits.labels["dev"])
        entry["params"] = {**entry["params"], OUTPUT_TEMPERATURE: t}
    entry["candidates"] = {m: r.dev_score for m, r in results.items()}
    return Combination.from_section(entry, kinds, splits.label_names, splits.class_intensity(),
                                    edges)


def publish(
    cfg: C.RunConfig,
    run_dir: Path,
    splits: Splits,
    kinds: dict[str, str],
    outputs: dict[str, dict[str, np.ndarray]],
    state: dict[str, Any],
    wall_s: float,
) -> Manifest:
    """Evaluate the final members and the ensemble; write metrics, plots and the manifest."""
    probs = {s: to_probs({n: o[s] for n, o in outputs.items()}, kinds) for s in ("dev", "test")}
    for split in ("dev", "test"):
        arrays = {n: p.astype(np.float32) for n, p in probs[split].items()}
        arrays["labels"] = splits.labels[split]
        if splits.intensity is not None:
            arrays["intensity"] = splits.intensity[split]
        save_npz(run_dir / "predictions" / f"{split}.npz", arrays)
    combine = fit_combiner(
        probs["dev"], kinds, splits, cfg.training.seed, cfg.training.regressor_vote,
        cfg.training.combiner, cfg.training.combiner_select, cfg.training.calibrate,
    )
    common = dict(
        kinds=kinds,
        label_names=splits.label_names,
        class_intensity=splits.class_intensity(),
        edges=splits.intensity_edges(),
        learned=combine,
        sharpness=combine.params.get("regressor_sharpness"),
        temperatures=combine.params.get("temperatures"),
    )
    results = {}
    for split in ("dev", "test"):
        intensity = splits.intensity[split] if splits.intensity is not None else None
        results[split] = E.evaluate_split(
            probs[split], labels=splits.labels[split], intensity=intensity, **common
        )
    info = dict(state.member_info)
    _student_ratios(cfg, info, run_dir, splits.texts["dev"])
    metrics = {
        "dev": results["dev"],
        "test": results["test"],
        "members": info,
        "combine": combine.section(),
        "wall_s": wall_s,
        "rounds": state.rounds_completed,
        "data": splits.summary(),
        # the share of test texts on which two members' classes differ (a regressor by its bin)
        "test_disagreement": E.disagreement(probs["test"], kinds, splits.intensity_edges()),
    }
    _plots(run_dir, splits, probs["test"], kinds, results["test"], state, combine)
    if len(kinds) > 1:
        report.plot_disagreement(
            metrics["test_disagreement"], run_dir / "plots" / "disagreement.png",
            "members' top-1 disagreement (test)",
        )
    manifest = Manifest(
        name=cfg.name,
        label_names=list(splits.label_names),
        class_intensity=splits.class_intensity(),
        intensity_edges=splits.intensity_edges(),
        intensity_range=list(splits.intensity_range()),
        members={
            n: MemberEntry(
                kind=kinds[n],
                path=f"members/{n}/export",
                num_labels=1 if kinds[n] == "regressor" else splits.num_labels(),
                max_length=cfg.max_length(n),
                metrics=E.compact({n: results["test"][n]})[n],
                params=int(info.get(n, {}).get("params", 0)),
            )
            for n in kinds
        },
        combine=combine,
        rounds_completed=state.rounds_completed,
        rounds_planned=cfg.training.rounds,
        metrics=E.compact({k: v for k, v in results["test"].items() if k.startswith("ensemble")}),
        config=C.to_dict(cfg),
    )
    if "student" in kinds.values():
        metrics["cascade"] = _cascade(cfg, run_dir, manifest)
    atomic_write_json(run_dir / "metrics.json", metrics)
    report.write_index(run_dir, metrics, cfg.name)  # every plot beside the metrics table
    write_cards(cfg, run_dir, manifest, metrics)  # a README.md beside each member's export
    manifest.save(run_dir)  # last: a run directory with a manifest is complete
    print_summary(results["test"], info, run_dir)
    return manifest


def _cascade(cfg: C.RunConfig, run_dir: Path, manifest: Manifest) -> dict[str, Any]:
    """The cascade Serve would fit (`serve.*` settings): its stats with the test loss, and the
    curve plot."""
    from ensemble.serving import cascade

    spec = manifest.combination()
    threshold, measure, stats = cascade.fit_cascade_from_run(
        run_dir, spec, cfg.serve.cascade_confidence, cfg.serve.cascade_max_accuracy_loss
    )
    curves = {split: cascade.cascade_curve(*cascade.served_probs(run_dir, spec, split), measure)
              for split in ("dev", "test")}
    report.plot_cascade(curves, run_dir / "plots" / "cascade.png", threshold,
                        cfg.serve.cascade_max_accuracy_loss,
                        f"cascade on the student's {measure} (test loss at the dev-fitted dot)")
    return stats


def _student_ratios(
    cfg: C.RunConfig, info: dict[str, Any], run_dir: Path, texts: list[str]
) -> None:
    """Each student's size and inference speed relative to its teacher.

    The speed is measured here, once training is over, on the exported models back to back
    (`infer_ms`), not from the in-run predictions, which share the CPUs with members still
    training.
    """
    for name, m in cfg.members.items():
        if m.kind == "student" and m.teacher in info and name in info:
            s, t = info[name], info[m.teacher]
            s["size_ratio"] = s["params"] / max(1, t["params"])
            ms = infer_ms(
                [run_dir / "members" / n / "export" for n in (m.teacher, name)],
                texts[:SPEED_TEXTS],
                cfg.data.max_length,
                cfg.training.eval_batch_size,
            )
            t["infer_ms_per_text"], s["infer_ms_per_text"] = ms
            s["speedup"] = ms[0] / max(1e-9, ms[1])
            s["speed_texts"] = min(len(texts), SPEED_TEXTS)


SPEED_TEXTS = 512  # dev texts timed per model for the student's speed-up


def infer_ms(paths: list[Path], texts: list[str], max_length: int, batch_size: int,
             repeats: int = 3) -> list[float]:
    """Milliseconds per text of each exported model over `texts`: one warm-up pass each, then
    `repeats` passes with the models interleaved (a busy machine slows them alike); the median."""
    import time

    import torch

    from ensemble.models.members import load_exported
    from ensemble.training.loop import encode, predict_logits

    loaded = []
    for path in paths:
        model, tokenizer = load_exported(path)
        ids = encode(tokenizer, texts, max_length)
        loaded.append((model, ids, tokenizer.pad_token_id))
    times: list[list[float]] = [[] for _ in paths]
    with torch.inference_mode():
        for model, ids, pad in loaded:
            predict_logits(model, ids[:batch_size], pad, batch_size)
        for _ in range(repeats):
            for i, (model, ids, pad) in enumerate(loaded):
                t0 = time.perf_counter()
                predict_logits(model, ids, pad, batch_size)
                times[i].append(1000 * (time.perf_counter() - t0) / max(1, len(ids)))
    return [sorted(t)[len(t) // 2] for t in times]


def _plots(run_dir: Path, splits: Splits, test_probs, kinds, test_rows, state,
           spec: Combination) -> None:
    plots = run_dir / "plots"
    report.plot_learning_curves(state.history, plots / "learning_curves.png")
    if state.rounds:
        report.plot_rounds(state.rounds, plots / "rounds.png")
    edges, num_classes = splits.intensity_edges(), splits.num_labels()
    sharpness = spec.params.get("regressor_sharpness")
    temperatures = spec.params.get("temperatures")
    names = list(test_probs)
    raw = member_votes(test_probs, kinds, edges, num_classes, sharpness)
    voted = member_votes(test_probs, kinds, edges, num_classes, sharpness, temperatures)
    ens = spec.combine_votes(voted, names)
    key = f"ensemble/{spec.method}"
    combined = {**dict(zip(names, voted, strict=True)), key: ens}
    panels = {"test": combined}
    if temperatures:  # the members before and after scaling
        panels = {"members as trained (test)": dict(zip(names, raw, strict=True)),
                  "temperature-scaled, as combined (test)": combined}
    report.plot_reliability(splits.labels["test"], panels, plots / "reliability.png")
    if splits.intensity is not None:  # each regressor's and the ensemble's intensity vs the truth
        shown = {n: test_probs[n] for n in names if kinds[n] == "regressor"}
        shown[report.ENSEMBLE] = E.voted_intensity(
            test_probs, kinds, names, voted, splits.class_intensity()
        )
        report.plot_intensity(splits.intensity["test"], shown, plots / "intensity.png",
                              "intensity, predicted vs true (test)")
    # a member's confusion matrix and ROC are its own, as in metrics.json
    for name, p in [*zip(names, raw, strict=True), (key, ens)]:
        slug = name.replace("/", "_")
        report.plot_confusion(
            test_rows[name]["confusion"],
            splits.label_names,
            plots / f"confusion_{slug}.png",
            f"{name} (test)",
        )
        if kinds.get(name) != "regressor":
            report.plot_roc(
                roc_curves(splits.labels["test"], p, splits.label_names),
                plots / f"roc_{slug}.png",
                f"{name} (test)",
            )


def print_round(row: dict[str, Any]) -> None:
    table = report.metrics_table(row["dev"], f"round {row['round']}: dev")
    print(report.render(table), flush=True)


def print_summary(test_rows: dict[str, Any], info: dict[str, Any], run_dir: Path) -> None:
    rows = {}
    for name, r in test_rows.items():
        rows[name] = {
            **E.compact({name: r})[name],
            **{
                k: info.get(name, {}).get(k)
                for k in ("size_ratio", "speedup")
                if k in info.get(name, {})
            },
        }
    print(report.render(report.metrics_table(rows, "test")), flush=True)
    speed = {n: f"{i.get('samples_per_s', 0):.1f}" for n, i in info.items()}
    print(f"training samples/s per member: {speed}", flush=True)
    print(f"run directory: {run_dir}", flush=True)
