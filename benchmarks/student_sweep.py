"""Students of 1-4 layers distilled from a finished recipe run: size, speed, accuracy, cascade.

    python benchmarks/student_sweep.py --run runs/recipe2/sst_recipe_s0 --layers 1 2 3 4
    python benchmarks/student_sweep.py --run R0 --run R1 --run R2 --layers 3   # more seeds
    python benchmarks/student_sweep.py --run R0 ... --time-only                # speed, machine idle

For every run and depth, `ensemble.students.distill_run` (what `ensemble distill RUN_DIR
--layers N` runs) cuts a student from the run's best classifier and trains it on the published
ensemble's calibrated probabilities; students already in ``RUN_DIR/students/`` are reused. The
table gives, per depth: parameters; texts/s on this CPU (one thread per model, the models timed
back to back over 512 dev texts, median of 3 passes, next to the 6-layer teacher); SST-5 test
accuracy and its share of the ensemble's; the gap to the best single member (the recipe's
members are each trained alone for their full budget); and the cascade a 0.5-point dev budget
allows (student share and accuracy loss on test beside dev). Over several runs (seeds) each
number is a mean with the SE over runs; with one run, the accuracy gaps carry a paired bootstrap
SE over the test texts. A target counts as met only when the gap is beyond its SE.

Speed is measured only when the load average says the machine is quiet enough (``--time-only``
re-times finished students). Writes benchmarks/results/student_sweep.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import git_commit, load_average, machine, write_results

TARGET_SHARE = 0.97  # of the ensemble's accuracy
TARGET_SPEEDUP = 1.9  # against a 6-layer member
TARGET_CASCADE_SHARE = 0.70
SPEED_TEXTS = 512
TIMING_ROUNDS = 5  # rounds of teacher + students back to back; the speed-up's SE is over them


def paired_se(labels: np.ndarray, a: np.ndarray, b: np.ndarray, seed: int = 0) -> float:
    """Bootstrap SE of accuracy(a) - accuracy(b) over the test texts (paired)."""
    diff = (a == labels).astype(np.float64) - (b == labels).astype(np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, diff.size, size=(1000, diff.size))
    return float(diff[idx].mean(axis=1).std(ddof=1))


def mean_se(values: list[float]) -> tuple[float, float | None]:
    v = np.asarray(values, np.float64)
    return float(v.mean()), (float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else None)


def best_member(run_dir: Path) -> tuple[str, np.ndarray, np.ndarray]:
    """The recipe's classifier with the best test accuracy: (name, its test predictions, labels).

    Picked on test, so the comparison is against the strongest single member there is.
    """
    from ensemble.rundir import read_json

    manifest = read_json(run_dir / "manifest.json")
    with np.load(run_dir / "predictions" / "test.npz") as z:
        labels = z["labels"].astype(np.int64)
        preds = {n: z[n].argmax(1) for n, m in manifest["members"].items()
                 if m["kind"] in ("classifier", "teacher")}
    name = max(preds, key=lambda n: float((preds[n] == labels).mean()))
    return name, preds[name], labels


def run_splits(run_dir: Path) -> Any:
    from ensemble import config as C
    from ensemble.data import load_splits

    return load_splits(C.load(run_dir / "config.yaml").data)


def score_run(run_dir: Path, row: dict[str, Any]) -> dict[str, Any]:
    """One student's row with its gaps to the best member and to the ensemble (paired SEs)."""
    from ensemble.rundir import Manifest
    from ensemble.serving.cascade import load_predictions

    name, member_pred, labels = best_member(run_dir)
    with np.load(run_dir / "students" / row["name"] / "predictions.npz") as z:
        student_pred = z["test"].argmax(1)
    spec = Manifest.load(run_dir).combine
    preds = load_predictions(run_dir, "test")
    ens_pred = spec.probs({n: preds[n] for n in spec.members}).argmax(1)
    return {
        "run": str(run_dir), "name": row["name"], "layers": row["layers"],
        "params": row["params"], "teacher_params": row["teacher_params"],
        "student_accuracy": row["test"]["accuracy"],
        "ensemble_accuracy": row["test"]["ensemble_accuracy"],
        "share_of_ensemble": row["test"]["share_of_ensemble_accuracy"],
        "best_member": name, "best_member_accuracy": float((member_pred == labels).mean()),
        "minus_best_member": float(np.mean(student_pred == labels)
                                   - np.mean(member_pred == labels)),
        "minus_best_member_se": paired_se(labels, student_pred, member_pred),
        "minus_ensemble_se": paired_se(labels, student_pred, ens_pred),
        "nll": row["test"]["nll"], "ece_calibrated": row["test"]["ece_calibrated"],
        "kl_to_ensemble": row["test"]["kl_to_ensemble"],
        "cascade_dev_share": row["cascade"]["student_fraction"],
        "cascade_dev_loss": row["cascade"]["accuracy_loss"],
        "cascade_test_share": row["cascade"]["test"]["student_fraction"],
        "cascade_test_loss": row["cascade"]["test"]["accuracy_loss"],
        "cascade_measure": row["cascade"]["measure"],
        "train_wall_s": row["train_wall_s"], "epochs": row["epochs"],
        "corpus_texts": row["corpus_texts"], "texts": row["texts"],
    }


def students(runs: list[Path], layers: list[int], suffixes: list[str],
             ) -> list[tuple[Path, int, str]]:
    """(run, layers, student name) for every run, depth and suffix: the table's replicates.

    Several suffixes are student seeds of one run: their rows pool with other runs' under the
    same depth, so a depth's mean and SE are over every (run, student seed).
    """
    return [(run, n, f"l{n}{suffix}") for run in runs for n in layers for suffix in suffixes]


def time_students(run_dir: Path, names: list[str], rounds: int = TIMING_ROUNDS) -> dict[str, Any]:
    """ms/text of the teacher and each student, back to back on one thread, in ``rounds``
    independent rounds (each the median of 3 passes), so that a speed-up has an SE."""
    import torch

    from ensemble.publish import infer_ms
    from ensemble.rundir import read_json

    torch.set_num_threads(1)
    manifest = read_json(run_dir / "manifest.json")
    cfg = read_json(run_dir / "students" / names[0] / "metrics.json")
    teacher = run_dir / manifest["members"][cfg["teacher"]]["path"]
    texts = run_splits(run_dir).texts["dev"][:SPEED_TEXTS]
    load_before = load_average()
    per_round = []
    for _ in range(rounds):
        ms = infer_ms([teacher, *(run_dir / "students" / n / "export" for n in names)], texts,
                      manifest["members"][cfg["teacher"]]["max_length"], 32)
        per_round.append({"teacher": ms[0], **dict(zip(names, ms[1:], strict=True))})
    return {"teacher_ms_per_text": float(np.median([r["teacher"] for r in per_round])),
            "ms_per_text": {n: float(np.median([r[n] for r in per_round])) for n in names},
            "rounds": per_round, "texts": len(texts), "threads": 1, "load_before": load_before,
            "load_after": load_average()}


def speedup(timing: dict[str, Any], name: str) -> tuple[float, float | None]:
    """Mean and SE over the timing rounds of the teacher's ms/text over student ``name``'s."""
    rounds = timing.get("rounds") or [{"teacher": timing["teacher_ms_per_text"],
                                       name: timing["ms_per_text"][name]}]
    return mean_se([r["teacher"] / r[name] for r in rounds])


def summarize(rows: list[dict[str, Any]], timing: dict[str, Any] | None) -> dict[str, Any]:
    by_layers: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        by_layers.setdefault(r["layers"], []).append(r)
    table = {}
    for layers, rs in sorted(by_layers.items()):
        acc, acc_se = mean_se([r["student_accuracy"] for r in rs])
        gap, gap_se = mean_se([r["minus_best_member"] for r in rs])
        share, share_se = mean_se([r["share_of_ensemble"] for r in rs])
        if gap_se is None:
            gap_se = rs[0]["minus_best_member_se"]
        entry = {
            "runs": len(rs), "params": rs[0]["params"],
            "param_ratio": rs[0]["params"] / rs[0]["teacher_params"],
            "accuracy": acc, "accuracy_se": acc_se,
            "share_of_ensemble": share, "share_of_ensemble_se": share_se,
            "minus_best_member": gap, "minus_best_member_se": gap_se,
            "ensemble_accuracy": mean_se([r["ensemble_accuracy"] for r in rs])[0],
            "best_member_accuracy": mean_se([r["best_member_accuracy"] for r in rs])[0],
            "ece_calibrated": mean_se([r["ece_calibrated"] for r in rs])[0],
            "cascade_test_share": mean_se([r["cascade_test_share"] for r in rs])[0],
            "cascade_test_loss_max": max(r["cascade_test_loss"] for r in rs),
            "cascade_dev_loss_max": max(r["cascade_dev_loss"] for r in rs),
            "cascade_test_share_min": min(r["cascade_test_share"] for r in rs),
            "train_wall_s": mean_se([r["train_wall_s"] for r in rs])[0],
        }
        if timing and rs[0]["name"] in timing["ms_per_text"]:
            entry["texts_per_s"] = 1000.0 / timing["ms_per_text"][rs[0]["name"]]
            entry["speedup"], entry["speedup_se"] = speedup(timing, rs[0]["name"])
        entry["targets"] = {
            "beats_best_member": gap - gap_se > 0,
            "share_97": share >= TARGET_SHARE,
            "speedup_1_9": (entry["speedup"] - (entry["speedup_se"] or 0.0) >= TARGET_SPEEDUP
                            if "speedup" in entry else None),
            "cascade_70_within_half_point": (entry["cascade_test_share_min"] >= TARGET_CASCADE_SHARE
                                             and entry["cascade_test_loss_max"] <= 0.005),
        }
        table[layers] = entry
    return table


def markdown(table: dict[int, dict[str, Any]], timing: dict[str, Any] | None,
             meta: dict[str, Any]) -> str:
    def pm(v: float, se: float | None, scale: float = 100) -> str:
        return f"{scale * v:.2f}" + (f" ± {scale * se:.2f}" if se is not None else "")

    lines = [
        "# Students distilled from the recipe's ensemble (SST-5 test)", "",
        f"commit {meta['commit']}, {meta['runs']} run(s): {', '.join(meta['run_names'])}"
        + (f", students {', '.join(meta['students'])} of each" if len(meta.get("students", []))
           > len(table) else "") + "; "
        f"{meta['epochs']} epochs, alpha {meta['alpha']}, T {meta['temperature']}, "
        f"corpus texts {meta['corpus_texts']}",
        "",
        "| layers | params (M) | of teacher | texts/s (1 thread) | speed-up vs 6 layers | "
        "test acc (%) | of ensemble | − best member (pt) | ECE (T-scaled, pt) | "
        "cascade: test share / loss (pt) | dev loss (pt) | train (min) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for layers, e in table.items():
        speed = (f"{e['texts_per_s']:.0f} | {e['speedup']:.2f}×"
                 + (f" ± {e['speedup_se']:.2f}" if e.get("speedup_se") is not None else "")
                 if "speedup" in e else "– | –")
        lines.append(
            f"| {layers} | {e['params'] / 1e6:.1f} | {e['param_ratio']:.2f} | {speed} | "
            f"{pm(e['accuracy'], e['accuracy_se'])} | {pm(e['share_of_ensemble'], None)} % | "
            f"{pm(e['minus_best_member'], e['minus_best_member_se'])} | "
            f"{100 * e['ece_calibrated']:.2f} | {e['cascade_test_share']:.0%} / "
            f"{100 * e['cascade_test_loss_max']:.2f} | {100 * e['cascade_dev_loss_max']:.2f} | "
            f"{e['train_wall_s'] / 60:.1f} |")
    e0 = next(iter(table.values()))
    lines += ["", f"Ensemble test accuracy {100 * e0['ensemble_accuracy']:.2f} %, best single "
              f"member (trained alone, full budget, picked on test) "
              f"{100 * e0['best_member_accuracy']:.2f} % (means over the runs)."]
    if timing:
        rounds = len(timing.get("rounds") or [None])
        lines += [f"Speed: {timing['texts']} dev texts, one thread, models back to back, "
                  f"{rounds} round(s) of the median of 3 passes (texts/s: the median round; "
                  f"speed-up: mean ± SE over the rounds); teacher "
                  f"{1000 / timing['teacher_ms_per_text']:.0f} texts/s; load average before "
                  f"{timing['load_before']}, after {timing['load_after']}."]
    else:
        lines += ["Speed not measured: the load average was above --max-load. Rerun with "
                  "--time-only on a quiet machine."]
    lines += ["", "Targets per depth (met only beyond one SE): ≥ best member, ≥ 97 % of the "
              "ensemble, ≥ 1.9× faster than 6 layers, cascade ≥ 70 % of test within 0.5 pt on "
              "every run.", "",
              "| layers | ≥ best member | ≥ 97 % | ≥ 1.9× | cascade |", "|---:|---|---|---|---|"]
    for layers, e in table.items():
        t = e["targets"]

        def yn(v: bool | None) -> str:
            return "–" if v is None else ("met" if v else "missed")

        lines.append(f"| {layers} | {yn(t['beats_best_member'])} | {yn(t['share_97'])} | "
                     f"{yn(t['speedup_1_9'])} | {yn(t['cascade_70_within_half_point'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", required=True, help="a finished recipe run")
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--alpha", type=float, default=0.9)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--teacher", default=None,
                        help="the member to cut students from (default: best classifier on dev)")
    parser.add_argument("--corpus", default=None)
    parser.add_argument("--corpus-text-column", default=None)
    parser.add_argument("--max-corpus-texts", type=int, default=None)
    parser.add_argument("--name-suffix", nargs="+", default=[""],
                        help="student dir: l<N><suffix>; several: student seeds of each run, "
                             "tabled with --time-only")
    parser.add_argument("--time-only", action="store_true",
                        help="no training: table the finished students, timed again")
    parser.add_argument("--max-load", type=float, default=1.5,
                        help="skip timing above this 1-minute load average")
    parser.add_argument("--out", default="student_sweep")
    args = parser.parse_args(argv)

    from ensemble import config as C
    from ensemble.rundir import read_json
    from ensemble.students import distill_run

    runs = [Path(r).resolve() for r in args.run]
    d = C.DistillConfig(epochs=args.epochs, alpha=args.alpha, temperature=args.temperature,
                        corpus=args.corpus, corpus_text_column=args.corpus_text_column,
                        max_corpus_texts=args.max_corpus_texts)
    if len(args.name_suffix) > 1 and not args.time_only:
        parser.error("several --name-suffix values table students trained apart, each with a "
                     "seed of its own (`ensemble distill RUN --name l<N><suffix> "
                     "members.<teacher>.seed=S`): add --time-only")
    names = [f"l{n}{args.name_suffix[0]}" for n in args.layers]  # timed
    t0 = time.time()
    results = {}
    for run, layers, name in students(runs, args.layers, args.name_suffix):
        path = run / "students" / name / "metrics.json"
        if args.time_only:
            if not path.is_file():
                print(f"{path} missing (not trained yet): left out of the table", flush=True)
                continue
            results[(run, name)] = read_json(path)
        else:
            os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
            results[(run, name)] = distill_run(run, layers, name=name, distill=d, lr=args.lr,
                                               teacher=args.teacher)
    import ray

    if ray.is_initialized():
        ray.shutdown()
    if not results:
        raise SystemExit("no finished student to table; train some first (without --time-only)")
    rows = [score_run(run, row) for (run, _), row in results.items()]
    timed = [n for n in names if (runs[0] / "students" / n / "metrics.json").is_file()]
    timing = None
    if load_average()[0] <= args.max_load:
        timing = time_students(runs[0], timed)
    else:
        print(f"load average {load_average()} above {args.max_load}: speed not measured",
              flush=True)
    table = summarize(rows, timing)
    first = next(iter(results.values()))
    meta = {"commit": git_commit(), "runs": len(runs), "run_names": [r.name for r in runs],
            "students": sorted({n for _, n in results}),
            "epochs": args.epochs, "alpha": args.alpha, "temperature": args.temperature,
            "corpus": args.corpus, "corpus_texts": first["corpus_texts"]}
    data = {"meta": meta, "machine": machine(), "rows": rows, "timing": timing,
            "table": {str(k): v for k, v in table.items()}, "wall_s": time.time() - t0,
            "command": " ".join(["python", "benchmarks/student_sweep.py", *(argv or sys.argv[1:])])}
    json_path, md_path = write_results(args.out, data, markdown(table, timing, meta))
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
