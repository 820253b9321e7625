"""After a Tune experiment: trial table, PBT mutation history, best config YAML, trial plot."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ensemble import config as C
from ensemble.rundir import RunState, atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)



def trial_metrics(row: dict[str, Any]) -> dict[str, float]:
    """A round's row as the flat metrics a Tune trial reports: ``<model>_dev_<metric>``."""
    out = {"round": row["round"]}
    for name, metrics in row["dev"].items():
        slug = name.replace("/", "_")
        for key, value in metrics.items():
            out[f"{slug}_dev_{key}"] = value
    return out

def mutation_history(*dirs: Path) -> list[dict[str, Any]]:
    """PBT's exploit/explore steps from `pbt_global.txt` (first one found among `dirs`)."""
    for d in dirs:
        path = Path(d) / "pbt_global.txt"
        if path.is_file():
            rows = []
            for line in path.read_text().splitlines():
                target, donor, target_iter, donor_iter, old, new = json.loads(line)
                rows.append(
                    {
                        "trial": target,
                        "cloned_from": donor,
                        "trial_round": target_iter,
                        "donor_round": donor_iter,
                        "donor_config": old,
                        "new_config": new,
                    }
                )
            return rows
    return []


def trial_rows(results: Any, metric: str) -> list[dict[str, Any]]:
    """One row per trial: config, the metric after each round, where it was restored from.

    Per-round values come from the trial's own run state (`run/state.json`), which holds one row
    per completed round even when PBT restarted the trial from another trial's checkpoint; Tune's
    progress table is the fallback.
    """

    rows = []
    for result in results:
        state = RunState.load(Path(result.path) / "run") if result.path else RunState()
        per_round = [float(trial_metrics(r)[metric]) for r in state.rounds
                     if metric in trial_metrics(r)]
        df = result.metrics_dataframe
        if not per_round and df is not None and metric in df:
            per_round = [float(x) for x in df[metric]]
        rows.append({
            "trial": Path(result.path).name if result.path else "?",
            "trial_id": state.trial_id,
            "config": result.config,
            "metric_per_round": per_round,
            "restored_from_trial": state.restored_from_trial,
            "restored_from_round": state.restored_from_round,
            "final": per_round[-1] if per_round else None,
            "error": str(result.error) if result.error else None,
            "run_dir": str(Path(result.path) / "run") if result.path else None,
        })
    return rows


def markdown(rows: list[dict[str, Any]], metric: str) -> str:
    keys = sorted({k for r in rows for k in r["config"]})
    head = ["trial", *keys, f"{metric} per round", "final"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["trial"],
            *[_fmt(r["config"].get(k)) for k in keys],
            " → ".join(f"{x:.3f}" for x in r["metric_per_round"]),
            _fmt(r["final"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def plot_trials(rows: list[dict[str, Any]], metric: str, path: Path,
                mutations: list[dict[str, Any]] | None = None) -> int:
    """Each trial's metric per round; with PBT's ``mutations``, the lineage drawn over it.

    A PBT exploit (`mutation_history`) is an arrow from the donor trial's point at the round
    whose checkpoint was copied to the trial that took it over, at the round it did, so one
    can follow which trial's weights every trial ended up training. Returns the arrows drawn
    (a mutation whose trials have no recorded rounds has none).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    points: dict[str, list[float]] = {}
    for r in rows:
        if r["metric_per_round"]:
            ax.plot(
                range(1, len(r["metric_per_round"]) + 1),
                r["metric_per_round"],
                marker="o",
                label=r["trial"][-24:],
            )
            points[r["trial"]] = r["metric_per_round"]
    drawn = 0
    for m in mutations or []:
        donor, target = _row_for(rows, m["cloned_from"]), _row_for(rows, m["trial"])
        if donor is None or target is None:
            continue
        start = _point(points.get(donor["trial"], []), m["donor_round"])
        end = _point(points.get(target["trial"], []), m["trial_round"])
        if start is None or end is None:
            continue
        ax.annotate("", xy=end, xytext=start, arrowprops={
            "arrowstyle": "->", "color": "grey", "linestyle": "--", "linewidth": 0.9})
        drawn += 1
    ax.set_xlabel("round")
    ax.set_ylabel(metric)
    title = "trials" if not mutations else f"PBT lineage: {drawn} exploit(s), donor -> taker"
    ax.set_title(title)
    ax.legend(fontsize=6)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)
    return drawn


def _row_for(rows: list[dict[str, Any]], trial_id: str) -> dict[str, Any] | None:
    """The trial row of a Tune trial id: its recorded id, else the directory named after it."""
    for r in rows:
        if r.get("trial_id") == trial_id:
            return r
    return next((r for r in rows if trial_id and trial_id in r["trial"]), None)


def _point(values: list[float], round_: int) -> tuple[int, float] | None:
    """(round, metric) of a 1-based round, clamped to the rounds the trial recorded."""
    if not values:
        return None
    i = min(max(int(round_), 1), len(values))
    return i, values[i - 1]


def write_report(
    cfg: C.RunConfig, results: Any, metric: str, exp_path: Path, out_dir: Path
) -> dict[str, Any]:
    rows = trial_rows(results, metric)
    history = mutation_history(exp_path, Path(results.experiment_path))
    best = results.get_best_result(metric=metric, mode=cfg.tune.mode, scope="last")
    best_cfg = C.replace(cfg, {**best.config, "output_dir": f"{cfg.output_dir}/best"})
    atomic_write_text(out_dir / "best_config.yaml", C.to_yaml(best_cfg))
    summary = {
        "metric": metric,
        "mode": cfg.tune.mode,
        "scheduler": cfg.tune.scheduler,
        "best_config": best.config,
        "best_metric": best.metrics.get(metric),
        "best_run_dir": str(Path(best.path) / "run"),
        "trials": rows,
        "mutations": history,
    }
    atomic_write_json(out_dir / "tune_results.json", summary)
    atomic_write_text(out_dir / "trials.md", markdown(rows, metric))
    plot_trials(rows, metric, out_dir / "trials.png", history)
    print(markdown(rows, metric), flush=True)
    print(
        f"{len(history)} PBT mutation(s); best {metric}={best.metrics.get(metric)} "
        f"config={best.config}",
        flush=True,
    )
    print(f"best config: {out_dir / 'best_config.yaml'}; best run: {summary['best_run_dir']}")
    return summary
