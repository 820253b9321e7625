"""SST: PBT-tuned vs hand-set guidance weights, and learned vs uniform ensemble weights.

    python benchmarks/sst_tune.py [--config configs/tune_sst.yaml] [overrides ...]

1. The default run: `ensemble train` on the tune config as written (its hand-set guidance weights
   and learning rates), same members, data and rounds as every trial.
2. The tuned runs: `ensemble tune` on the same config, a PBT population that exploits/explores
   at round boundaries. The best trial is picked by the config's dev metric (last round); its
   test numbers are reported beside the default run's. Every trial's test numbers are listed too,
   so the spread of the population is visible.
3. Learned vs uniform combination weights on test, for the default run and the best trial: every
   method fitted on dev exactly as `ensemble train` does (`benchmarks.common.combiners_on_test`).

Writes benchmarks/results/sst_tune.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

try:
    from benchmarks import common
except ModuleNotFoundError:  # run as a script: benchmarks/ is on sys.path
    import common  # type: ignore[no-redef]

from ensemble import config as C

NAME = "sst_tune"
KEYS = ("accuracy", "macro_f1", "pearson")


def test_row(run_dir: Path) -> dict[str, Any]:
    """A finished run's test numbers: each member and the uniform soft vote."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {name: {k: row.get(k) for k in KEYS} for name, row in metrics["test"].items()}


def fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else ("-" if value is None else str(value))


def markdown(result: dict[str, Any]) -> str:
    d, b = result["default"], result["best"]
    rows = ["classifier", "regressor", "ensemble/soft_vote"]
    lines = [
        f"# SST: tuned vs default guidance ({result['config']})",
        "",
        f"Data: {result['train_samples']} training examples, dev {result['dev_samples']}, "
        f"test {result['test_samples']}; members "
        f"{', '.join(result['members'])} ({result['model']}), {result['rounds']} rounds. "
        f"{result['machine']['cpu_count']} CPUs, load {result['load_before']} before, "
        f"{result['load_after']} after.",
        "",
        f"Default guidance: `{json.dumps(result['default_guidance'])}`; tuned (best of "
        f"{len(result['trials'])} PBT trials by `{result['metric']}` on dev): "
        f"`{json.dumps(result['best_config'])}`",
        "",
        "| row | default acc | tuned acc | default macro-F1 | tuned macro-F1 | default r "
        "| tuned r |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in rows:
        dr, br = d["test"].get(name, {}), b["test"].get(name, {})
        lines.append(
            f"| {name} | {fmt(dr.get('accuracy'))} | {fmt(br.get('accuracy'))} | "
            f"{fmt(dr.get('macro_f1'))} | {fmt(br.get('macro_f1'))} | "
            f"{fmt(dr.get('pearson'))} | {fmt(br.get('pearson'))} |"
        )
    lines += [
        "",
        f"Tuned minus default, ensemble soft vote test accuracy: "
        f"**{result['delta_ensemble_acc']:+.3f}**; classifier: "
        f"**{result['delta_classifier_acc']:+.3f}**; regressor Pearson r: "
        f"**{result['delta_regressor_r']:+.3f}**.",
        "",
        "## Every trial (test, after the last round)",
        "",
        "| trial | dev metric | ensemble test acc | classifier test acc | regressor test r | "
        "restored from |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for t in result["trials"]:
        lines.append(
            f"| {t['trial']} | {fmt(t['final'])} | {fmt(t['ensemble_acc'])} | "
            f"{fmt(t['classifier_acc'])} | {fmt(t['regressor_r'])} | "
            f"{t['restored_from_trial'] or '-'} |"
        )
    lines += [
        "",
        f"{len(result['mutations'])} PBT exploit(s). Wall time: default run "
        f"{d['wall_s']:.0f} s, tune {result['tune_wall_s']:.0f} s.",
        "",
        "## Learned vs uniform ensemble weights (test)",
        "",
        common.combiner_markdown("default run", result["combiners_default"]),
        common.combiner_markdown("best tuned trial", result["combiners_best"]),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(common.REPO / "configs" / "tune_sst.yaml"))
    ap.add_argument("--data", default=str(common.sst_dir()))
    ap.add_argument("--work-dir", default=str(common.REPO / "runs" / "bench_sst_tune"))
    ap.add_argument("--fresh", action="store_true", help="delete the work dir first")
    ap.add_argument("--out-dir", type=Path, default=None, help="default benchmarks/results")
    ap.add_argument("overrides", nargs="*", help="dotted overrides for every run")
    args = ap.parse_args()

    from ensemble.data import load_splits
    from ensemble.orchestrate import init_ray, train
    from ensemble.tuning.search import run_tune

    work = Path(args.work_dir).resolve()
    if args.fresh and work.exists():
        shutil.rmtree(work)
    base = C.load(args.config, [f"data.source={args.data}", *args.overrides])
    splits = load_splits(base.data)
    load_before = common.load_average()
    init_ray(base.ray)

    t0 = time.time()
    default_dir = train(C.replace(base, {"output_dir": str(work / "default")}), progress=False)
    default_s = time.time() - t0

    t0 = time.time()
    tune_out = run_tune(C.replace(base, {"output_dir": str(work / "tune")}))
    tune_s = time.time() - t0
    summary = json.loads((tune_out / "tune_results.json").read_text())
    best_dir = Path(summary["best_run_dir"])

    trials = []
    for row in summary["trials"]:
        run_dir = Path(row["run_dir"]) if row.get("run_dir") else None
        test = test_row(run_dir) if run_dir and (run_dir / "metrics.json").is_file() else {}
        trials.append({
            "trial": row.get("trial_id") or row["trial"][:32],
            "final": row["final"],
            "config": row["config"],
            "restored_from_trial": row["restored_from_trial"],
            "ensemble_acc": test.get("ensemble/soft_vote", {}).get("accuracy"),
            "classifier_acc": test.get("classifier", {}).get("accuracy"),
            "regressor_r": test.get("regressor", {}).get("pearson"),
        })  # fmt: skip

    default_test, best_test = test_row(default_dir), test_row(best_dir)
    result: dict[str, Any] = {
        "config": Path(args.config).name,
        "overrides": args.overrides,
        "machine": common.machine(),
        "load_before": load_before,
        "load_after": common.load_average(),
        "model": next(iter(base.members.values())).model,
        "members": list(base.members),
        "rounds": base.training.rounds,
        "train_samples": len(splits.texts["train"]),
        "dev_samples": len(splits.texts["dev"]),
        "test_samples": len(splits.texts["test"]),
        "metric": summary["metric"],
        "default_guidance": C.to_dict(base)["training"]["guidance"],
        "best_config": summary["best_config"],
        "default": {"run_dir": str(default_dir), "test": default_test, "wall_s": default_s},
        "best": {"run_dir": str(best_dir), "test": best_test},
        "tune_wall_s": tune_s,
        "trials": trials,
        "mutations": summary["mutations"],
        "delta_ensemble_acc": best_test["ensemble/soft_vote"]["accuracy"]
        - default_test["ensemble/soft_vote"]["accuracy"],
        "delta_classifier_acc": best_test["classifier"]["accuracy"]
        - default_test["classifier"]["accuracy"],
        "delta_regressor_r": best_test["regressor"]["pearson"]
        - default_test["regressor"]["pearson"],
        "combiners_default": common.combiners_on_test(default_dir),
        "combiners_best": common.combiners_on_test(best_dir),
    }
    md = markdown(result)
    paths = common.write_results(NAME, result, md, args.out_dir)
    print(md)
    print("wrote", *paths, file=sys.stderr)


if __name__ == "__main__":
    main()
