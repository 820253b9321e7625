"""The recipe against its baselines, in one benchmark run per seed: is the ensemble worth its cost?

    python benchmarks/recipe_quality.py --seed 0                 # SST-5, configs/sst.yaml
    python benchmarks/recipe_quality.py --seed 1 --seed 2        # more seeds (one run at a time)
    python benchmarks/recipe_quality.py --summarize              # every seed's file -> the table
    python benchmarks/recipe_quality.py --dataset vader --seed 0 # configs/vader.yaml on VADER

For a seed S it trains, side by side on a local Ray (each `ensemble train`, Ray's workers at
nice 0 so both compete on equal terms):

- the recipe (`configs/<dataset>.yaml`): every member's `seed` plus 10*S, `training.seed` S;
- baseline (b), one classifier given the whole ensemble's compute: the recipe's member settings,
  `epochs` the sum of the members' epochs (K members x E epochs), early stopping on dev
  accuracy with patience 2 (so it may stop sooner), seed 10*S.

and then scores, on test, from the runs' `predictions/{dev,test}.npz` and manifests:

- (a) every member: accuracy, macro-F1, NLL and ECE (15 bins) as trained and temperature-scaled;
- (b) the single long-trained classifier;
- (c) the deep ensemble: the recipe's classifiers (members that differ only in seed), each
  temperature-scaled on dev, probabilities averaged;
- (d) the recipe's published ensemble, its combiner chosen on dev (`training.combiner`).

A comparison's standard error is, for one seed, the paired bootstrap SE over the test texts
(1,000 resamples), and over several seeds the SE of the per-seed differences; a target counts as
met only when the difference is larger than that SE. Finished runs in --work-dir are reused (their
members must match the derived config, or the script stops). Writes
benchmarks/results/recipe_<dataset>_seed<S>.{json,md} and, with --summarize,
recipe_<dataset>.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

try:
    from benchmarks import common
except ModuleNotFoundError:  # run as a script: benchmarks/ is on sys.path
    import common  # type: ignore[no-redef]

KEYS = ("accuracy", "macro_f1", "nll", "ece", "brier")
SEED_STRIDE = 10  # a benchmark seed shifts every member's seed by this much
BOOTSTRAP = 1000
# targets for SST-5 (fractions); other datasets are judged against their best member only
TARGET_ACCURACY = 0.525
TARGET_OVER_BEST = 0.015
SINGLE_EARLY_STOPPING = {"metric": "auto", "patience": 2}


def recipe_config(dataset: str, seed: int, work: Path, data: str | None) -> dict[str, Any]:
    cfg = yaml.safe_load((ROOT / "configs" / f"{dataset}.yaml").read_text())
    cfg["name"] = f"{dataset}_recipe_s{seed}"
    cfg["output_dir"] = str(work / cfg["name"])
    if data:
        cfg["data"]["source"] = data
    for member in cfg["members"].values():
        member["seed"] = int(member.get("seed", 0)) + SEED_STRIDE * seed
    cfg.setdefault("training", {})["seed"] = seed
    return cfg


def single_config(recipe: dict[str, Any], dataset: str, seed: int, work: Path) -> dict[str, Any]:
    """Baseline (b): one classifier with the recipe's settings and K x E epochs."""

    resolved = _resolve(recipe)
    budget = sum(m.epochs for m in resolved.members.values())
    cfg = copy.deepcopy(recipe)
    cfg["name"] = f"{dataset}_single_s{seed}"
    cfg["output_dir"] = str(work / cfg["name"])
    first = next(n for n, m in resolved.members.items() if m.kind == "classifier")
    member = dict(recipe["members"][first])
    member.update({"kind": "classifier", "epochs": budget, "seed": SEED_STRIDE * seed})
    # K x E epochs is more than one model needs: (b) stops on dev, as a user training one model
    # long would, whatever the recipe's members do
    member["early_stopping"] = SINGLE_EARLY_STOPPING
    cfg["members"] = {"classifier": member}
    cfg.setdefault("ray", {})["num_cpus"] = 2
    return cfg


def _resolve(cfg: dict[str, Any]) -> Any:
    """A config dict validated and completed as `ensemble train` would read it from YAML."""
    import tempfile

    from ensemble import config as C

    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump(cfg, f)
        f.flush()
        return C.load(f.name)


def start(cfg: dict[str, Any]) -> subprocess.Popen | None:
    """`ensemble train` in the background, or None when the run has finished already."""
    from ensemble import config as C

    run_dir = Path(cfg["output_dir"])
    if (run_dir / "manifest.json").is_file():
        done = C.to_dict(C.load(run_dir / "config.yaml"))["members"]
        if done != C.to_dict(_resolve(cfg))["members"]:
            raise SystemExit(f"{run_dir} holds a run with other members; pass another --work-dir")
        return None
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    path = run_dir.parent / f"{cfg['name']}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = {**os.environ, common.WORKER_NICENESS: "0"}
    log = open(run_dir.parent / f"{cfg['name']}.log", "w")  # closed by the OS with the child
    return subprocess.Popen([sys.executable, "-m", "ensemble.cli", "train", str(path),
                             "--no-progress"], env=env, stdout=log, stderr=subprocess.STDOUT)


def load_run(run_dir: Path) -> dict[str, Any]:
    """A finished run's test votes, as the published combiner sees them, and its metadata."""
    from ensemble import combine
    from ensemble.rundir import Manifest

    manifest = Manifest.load(run_dir)
    c = manifest.combine
    params = c.params
    kinds = {n: m.kind for n, m in manifest.members.items()}
    num_classes = len(manifest.label_names)
    with np.load(run_dir / "predictions" / "test.npz") as z:
        outputs = {n: z[n] for n in kinds}
        labels = z["labels"]
    edges = manifest.intensity_edges
    names, sharpness = list(outputs), params.get("regressor_sharpness")
    raw = combine.member_votes(outputs, kinds, edges, num_classes, sharpness)
    scaled = combine.member_votes(outputs, kinds, edges, num_classes, sharpness,
                                  params.get("temperatures"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {
        "names": names, "kinds": kinds, "labels": labels, "label_names": manifest.label_names,
        "raw": dict(zip(names, raw, strict=True)),
        "scaled": dict(zip(names, scaled, strict=True)),
        "published": c.combine_votes(scaled, names),
        "method": c.method, "candidates": c.info.get("candidates", {}),
        "temperatures": params.get("temperatures") or {},
        "wall_s": metrics.get("wall_s"), "info": metrics.get("members", {}),
        "test_rows": metrics["test"],
    }


def load_unfinished_single(run_dir: Path, dev_labels: np.ndarray, texts: dict[str, list[str]],
                           max_length: int) -> dict[str, Any]:
    """(b) cut short (no manifest yet): its latest checkpoint's export, the best dev weights so far.

    Predicts dev and test in this process and fits the temperature on dev, as `load_run` reads
    them from a finished run; the row says it is unfinished and how many dev evaluations it had.
    """
    import torch

    from ensemble.calibration import fit_temperature, log_probs, temper
    from ensemble.combine import softmax
    from ensemble.models.members import load_exported
    from ensemble.training.loop import encode, predict_logits

    (job,) = [d for d in (run_dir / "ray").iterdir() if d.is_dir()]
    snapshot = json.loads((job / "checkpoint_manager_snapshot.json").read_text())
    evals = re.findall(r'"evals": (\[[^\]]*\])', json.dumps(snapshot))
    evals = json.loads(evals[-1]) if evals else []
    checkpoint = max(p for p in job.glob("checkpoint_*") if p.is_dir())
    torch.set_num_threads(2)
    model, tokenizer = load_exported(checkpoint / "hf")
    model.eval()
    probs = {}
    for split in ("dev", "test"):
        ids = encode(tokenizer, texts[split], max_length)
        probs[split] = softmax(predict_logits(model, ids, tokenizer.pad_token_id, 128))
    t = fit_temperature(log_probs(probs["dev"]), dev_labels)
    kept = [i for i, e in enumerate(evals, 1) if e.get("best")]
    return {"raw": probs["test"], "scaled": temper(probs["test"], t), "temperature": t,
            "dev_evals": len(evals), "kept_eval": kept[-1] if kept else None,
            "checkpoint": checkpoint.name}


def scores(labels: np.ndarray, probs: np.ndarray, names: list[str]) -> dict[str, float]:
    from ensemble.metrics import classification_metrics

    m = classification_metrics(labels, probs, names)
    return {k: float(m[k]) for k in KEYS}


def paired_se(labels: np.ndarray, a: np.ndarray, b: np.ndarray, seed: int = 0) -> float:
    """Bootstrap SE over texts of accuracy(a) - accuracy(b), both (N, C) probabilities."""
    diff = (a.argmax(1) == labels).astype(float) - (b.argmax(1) == labels).astype(float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(labels), size=(BOOTSTRAP, len(labels)))
    return float(diff[idx].mean(axis=1).std(ddof=1))


def score_seed(recipe_dir: Path, single_dir: Path) -> dict[str, Any]:
    from ensemble.metrics import pairwise_disagreement

    run = load_run(recipe_dir)
    y, names = run["labels"], run["label_names"]
    rows: dict[str, dict[str, Any]] = {}
    for n in run["names"]:
        rows[n] = {"role": "(a) member", "kind": run["kinds"][n], **scores(y, run["raw"][n], names)}
        if n in run["temperatures"]:
            cal = scores(y, run["scaled"][n], names)
            rows[n].update(temperature=run["temperatures"][n], nll_calibrated=cal["nll"],
                           ece_calibrated=cal["ece"])
        rows[n].update(_evals(run["info"].get(n, {})))
    if (single_dir / "manifest.json").is_file():
        single = load_run(single_dir)
        (s_name,) = single["names"]
        rows["(b) single classifier"] = {
            "role": "(b)", **scores(y, single["raw"][s_name], names),
            "temperature": single["temperatures"].get(s_name),
            **_evals(single["info"].get(s_name, {})), "wall_s": single["wall_s"],
        }
        single_scaled = single["scaled"][s_name]
    else:  # cut short for time: scored from its best checkpoint so far, and marked so
        from ensemble import config as C
        from ensemble.data import load_splits

        cfg = C.load(single_dir / "config.yaml")
        splits = load_splits(cfg.data)
        b = load_unfinished_single(single_dir, splits.labels["dev"], splits.texts,
                                   cfg.max_length("classifier"))
        rows["(b) single classifier"] = {
            "role": "(b)", **scores(y, b["raw"], names), "temperature": b["temperature"],
            "dev_evals": b["dev_evals"], "kept_eval": b["kept_eval"], "finished": False,
            "checkpoint": b["checkpoint"],
        }
        single_scaled = b["scaled"]
    cal = scores(y, single_scaled, names)
    rows["(b) single classifier"].update(nll_calibrated=cal["nll"], ece_calibrated=cal["ece"])
    seeds = [n for n in run["names"] if run["kinds"][n] == "classifier"]
    deep = np.mean([run["scaled"][n] for n in seeds], axis=0)
    rows["(c) deep ensemble"] = {"role": "(c)", "members": seeds, **scores(y, deep, names)}
    rows["(d) ensemble"] = {"role": "(d)", "method": run["method"],
                            "members": run["names"], **scores(y, run["published"], names),
                            "wall_s": run["wall_s"]}
    preds = {n: p.argmax(1) for n, p in run["raw"].items()}
    disagreement = {
        "(c)": pairwise_disagreement({n: preds[n] for n in seeds}),
        "(d)": pairwise_disagreement(preds),
    }
    best = max(run["names"], key=lambda n: rows[n]["accuracy"])
    d = run["published"]
    comparisons = {
        "(d) minus best member": (d, run["scaled"][best]),
        "(d) minus (b)": (d, single_scaled),
        "(d) minus (c)": (d, deep),
        "(c) minus best member": (deep, run["scaled"][best]),
    }
    diffs = {
        k: {"diff": scores(y, a, names)["accuracy"] - scores(y, b, names)["accuracy"],
            "se": paired_se(y, a, b)}
        for k, (a, b) in comparisons.items()
    }
    return {"rows": rows, "best_member": best, "disagreement": disagreement,
            "accuracy_differences": diffs, "dev_candidates": run["candidates"]}


def _evals(info: dict[str, Any]) -> dict[str, Any]:
    """Dev evaluations made (one per epoch by default) and the 1-based one that was kept."""
    evals = [e for stage in info.get("stages", []) for e in stage.get("evals", [])]
    kept = [i for i, e in enumerate(evals, 1) if e.get("best")]
    return {"dev_evals": len(evals), "kept_eval": kept[-1] if kept else None}


def _pt(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def seed_markdown(dataset: str, seed: int, res: dict[str, Any]) -> str:
    lines = [f"# Recipe vs baselines on {dataset} test, seed {seed}", "",
             "| row | accuracy | macro-F1 | NLL | ECE (pt) | NLL scaled | ECE scaled (pt) "
             "| dev evals (kept) |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, r in res["rows"].items():
        nll_c = f"{r['nll_calibrated']:.3f}" if "nll_calibrated" in r else "-"
        if r.get("finished") is False:
            name += f" (unfinished: best of {r['dev_evals']} dev evaluations so far)"
        lines.append(
            f"| {name}{' (' + r['method'] + ')' if 'method' in r else ''} | {_pt(r['accuracy'])} "
            f"| {_pt(r['macro_f1'])} | {r['nll']:.3f} | {_pt(r['ece'])} | {nll_c} "
            f"| {_pt(r.get('ece_calibrated'))} | "
            + (f"{r['dev_evals']} ({r['kept_eval']})" if r.get("dev_evals") else "-") + " |")
    lines += ["", "| accuracy difference | pt | paired bootstrap SE (pt) | beyond one SE |",
              "|---|---:|---:|---|"]
    for k, v in res["accuracy_differences"].items():
        beyond = "yes" if v["diff"] > v["se"] else ("no (tie)" if v["diff"] > -v["se"] else "no")
        lines.append(f"| {k} | {100 * v['diff']:+.2f} | {100 * v['se']:.2f} | {beyond} |")
    dis = res["disagreement"]
    lines += ["", f"- members' mean pairwise test disagreement: (c) {dis['(c)']['mean']:.3f}, "
              f"(d) {dis['(d)']['mean']:.3f}; best member {res['best_member']}",
              f"- dev scores of the combiners (d) chose among: {res['dev_candidates']}"]
    return "\n".join(lines) + "\n"


def run_seed(args: argparse.Namespace, seed: int) -> None:
    work = Path(args.work_dir)
    recipe = recipe_config(args.dataset, seed, work, args.data)
    single = single_config(recipe, args.dataset, seed, work)
    procs = [start(recipe)] + ([] if args.score_unfinished_single else [start(single)])
    for p in procs:
        if p is not None and p.wait() != 0:
            raise SystemExit(f"{' '.join(map(str, p.args))} failed (rc {p.returncode}); see its "
                             f"log in {work}")
    res = score_seed(Path(recipe["output_dir"]), Path(single["output_dir"]))
    res.update(seed=seed, dataset=args.dataset, config=recipe, env=env_info())
    common.write_results(f"recipe_{args.dataset}_seed{seed}", res,
                         seed_markdown(args.dataset, seed, res) + env_line(res["env"]))


def env_info() -> dict[str, Any]:
    import deepspeed
    import ray
    import torch
    import transformers

    return {"commit": common.git_commit(), "torch": torch.__version__,
            "transformers": transformers.__version__, "ray": ray.__version__,
            "deepspeed": deepspeed.__version__, "load": common.load_average()}


def env_line(env: dict[str, Any]) -> str:
    return (f"\ncommit {env['commit']}, torch {env['torch']}, transformers {env['transformers']}, "
            f"ray {env['ray']}, deepspeed {env['deepspeed']}; load when written {env['load']}\n")


def mean_se(values: list[float]) -> tuple[float, float | None]:
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), (float(arr.std(ddof=1) / np.sqrt(len(arr))) if len(arr) > 1 else None)


def summarize(dataset: str, directory: Path | None = None) -> dict[str, Any]:
    """Every seed's file of `dataset` -> recipe_<dataset>.{json,md} in the same directory."""
    directory = directory or common.RESULTS
    files = sorted(directory.glob(f"recipe_{dataset}_seed*.json"))
    if not files:
        raise SystemExit(f"no recipe_{dataset}_seed*.json in {directory}; run a seed first")
    per_seed = [json.loads(f.read_text()) for f in files]
    n = len(per_seed)
    rows = ["(d) ensemble", "(c) deep ensemble", "(b) single classifier"]
    table: dict[str, Any] = {"seeds": [r["seed"] for r in per_seed], "rows": {}, "targets": {}}
    for row in rows + ["best member"]:
        vals = [r["rows"][r["best_member"] if row == "best member" else row] for r in per_seed]
        table["rows"][row] = {k: mean_se([v[k] for v in vals]) for k in KEYS}
    diffs = {}
    for k in per_seed[0]["accuracy_differences"]:
        d = [r["accuracy_differences"][k] for r in per_seed]
        mean, se = mean_se([x["diff"] for x in d])
        se = se if se is not None else d[0]["se"]  # one seed: the paired bootstrap SE
        diffs[k] = {"mean": mean, "se": se, "met": mean > se}
    acc = table["rows"]["(d) ensemble"]["accuracy"][0]
    best = table["rows"]["best member"]
    ens = table["rows"]["(d) ensemble"]
    targets = {} if dataset != "sst" else {
        f"(d) >= {100 * TARGET_ACCURACY:.1f} %": acc >= TARGET_ACCURACY}
    targets |= {
        f"(d) >= best member + {100 * TARGET_OVER_BEST:.1f} pt and beyond one SE": (
            diffs["(d) minus best member"]["mean"] >= TARGET_OVER_BEST
            and diffs["(d) minus best member"]["met"]),
        "(d) ahead of (b) beyond one SE": diffs["(d) minus (b)"]["met"],
        "(d) ahead of (c) beyond one SE": diffs["(d) minus (c)"]["met"],
        "(d) NLL below the best member's (as trained)": ens["nll"][0] < best["nll"][0],
        "(d) ECE no higher than the best member's (as trained)": ens["ece"][0] <= best["ece"][0],
    }
    table.update(differences=diffs, targets=targets, n=n)
    lines = [f"# Recipe vs baselines on {dataset} test over {n} seed(s)", "",
             "| row | accuracy (pt) | macro-F1 (pt) | NLL | ECE (pt) |",
             "|---|---:|---:|---:|---:|"]
    for row, v in table["rows"].items():
        cells = []
        for k in ("accuracy", "macro_f1", "nll", "ece"):
            m, se = v[k]
            scale = 1 if k == "nll" else 100
            cells.append(f"{scale * m:.2f}" + (f" ± {scale * se:.2f}" if se is not None else ""))
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines += ["", "| accuracy difference | mean (pt) | SE (pt) | beyond one SE |",
              "|---|---:|---:|---|"]
    for k, v in diffs.items():
        lines.append(f"| {k} | {100 * v['mean']:+.2f} | {100 * v['se']:.2f} | "
                     f"{'yes' if v['met'] else 'no'} |")
    lines += ["", "| target | met |", "|---|---|"]
    lines += [f"| {k} | {'yes' if v else 'no'} |" for k, v in targets.items()]
    if n == 1:
        lines += ["", "One seed: the SEs are paired bootstrap SEs over test texts, not over seeds."]
    common.write_results(f"recipe_{dataset}", table, "\n".join(lines) + "\n", directory)
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="sst", help="configs/<dataset>.yaml is the recipe")
    ap.add_argument("--data", help="override the recipe's data.source")
    ap.add_argument("--seed", type=int, action="append", help="benchmark seed (repeatable)")
    ap.add_argument("--work-dir", default=str(ROOT / "runs" / "recipe"))
    ap.add_argument("--summarize", action="store_true")
    ap.add_argument("--score-unfinished-single", action="store_true",
                    help="score (b) from its best checkpoint so far when its run has not finished")
    args = ap.parse_args()
    for seed in args.seed or ([] if args.summarize else [0]):
        run_seed(args, seed)
    if args.summarize:
        summarize(args.dataset)


if __name__ == "__main__":
    main()
