"""SST quality: independent vs joint training (same budget), the ensemble, and a TF-IDF floor.

    python benchmarks/sst_quality.py [--data ../shared/data/sst] [--rounds 2] [--epochs 0.5]

Trains the four members twice with the same budget (`--rounds` x `--epochs` per round; the
default, 2 x 0.5, is one pass over SST train like configs/sst.yaml): once with every guidance
weight 0 (independent training), once with guidance on (joint). Reports SST-5 test accuracy /
macro-F1 and SST intensity Pearson r for every member and the ensemble, plus TF-IDF + logistic
regression (classes) and ridge (intensity) from scikit-learn, and every combination method
(uniform hard/soft vote, learned weights, Caruana selection, stacking) fitted on dev and scored on
test for both runs. Writes benchmarks/results/sst_quality.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

try:
    from benchmarks import common
except ModuleNotFoundError:  # run as a script: benchmarks/ is on sys.path
    import common  # type: ignore[no-redef]

from ensemble import config as C  # noqa: E402
from ensemble.data import load_splits  # noqa: E402
from ensemble.metrics import classification_metrics, regression_metrics  # noqa: E402


def tfidf_baseline(data: str) -> dict[str, float]:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression, Ridge

    splits = load_splits(C.DataConfig(source=data))
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    x_train = vec.fit_transform(splits.texts["train"])
    x_test = vec.transform(splits.texts["test"])
    clf = LogisticRegression(C=2.0, max_iter=2000).fit(x_train, splits.labels["train"])
    probs = clf.predict_proba(x_test)
    cls = classification_metrics(splits.labels["test"], probs, splits.label_names)
    reg = Ridge(alpha=1.0).fit(x_train, splits.intensity["train"])
    r = regression_metrics(splits.intensity["test"], reg.predict(x_test))
    return {"accuracy": cls["accuracy"], "macro_f1": cls["macro_f1"], "pearson": r["pearson"]}


def run(config: str, overrides: list[str], address: str | None) -> tuple[dict, float]:
    from ensemble.orchestrate import train

    cfg = C.load(config, overrides)
    start = time.time()
    run_dir = train(cfg, address=address, progress=False)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return metrics, time.time() - start


def rows_of(metrics: dict) -> dict[str, dict[str, float]]:
    out = {}
    for name, row in metrics["test"].items():
        out[name] = {k: row.get(k) for k in ("accuracy", "macro_f1", "pearson")}
    return out


def markdown(result: dict) -> str:
    lines = [
        "| model | training | SST-5 test acc | macro-F1 | intensity Pearson r |",
        "|---|---|---|---|---|",
    ]
    b = result["tfidf"]
    lines.append(
        f"| TF-IDF + logistic / ridge | - | {b['accuracy']:.3f} | {b['macro_f1']:.3f} | "
        f"{b['pearson']:.3f} |"
    )
    for mode in ("independent", "joint"):
        for name, row in result[mode]["test"].items():
            cells = [
                f"{row[k]:.3f}" if row.get(k) is not None else "-"
                for k in ("accuracy", "macro_f1", "pearson")
            ]
            lines.append(f"| {name} | {mode} | " + " | ".join(cells) + " |")
    t = result["targets"]
    lines += [
        "",
        f"- joint ensemble ({t['ensemble_row']}) vs best joint member "
        f"({t['best_member']}): {t['ensemble_acc']:.3f} vs {t['best_member_acc']:.3f} "
        f"→ {'met' if t['ensemble_beats_best_member'] else 'missed'}",
        f"- joint vs independent classifier: {t['joint_classifier_acc']:.3f} vs "
        f"{t['independent_classifier_acc']:.3f} → "
        f"{'met' if t['joint_classifier_beats_independent'] else 'missed'}",
        f"- wall time: independent {result['independent']['wall_s']:.0f} s, joint "
        f"{result['joint']['wall_s']:.0f} s",
        f"- load average before {result['load_before']}, after {result['load_after']} on "
        f"{result['cpus']} CPUs",
        "",
        "## Learned vs uniform ensemble weights (test)",
        "",
        common.combiner_markdown("independent run", result["independent"]["combiners"]),
        common.combiner_markdown("joint run", result["joint"]["combiners"]),
    ]
    return "\n".join(lines) + "\n"


def targets(indep: dict, joint: dict, kinds: dict[str, str]) -> dict:
    members = {n: r for n, r in joint.items() if n in kinds and kinds[n] != "regressor"}
    best_member = max(members, key=lambda n: members[n]["accuracy"])
    ens = {n: r for n, r in joint.items() if n.startswith("ensemble/")}
    ens_row = max(ens, key=lambda n: ens[n]["accuracy"])
    return {
        "best_member": best_member,
        "best_member_acc": members[best_member]["accuracy"],
        "ensemble_row": ens_row,
        "ensemble_acc": ens[ens_row]["accuracy"],
        "ensemble_beats_best_member": ens[ens_row]["accuracy"] > members[best_member]["accuracy"],
        "joint_classifier_acc": joint["classifier"]["accuracy"],
        "independent_classifier_acc": indep["classifier"]["accuracy"],
        "joint_classifier_beats_independent": joint["classifier"]["accuracy"]
        > indep["classifier"]["accuracy"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "sst.yaml"))
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sst"))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--epochs", type=float, default=0.5, help="per member per round")
    ap.add_argument(
        "--guidance",
        nargs="*",
        default=[
            "training.guidance.classifier_from_regressor=0.3",
            "training.guidance.regressor_from_classifier=0.3",
            "training.guidance.mutual=0.3",
            "training.guidance.student_from_ensemble=0.3",
        ],
    )
    ap.add_argument("--work-dir", default=str(ROOT / "runs" / "bench_sst_quality"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--address", default=None)
    ap.add_argument("extra", nargs="*", help="more dotted overrides for both runs")
    args = ap.parse_args()

    shared = [
        f"data.source={args.data}",
        f"training.rounds={args.rounds}",
        *[f"members.{m}.epochs={args.epochs}" for m in C.load(args.config).members],
        *args.extra,
    ]
    result: dict = {
        "config": args.config,
        "rounds": args.rounds,
        "epochs": args.epochs,
        "guidance": args.guidance,
        "extra": args.extra,
        "cpus": os.cpu_count(),
        "machine": common.machine(),
        "load_before": common.load_average(),
    }
    result["tfidf"] = tfidf_baseline(args.data)
    indep, t_indep = run(
        args.config, [*shared, f"output_dir={args.work_dir}/independent"], args.address
    )
    joint, t_joint = run(
        args.config, [*shared, *args.guidance, f"output_dir={args.work_dir}/joint"], args.address
    )
    result["independent"] = {"test": rows_of(indep), "wall_s": t_indep, "combine": indep["combine"]}
    result["joint"] = {"test": rows_of(joint), "wall_s": t_joint, "combine": joint["combine"]}
    result["load_after"] = common.load_average()
    for mode in ("independent", "joint"):
        result[mode]["combiners"] = common.combiners_on_test(Path(args.work_dir) / mode)
    kinds = {n: i["kind"] for n, i in joint["members"].items()}
    result["targets"] = targets(result["independent"]["test"], result["joint"]["test"], kinds)
    common.write_results("sst_quality", result, markdown(result), Path(args.out))
    print(markdown(result))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
