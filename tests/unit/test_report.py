"""ensemble.report: the metrics table text and the PNG plots (valid, non-blank, atomic)."""

from __future__ import annotations

import stat
import struct

import numpy as np
import pytest
from matplotlib.image import imread

from ensemble.metrics import classification_metrics, regression_metrics, roc_curves
from ensemble.report import (
    _global_steps,
    metrics_table,
    plot_confusion,
    plot_intensity,
    plot_latency,
    plot_learning_curves,
    plot_reliability,
    plot_roc,
    plot_rounds,
    render,
    write_index,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NAMES = ["very negative", "negative", "neutral", "positive", "very positive"]


def _assert_png(path, min_width: int = 400, min_height: int = 300) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= min_width and height >= min_height, (width, height)
    assert len(data) > 10_000, f"{path.name} is suspiciously small ({len(data)} bytes)"
    pixels = imread(path)[..., :3]  # (H, W, 3) floats
    # Non-trivial picture: many distinct colours, not a blank canvas.
    assert pixels.std() > 0.05
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50
    # Atomic write: no temporary sibling left behind; readable by others.
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []
    assert path.stat().st_mode & stat.S_IROTH


@pytest.fixture(scope="module")
def evaluated():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 300)
    logits = rng.normal(size=(300, 5))
    logits[np.arange(300), labels] += 1.5
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    targets = rng.random(300)
    return {
        "labels": labels,
        "probs": probs,
        "cls": classification_metrics(labels, probs, NAMES),
        "reg": regression_metrics(targets, targets + rng.normal(0, 0.2, 300)),
    }


# ---- table -----------------------------------------------------------------------------------


def test_table_rows_columns_and_3_decimals():
    metrics = {
        "ensemble": {"accuracy": 0.5, "macro_f1": 0.45, "pearson": 0.7},
        "classifier": {"accuracy": 0.43219, "macro_f1": 0.40001, "n": 1101},
        "regressor": {"pearson": 0.61234, "spearman": 0.6, "mae": 0.1049},
    }
    text = render(metrics_table(metrics, "dev metrics"))
    assert "dev metrics" in text
    lines = text.splitlines()
    row = {name: next(line for line in lines if name in line) for name in metrics}
    assert "0.432" in row["classifier"] and "0.400" in row["classifier"]
    assert "0.612" in row["regressor"] and "0.105" in row["regressor"]
    assert row["classifier"].count("-") == 3  # pearson, spearman, MAE missing
    assert row["regressor"].count(" - ") == 2  # accuracy, macro-F1 missing
    # The ensemble comes last even though it was given first.
    assert lines.index(row["ensemble"]) > lines.index(row["regressor"])
    header = next(line for line in lines if "member" in line)
    for col in ["accuracy", "macro-F1", "pearson", "spearman", "MAE"]:
        assert col in header
    assert "params x" not in text and "speed-up x" not in text
    assert "\x1b[" not in text  # plain text, no ANSI codes


def test_table_student_ratio_columns_nested_and_bad_values(evaluated):
    metrics = {
        "teacher": {"classification": evaluated["cls"]},
        "student": {"accuracy": 0.4, "size_ratio": 0.2466, "speedup": 3.5},
        "broken": {"accuracy": float("nan"), "macro_f1": None, "pearson": True},
        "ensemble": {"classification": evaluated["cls"], "regression": evaluated["reg"]},
    }
    text = render(metrics_table(metrics, "test"))
    lines = text.splitlines()
    header = next(line for line in lines if "member" in line)
    assert "params x" in header and "speed-up x" in header
    student = next(line for line in lines if "student" in line)
    assert "0.247x" in student and "3.500x" in student
    teacher = next(line for line in lines if "teacher" in line)
    assert f"{evaluated['cls']['accuracy']:.3f}" in teacher
    assert teacher.count(" - ") == 5  # no regression metrics, no ratios
    for col in ["NLL", "ECE"]:
        assert col in header
    assert f"{evaluated['cls']['nll']:.3f}" in teacher
    ensemble = next(line for line in lines if "ensemble" in line)
    assert f"{evaluated['reg']['pearson']:.3f}" in ensemble
    assert f"{evaluated['cls']['macro_f1']:.3f}" in ensemble
    broken = next(line for line in lines if "broken" in line)
    assert "nan" not in broken.lower() and "true" not in broken.lower()
    assert broken.count(" - ") == 9


def test_table_calibration_columns_and_the_scaled_member_row():
    metrics = {
        "classifier": {"accuracy": 0.45, "macro_f1": 0.4, "nll": 1.4021, "ece": 0.1234,
                       "temperature": 1.5172, "nll_calibrated": 1.2511, "ece_calibrated": 0.0311},
        "regressor": {"accuracy": 0.40, "nll": 1.5, "ece": 0.05, "pearson": 0.6},
        "ensemble/soft_vote": {"accuracy": 0.5, "macro_f1": 0.45, "nll": 1.2, "ece": 0.02},
    }
    lines = render(metrics_table(metrics, "test")).splitlines()
    header = next(line for line in lines if "member" in line)
    assert header.index("macro-F1") < header.index("NLL") < header.index("ECE") < header.index(
        "pearson"
    )
    names = [line.split("│")[1].strip() for line in lines if line.startswith("│")]
    assert names == ["classifier", "classifier (T=1.52)", "regressor", "ensemble/soft_vote"]
    raw = next(line for line in lines if "classifier" in line and "T=" not in line)
    scaled = next(line for line in lines if "classifier (T=1.52)" in line)
    assert "1.402" in raw and "0.123" in raw
    assert "1.251" in scaled and "0.031" in scaled and "0.450" not in scaled
    assert scaled.count(" - ") == 0  # only NLL and ECE are filled in


def test_table_without_calibration_metrics_has_no_nll_columns():
    text = render(metrics_table({"regressor": {"pearson": 0.6}}, "dev"))
    assert "NLL" not in text and "ECE" not in text


def test_empty_table_renders():
    assert "nothing" in render(metrics_table({}, "nothing"))


# ---- plots -----------------------------------------------------------------------------------


def test_plot_confusion(tmp_path, evaluated):
    path = tmp_path / "plots" / "confusion.png"  # parent is created
    plot_confusion(evaluated["cls"]["confusion"], NAMES, path, "classifier on dev")
    _assert_png(path)


def test_plot_confusion_with_empty_row(tmp_path):
    plot_confusion([[3, 1, 0], [0, 0, 0], [1, 0, 2]], ["a", "b", "c"], tmp_path / "c.png", "t")
    _assert_png(tmp_path / "c.png", min_width=300)


def test_plot_confusion_rejects_wrong_shape(tmp_path):
    with pytest.raises(ValueError, match="pass one name per class"):
        plot_confusion([[1, 2], [3, 4]], ["a", "b", "c"], tmp_path / "c.png", "t")
    assert not list(tmp_path.iterdir())


def test_plot_roc(tmp_path, evaluated):
    curves = roc_curves(evaluated["labels"], evaluated["probs"], NAMES)
    plot_roc(curves, tmp_path / "roc.png", "classifier ROC")
    _assert_png(tmp_path / "roc.png")
    with pytest.raises(ValueError, match="no ROC curves"):
        plot_roc({}, tmp_path / "empty.png", "t")


def _history(steps_restart: bool) -> dict[str, list[dict]]:
    rng = np.random.default_rng(0)
    history = {}
    for name, base in [("classifier", 1.6), ("regressor", 0.2), ("student", 2.0)]:
        records = []
        for rnd in range(3):
            for s in range(1, 41):
                step = s if steps_restart else rnd * 40 + s
                loss = base * np.exp(-(rnd * 40 + s) / 60) + 0.02 * rng.random()
                records.append({"step": step, "loss": loss, "round": rnd, "lr": 1e-4})
        history[name] = records
    return history


@pytest.mark.parametrize("steps_restart", [True, False])
def test_plot_learning_curves(tmp_path, steps_restart):
    history = _history(steps_restart)
    history["teacher"] = [{"step": 1, "loss": 0.0}, {"step": 2, "loss": float("nan")}]
    plot_learning_curves(history, tmp_path / "lc.png")
    _assert_png(tmp_path / "lc.png")


def test_learning_curve_steps_run_on_across_rounds():
    records = [{"step": s, "loss": 1.0, "round": r} for r in (1, 2) for s in range(1, 4)]
    x, _ = _global_steps("m", list(reversed(records)))  # order of records does not matter
    assert x.tolist() == [1, 2, 3, 4, 5, 6]
    zero_based = [{"step": s, "loss": 1.0, "round": r} for r in (0, 1) for s in range(3)]
    assert _global_steps("m", zero_based)[0].tolist() == [0, 1, 2, 3, 4, 5]
    already_global = [{"step": 10 * r + s, "loss": 1.0, "round": r} for r in (0, 1) for s in (1, 5)]
    assert _global_steps("m", already_global)[0].tolist() == [1, 5, 11, 15]
    x, y = _global_steps("m", [{"step": 1, "loss": float("inf")}, {"step": 2, "loss": 0.5}])
    assert (x.tolist(), y.tolist()) == ([2], [0.5])


def test_plot_learning_curves_rejects_bad_history(tmp_path):
    with pytest.raises(ValueError, match="needs 'step' and 'loss'"):
        plot_learning_curves({"m": [{"loss": 1.0}]}, tmp_path / "lc.png")
    with pytest.raises(ValueError, match="no finite losses"):
        plot_learning_curves({"m": [], "n": [{"step": 1, "loss": float("nan")}]}, tmp_path / "x")


def test_plot_rounds(tmp_path):
    rounds = [
        {
            "round": r,
            "dev": {
                "classifier": {"accuracy": 0.3 + 0.05 * r, "macro_f1": 0.25 + 0.05 * r},
                "regressor": {"regression": {"pearson": 0.4 + 0.1 * r, "mae": 0.2 - 0.02 * r}},
                "ensemble": {"accuracy": 0.35 + 0.05 * r, "macro_f1": 0.3, "pearson": 0.5},
            },
        }
        for r in (3, 1, 2)  # unsorted rounds are drawn in order
    ]
    plot_rounds(rounds, tmp_path / "rounds.png")
    _assert_png(tmp_path / "rounds.png")
    plot_rounds(rounds[:1], tmp_path / "rounds.png")  # one round, overwrite in place
    _assert_png(tmp_path / "rounds.png")


def test_plot_reliability(tmp_path, evaluated):
    labels, probs = evaluated["labels"], evaluated["probs"]
    sharp = probs**3 / (probs**3).sum(axis=1, keepdims=True)  # overconfident
    panels = {
        "members as trained": {"classifier": sharp, "teacher": probs},
        "as combined": {"classifier": probs, "teacher": probs,
                        "ensemble/soft_vote": (probs + sharp) / 2},
    }
    plot_reliability(labels, panels, tmp_path / "plots" / "reliability.png")
    _assert_png(tmp_path / "plots" / "reliability.png")
    plot_reliability(labels, {"test": {"classifier": probs}}, tmp_path / "one.png")
    _assert_png(tmp_path / "one.png")
    with pytest.raises(ValueError, match="no probabilities to plot"):
        plot_reliability(labels, {"test": {}}, tmp_path / "none.png")


def test_plot_rounds_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="needs keys 'round' and 'dev'"):
        plot_rounds([{"dev": {}}], tmp_path / "r.png")
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_rounds([{"round": 1, "dev": {"m": {"loss": 1.0}}}], tmp_path / "r.png")


def test_plot_intensity(tmp_path):
    rng = np.random.default_rng(1)
    true = rng.random(400)
    plot_intensity(true, {"regressor": true + rng.normal(0, 0.1, 400),
                          "ensemble": true + rng.normal(0, 0.05, 400)},
                   tmp_path / "intensity.png", "intensity (test)")
    _assert_png(tmp_path / "intensity.png")
    with pytest.raises(ValueError, match="do not match"):
        plot_intensity(true, {"regressor": true[:10]}, tmp_path / "bad.png", "t")
    with pytest.raises(ValueError, match="no intensity estimates"):
        plot_intensity(true, {}, tmp_path / "none.png", "t")


def test_plot_latency_skips_points_without_answers(tmp_path):
    row = lambda p50: {"p50_ms": p50, "p99_ms": None if p50 is None else 2 * p50}  # noqa: E731
    results = {"ensemble": {"1": row(80.0), "8": row(300.0), "32": row(900.0)},
               "member:student": {"1": row(30.0), "8": row(None), "32": row(400.0)}}
    plot_latency(results, tmp_path / "latency.png")
    _assert_png(tmp_path / "latency.png")
    with pytest.raises(ValueError, match="no load-test results"):
        plot_latency({}, tmp_path / "none.png")


def test_index_page_shows_the_metrics_table_and_every_plot(tmp_path, evaluated):
    plots = tmp_path / "plots"
    plot_confusion(evaluated["cls"]["confusion"], NAMES, plots / "confusion_a_b.png", "a")
    plot_reliability(evaluated["labels"], {"test": {"m": evaluated["probs"]}},
                     plots / "reliability.png")
    metrics = {"test": {"m<1>": {"accuracy": 0.5, "nll": 1.25},
                        "ensemble/soft_vote": {"accuracy": 0.55, "nll": 1.1, "pearson": 0.7}},
               "combine": {"method": "soft_vote"}}
    page = write_index(tmp_path, metrics, "run & co").read_text()
    assert "<title>run &amp; co</title>" in page and "m&lt;1&gt;" in page  # escaped
    assert '<tr class="published"><td>ensemble/soft_vote</td><td>0.5500</td>' in page
    assert "<th>pearson</th>" in page and "<th>ECE</th>" not in page  # columns some row has
    for png in ("plots/confusion_a_b.png", "plots/reliability.png"):
        assert f'<img src="{png}"' in page
    assert "<figcaption>confusion a b</figcaption>" in page
