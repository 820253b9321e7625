"""A recipe run grown by other members (say a heterogeneous encoder): what does it add?

    python benchmarks/grow_quality.py --base runs/recipe2/sst_recipe_s0 \\
        --grown runs/mpnet/sst_recipe_mpnet_s0 --out grow_mpnet_s0

The grown run is the base run with members added (`ensemble train` on a config that keeps the
base's members and adds some; only the added ones train). Both runs' published ensembles (their
combiners chosen on dev) and every member are scored on test from the runs'
``predictions/test.npz``; each member as trained and temperature-scaled. The differences that
matter carry a paired bootstrap SE over the test texts (one seed): the grown ensemble against
its best member (picked on test), against each added member alone, and against the base
ensemble. A target counts as met only beyond one SE. Cost: parameters and the run's measured
inference ms/text per member (taken while the run trained, so an upper bound). Writes
benchmarks/results/<out>.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402
from benchmarks.recipe_quality import (  # noqa: E402
    TARGET_ACCURACY,
    TARGET_OVER_BEST,
    load_run,
    paired_se,
    scores,
)


def compare(base: dict[str, Any], grown: dict[str, Any]) -> dict[str, Any]:
    """Rows and paired differences of a grown run against its base (both from `load_run`)."""
    labels, names = grown["labels"], grown["label_names"]
    if not np.array_equal(labels, base["labels"]):
        raise SystemExit("the two runs were not scored on the same test texts")
    added = [n for n in grown["names"] if n not in base["names"]]
    if not added or set(base["names"]) - set(grown["names"]):
        raise SystemExit(f"{grown['names']} is not {base['names']} plus new members")
    members = {}
    for n in grown["names"]:
        info = grown["info"].get(n, {})
        members[n] = {"kind": grown["kinds"][n], "added": n in added,
                      "as_trained": scores(labels, grown["raw"][n], names),
                      "scaled": scores(labels, grown["scaled"][n], names),
                      "params": info.get("params"),
                      "infer_ms_per_text": info.get("infer_ms_per_text")}
    cls = [n for n in grown["names"] if grown["kinds"][n] != "regressor"]
    best = max(cls, key=lambda n: members[n]["as_trained"]["accuracy"])
    ens, base_ens = grown["published"], base["published"]

    def diff(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
        d = float((a.argmax(1) == labels).mean() - (b.argmax(1) == labels).mean())
        return {"mean": d, "se": paired_se(labels, a, b)}

    diffs = {"grown_minus_best_member": diff(ens, grown["scaled"][best]),
             "grown_minus_base": diff(ens, base_ens),
             **{f"grown_minus_{n}": diff(ens, grown["scaled"][n]) for n in added}}
    grown_row = scores(labels, ens, names)
    over_best, over_base = diffs["grown_minus_best_member"], diffs["grown_minus_base"]
    return {
        "added": added, "best_member": best, "members": members,
        "base_ensemble": {**scores(labels, base_ens, names), "method": base["method"]},
        "grown_ensemble": {**grown_row, "method": grown["method"]},
        "differences": diffs,
        "targets": {
            "accuracy_52_5": grown_row["accuracy"] >= TARGET_ACCURACY,
            "best_member_plus_1_5": (over_best["mean"] >= TARGET_OVER_BEST
                                     and over_best["mean"] - over_best["se"] > 0),
            "ahead_of_base": over_base["mean"] - over_base["se"] > 0,
            "nll_below_best_member": grown_row["nll"] < members[best]["as_trained"]["nll"],
        },
        "cost": {
            "params_base": sum(members[n]["params"] or 0 for n in base["names"]),
            "params_grown": sum(m["params"] or 0 for m in members.values()),
            "infer_ms_base": sum(members[n]["infer_ms_per_text"] or 0 for n in base["names"]),
            "infer_ms_grown": sum(m["infer_ms_per_text"] or 0 for m in members.values()),
        },
    }


def markdown(res: dict[str, Any], base: str, grown: str, machine_line: str) -> str:
    def pct(x: float) -> str:
        return f"{100 * x:.2f}"

    lines = [f"# A grown ensemble: {base} + {', '.join(res['added'])} (SST-5 test, one seed)", "",
             f"Base run `{base}`, grown run `{grown}`; {machine_line}", "",
             "| row | accuracy (%) | macro-F1 (%) | NLL | ECE (pt) | params (M) | ms/text |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for n, m in res["members"].items():
        a = m["as_trained"]
        tag = " (added)" if m["added"] else ""
        lines.append(f"| {n}{tag} | {pct(a['accuracy'])} | {pct(a['macro_f1'])} | "
                     f"{a['nll']:.3f} | {pct(a['ece'])} | {(m['params'] or 0) / 1e6:.1f} | "
                     f"{m['infer_ms_per_text'] or 0:.1f} |")
    c = res["cost"]
    for key, label, params, ms in (("base_ensemble", "base ensemble", c["params_base"],
                                    c["infer_ms_base"]),
                                   ("grown_ensemble", "**grown ensemble**", c["params_grown"],
                                    c["infer_ms_grown"])):
        r = res[key]
        lines.append(f"| {label} ({r['method']}) | {pct(r['accuracy'])} | {pct(r['macro_f1'])} | "
                     f"{r['nll']:.3f} | {pct(r['ece'])} | {params / 1e6:.1f} | {ms:.1f} |")
    lines += ["", "| accuracy difference | mean (pt) | paired SE (pt) | beyond one SE |",
              "|---|---:|---:|---|"]
    for k, d in res["differences"].items():
        beyond = "yes" if abs(d["mean"]) > d["se"] else "no"
        lines.append(f"| {k.replace('_', ' ')} | {100 * d['mean']:+.2f} | {100 * d['se']:.2f} | "
                     f"{beyond} |")
    t = res["targets"]
    lines += ["", f"Best member (picked on test): {res['best_member']}. Members' ms/text were "
              "measured while the run trained (upper bounds).", "",
              "| target | met |", "|---|---|"]
    for key, label in (("accuracy_52_5", "grown ensemble >= 52.5 %"),
                       ("best_member_plus_1_5", "grown >= best member + 1.5 pt, beyond one SE"),
                       ("ahead_of_base", "grown ahead of the base ensemble beyond one SE"),
                       ("nll_below_best_member", "grown NLL below the best member's")):
        lines.append(f"| {label} | {'yes' if t[key] else 'no'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, required=True, help="the finished recipe run")
    ap.add_argument("--grown", type=Path, required=True, help="the same run with members added")
    ap.add_argument("--out", default="grow_quality")
    args = ap.parse_args(argv)
    res = compare(load_run(args.base), load_run(args.grown))
    machine = common.machine()
    line = (f"commit {common.git_commit()}, torch {machine.get('torch')}, transformers "
            f"{machine.get('transformers')}.")
    data = {"bench": {"base": str(args.base), "grown": str(args.grown)}, "machine": machine,
            "result": res, "command": " ".join(["python", "benchmarks/grow_quality.py",
                                                *(argv or sys.argv[1:])])}
    json_path, md_path = common.write_results(args.out, data, markdown(
        res, args.base.name, args.grown.name, line))
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
