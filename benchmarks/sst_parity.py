"""Parity: an `ensemble` classifier against a plain `transformers` fine-tune, same settings.

    python benchmarks/sst_parity.py --epochs 1 --seeds 0 1 2
    python benchmarks/sst_parity.py --epochs 3 --seeds 0 1 2 --members 3

Both arms train the offline MiniLM on SST-5 train with AdamW (lr 5e-5, weight decay 0.01),
batch 32, max length 128, a linear decay without warm-up and clipping at 1.0, for `--epochs`
epochs, one CPU thread each, side by side (the two arms of a seed run at the same time, so load
affects both alike). The plain arm is `benchmarks/plain_finetune.py` (transformers alone); the
`ensemble` arm is `ensemble train` on a local Ray (Ray Train + DeepSpeed ZeRO-0), one round, no
guidance and no early stopping, as the plain loop has neither.

With `--members K` the `ensemble` arm is one run of K classifiers whose `seed`s are the K seeds
(a deep ensemble: members that differ only in seed), so each member is one seed's sample of
parity and the run's combiner is the ensemble of them; the plain arm's K models are combined by
averaging their probabilities (a plain deep ensemble) with and without per-model temperature
scaling fitted on dev. Results go to benchmarks/results/sst_parity_e<E>[_k<K>].{json,md},
rewritten after every arm that lands; finished arms are reused from --work-dir on a re-run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

try:
    from benchmarks import common
except ModuleNotFoundError:  # run as a script: benchmarks/ is on sys.path
    import common  # type: ignore[no-redef]

KEYS = ("accuracy", "macro_f1", "nll", "ece", "brier")
SETTINGS = {"lr": 5.0e-5, "micro_batch_size": 32, "scheduler": "linear", "warmup_ratio": 0.0,
            "max_grad_norm": 1.0, "weight_decay": 0.01, "zero_stage": 0, "precision": "fp32",
            "num_workers": 1, "cpus_per_worker": 1}


def ensemble_config(data: Path, epochs: int, seeds: list[int], out: Path) -> dict:
    """One round, no guidance: K classifiers named classifier_s<seed> (or `classifier`)."""
    names = [f"classifier_s{s}" for s in seeds] if len(seeds) > 1 else ["classifier"]
    return {
        "name": "parity",
        "output_dir": str(out),
        "data": {"source": str(data), "text_column": "text", "label_column": "label",
                 "intensity_column": "intensity", "max_length": 128,
                 "label_names": ["very negative", "negative", "neutral", "positive",
                                 "very positive"]},
        "members": {n: {"kind": "classifier", "model": "default", "epochs": epochs, "seed": s,
                        **SETTINGS} for n, s in zip(names, seeds, strict=True)},
        "training": {"rounds": 1, "seed": seeds[0], "eval_batch_size": 128},
        "ray": {"num_cpus": max(2, len(seeds))},
    }


def start_ensemble(cfg: dict, run_dir: Path) -> subprocess.Popen | None:
    if (run_dir / "manifest.json").is_file():
        return None
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, common.WORKER_NICENESS: "0"}  # Ray's workers compete on equal terms
    log = open(run_dir.parent / f"{run_dir.name}.log", "w")
    return subprocess.Popen([sys.executable, "-m", "ensemble.cli", "train", str(path),
                             "--no-progress"], env=env, stdout=log, stderr=subprocess.STDOUT)


def start_plain(data: Path, epochs: int, seed: int, out: Path) -> subprocess.Popen | None:
    if out.is_file():
        return None
    log = open(out.with_suffix(".log"), "w")
    return subprocess.Popen(
        [sys.executable, str(ROOT / "benchmarks" / "plain_finetune.py"), "--data", str(data),
         "--epochs", str(epochs), "--seed", str(seed), "--threads", "1", "--out", str(out)],
        stdout=log, stderr=subprocess.STDOUT)


def wait(procs: list[subprocess.Popen | None]) -> None:
    for p in procs:
        if p is not None and p.wait() != 0:
            raise RuntimeError(f"{' '.join(map(str, p.args))} failed (rc {p.returncode}); "
                               "see its .log in the work dir")


def mean_se(values: list[float]) -> dict[str, float | None]:
    arr = np.asarray(values, dtype=float)
    se = float(arr.std(ddof=1) / np.sqrt(len(arr))) if len(arr) > 1 else None
    return {"mean": float(arr.mean()), "se": se, "n": len(arr)}


def plain_ensemble(plain: dict[int, dict], labels: dict[str, np.ndarray],
                   names: list[str]) -> dict[str, dict]:
    """Average the plain models' test probabilities, raw and temperature-scaled on dev."""
    from ensemble.calibration import fit_temperature, log_probs, temper
    from ensemble.metrics import classification_metrics

    raw = np.mean([np.asarray(r["test_probs"]) for r in plain.values()], axis=0)
    temps = {s: fit_temperature(log_probs(np.asarray(r["dev_probs"])), labels["dev"])
             for s, r in plain.items()}
    cal = np.mean([temper(np.asarray(r["test_probs"]), temps[s]) for s, r in plain.items()],
                  axis=0)
    out = {}
    for key, probs in (("soft_vote", raw), ("soft_vote_calibrated", cal)):
        m = classification_metrics(labels["test"], probs, names)
        out[key] = {k: m[k] for k in KEYS}
    out["temperatures"] = {str(s): t for s, t in temps.items()}
    return out


def disagreement(preds: list[np.ndarray]) -> float:
    """Mean over model pairs of the share of texts whose top-1 class differs."""
    pairs = [(i, j) for i in range(len(preds)) for j in range(i + 1, len(preds))]
    return float(np.mean([np.mean(preds[i] != preds[j]) for i, j in pairs])) if pairs else 0.0


def collect(work: Path, epochs: int, seeds: list[int], members: int, data: Path) -> dict:
    from ensemble import config as C
    from ensemble.data import load_splits

    splits = load_splits(C.DataConfig(source=str(data)))
    rows, plain = {}, {}
    for s in seeds:
        path = work / f"plain_e{epochs}_s{s}.json"
        if path.is_file():
            plain[s] = json.loads(path.read_text())
    runs = ([work / f"ens_e{epochs}_k{members}"] if members > 1
            else [work / f"ens_e{epochs}_s{s}" for s in seeds])
    ens_members: dict[int, dict] = {}
    ens_metrics = None
    for run in runs:
        if not (run / "metrics.json").is_file():
            continue
        metrics = json.loads((run / "metrics.json").read_text())
        for name, row in metrics["test"].items():
            if name.startswith("classifier"):
                seed = int(name.split("_s")[1]) if "_s" in name else int(run.name.split("_s")[1])
                ens_members[seed] = {k: row.get(k) for k in KEYS}
        if members > 1:
            ens_metrics = metrics
    for s in seeds:
        rows[s] = {"plain": {k: plain[s]["test"].get(k) for k in KEYS} if s in plain else None,
                   "ensemble": ens_members.get(s)}
    both = [s for s in seeds if rows[s]["plain"] and rows[s]["ensemble"]]
    summary = {}
    for arm in ("plain", "ensemble"):
        got = [rows[s][arm] for s in seeds if rows[s][arm]]
        summary[arm] = {k: mean_se([r[k] for r in got]) for k in KEYS} if got else None
    summary["ensemble_minus_plain"] = {
        k: mean_se([rows[s]["ensemble"][k] - rows[s]["plain"][k] for s in both]) for k in KEYS
    } if both else None
    result = {"epochs": epochs, "seeds": seeds, "members": members, "settings": SETTINGS,
              "max_length": 128, "per_seed": {str(s): r for s, r in rows.items()},
              "summary": summary}
    if members > 1 and len(plain) == len(seeds):
        result["plain_deep_ensemble"] = plain_ensemble(plain, splits.labels, splits.label_names)
        result["plain_disagreement"] = disagreement(
            [np.asarray(r["test_probs"]).argmax(1) for r in plain.values()])
    if ens_metrics is not None:
        result["ensemble_run"] = {
            name: {k: row.get(k) for k in KEYS}
            for name, row in ens_metrics["test"].items() if name.startswith("ensemble")}
        result["ensemble_run"]["chosen"] = ens_metrics.get("combine", {})
        from ensemble.metrics import pairwise_disagreement

        with np.load(runs[0] / "predictions" / "test.npz") as test:
            names = [n for n in test.files if n.startswith("classifier")]
            result["run_disagreement"] = pairwise_disagreement(
                {n: test[n].argmax(1) for n in names})
    return result


def markdown(r: dict) -> str:
    def cell(d: dict | None, k: str) -> str:
        return "-" if not d or d.get(k) is None else f"{d[k]:.4f}"

    def ms(d: dict | None, k: str, scale: float = 1.0) -> str:
        if not d:
            return "-"
        m = d[k]
        se = f" ± {m['se'] * scale:.2f}" if m["se"] is not None else ""
        return f"{m['mean'] * scale:.2f}{se}"

    lines = [f"# Parity on SST-5 test: plain transformers vs an `ensemble` classifier, "
             f"{r['epochs']} epoch(s)", "",
             "Same model, data, optimizer, schedule, batch, max length and epochs; "
             "one CPU thread per arm, both arms of a seed side by side.", "",
             "| seed | plain acc | ensemble acc | plain NLL | ensemble NLL | plain ECE | "
             "ensemble ECE |", "|---|---:|---:|---:|---:|---:|---:|"]
    for s, row in r["per_seed"].items():
        p, e = row["plain"], row["ensemble"]
        lines.append(f"| {s} | {cell(p, 'accuracy')} | {cell(e, 'accuracy')} | {cell(p, 'nll')} "
                     f"| {cell(e, 'nll')} | {cell(p, 'ece')} | {cell(e, 'ece')} |")
    s = r["summary"]
    lines += ["", "| | accuracy (pt) | macro-F1 (pt) | NLL | ECE (pt) |",
              "|---|---:|---:|---:|---:|"]
    for arm in ("plain", "ensemble", "ensemble_minus_plain"):
        d = s.get(arm)
        lines.append(f"| {arm.replace('_', ' ')} | {ms(d, 'accuracy', 100)} | "
                     f"{ms(d, 'macro_f1', 100)} | {ms(d, 'nll')} | {ms(d, 'ece', 100)} |")
    d = s.get("ensemble_minus_plain")
    if d and d["accuracy"]["se"] is not None:
        gap, se = 100 * d["accuracy"]["mean"], 100 * d["accuracy"]["se"]
        verdict = ("within 0.5 pt → parity met" if abs(gap) <= 0.5 else
                   f"{'behind' if gap < 0 else 'ahead'} by {abs(gap):.2f} pt "
                   + ("(within one SE: no measurable difference)" if abs(gap) <= se else ""))
        lines += ["", f"- ensemble minus plain accuracy: {gap:+.2f} ± {se:.2f} pt over "
                  f"{d['accuracy']['n']} seeds: {verdict}"]
    if "ensemble_run" in r:
        lines += ["", f"## Ensembles of the {r['members']} seeds on SST-5 test", "",
                  "| ensemble | accuracy | macro-F1 | NLL | ECE | Brier |",
                  "|---|---:|---:|---:|---:|---:|"]
        pd = r.get("plain_deep_ensemble")
        for key in ("soft_vote", "soft_vote_calibrated") if pd else ():
            lines.append(f"| plain models, {key.replace('_', ' ')} | " + " | ".join(
                cell(pd[key], k) for k in KEYS) + " |")
        for name, row in r["ensemble_run"].items():
            if name != "chosen":
                lines.append(f"| `ensemble` run, {name} | " + " | ".join(
                    cell(row, k) for k in KEYS) + " |")
        best = max((row["accuracy"], s) for s, row in
                   ((s, v["ensemble"]) for s, v in r["per_seed"].items()) if row)
        lines.append(f"\n- best member of the run: seed {best[1]}, {best[0]:.4f}; the run "
                     f"published {r['ensemble_run']['chosen'].get('method')}")
        if "run_disagreement" in r:
            lines.append(f"- the run's members' mean pairwise test disagreement: "
                         f"{r['run_disagreement']['mean']:.3f}")
        if pd:
            lines.append(f"- plain models' pairwise test disagreement: "
                         f"{r['plain_disagreement']:.3f}")
        else:
            lines.append("- plain deep ensemble: not formed (fewer plain seeds finished than "
                         "members)")
    lines += ["", f"commit {r['machine']['git_commit']}, torch {r['machine']['torch']}, "
              f"transformers {r['machine']['transformers']}, ray {r['machine']['ray']}, "
              f"deepspeed {r['machine']['deepspeed']}; load when written {r['load_average']}",
              f"- wall seconds per arm (the arms shared 2 cores with up to 7 other training "
              f"processes, so these are not speeds): {r['arm_wall_s']}"]
    return "\n".join(lines) + "\n"


def arm_walls(work: Path, epochs: int, seeds: list[int], members: int) -> dict[str, float]:
    """Wall time of each finished arm: the plain loop's own clock, the run's metrics.json."""
    out = {}
    for s in seeds:
        path = work / f"plain_e{epochs}_s{s}.json"
        if path.is_file():
            out[f"plain_s{s}"] = json.loads(path.read_text())["wall_s"]
    runs = ([f"ens_e{epochs}_k{members}"] if members > 1
            else [f"ens_e{epochs}_s{s}" for s in seeds])
    for name in runs:
        metrics = work / name / "metrics.json"
        if metrics.is_file():
            wall = json.loads(metrics.read_text()).get("wall_s")
            if wall is not None:
                out[name] = round(float(wall), 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--members", type=int, default=1,
                        help="K > 1: one ensemble run of K classifiers seeded with the K seeds")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "parity")
    parser.add_argument("--summarize", action="store_true", help="only rewrite the results")
    a = parser.parse_args()
    data = common.sst_dir(a.data)
    if a.members > 1 and a.members != len(a.seeds):
        parser.error(f"--members {a.members} needs {a.members} --seeds")
    a.work_dir.mkdir(parents=True, exist_ok=True)
    name = f"sst_parity_e{a.epochs}" + (f"_k{a.members}" if a.members > 1 else "")
    start = time.time()

    def write() -> None:
        result = collect(a.work_dir, a.epochs, a.seeds, a.members, data)
        result.update(machine=common.machine(), load_average=common.load_average(),
                      wall_s=None if a.summarize else time.time() - start,
                      arm_wall_s=arm_walls(a.work_dir, a.epochs, a.seeds, a.members))
        common.write_results(name, result, markdown(result))

    if not a.summarize:
        if a.members > 1:
            run = a.work_dir / f"ens_e{a.epochs}_k{a.members}"
            procs = [start_ensemble(ensemble_config(data, a.epochs, a.seeds, run), run)]
            for s in a.seeds:  # the plain models one after another beside the ensemble run
                wait([start_plain(data, a.epochs, s, a.work_dir / f"plain_e{a.epochs}_s{s}.json")])
                write()
            wait(procs)
        else:
            for s in a.seeds:
                run = a.work_dir / f"ens_e{a.epochs}_s{s}"
                wait([start_ensemble(ensemble_config(data, a.epochs, [s], run), run),
                      start_plain(data, a.epochs, s, a.work_dir / f"plain_e{a.epochs}_s{s}.json")])
                write()
    write()
    print((common.RESULTS / f"{name}.md").read_text())


if __name__ == "__main__":
    main()
