"""The data layer: load, validate and split labelled texts into plain arrays.

`load_splits(cfg)` reads the source named by a `DataConfig` (see `ensemble.data.sources`), checks
every row before any training starts, carves dev/test out of train when the source lacks them, and
returns `Splits`: lists and numpy arrays that pickle cheaply through Ray's object store.

Pure module: no ray or deepspeed imports.
"""

from __future__ import annotations

import difflib
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ensemble.config import DataConfig
from ensemble.data.sources import (
    SPLITS,
    VADER_LABELS,
    VADER_NEUTRAL_BAND,
    DataError,
    RawTable,
    read_file,
    read_source,
    read_vader_lexicon,
)

__all__ = [
    "SPLITS",
    "VADER_LABELS",
    "VADER_NEUTRAL_BAND",
    "DataError",
    "RawTable",
    "Splits",
    "load_splits",
    "read_file",
    "read_source",
    "read_vader_lexicon",
]

logger = logging.getLogger(__name__)

_SHOW = 8  # rows named in an error message
Arrays = tuple[dict[str, list[str]], dict[str, np.ndarray], dict[str, np.ndarray]]


@dataclass
class Splits:
    """Plain, picklable arrays (they travel through Ray's object store).

    The classes are assumed ordinal in intensity (class c+1 is more positive than class c), which
    holds for SST-5 and for the VADER lexicon's negative/neutral/positive; `intensity_edges` bins
    a regressor's intensity into classes on that assumption.

    Attributes:
        texts: split ("train"/"dev"/"test") -> texts.
        labels: split -> (N,) int64 class indices in [0, C).
        intensity: split -> (N,) float32, or None when no intensity column is configured.
        label_names: C class names in index order.
    """

    texts: dict[str, list[str]]
    labels: dict[str, np.ndarray]
    intensity: dict[str, np.ndarray] | None
    label_names: list[str]

    def __post_init__(self) -> None:
        self.labels = {k: np.asarray(v, dtype=np.int64) for k, v in self.labels.items()}
        if self.intensity is not None:
            self.intensity = {k: np.asarray(v, dtype=np.float32) for k, v in self.intensity.items()}
        if "train" not in self.texts or set(self.labels) != set(self.texts):
            raise ValueError("Splits needs a 'train' split and labels for exactly the text splits")
        for split, texts in self.texts.items():
            sizes = {len(texts), len(self.labels[split])}
            if self.intensity is not None:
                sizes.add(len(self.intensity[split]))
            if len(sizes) != 1:
                raise ValueError(f"split {split!r}: texts, labels and intensity differ in length")

    def num_labels(self) -> int:
        """C, the number of classes."""
        return len(self.label_names)

    def class_intensity(self) -> list[float]:
        """Mean training intensity of each class (len C).

        Without intensities, C evenly spaced values on [0, 1]. A class with no training example
        gets a value interpolated from its neighbours by class index.
        """
        c = self.num_labels()
        if self.intensity is None:
            return np.linspace(0.0, 1.0, c).tolist()
        y, x = self.labels["train"], self.intensity["train"].astype(np.float64)
        counts = np.bincount(y, minlength=c)
        sums = np.bincount(y, weights=x, minlength=c)
        present = np.flatnonzero(counts)
        means = sums[present] / counts[present]
        return np.interp(np.arange(c), present, means).tolist()

    def intensity_edges(self) -> list[float]:
        """C-1 strictly ascending bin edges that turn an intensity into a class.

        When the training intensities separate the classes (every text of class c is at most as
        intense as every text of class c+1, as when the labels were cut from the intensity, e.g.
        SST-5 or VADER), each edge lies midway between the two classes' nearest texts, i.e. on the
        cut the labels came from. Otherwise each edge is the midpoint between consecutive class
        mean intensities (`class_intensity`), sorted first so the edges ascend even if the data
        break the ordinal assumption. Ties are nudged apart by one ulp.
        """
        separated = self._separating_edges()
        if separated is not None:
            return separated
        ci = np.sort(np.asarray(self.class_intensity(), dtype=np.float64))
        edges = (ci[1:] + ci[:-1]) / 2.0
        for i in range(1, len(edges)):
            if edges[i] <= edges[i - 1]:
                edges[i] = np.nextafter(edges[i - 1], np.inf)
        return edges.tolist()

    def _separating_edges(self) -> list[float] | None:
        """Edges midway between adjacent classes when intensity separates them, else None."""
        if self.intensity is None:
            return None
        y, x = self.labels["train"], self.intensity["train"].astype(np.float64)
        c = self.num_labels()
        if np.any(np.bincount(y, minlength=c) == 0):
            return None
        lo = np.array([x[y == k].min() for k in range(c)])
        hi = np.array([x[y == k].max() for k in range(c)])
        if np.any(hi[:-1] >= lo[1:]):  # overlapping (or touching) classes: no clean cut
            return None
        return ((hi[:-1] + lo[1:]) / 2.0).tolist()

    def intensity_range(self) -> tuple[float, float]:
        """(min, max) training intensity; (0.0, 1.0) without intensities."""
        if self.intensity is None:
            return 0.0, 1.0
        x = self.intensity["train"]
        return float(x.min()), float(x.max())

    def summary(self) -> dict[str, Any]:
        """JSON-safe counts per split and per class, plus the intensity range."""
        c = self.num_labels()
        splits = {}
        for split, y in self.labels.items():
            counts = np.bincount(y, minlength=c)
            per_class = {name: int(n) for name, n in zip(self.label_names, counts, strict=True)}
            splits[split] = {"n": int(len(y)), "per_class": per_class}
        return {
            "num_labels": c,
            "label_names": list(self.label_names),
            "splits": splits,
            "intensity_range": None if self.intensity is None else list(self.intensity_range()),
        }


def load_splits(cfg: DataConfig) -> Splits:
    """Load, validate and split the data a `DataConfig` describes.

    Steps: read the source; check columns, texts, labels and intensities of every split (all
    problems are reported together); carve missing dev/test splits out of train with
    `cfg.dev_fraction` / `cfg.test_fraction`, stratified by label and seeded by `cfg.split_seed`;
    subsample to `cfg.max_train_samples` / `cfg.max_eval_samples` (seeded).

    Labels may be class indices or strings. Strings map through `cfg.label_names`; without it,
    strings that all look like integers are indices and other strings become classes in sorted
    order. Class names default to `cfg.label_names`, then names stored with the data (a hub
    `ClassLabel`), then "0".."C-1".

    Args:
        cfg: the data config.

    Returns:
        Splits with "train", "dev" and "test".

    Raises:
        DataError: any problem with the source or its rows, naming the rows and the fix.
    """
    tables, cfg = read_source(cfg)
    _check_columns(tables, cfg)
    names = cfg.label_names or next((t.label_names for t in tables.values() if t.label_names), None)
    problems: list[str] = []
    names = _resolve_names(tables, cfg, names)
    texts, labels, intensity = {}, {}, {}
    for split, table in tables.items():
        texts[split] = _texts(table, split, cfg.text_column, problems)
        labels[split] = _labels(table, split, cfg.label_column, names, problems)
        if cfg.intensity_column is not None:
            intensity[split] = _intensity(table, split, cfg.intensity_column, problems)
    if problems:
        raise DataError("invalid data:\n  - " + "\n  - ".join(problems))
    arrays = _carve(texts, labels, intensity, cfg=cfg)
    texts, labels, intensity = (
        {s: part[s] for s in SPLITS if s in part} for part in _subsample(*arrays, cfg=cfg)
    )
    splits = Splits(texts, labels, intensity if cfg.intensity_column else None, names)
    _check_splits(splits, cfg)
    logger.info("data: %s", splits.summary())
    return splits


def _rows(table: RawTable, index: list[int] | np.ndarray) -> str:
    """`rows [3, 9] (id ['a', 'b'])` with at most _SHOW entries, for error messages."""
    index = [int(i) for i in index]
    shown, more = index[:_SHOW], len(index) - _SHOW
    text = f"row{'s' if len(index) > 1 else ''} {shown}"
    ids = table.columns.get("id")
    if ids is not None:
        text += f" (id {[ids[i] for i in shown]})"
    return text + (f" and {more} more" if more > 0 else "") + " (0-based data rows)"


def _check_columns(tables: dict[str, RawTable], cfg: DataConfig) -> None:
    problems = []
    keys = [("data.text_column", cfg.text_column), ("data.label_column", cfg.label_column)]
    if cfg.intensity_column is not None:
        keys.append(("data.intensity_column", cfg.intensity_column))
    for split, table in tables.items():
        have = list(table.columns)
        for key, column in keys:
            if column not in table.columns:
                close = difflib.get_close_matches(column, have, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                extra = " or null for no intensity" if key == "data.intensity_column" else ""
                problems.append(
                    f"{split} ({table.origin}) has no column {column!r}{hint}; its columns are "
                    f"{have}. Set {key} to one of them{extra}"
                )
    if problems:
        raise DataError("missing columns:\n  - " + "\n  - ".join(problems))


def _is_int_text(value: str) -> bool:
    return value.strip().lstrip("+-").isdigit()


def _resolve_names(
    tables: dict[str, RawTable], cfg: DataConfig, names: list[str] | None
) -> list[str]:
    if names is not None:
        return list(names)
    values = [v for t in tables.values() for v in t.columns[cfg.label_column] if v is not None]
    strings = {v for v in values if isinstance(v, str) and not _is_int_text(v)}
    if strings:
        logger.warning(
            "data: class order is the sorted label strings %s; set data.label_names to order "
            "them by intensity",
            sorted(strings),
        )
        return sorted(strings)
    top = max((i for i in map(_as_int, values) if i is not None), default=-1)
    if top >= 10_000:
        raise DataError(
            f"column {cfg.label_column!r} holds integers up to {top}, too many classes; point "
            "data.label_column at the class column or list the classes in data.label_names"
        )
    return [str(i) for i in range(top + 1)]


def _as_int(value: Any) -> int | None:
    """An integer label from an int, an integral float or an integer string; else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and _is_int_text(value):
        return int(value)
    return None


def _labels(
    table: RawTable, split: str, column: str, names: list[str], problems: list[str]
) -> np.ndarray:
    lookup = {name: i for i, name in enumerate(names)}
    out = np.full(len(table), -1, dtype=np.int64)
    missing, unknown, bad_rows = [], {}, []
    for row, value in enumerate(table.columns[column]):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            missing.append(row)
            continue
        index = lookup.get(value) if isinstance(value, str) else None
        if index is None:
            index = _as_int(value)
        if index is None or not 0 <= index < len(names):
            key = value if isinstance(value, (str, int, float)) else repr(value)
            unknown.setdefault(key, []).append(row)
            bad_rows.append(row)
            continue
        out[row] = index
    where = f"{split} ({table.origin})"
    if missing:
        problems.append(
            f"{where}: {len(missing)} missing label(s) in {column!r} at {_rows(table, missing)}; "
            "fill or drop those rows"
        )
    if unknown:
        values = sorted(unknown, key=str)[:_SHOW]
        problems.append(
            f"{where}: label value(s) {values} outside the label set at "
            f"{_rows(table, bad_rows)}; data.label_names has {len(names)} names {names[:10]} "
            f"(class indices 0..{len(names) - 1}) but these values appear. Fix the labels or "
            "set data.label_names to the full, ordered list of classes"
        )
    return out


def _texts(table: RawTable, split: str, column: str, problems: list[str]) -> list[str]:
    out, bad = [], []
    for row, value in enumerate(table.columns[column]):
        text = "" if value is None else str(value)
        if not text.strip() or (isinstance(value, float) and math.isnan(value)):
            bad.append(row)
        out.append(text)
    if bad:
        problems.append(
            f"{split} ({table.origin}): {len(bad)} empty or null text(s) in {column!r} at "
            f"{_rows(table, bad)}; drop or fill those rows"
        )
    return out


def _intensity(table: RawTable, split: str, column: str, problems: list[str]) -> np.ndarray:
    out = np.zeros(len(table), dtype=np.float32)
    bad = []
    for row, value in enumerate(table.columns[column]):
        try:
            x = float(value)  # None / "" / "abc" raise; bool is rejected below
        except (TypeError, ValueError):
            x = math.nan
        if isinstance(value, bool) or not math.isfinite(x):
            bad.append(row)
            continue
        out[row] = x
    if bad:
        shown = [table.columns[column][i] for i in bad[:_SHOW]]
        problems.append(
            f"{split} ({table.origin}): {len(bad)} missing, non-numeric or non-finite "
            f"intensit{'y' if len(bad) == 1 else 'ies'} in {column!r} (values {shown}) at "
            f"{_rows(table, bad)}; fix them, or set data.intensity_column=null to train without "
            "intensity"
        )
    return out


def _take(
    texts: list[str], labels: np.ndarray, intensity: np.ndarray | None, idx: np.ndarray
) -> tuple[list[str], np.ndarray, np.ndarray | None]:
    return [texts[i] for i in idx], labels[idx], None if intensity is None else intensity[idx]


def _quotas(counts: np.ndarray, fraction: float, target: int) -> np.ndarray:
    """Per-class sizes summing to `target` (largest remainder), each <= its class count."""
    exact = counts * fraction
    quota = np.floor(exact).astype(np.int64)
    for c in np.argsort(-(exact - quota), kind="stable"):
        if quota.sum() >= target:
            break
        if quota[c] < counts[c]:
            quota[c] += 1
    return quota


def _carve(*arrays: Any, cfg: DataConfig) -> Arrays:
    """Split missing dev/test out of train: stratified by label, seeded, order preserved."""
    texts, labels, intensity = arrays
    wanted = {s: f for s, f in (("test", cfg.test_fraction), ("dev", cfg.dev_fraction))}
    wanted = {s: f for s, f in wanted.items() if s not in texts}
    if not wanted:
        return texts, labels, intensity
    rng = np.random.default_rng(cfg.split_seed)
    y = labels["train"]
    n = len(y)
    pools = [rng.permutation(np.flatnonzero(y == c)) for c in range(int(y.max(initial=0)) + 1)]
    remaining = np.array([len(p) for p in pools])
    taken = np.zeros_like(remaining)
    parts: dict[str, np.ndarray] = {}
    left = 1.0
    for split, fraction in wanted.items():  # test first, so dev_fraction means the same either way
        target = max(1, round(n * fraction)) if fraction > 0 and n > 1 else 0
        quota = _quotas(remaining, fraction / left, target)
        parts[split] = np.sort(
            np.concatenate([p[t : t + q] for p, t, q in zip(pools, taken, quota, strict=True)])
        ).astype(np.int64)
        taken, remaining, left = taken + quota, remaining - quota, left - fraction
    parts["train"] = np.sort(
        np.concatenate([p[t:] for p, t in zip(pools, taken, strict=True)])
    ).astype(np.int64)
    train = (texts["train"], y, intensity.get("train"))
    for split, idx in parts.items():
        texts[split], labels[split], x = _take(*train, idx)
        if x is not None:
            intensity[split] = x
    logger.info(
        "data: carved %s out of train (seed %d)",
        {s: len(parts[s]) for s in wanted},
        cfg.split_seed,
    )
    return texts, labels, intensity


def _subsample(*arrays: Any, cfg: DataConfig) -> Arrays:
    texts, labels, intensity = arrays
    for i, split in enumerate(SPLITS):
        limit = cfg.max_train_samples if split == "train" else cfg.max_eval_samples
        if split not in texts or limit is None or len(texts[split]) <= limit:
            continue
        rng = np.random.default_rng([cfg.split_seed, i])
        idx = np.sort(rng.choice(len(texts[split]), size=limit, replace=False))
        texts[split], labels[split], x = _take(
            texts[split], labels[split], intensity.get(split), idx
        )
        if x is not None:
            intensity[split] = x
    return texts, labels, intensity


def _check_splits(splits: Splits, cfg: DataConfig) -> None:
    problems = []
    for split in SPLITS:
        if not splits.texts.get(split):
            fix = (
                f"raise data.{split}_fraction"
                if split != "train"
                else "lower data.dev_fraction / data.test_fraction"
            )
            problems.append(
                f"the {split} split is empty; give the source a non-empty {split} split "
                f"(data.files.{split}) or {fix}"
            )
    present = np.unique(splits.labels["train"])
    if len(present) < 2:
        names = [splits.label_names[i] for i in present]
        problems.append(
            f"the train split has {len(present)} class(es) {names}; a classifier needs at least 2. "
            "Check data.label_column and data.label_names, or raise data.max_train_samples"
        )
    if problems:
        raise DataError("invalid splits:\n  - " + "\n  - ".join(problems))
