"""SST quality: independent vs joint training (same budget), the ensemble, and a TF-IDF floor.

    python benchmarks/sst_quality.py [--data ../shared/data/sst] [--rounds 2] [--epochs 0.5]
    python benchmarks/sst_quality.py --seed 1        # another seed: sst_quality_seed1.{json,md}
    python benchmarks/sst_quality.py --summarize     # every seed's file -> sst_quality_seeds.*
    python benchmarks/sst_quality.py --seed 1 --variant no_c2r --reuse-independent \
        --guidance training.guidance.classifier_from_regressor=0 ...  # ablate the joint arm

Trains the four members twice with the same budget (`--rounds` x `--epochs` per round; the
default, 2 x 0.5, is one pass over SST train like configs/sst_joint.yaml): once with every guidance
weight 0 (independent training), once with guidance on (joint). Reports SST-5 test accuracy /
macro-F1 and SST intensity Pearson r for every member and the ensemble, plus TF-IDF + logistic
regression (classes) and ridge (intensity) from scikit-learn, and every combination method
(uniform hard/soft vote, learned weights, Caruana selection, stacking) fitted on dev and scored on
test for both runs. Writes benchmarks/results/sst_quality.{json,md} (seed 0) or
sst_quality_seed<S>.{json,md}.

One seed's comparison of two classifiers is noisy: one standard error of an accuracy near 0.47 on
the 2210 test texts is about 1.1 points. `--summarize` reads every seed's file and reports each
target per seed and over seeds (the mean paired difference, joint minus independent, with its
standard error across seeds), the test NLL of both arms the same way, and their churn: every
seed's file keeps the class each member and the published ensemble predicted for every test text,
and the churn of a model is the share of test texts whose class changes between two seeds (mean
over every pair of seeds). Seed files written before they kept predictions give no churn.

`--variant NAME` names an ablation of the joint arm: its files are sst_quality_NAME[_seedS].* and
`--summarize --variant NAME` summarizes them. With `--reuse-independent` the independent arm is
not trained again but copied from the same seed's sst_quality[_seedS].json (training is
deterministic for a seed; the file must come from the same config, rounds, epochs and extra
overrides, or the script stops).
"""

from __future__ import annotations

import argparse
import dataclasses
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
        out[name] = {k: row.get(k) for k in ("accuracy", "macro_f1", "pearson", "nll", "ece")}
    return out


ENSEMBLE = "ensemble (chosen on dev)"


def test_predictions(run_dir: Path) -> dict[str, list[int]]:
    """The class each voting member, and the published ensemble, predicts for every test text:
    what the churn between seeds is measured on."""
    from ensemble.combination import stack_member_probs
    from ensemble.rundir import Manifest
    from ensemble.serving.cascade import load_predictions

    spec = Manifest.load(run_dir).combine
    votes = stack_member_probs(load_predictions(run_dir, "test"), spec)  # (M, N, C)
    out = {n: v.argmax(1).tolist() for n, v in zip(spec.members, votes, strict=True)}
    out[ENSEMBLE] = spec.combine_votes(votes).argmax(1).tolist()
    return out


def pair_churn(by_seed: dict[int, list[int]]) -> list[float]:
    """For every pair of seeds, in seed order, the fraction of test texts whose predicted class
    differs between the two."""
    seeds = sorted(by_seed)
    pairs = [(a, b) for i, a in enumerate(seeds) for b in seeds[i + 1:]]
    return [float(np.mean(np.asarray(by_seed[a]) != np.asarray(by_seed[b]))) for a, b in pairs]


def churn(by_seed: dict[int, list[int]]) -> dict[str, float | int | None]:
    """The fraction of test texts whose predicted class changes between two seeds: its mean over
    every pair of seeds, and the SE over the pairs (pairs share seeds: a rough SE)."""
    return _churn_summary(pair_churn(by_seed))


def _churn_summary(rates: list[float]) -> dict[str, float | int | None]:
    if not rates:
        return {"mean": None, "se": None, "pairs": 0}
    mean, se = _mean_se(rates)
    return {"mean": mean, "se": se, "pairs": len(rates)}


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
        f"→ {'ahead' if t['ensemble_beats_best_member'] else 'not ahead'} (one seed: whether "
        "it is beyond noise is judged over seeds)",
        f"- joint vs independent classifier: {t['joint_classifier_acc']:.3f} vs "
        f"{t['independent_classifier_acc']:.3f} → "
        f"{'ahead' if t['joint_classifier_beats_independent'] else 'not ahead'}",
        f"- wall time: independent {result['independent']['wall_s']:.0f} s"
        + (f" (not rerun: copied from {result['independent']['reused_from']}, commit "
           f"{result['independent']['reused_git_commit']})"
           if "reused_from" in result["independent"] else "")
        + f", joint {result['joint']['wall_s']:.0f} s",
        *[
            f"- {mode} ensemble: {c['method']} is what this code chooses (rule {c['select']}, "
            f"refitted at commit {c['rescored_git_commit']}); the run published {c['published']}"
            for mode in ("independent", "joint") if "published" in (c := result[mode]["combine"])
        ],
        f"- seed {result['seed']}, joint arm guidance: {' '.join(result['guidance'])}",
        f"- load average before {result['load_before']}, after {result['load_after']} on "
        f"{result['cpus']} CPUs",
        "",
        "## Learned vs uniform ensemble weights (test)",
        "",
        common.combiner_markdown("independent run", result["independent"]["combiners"]),
        common.combiner_markdown("joint run", result["joint"]["combiners"]),
    ]
    return "\n".join(lines) + "\n"


def targets(indep: dict, joint: dict, kinds: dict[str, str], chosen: str) -> dict:
    """Both targets on test; the ensemble is the combination chosen on dev (`chosen`)."""
    members = {n: r for n, r in joint.items() if n in kinds and kinds[n] != "regressor"}
    best_member = max(members, key=lambda n: members[n]["accuracy"])
    ens_row = f"ensemble/{chosen}"
    return {
        "best_member": best_member,
        "best_member_acc": members[best_member]["accuracy"],
        "ensemble_row": ens_row,
        "ensemble_acc": joint[ens_row]["accuracy"],
        "ensemble_beats_best_member": joint[ens_row]["accuracy"]
        > members[best_member]["accuracy"],
        "joint_classifier_acc": joint["classifier"]["accuracy"],
        "independent_classifier_acc": indep["classifier"]["accuracy"],
        "joint_classifier_beats_independent": joint["classifier"]["accuracy"]
        > indep["classifier"]["accuracy"],
    }


def result_name(seed: int, variant: str | None = None) -> str:
    base = f"sst_quality_{variant}" if variant else "sst_quality"
    return base if seed == 0 else f"{base}_seed{seed}"


def summary_name(variant: str | None = None) -> str:
    return f"sst_quality_{variant}_seeds" if variant else "sst_quality_seeds"


def seed_files(directory: Path, variant: str | None = None) -> dict[int, Path]:
    """Every seed's result file of `variant` (None: the main comparison) in `directory`."""
    found = {}
    for path in directory.glob("sst_quality*.json"):
        if path.stem.endswith("_seeds"):
            continue
        r = json.loads(path.read_text())
        if r.get("variant") != variant:
            continue
        seed = r.get("seed", 0)
        if path.stem != result_name(seed, variant):
            raise ValueError(
                f"{path} holds seed {seed}; expected {result_name(seed, variant)}.json"
            )
        found[seed] = path
    return dict(sorted(found.items()))


def reused_independent(out: Path, seed: int, config: str, rounds: int, epochs: float,
                       extra: list[str]) -> dict:
    """The independent arm of `seed` from its main result file, if it was run the same way."""
    path = out / f"{result_name(seed)}.json"
    if not path.exists():
        raise FileNotFoundError(
            f"--reuse-independent: {path} is missing; run the main comparison for seed {seed} "
            "first, or drop --reuse-independent"
        )
    r = json.loads(path.read_text())
    ours = {"config": Path(config).name, "rounds": rounds, "epochs": epochs, "extra": extra}
    theirs = {"config": Path(r["config"]).name, "rounds": r["rounds"], "epochs": r["epochs"],
              "extra": r.get("extra", [])}
    if ours != theirs:
        raise ValueError(
            f"--reuse-independent: {path} was run with {theirs}, this run asks for {ours}; "
            "rerun the main comparison with these settings or drop --reuse-independent"
        )
    return {**r["independent"], "reused_from": path.name,
            "reused_git_commit": r["machine"].get("git_commit")}


def _mean_se(values: list[float]) -> tuple[float, float | None]:
    arr = np.asarray(values, dtype=float)
    se = float(arr.std(ddof=1) / np.sqrt(len(arr))) if len(arr) > 1 else None
    return float(arr.mean()), se


def summarize(directory: Path, variant: str | None = None) -> dict:
    """Both targets per seed and over seeds, from every seed's result file in `directory`."""
    files = seed_files(directory, variant)
    if not files:
        raise FileNotFoundError(
            f"no {result_name(0, variant)}*.json in {directory}; run the benchmark first"
        )
    results = {seed: json.loads(path.read_text()) for seed, path in files.items()}
    seeds = {}
    for seed, r in results.items():
        # files written before "kinds" was saved come from configs/sst.yaml: names are kinds
        kinds = r.get("kinds") or {n: n for n in r["joint"]["test"] if "/" not in n}
        accs = {}
        for mode in ("independent", "joint"):
            accs[mode] = {n: row["accuracy"] for n, row in _test_rows(r[mode]).items()}
        combine = r["joint"]["combine"]
        seeds[seed] = {
            "git_commit": r["machine"].get("git_commit"),
            # how the joint ensemble was chosen: runs before combiner_select took the best score
            "select": combine.get("select", "best"),
            **accs,
            "targets": targets(r["independent"]["test"], r["joint"]["test"], kinds,
                               combine["method"]),
        }
    out: dict = {"variant": variant, "seeds": seeds, "over_seeds": {}}
    shared = [set(s[m]) for s in seeds.values() for m in ("independent", "joint")]
    names = [n for n in next(iter(seeds.values()))["joint"] if n in set.intersection(*shared)]
    for name in names:
        diffs = [s["joint"][name] - s["independent"][name] for s in seeds.values()]
        indep = _mean_se([s["independent"][name] for s in seeds.values()])
        joint = _mean_se([s["joint"][name] for s in seeds.values()])
        diff = _mean_se(diffs)
        out["over_seeds"][name] = {
            "independent_mean": indep[0], "joint_mean": joint[0], "diff_mean": diff[0],
            "diff_se": diff[1], "joint_better_seeds": sum(d > 0 for d in diffs),
        }
    out["nll_over_seeds"] = nll_over_seeds(list(results.values()))
    out["churn"] = churn_over_seeds(results)
    margins = [s["targets"]["ensemble_acc"] - s["targets"]["best_member_acc"]
               for s in seeds.values()]
    m, se = _mean_se(margins)
    out["ensemble_minus_best_member"] = {"mean": m, "se": se,
                                         "met_seeds": sum(x > 0 for x in margins)}
    soft = [s["joint"]["ensemble/soft_vote"] - s["targets"]["best_member_acc"]
            for s in seeds.values() if "ensemble/soft_vote" in s["joint"]]
    if soft:
        sm, sse = _mean_se(soft)
        out["soft_vote_minus_best_member"] = {"mean": sm, "se": sse,
                                              "ahead_seeds": sum(x > 0 for x in soft)}
    # "better" is met only by a mean difference larger than its standard error over seeds
    out["joint_better"] = joint_better(out)
    out["targets"] = {
        "ensemble_beats_best_member": _beyond_se(m, se),
        "joint_classifier_beats_independent": out["joint_better"]["classifier"]["accuracy"],
    }
    return out


def joint_better(s: dict) -> dict[str, dict[str, bool | None]]:
    """For the classifier and the ensemble: is joint training better than independent training,
    beyond one standard error over seeds, on test accuracy, on NLL (lower) and on churn (lower)?
    None where it was not measured."""
    out = {}
    for name in ("classifier", ENSEMBLE):
        acc = s["over_seeds"].get(name)
        nll = s["nll_over_seeds"].get(name)
        ch = s["churn"].get(name)
        out[name] = {
            "accuracy": _beyond_se(acc["diff_mean"], acc["diff_se"]) if acc else None,
            "nll": _beyond_se(-nll["diff_mean"], nll["diff_se"]) if nll else None,
            "churn": _beyond_se(-ch["diff_mean"], ch["diff_se"]) if ch else None,
        }
    return out


def _test_rows(arm: dict) -> dict[str, dict]:
    """An arm's test rows, with the ensemble its run chose on dev under ENSEMBLE."""
    return {**arm["test"], ENSEMBLE: arm["test"][f"ensemble/{arm['combine']['method']}"]}


def nll_over_seeds(results: list[dict]) -> dict[str, dict]:
    """Test NLL per model, joint and independent, over the seeds whose results record it."""
    results = [r for r in results if all("nll" in row for m in ("independent", "joint")
                                         for row in r[m]["test"].values())]
    out: dict[str, dict] = {}
    if not results:
        return out
    rows = [{m: _test_rows(r[m]) for m in ("independent", "joint")} for r in results]
    names = [n for n in rows[0]["joint"]
             if all(n in r[m] and r[m][n]["nll"] is not None
                    for r in rows for m in ("independent", "joint"))]
    for name in names:
        indep = [r["independent"][name]["nll"] for r in rows]
        joint = [r["joint"][name]["nll"] for r in rows]
        diff = _mean_se([j - i for i, j in zip(indep, joint, strict=True)])
        out[name] = {"seeds": len(results), "independent_mean": _mean_se(indep)[0],
                     "joint_mean": _mean_se(joint)[0], "diff_mean": diff[0], "diff_se": diff[1]}
    return out


def churn_over_seeds(results: dict[int, dict]) -> dict[str, dict]:
    """Churn between seeds per model and arm, over the seeds whose results hold test predictions."""
    results = {seed: r for seed, r in results.items()
               if all("test_predictions" in r[m] for m in ("independent", "joint"))}
    out: dict[str, dict] = {}
    if len(results) < 2:
        return out
    first = next(iter(results.values()))
    names = [n for n in first["joint"]["test_predictions"]
             if all(n in r[m]["test_predictions"] for r in results.values()
                    for m in ("independent", "joint"))]
    for name in names:
        by_arm = {m: {seed: r[m]["test_predictions"][name] for seed, r in results.items()}
                  for m in ("independent", "joint")}
        rates = {m: pair_churn(by_seed) for m, by_seed in by_arm.items()}
        out[name] = {m: _churn_summary(r) for m, r in rates.items()}
        # paired by seed pair: joint minus independent churn on the same two seeds
        diff = _mean_se([j - i for i, j in zip(rates["independent"], rates["joint"],
                                                strict=True)])
        out[name]["diff_mean"], out[name]["diff_se"] = diff
    return out


def _beyond_se(mean: float, se: float | None) -> bool:
    """A positive difference larger than its standard error (never met on one seed)."""
    return se is not None and mean > se


def _within_noise(row: dict | None) -> str:
    """A note when a mean difference over seeds is no larger than its standard error."""
    if not row or row["diff_se"] is None or abs(row["diff_mean"]) > row["diff_se"]:
        return ""
    return (f" ({100 * row['diff_mean']:+.2f} ± {100 * row['diff_se']:.2f} pt: within one "
            "standard error, no measurable difference)")


def summary_markdown(s: dict) -> str:
    n = len(s["seeds"])
    title = f" ({s['variant']})" if s.get("variant") else ""
    lines = [
        f"# SST quality{title} over {n} seed(s): SST-5 test accuracy", "",
        "| seed | classifier indep | classifier joint | joint ensemble (row, rule) | "
        "best joint member |",
        "|---|---:|---:|---|---|",
    ]
    for seed, r in s["seeds"].items():
        t = r["targets"]
        lines.append(
            f"| {seed} | {t['independent_classifier_acc']:.3f} | {t['joint_classifier_acc']:.3f} "
            f"| {t['ensemble_acc']:.3f} ({t['ensemble_row']}, {r['select']}) | "
            f"{t['best_member_acc']:.3f} "
            f"({t['best_member']}) |"
        )
    lines += ["", "| model | independent mean | joint mean | joint - independent (± SE) | "
              "seeds joint better |", "|---|---:|---:|---:|---:|"]
    for name, r in s["over_seeds"].items():
        se = f" ± {100 * r['diff_se']:.2f}" if r["diff_se"] is not None else ""
        lines.append(
            f"| {name} | {r['independent_mean']:.4f} | {r['joint_mean']:.4f} | "
            f"{100 * r['diff_mean']:+.2f} pt{se} | {r['joint_better_seeds']}/{n} |"
        )
    e, t = s["ensemble_minus_best_member"], s["targets"]
    se = f" ± {100 * e['se']:.2f}" if e["se"] is not None else ""
    lines += [
        "",
        f"- joint ensemble (chosen on dev) minus best joint member: {100 * e['mean']:+.2f} pt{se}"
        f", ahead on {e['met_seeds']}/{n} seeds → "
        f"{'met' if t['ensemble_beats_best_member'] else 'missed'}",
        *(
            [f"- joint uniform soft vote minus best joint member: "
             f"{100 * v['mean']:+.2f} pt, ahead on {v['ahead_seeds']}/{n} seeds"]
            if (v := s.get("soft_vote_minus_best_member")) else []
        ),
        f"- joint minus independent classifier, mean over seeds → "
        f"{'met' if t['joint_classifier_beats_independent'] else 'missed'}"
        + _within_noise(s["over_seeds"].get("classifier")),
    ]
    nll = s.get("nll_over_seeds") or {}
    if nll:
        lines += ["", "| model | test NLL independent | joint | joint - independent (± SE) | "
                  "seeds |", "|---|---:|---:|---:|---:|"]
        for name, r in nll.items():
            se = f" ± {r['diff_se']:.3f}" if r["diff_se"] is not None else ""
            lines.append(f"| {name} | {r['independent_mean']:.3f} | {r['joint_mean']:.3f} | "
                         f"{r['diff_mean']:+.3f}{se} | {r['seeds']} |")
    ch = s.get("churn") or {}
    if ch:
        lines += ["", "Churn: the share of test texts whose predicted class changes between two "
                  "seeds (mean over every pair of seeds ± SE over the pairs).", "",
                  "| model | churn independent | churn joint | joint - independent (± SE) | "
                  "pairs |", "|---|---:|---:|---:|---:|"]
        for name, r in ch.items():
            cells = [f"{100 * c['mean']:.1f} %" + (f" ± {100 * c['se']:.1f}"
                                                   if c["se"] is not None else "")
                     for c in (r["independent"], r["joint"])]
            se = f" ± {100 * r['diff_se']:.2f}" if r["diff_se"] is not None else ""
            lines.append(f"| {name} | {cells[0]} | {cells[1]} | {100 * r['diff_mean']:+.2f} pt"
                         f"{se} | {r['joint']['pairs']} |")
    else:
        lines += ["", "Churn between seeds: not measured (the seeds' files hold no test "
                  "predictions; rerun the seeds with this script)."]
    verdict = {None: "not measured", True: "yes", False: "no"}
    lines += ["", "Joint better than independent, beyond one SE over seeds:", ""]
    for name, better in s.get("joint_better", {}).items():
        lines.append(f"- {name}: " + ", ".join(f"{k} {verdict[v]}" for k, v in better.items()))
    return "\n".join(lines) + "\n"


def rescore(out: Path, name: str, work_dir: Path) -> dict:
    """Refit the combiner tables of result `name` from the run directories under `work_dir`."""
    path = out / f"{name}.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; run the benchmark first")
    result = json.loads(path.read_text())
    for mode in ("independent", "joint"):
        if "reused_from" in result[mode]:
            continue  # refitted in the file it was copied from
        run_dir = work_dir / mode
        if not (run_dir / "manifest.json").exists():
            raise FileNotFoundError(f"{run_dir} holds no finished run; --work-dir names the "
                                    f"directory {name} was trained in")
        table = common.combiners_on_test(run_dir)
        result[mode]["combiners"] = table
        combine = result[mode]["combine"]
        published = combine.get("published", combine["method"])  # an earlier rescore kept it
        if table["chosen"] != published or "published" in combine:
            # the run published another method than this code would: score this code's choice
            result[mode]["combine"] = {
                "method": table["chosen"], "select": table["select"],
                "published": published, "rescored_git_commit": common.git_commit(),
            }
            row = f"ensemble/{table['chosen']}"
            if row not in result[mode]["test"]:
                fit = table["methods"][table["chosen"]]
                # the intensity estimate does not depend on the vote: any ensemble row's r
                r = result[mode]["test"][f"ensemble/{published}"].get("pearson")
                result[mode]["test"][row] = {"accuracy": fit["test_accuracy"],
                                             "macro_f1": fit["test_macro_f1"], "pearson": r}
    result["targets"] = targets(result["independent"]["test"], result["joint"]["test"],
                                result["kinds"], result["joint"]["combine"]["method"])
    common.write_results(name, result, markdown(result), out)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "sst_joint.yaml"))
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
    ap.add_argument("--seed", type=int, default=0, help="training.seed of both runs")
    ap.add_argument("--summarize", action="store_true",
                    help="only combine the seeds' result files in --out into sst_quality_seeds")
    ap.add_argument("--variant", default=None,
                    help="name of an ablation of the joint arm: sst_quality_VARIANT[_seedS].*")
    ap.add_argument("--reuse-independent", action="store_true",
                    help="copy the independent arm from this seed's sst_quality[_seedS].json")
    ap.add_argument("--rescore", action="store_true",
                    help="only refit the combiner tables of this seed's result file from its "
                         "run directories (no training)")
    ap.add_argument("--resume", action="store_true",
                    help="continue the run directories in --work-dir (an interrupted run)")
    ap.add_argument("--work-dir", default=None,
                    help="default: runs/bench_sst_quality (seed 0) or runs/bench_sst_quality_seedS")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--address", default=None)
    ap.add_argument("extra", nargs="*", help="more dotted overrides for both runs")
    args = ap.parse_args()
    if args.variant is not None and not args.variant.replace("_", "").isalnum():
        ap.error(f"--variant {args.variant!r}: use letters, digits and _ only")
    if args.summarize:
        summary = summarize(Path(args.out), args.variant)
        common.write_results(summary_name(args.variant), summary, summary_markdown(summary),
                             Path(args.out))
        print(summary_markdown(summary))
        return
    work_dir = args.work_dir or str(ROOT / "runs" / f"bench_{result_name(args.seed, args.variant)}")
    if args.rescore:
        result = rescore(Path(args.out), result_name(args.seed, args.variant), Path(work_dir))
        print(markdown(result))
        return
    arms = ("joint",) if args.reuse_independent else ("independent", "joint")
    stale = [f"{work_dir}/{arm}" for arm in arms if Path(work_dir, arm).exists()]
    if stale and not args.resume:
        # `ensemble train` resumes a run directory and skips its finished rounds: training again
        # into an old one would report the old models as this code's
        ap.error(f"{' and '.join(stale)} already exist; move them away for a fresh measurement, "
                 "or pass --resume to finish an interrupted run")
    reused = (
        reused_independent(Path(args.out), args.seed, args.config, args.rounds, args.epochs,
                           args.extra)
        if args.reuse_independent else None
    )

    shared = [
        f"data.source={args.data}",
        f"training.rounds={args.rounds}",
        *[f"members.{m}.epochs={args.epochs}" for m in C.load(args.config).members],
        f"training.seed={args.seed}",
        *args.extra,
    ]
    result: dict = {
        "seed": args.seed,
        "variant": args.variant,
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
    # every guidance weight 0, whatever the config says: independent training
    no_guidance = [f"training.guidance.{f.name}=0" for f in dataclasses.fields(C.GuidanceConfig)
                   if f.name != "temperature"]
    if reused is None:
        indep, t_indep = run(
            args.config, [*shared, *no_guidance, f"output_dir={work_dir}/independent"],
            args.address,
        )
        result["independent"] = {"test": rows_of(indep), "wall_s": t_indep,
                                 "combine": indep["combine"]}
    joint, t_joint = run(
        args.config, [*shared, *args.guidance, f"output_dir={work_dir}/joint"], args.address
    )
    result["joint"] = {"test": rows_of(joint), "wall_s": t_joint, "combine": joint["combine"]}
    result["load_after"] = common.load_average()
    modes = ("joint",) if reused is not None else ("independent", "joint")
    for mode in modes:
        result[mode]["combiners"] = common.combiners_on_test(Path(work_dir) / mode)
        result[mode]["test_predictions"] = test_predictions(Path(work_dir) / mode)
    if reused is not None:
        result["independent"] = reused
    kinds = {n: i["kind"] for n, i in joint["members"].items()}
    result["kinds"] = kinds
    result["targets"] = targets(result["independent"]["test"], result["joint"]["test"], kinds,
                                joint["combine"]["method"])
    common.write_results(result_name(args.seed, args.variant), result, markdown(result),
                         Path(args.out))
    print(markdown(result))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
