"""Human-readable reports of a run: a rich metrics table and PNG plots.

Plots are drawn on `matplotlib.figure.Figure` objects attached to the Agg canvas directly,
not through `pyplot`: nothing needs a display, the process-wide backend of a caller (e.g. a
notebook) is left alone, no figure is kept in pyplot's global registry, and several threads or
Ray actors can draw at once. Every PNG is written to a temporary sibling and renamed into place,
like the rest of the run directory (see `ensemble.rundir`).

Member colours are stable across plots: members are coloured by sorted name and the ensemble is
always drawn in black, thicker.
"""

from __future__ import annotations

import html
import io
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rich.console import Console
from rich.table import Table

from ensemble.metrics import ECE_BINS, expected_calibration_error, reliability_bins
from ensemble.rundir import atomic_write_bytes, atomic_write_text

logger = logging.getLogger(__name__)

__all__ = [
    "metrics_table",
    "plot_confusion",
    "plot_intensity",
    "plot_latency",
    "plot_learning_curves",
    "plot_reliability",
    "plot_roc",
    "plot_rounds",
    "render",
    "write_index",
]

ENSEMBLE = "ensemble"
# (column header, metrics key); the calibration and ratio columns appear only when some row has
# the key.
METRIC_COLUMNS = [
    ("accuracy", "accuracy"),
    ("macro-F1", "macro_f1"),
    ("pearson", "pearson"),
    ("spearman", "spearman"),
    ("MAE", "mae"),
]
CALIBRATION_COLUMNS = [("NLL", "nll"), ("ECE", "ece")]
RATIO_COLUMNS = [("params x", "size_ratio"), ("speed-up x", "speedup")]
ROUND_METRICS = ["accuracy", "macro_f1", "nll", "ece", "pearson", "spearman", "mae", "rmse"]
_DPI = 120


def metrics_table(metrics: Mapping[str, Mapping[str, Any]], title: str) -> Table:
    """Tabulate the evaluation of every member and of the ensemble.

    A value is looked up in the row's dict, or one level down (so both ``{"accuracy": ...}`` and
    ``{"classification": {"accuracy": ...}}`` work). Numbers are shown with 3 decimals, missing
    or non-finite values as ``-``.

    Args:
        metrics: row name (member, or ``"ensemble"``) -> metrics dict. The ensemble row, if any,
            goes last; others keep their order. ``nll`` and ``ece`` get the columns "NLL" and
            "ECE", and ``size_ratio`` and ``speedup`` (student vs teacher) the columns
            "params x" and "speed-up x", when some row has them. A temperature-scaled member
            (a row with ``temperature`` and ``nll_calibrated``) gets a second row, ``<name>
            (T=<temperature>)``, with the NLL and ECE of its scaled probabilities.
        title: table title.

    Returns:
        A `rich.table.Table`; print it or turn it into text with `render`.
    """
    rows = _rows(metrics)
    present = [c for c in CALIBRATION_COLUMNS if any(_lookup(m, c[1]) is not None for m in rows)]
    columns = [*METRIC_COLUMNS[:2], *present, *METRIC_COLUMNS[2:]]
    columns += [c for c in RATIO_COLUMNS if any(_lookup(m, c[1]) is not None for m in rows)]
    table = Table(title=title)
    table.add_column("member", style="bold")
    for header, _ in columns:
        table.add_column(header, justify="right")
    for name in _ordered(metrics):
        cells = [_format(_lookup(metrics[name], key), key) for _, key in columns]
        table.add_row(name, *cells, style="bold" if name == ENSEMBLE else None)
        t = _lookup(metrics[name], "temperature")
        if t is not None and _lookup(metrics[name], "nll_calibrated") is not None:
            scaled = [
                _format(_lookup(metrics[name], f"{key}_calibrated"), key)
                if (header, key) in CALIBRATION_COLUMNS
                else ""
                for header, key in columns
            ]
            table.add_row(f"{name} (T={t:.2f})", *scaled)
    return table


def render(table: Table) -> str:
    """Plain-text rendering of a rich table (120 columns, no colour codes), for logs and tests."""
    console = Console(record=True, width=120, file=io.StringIO(), color_system=None)
    console.print(table)
    return console.export_text()


def plot_learning_curves(history: Mapping[str, Sequence[Mapping[str, Any]]], path: Any) -> None:
    """Training loss of every member against the global step, one line per member.

    Steps that restart at each round are shifted so the x axis runs on across rounds; steps that
    already count globally are used as they are. The y axis is logarithmic when every loss is
    positive. Long noisy curves get a smoothed line (EMA) over the faint raw one.

    Args:
        history: member -> records ``{"step": int, "loss": float, "round": int, ...}``
            (``round`` defaults to 0). Non-finite losses are skipped.
        path: PNG file to write.

    Raises:
        ValueError: if a record lacks ``step`` or ``loss``, or there is nothing to plot.
    """
    series = {name: _global_steps(name, recs) for name, recs in history.items()}
    series = {name: xy for name, xy in series.items() if xy[0].size}
    if not series:
        raise ValueError("history has no finite losses to plot; record losses during training")
    fig, ax = _figure(figsize=(8, 4.5))
    colors = _colors(series)
    for name, (x, y) in series.items():
        if y.size > 20:
            ax.plot(x, y, color=colors[name], alpha=0.25, linewidth=0.8)
            smooth = _ema(y, alpha=2.0 / (1 + min(50, y.size // 10)))
            ax.plot(x, smooth, color=colors[name], label=name)
        else:
            ax.plot(x, y, color=colors[name], marker="o", markersize=3, label=name)
    if all(float(y.min()) > 0 for _, y in series.values()):
        ax.set_yscale("log")
    ax.set(xlabel="step (global across rounds)", ylabel="training loss", title="Learning curves")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    _save(fig, path)


def plot_confusion(
    confusion: Sequence[Sequence[int]], label_names: Sequence[str], path: Any, title: str
) -> None:
    """Confusion-matrix heatmap, rows = true class, annotated with counts and row percentages.

    Colour is the row-normalised rate (recall on the diagonal), so imbalanced classes stay
    readable.

    Args:
        confusion: C x C counts, as in ``classification_metrics(...)["confusion"]``.
        label_names: C class names.
        path: PNG file to write.
        title: figure title.

    Raises:
        ValueError: if the matrix is not C x C for the C names given.
    """
    counts = np.asarray(confusion, dtype=np.int64)
    n = len(label_names)
    if counts.shape != (n, n):
        raise ValueError(
            f"confusion has shape {counts.shape} but {n} label_names were given; "
            "pass one name per class"
        )
    totals = counts.sum(axis=1, keepdims=True)  # (C, 1)
    rates = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    size = 2.5 + 0.9 * n
    fig, ax = _figure(figsize=(size + 1.2, size))
    image = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    for i in range(n):
        for j in range(n):
            color = "white" if rates[i, j] > 0.5 else "black"
            label = f"{counts[i, j]}\n{rates[i, j]:.0%}"
            ax.text(j, i, label, ha="center", va="center", color=color, fontsize="small")
    ax.set_xticks(range(n), labels=list(label_names), rotation=30, ha="right")
    ax.set_yticks(range(n), labels=list(label_names))
    ax.set(xlabel="predicted", ylabel="true", title=title)
    _save(fig, path)


def plot_disagreement(disagreement: Mapping[str, Any], path: Any, title: str) -> None:
    """Heatmap of the share of texts on which two members' top-1 classes differ.

    Args:
        disagreement: ``metrics.pairwise_disagreement``'s result (``models``, ``matrix``,
            ``mean``).
        path: PNG file to write.
        title: figure title; the mean over pairs is appended.
    """
    names = list(disagreement["models"])
    matrix = np.asarray(disagreement["matrix"], dtype=np.float64)
    n = len(names)
    size = 2.5 + 0.9 * n
    fig, ax = _figure(figsize=(size + 1.2, size))
    top = max(float(matrix.max()), 1e-9)
    image = ax.imshow(matrix, cmap="Oranges", vmin=0.0, vmax=top)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of texts")
    for i in range(n):
        for j in range(n):
            color = "white" if matrix[i, j] > 0.6 * top else "black"
            ax.text(j, i, f"{matrix[i, j]:.1%}", ha="center", va="center", color=color,
                    fontsize="small")
    ax.set_xticks(range(n), labels=names, rotation=30, ha="right")
    ax.set_yticks(range(n), labels=names)
    ax.set(title=f"{title}; mean over pairs {disagreement['mean']:.1%}")
    _save(fig, path)


def plot_cascade(
    curves: Mapping[str, Mapping[str, Any]], path: Any, threshold: float | None = None,
    budget: float | None = None, title: str = "cascade",
) -> None:
    """Student share vs accuracy loss against the full ensemble, one line per split.

    Args:
        curves: split -> `cascade.cascade_curve` (``threshold``, ``student_fraction``,
            ``accuracy_loss`` arrays).
        path: PNG file to write.
        threshold: the fitted threshold; each curve marks the point it gives.
        budget: the allowed loss, drawn as a horizontal line.
    """
    fig, ax = _figure(figsize=(6.4, 4.4))
    colors = _colors(curves, keep_order=True)
    for split, curve in curves.items():
        color = colors[split]
        share = np.asarray(curve["student_fraction"])
        loss = 100 * np.asarray(curve["accuracy_loss"])
        ax.plot(share, loss, color=color, linewidth=1.2, label=split)
        if threshold is not None:
            at = np.asarray(curve["threshold"]) >= threshold
            i = int(np.flatnonzero(at)[-1]) if at.any() else None
            if i is not None:
                ax.scatter([share[i]], [loss[i]], color=color, zorder=3)
    if budget is not None:
        ax.axhline(100 * budget, linestyle="--", color="grey", linewidth=0.8, label="budget")
    ax.axhline(0.0, color="black", linewidth=0.5)
    ax.set(xlim=(0, 1), xlabel="share of texts the student answers alone",
           ylabel="accuracy loss vs the full ensemble (pt)", title=title)
    ax.legend(loc="upper left")
    _save(fig, path)


def plot_roc(curves: Mapping[str, tuple], path: Any, title: str) -> None:
    """One-vs-rest ROC curves, one line per class with its AUC in the legend.

    Args:
        curves: class name -> ``(fpr, tpr, auc)``, as returned by `ensemble.metrics.roc_curves`.
        path: PNG file to write.
        title: figure title.

    Raises:
        ValueError: if there are no curves.
    """
    if not curves:
        raise ValueError("no ROC curves to plot; every class needs positive and negative examples")
    fig, ax = _figure(figsize=(5.5, 5.5))
    colors = _colors(curves, keep_order=True)  # class order, not alphabetical
    for name, (fpr, tpr, area) in curves.items():
        ax.plot(fpr, tpr, color=colors[name], label=f"{name} (AUC {area:.3f})")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8, label="chance")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate")
    ax.set_title(title)
    ax.set_aspect("equal")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    _save(fig, path)


def plot_reliability(
    labels: np.ndarray,
    panels: Mapping[str, Mapping[str, np.ndarray]],
    path: Any,
    bins: int = ECE_BINS,
) -> None:
    """Reliability diagram: accuracy against mean top-1 confidence in equal-width bins.

    One line per row (member or ensemble), its ECE in the legend, marker area by the bin's share
    of texts; the diagonal is perfect calibration. Below it, overconfident.

    Args:
        labels: (N,) class ids.
        panels: panel title -> row name -> (N, C) probabilities; e.g. the members as trained in
            one panel and as combined (temperature-scaled) with the ensemble in another.
        path: PNG file to write.
        bins: confidence bins (`ensemble.metrics.reliability_bins`).

    Raises:
        ValueError: if there is nothing to plot.
    """
    if not any(panels.values()):
        raise ValueError("no probabilities to plot; pass panel title -> {name: (N, C) probs}")
    ncols = len(panels)
    fig, axes = _figure(figsize=(5.2 * ncols, 5.4), ncols=ncols)
    colors = _colors({name for rows in panels.values() for name in rows})
    for ax, (panel, rows) in zip(np.atleast_1d(axes), panels.items(), strict=True):
        ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8,
                label="perfect calibration")
        for name in _ordered(rows):
            r = reliability_bins(labels, rows[name], bins)
            full = [i for i, c in enumerate(r["count"]) if c]
            share = np.array([r["count"][i] for i in full]) / max(1, sum(r["count"]))
            ece = expected_calibration_error(labels, rows[name], bins)
            width, z = (2.5, 3) if name.startswith(ENSEMBLE) else (1.3, 2)
            color = "black" if name.startswith(ENSEMBLE) else colors[name]
            x = [r["confidence"][i] for i in full]
            y = [r["accuracy"][i] for i in full]
            ax.plot(x, y, color=color, linewidth=width, zorder=z, label=f"{name} (ECE {ece:.3f})")
            ax.scatter(x, y, s=10 + 300 * share, color=color, zorder=z, alpha=0.8)
        ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="confidence (top-1 probability)",
               ylabel="accuracy", title=panel)
        ax.set_aspect("equal")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper left", fontsize="small")
    fig.suptitle(f"Reliability ({bins} bins)")
    _save(fig, path)


def plot_intensity(
    true: np.ndarray, estimates: Mapping[str, np.ndarray], path: Any, title: str
) -> None:
    """Predicted against true intensity, one panel per model, with the diagonal and Pearson r.

    Args:
        true: (N,) true intensities.
        estimates: model name -> (N,) predicted intensities (e.g. each regressor, the ensemble).
        path: PNG file to write.
        title: figure title.

    Raises:
        ValueError: if there is nothing to plot or a prediction does not match ``true``.
    """
    y = np.asarray(true, dtype=np.float64)
    if not estimates:
        raise ValueError("no intensity estimates to plot; pass name -> (N,) predictions")
    bad = {n: np.shape(e) for n, e in estimates.items() if np.shape(e) != y.shape}
    if bad:
        raise ValueError(f"predictions {bad} do not match the {y.shape} true intensities")
    lo, hi = float(min(y.min(), *(np.min(e) for e in estimates.values()))), float(
        max(y.max(), *(np.max(e) for e in estimates.values())))
    n = len(estimates)
    fig, axes = _figure(figsize=(4.4 * n, 4.6), ncols=n)
    colors = _colors(estimates)
    for ax, name in zip(np.atleast_1d(axes), _ordered(estimates), strict=True):
        pred = np.asarray(estimates[name], dtype=np.float64)
        r = float(np.corrcoef(y, pred)[0, 1]) if y.std() > 0 and pred.std() > 0 else float("nan")
        mae = float(np.abs(pred - y).mean())
        color = "black" if name.startswith(ENSEMBLE) else colors[name]
        ax.scatter(y, pred, s=6, alpha=0.35, color=color, edgecolors="none")
        ax.plot([lo, hi], [lo, hi], linestyle="--", color="grey", linewidth=0.8)
        ax.set(xlim=(lo, hi), ylim=(lo, hi), xlabel="true intensity",
               ylabel="predicted intensity", title=f"{name}: r {r:.3f}, MAE {mae:.3f}")
        ax.set_aspect("equal")
        ax.grid(True, alpha=0.3)
    fig.suptitle(title)
    _save(fig, path)


def plot_latency(results: Mapping[str, Mapping[Any, Mapping[str, Any]]], path: Any,
                 title: str = "latency vs concurrency") -> None:
    """p50 and p99 latency against concurrency, one line per scenario (`serve_load.py`).

    Args:
        results: scenario -> concurrency -> a row with ``p50_ms`` and ``p99_ms`` (None when no
            request succeeded; such points are left out).
        path: PNG file to write.
        title: figure title.
    """
    if not results:
        raise ValueError("no load-test results to plot")
    fig, axes = _figure(figsize=(11.0, 4.6), ncols=2)
    colors = _colors(results, keep_order=True)
    levels = sorted({int(c) for by_c in results.values() for c in by_c})
    for ax, key in zip(axes, ("p50_ms", "p99_ms"), strict=True):
        for name, by_c in results.items():
            points = sorted((int(c), r[key]) for c, r in by_c.items() if r.get(key) is not None)
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o", linewidth=1.2, color=colors[name], label=name)
        ax.set(xscale="log", yscale="log", xlabel="concurrent clients",
               ylabel=f"{key.removesuffix('_ms')} latency (ms)", title=key.removesuffix("_ms"))
        ax.set_xticks(levels, labels=[str(c) for c in levels])
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(loc="upper left", fontsize="x-small")
    fig.suptitle(title)
    _save(fig, path)


# the columns of the run page's table: (header, metrics key)
INDEX_COLUMNS = [("accuracy", "accuracy"), ("macro-F1", "macro_f1"), ("NLL", "nll"),
                 ("ECE", "ece"), ("Brier", "brier"), ("pearson", "pearson"), ("MAE", "mae")]


def write_index(run_dir: Any, metrics: Mapping[str, Any], title: str) -> Path:
    """``index.html`` in the run directory: the test metrics table, then every plot in ``plots/``.

    The page has no scripts and links the PNGs by relative path, so it opens from the directory
    (or an artifact store) as it is.

    Args:
        run_dir: the run directory (its ``plots/`` are shown).
        metrics: the run's ``metrics.json`` content (``test`` rows, ``combine``).
        title: page title (the run's name).

    Returns:
        The page's path.
    """
    run_dir = Path(run_dir)
    rows = metrics.get("test", {})
    keys = [(h, k) for h, k in INDEX_COLUMNS if any(k in r for r in rows.values())]
    combine = metrics.get("combine") or {}
    published = f"ensemble/{combine['method']}" if combine.get("method") else None
    esc = html.escape
    out = [
        "<!doctype html>", '<html><head><meta charset="utf-8">', f"<title>{esc(title)}</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child,"
        "th:first-child{text-align:left}tr.published{font-weight:bold}"
        "figure{display:inline-block;margin:1em}img{max-width:900px}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
    ]
    if published:
        out.append(f"<p>Published combination: <b>{esc(published)}</b> (chosen on dev).</p>")
    out += ["<h2>Test metrics</h2>", "<table><tr><th>model</th>"
            + "".join(f"<th>{esc(h)}</th>" for h, _ in keys) + "</tr>"]
    for name in _ordered(rows):
        row = rows[name]
        cls = ' class="published"' if name == published else ""
        cells = "".join(f"<td>{_index_cell(row.get(k))}</td>" for _, k in keys)
        out.append(f"<tr{cls}><td>{esc(name)}</td>{cells}</tr>")
    out.append("</table>")
    plots = sorted((run_dir / "plots").glob("*.png"))
    if plots:
        out.append("<h2>Plots</h2>")
    for png in plots:
        rel = png.relative_to(run_dir).as_posix()
        out.append(f'<figure><img src="{esc(rel)}" alt="{esc(png.stem)}">'
                   f"<figcaption>{esc(png.stem.replace('_', ' '))}</figcaption></figure>")
    out.append("</body></html>")
    path = run_dir / "index.html"
    atomic_write_text(path, "\n".join(out) + "\n")
    return path


def _index_cell(value: Any) -> str:
    return "-" if not isinstance(value, int | float) else f"{value:.4f}"


def plot_rounds(rounds: Sequence[Mapping[str, Any]], path: Any) -> None:
    """Dev metrics against the round: one subplot per metric, one line per member.

    A subplot is drawn for each of accuracy, macro_f1, nll, ece, pearson, spearman, mae and rmse
    that some member reports; a member without a metric (a regressor has no accuracy) is left out
    of that subplot.

    Args:
        rounds: ``[{"round": r, "dev": {member_or_"ensemble": {"accuracy": .., ...}}}, ...]``.
        path: PNG file to write.

    Raises:
        ValueError: if an entry lacks ``round`` or ``dev``, or no known metric is present.
    """
    points: dict[str, dict[str, list[tuple[int, float]]]] = {}  # metric -> member -> [(r, v)]
    for i, entry in enumerate(rounds):
        if "round" not in entry or not isinstance(entry.get("dev"), Mapping):
            raise ValueError(f"rounds[{i}] needs keys 'round' and 'dev' (member -> metrics dict)")
        for member, values in entry["dev"].items():
            for metric in ROUND_METRICS:
                value = _lookup(values, metric)
                if value is not None:
                    points.setdefault(metric, {}).setdefault(member, []).append(
                        (int(entry["round"]), value)
                    )
    metrics = [m for m in ROUND_METRICS if m in points]
    if not metrics:
        raise ValueError(f"rounds has none of the metrics {ROUND_METRICS}; nothing to plot")
    members = {member for per_member in points.values() for member in per_member}
    colors = _colors(members)
    ncols = min(3, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    fig, axes = _figure(figsize=(4.2 * ncols, 3.4 * nrows), nrows=nrows, ncols=ncols)
    flat = np.atleast_1d(axes).ravel()
    for ax, metric in zip(flat, metrics, strict=False):  # flat may have spare axes
        for member in _ordered(points[metric]):
            r, v = zip(*sorted(points[metric][member]), strict=True)
            is_ens = member == ENSEMBLE
            width, z = (2.5, 3) if is_ens else (1.5, 2)
            ax.plot(r, v, marker="o", color=colors[member], label=member, linewidth=width, zorder=z)
        ax.set(title=metric, xlabel="round")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(True, alpha=0.3)
    for ax in flat[len(metrics) :]:
        ax.set_visible(False)
    handles = {}
    for ax in flat[: len(metrics)]:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    labels = _ordered(sorted(handles))
    fig.legend(
        [handles[label] for label in labels], labels, loc="outside right center", fontsize="small"
    )
    fig.suptitle("Dev metrics per round")
    _save(fig, path)


# ---------------------------------------------------------------------------------------------
# helpers


def _rows(metrics: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [m for m in metrics.values() if isinstance(m, Mapping)]


def _ordered(names: Any) -> list[str]:
    """Keep the given order, but put the ensemble last."""
    names = list(names)
    return [n for n in names if n != ENSEMBLE] + [n for n in names if n == ENSEMBLE]


def _lookup(values: Any, key: str) -> float | None:
    """A finite number under `key`, in `values` or one level down; else None."""
    if not isinstance(values, Mapping):
        return None
    candidates = [values.get(key)]
    candidates += [v.get(key) for v in values.values() if isinstance(v, Mapping)]
    for value in candidates:
        if isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
            if math.isfinite(float(value)):
                return float(value)
    return None


def _format(value: float | None, key: str) -> str:
    if value is None:
        return "-"
    suffix = "x" if key in dict(RATIO_COLUMNS).values() else ""
    return f"{value:.3f}{suffix}"


def _colors(names: Any, keep_order: bool = False) -> dict[str, Any]:
    from matplotlib import colormaps

    palette = colormaps["tab10"].colors
    members = [n for n in names if n != ENSEMBLE]
    members = members if keep_order else sorted(members)
    colors: dict[str, Any] = {n: palette[i % len(palette)] for i, n in enumerate(members)}
    colors[ENSEMBLE] = "black"
    return colors


def _global_steps(name: str, records: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """(x, loss) arrays with x running on across rounds; non-finite losses dropped."""
    rows = []
    for i, rec in enumerate(records):
        if "step" not in rec or "loss" not in rec:
            raise ValueError(f"history[{name!r}][{i}] needs 'step' and 'loss', got {list(rec)}")
        rows.append((int(rec.get("round", 0)), int(rec["step"]), float(rec["loss"])))
    rows.sort(key=lambda r: (r[0], r[1]))
    xs: list[int] = []
    losses: list[float] = []
    offset, last_x, current = 0, None, None
    for rnd, step, loss in rows:
        if rnd != current:
            current = rnd
            # A round whose steps restart (overlap the previous round) continues after it.
            if last_x is not None and step + offset <= last_x:
                offset = last_x + 1 - step
        x = step + offset
        last_x = x if last_x is None else max(last_x, x)
        if math.isfinite(loss):
            xs.append(x)
            losses.append(loss)
    if len(losses) < len(rows):
        logger.warning("%s: skipped %d non-finite losses", name, len(rows) - len(losses))
    return np.asarray(xs), np.asarray(losses)


def _ema(values: np.ndarray, alpha: float) -> np.ndarray:
    out = np.empty_like(values, dtype=np.float64)
    acc = float(values[0])
    for i, v in enumerate(values):
        acc = alpha * float(v) + (1 - alpha) * acc
        out[i] = acc
    return out


def _figure(figsize: tuple[float, float], nrows: int = 1, ncols: int = 1) -> tuple[Figure, Any]:
    fig = Figure(figsize=figsize, dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=True)
    return fig, axes


def _save(fig: Figure, path: Any) -> None:
    """Write `fig` as PNG atomically: temp file in the same directory, fsync, rename."""
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png")
    finally:
        fig.clear()
    atomic_write_bytes(path, buf.getvalue())
    logger.debug("wrote %s", path)
