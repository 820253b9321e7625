"""More of the same members: what pooling the members of several finished recipe runs gives.

    python benchmarks/pooled_recipe.py --run runs/recipe2/sst_recipe_s0 --run ..._s1 --run ..._s2

Each recipe run trains K members (configs/sst.yaml: three MiniLM classifiers and two intensity
regressors, one seed each). Pooling n runs gives an ensemble of n*K members that cost n recipes
to train: the question is whether more MiniLM members, with nothing else changed, reach what
one recipe does not. No training: every run's member votes on dev and test (as its published
combiner sees them: temperature-scaled classifiers, the regressor through its fitted sharpness)
are stacked, and the combiners are fitted on dev exactly as `ensemble train` fits them
(`training.combiner` and `training.seed` of the pool's first run, so a pool of one run
reproduces that run's published ensemble), then scored on test. For every pool size n, every
subset of n runs is scored; a row gives each subset's test accuracy and their mean. The deep
ensemble of the pooled classifiers (soft vote of the temperature-scaled classifiers) is given
beside it, and the pool of every run carries the bootstrap SE of its accuracy over the test texts.

``--student RUN/students/NAME`` adds a student that `ensemble distill` trained (its dev-fitted
temperature applied) to every pool: e.g. a MiniLM distilled from a run grown with an MPNet member,
which makes a pool that serves MiniLMs only but learned from a larger model.

Writes benchmarks/results/<--out>.{json,md}.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    bootstrap_se,
    fitted_on_test,
    git_commit,
    load_average,
    machine,
    member_votes,
    write_results,
)

TARGET = 0.525  # the accuracy target for a MiniLM-only ensemble on SST-5 test
CLASSIFIER = "classifier"


def pool(runs: list[Path], votes: dict[Path, Any]) -> tuple[dict[str, str], dict, dict]:
    """The runs' members as one ensemble: ``member@run`` -> kind, votes stacked along members."""
    kinds = {f"{n}@{r.name}": k for r in runs for n, k in votes[r][0].items()}
    stacked = {s: np.concatenate([votes[r][1][s] for r in runs]) for s in ("dev", "test")}
    labels = votes[runs[0]][2]
    for r in runs[1:]:
        for s in ("dev", "test"):
            if not np.array_equal(votes[r][2][s], labels[s]):
                raise ValueError(f"{r} was scored on other {s} texts than {runs[0]}; pool runs "
                                 "of one dataset")
    return kinds, stacked, labels


def student_votes(student_dir: Path) -> tuple[dict[str, str], dict[str, Any], dict[str, Any]]:
    """A distilled student's dev/test votes (softmax of its logits over its fitted temperature),
    shaped like `member_votes`'s: ({"student": "student"}, {split: (1, N, C)}, {split: (N,)})."""
    from ensemble import combine
    from ensemble.rundir import read_json

    metrics = read_json(student_dir / "metrics.json")
    run_dir = student_dir.parent.parent
    stacked, labels = {}, {}
    with np.load(student_dir / "predictions.npz") as z:
        for split in ("dev", "test"):
            stacked[split] = combine.softmax(z[split] / metrics["temperature"])[None]
            with np.load(run_dir / "predictions" / f"{split}.npz") as p:
                labels[split] = p["labels"]
    return {"student": "student"}, stacked, labels


def score(runs: list[Path], votes: dict[Path, Any], label_names: list[str], whole: bool,
          ) -> dict[str, Any]:
    """The pooled ensemble of ``runs`` (combiner fitted on dev) and the deep ensemble of its
    classifiers, on test; ``whole``: with the bootstrap SE of both accuracies."""
    from ensemble import config as C

    training = C.load(runs[0] / "config.yaml").training
    kinds, stacked, labels = pool(runs, votes)
    names = list(kinds)
    fitted = fitted_on_test(names, stacked, labels, label_names, training.seed,
                            training.combiner, training.combiner_select, se=whole)
    chosen = fitted["methods"][fitted["chosen"]]
    cls = [i for i, k in enumerate(kinds.values()) if k == CLASSIFIER]
    deep = stacked["test"][cls].mean(axis=0).argmax(axis=1) == labels["test"]
    return {
        "runs": [r.name for r in runs], "seed": training.seed, "members": len(names),
        "classifiers": len(cls),
        "chosen": fitted["chosen"], "test_accuracy": chosen["test_accuracy"],
        "test_macro_f1": chosen["test_macro_f1"],
        "test_accuracy_se": chosen.get("test_accuracy_se"),
        "deep_ensemble_accuracy": float(deep.mean()),
        "deep_ensemble_se": bootstrap_se(deep) if whole else None,
        "methods": {m: r["test_accuracy"] for m, r in fitted["methods"].items()},
    }


def markdown(result: dict[str, Any]) -> str:
    title = ("more MiniLM members, nothing else changed" if not result.get("students")
             else "the MiniLM members plus distilled student(s)")
    lines = [
        f"# Pooled recipe runs: {title} (SST-5 test)",
        "",
        f"commit {result['commit']}; runs {', '.join(result['runs'])}; combiner "
        f"`{result['combiner']}` ({result['select']}) fitted on dev with the first pooled run's "
        "seed. No training: the runs' saved predictions, rescored. A pool of n runs costs n "
        "recipes to train.",
        "",
        "| runs pooled | members | classifiers | ensemble test acc (%) | chosen | deep ensemble of "
        "the classifiers (%) |",
        "|---:|---:|---:|---:|---|---:|",
    ]
    if result.get("students"):
        lines[4:4] = [f"Every pool also holds the distilled student(s) {result['students']} "
                      "(kind `student`: in the combiner, not in the deep ensemble).", ""]
    for n, rows in result["by_size"].items():
        for row in rows:
            se = (f" ± {100 * row['test_accuracy_se']:.2f}" if row["test_accuracy_se"] else "")
            dse = (f" ± {100 * row['deep_ensemble_se']:.2f}" if row["deep_ensemble_se"] else "")
            lines.append(f"| {n} ({'+'.join(row['runs'])}) | {row['members']} | "
                         f"{row['classifiers']} | {100 * row['test_accuracy']:.2f}{se} | "
                         f"{row['chosen']} | {100 * row['deep_ensemble_accuracy']:.2f}{dse} |")
        if len(rows) > 1:
            mean = np.mean([r["test_accuracy"] for r in rows])
            deep = np.mean([r["deep_ensemble_accuracy"] for r in rows])
            lines.append(f"| {n}: mean of {len(rows)} | | | {100 * mean:.2f} | | "
                         f"{100 * deep:.2f} |")
    whole = result["by_size"][str(len(result["runs"]))][0]
    lines += [
        "",
        f"Target {100 * TARGET:.1f} %: the pool of every run scores "
        f"{100 * whole['test_accuracy']:.2f} %"
        + (f" (SE {100 * whole['test_accuracy_se']:.2f} pt over the test texts)"
           if whole["test_accuracy_se"] else "")
        + ". Test accuracy per method for that pool: "
        + ", ".join(f"{m} {100 * a:.2f}" for m, a in whole["methods"].items()) + ".",
        "",
        f"{result['machine']}; load average {result['load']}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", action="append", required=True, help="a finished recipe run")
    ap.add_argument("--student", action="append", default=[],
                    help="RUN/students/NAME: a distilled student added to every pool")
    ap.add_argument("--out", default="pooled_recipe")
    args = ap.parse_args(argv)
    from ensemble import config as C
    from ensemble.rundir import Manifest

    runs = [Path(r).resolve() for r in args.run]
    if len({r.name for r in runs}) != len(runs):
        ap.error("the runs' directory names must differ (they name the pooled members)")
    votes = {r: member_votes(r) for r in runs}
    students = [Path(s).resolve() for s in args.student]
    for s in students:
        if not (s / "metrics.json").is_file():
            ap.error(f"--student {s}: no trained student there (no metrics.json)")
        votes[s] = student_votes(s)
    training = C.load(runs[0] / "config.yaml").training
    label_names = Manifest.load(runs[0]).label_names
    by_size = {
        str(n): [score([*sub, *students], votes, label_names, whole=n == len(runs))
                 for sub in itertools.combinations(runs, n)]
        for n in range(1, len(runs) + 1)
    }
    result = {"commit": git_commit(), "runs": [r.name for r in runs],
              "students": [f"{s.parent.parent.name}/students/{s.name}" for s in students],
              "combiner": training.combiner, "select": training.combiner_select,
              "target": TARGET, "by_size": by_size, "machine": machine(),
              "load": load_average()}
    json_path, md_path = write_results(args.out, result, markdown(result))
    print(md_path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
