"""Read raw example tables from local files, the Hugging Face hub or the VADER lexicon.

This module only finds and reads data; turning columns into validated arrays and carving missing
splits happens in `ensemble.data.load_splits`. Every reader returns `RawTable`s keyed by split
name ("train", "dev", "test"); a split the source does not have is simply absent.

Local files are read with `datasets.load_dataset("csv" | "json" | "parquet", ...)`. CSV cells are
read as strings (only an empty cell is missing), so a sentence such as "NA" or "None" stays text
and labels or intensities are parsed later with row-level error messages.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import importlib.resources
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ensemble.config import DataConfig

logger = logging.getLogger(__name__)

SPLITS = ("train", "dev", "test")
VADER_SOURCE = "vader_lexicon"
VADER_LABELS = ["negative", "neutral", "positive"]
# |mean rating| below this is "neutral"; see `read_vader_lexicon` for why 1.0.
VADER_NEUTRAL_BAND = 1.0

# file stem -> split, for directories without `data.files`
_STEMS = {"train": ("train",), "dev": ("dev", "validation", "valid", "val"), "test": ("test",)}
_EXTENSIONS = {
    ".csv": "csv",
    ".tsv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
}
# hub split names tried, in order, when `data.files` does not name one
_HUB_SPLITS = {"train": ("train",), "dev": ("validation", "dev", "valid"), "test": ("test",)}


class DataError(ValueError):
    """A problem with the data; the message names the file or rows and the config key to fix."""


@dataclass(frozen=True)
class RawTable:
    """One split as read from its source, before validation.

    Attributes:
        columns: column name -> values in row order.
        origin: where it came from, for error messages (a path, or "hub <name>[<split>]").
        label_names: class names stored with the data (a hub `ClassLabel` feature), if any.
    """

    columns: dict[str, list[Any]]
    origin: str
    label_names: list[str] | None = None

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()), []))


def read_source(cfg: DataConfig) -> tuple[dict[str, RawTable], DataConfig]:
    """Read every split `cfg.source` provides.

    Args:
        cfg: the data config; `source`, `format`, `files` and `hub_config` select the reader.

    Returns:
        (tables, cfg) where tables maps split name -> RawTable and holds at least "train". The
        returned config is `cfg`, except for the VADER lexicon, whose fixed column names (and
        default label names) replace the configured ones.

    Raises:
        DataError: the source does not exist, cannot be read, or has no training split.
    """
    fmt = _detect_format(cfg)
    if fmt == VADER_SOURCE:
        path = None if cfg.source == VADER_SOURCE else Path(cfg.source)
        _reject_files(cfg, "the VADER lexicon")
        if cfg.label_names is not None and len(cfg.label_names) != len(VADER_LABELS):
            raise DataError(
                f"the VADER lexicon has 3 classes {VADER_LABELS} but data.label_names has "
                f"{len(cfg.label_names)}; give 3 names (negative, neutral, positive order) or null"
            )
        vader_cfg = dataclasses.replace(
            cfg,
            text_column="text",
            label_column="label",
            intensity_column="intensity" if cfg.intensity_column else None,
            label_names=cfg.label_names or list(VADER_LABELS),
        )
        return {"train": read_vader_lexicon(path)}, vader_cfg
    if fmt == "hub":
        return _read_hub(cfg), cfg
    path = Path(cfg.source)
    if path.is_dir():
        return _read_directory(path, cfg), cfg
    _reject_files(cfg, "a single file")
    return {"train": read_file(path, _forced(cfg), cfg.label_column)}, cfg


def _forced(cfg: DataConfig) -> str | None:
    return None if cfg.format == "auto" else cfg.format


def _detect_format(cfg: DataConfig) -> str:
    if cfg.format in ("hub", VADER_SOURCE):
        return cfg.format
    if cfg.source == VADER_SOURCE:
        if cfg.format != "auto":
            raise DataError(
                f"data.source={VADER_SOURCE!r} cannot be read as data.format={cfg.format!r}; "
                f"set data.format to auto or {VADER_SOURCE}"
            )
        return VADER_SOURCE
    path = Path(cfg.source)
    if path.exists():
        return cfg.format
    if cfg.format == "auto" and _looks_like_hub_name(cfg.source):
        return "hub"
    raise DataError(
        f"data.source={cfg.source!r} does not exist (looked in {Path.cwd()}); point data.source "
        f"at a directory of train/dev/test files, a single csv/json/parquet file, a Hugging Face "
        f"hub dataset name, or {VADER_SOURCE!r}"
    )


def _looks_like_hub_name(source: str) -> bool:
    """`name` or `org/name` with no path syntax and no file extension."""
    if not source or source.startswith((".", "/", "~")) or "\\" in source:
        return False
    if source.count("/") > 1 or Path(source).suffix.lower() in _EXTENSIONS:
        return False
    return all(c.isalnum() or c in "-_./" for c in source)


def _reject_files(cfg: DataConfig, what: str) -> None:
    if cfg.files:
        raise DataError(
            f"data.files={dict(cfg.files)} only applies when data.source is a directory or a hub "
            f"dataset, but data.source={cfg.source!r} is {what}; remove data.files"
        )


def _read_directory(root: Path, cfg: DataConfig) -> dict[str, RawTable]:
    tables = {}
    for split in SPLITS:
        if split in cfg.files:
            path = root / cfg.files[split]
            if not path.is_file():
                raise DataError(
                    f"data.files.{split}={cfg.files[split]!r} is not a file in {root} "
                    f"(found: {_listing(root)}); fix the file name in data.files"
                )
        else:
            found = [
                p
                for p in sorted(root.iterdir())
                if p.is_file()
                and p.suffix.lower() in _EXTENSIONS
                and p.name[: -len(p.suffix)].lower() in _STEMS[split]
            ]
            if len(found) > 1:
                names = [p.name for p in found]
                raise DataError(
                    f"{root} has several {split} files {names}; pick one with data.files.{split}"
                )
            if not found:
                continue
            path = found[0]
        tables[split] = read_file(path, _forced(cfg), cfg.label_column)
    if "train" not in tables:
        raise DataError(
            f"no training file in {root} (found: {_listing(root)}); name it train.csv / "
            "train.json / train.jsonl / train.parquet, or set data.files.train"
        )
    logger.info("data: read %s from %s", sorted(tables), root)
    return tables


def _listing(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())[:20]


def read_file(path: Path, fmt: str | None = None, label_column: str | None = None) -> RawTable:
    """Read one csv/tsv/json/jsonl/parquet file with `datasets`.

    Args:
        path: the file.
        fmt: "csv", "json" or "parquet"; None infers it from the extension.
        label_column: whose `ClassLabel` names (parquet written by `datasets`) to keep.

    Returns:
        The file's columns. CSV values are strings (None for an empty cell).

    Raises:
        DataError: the file is missing, its format is unknown, or it cannot be parsed.
    """
    import datasets  # heavy (pandas, pyarrow, fsspec): imported only when data is read

    if not path.is_file():
        raise DataError(f"data file {str(path)!r} not found; fix data.source or data.files")
    fmt = fmt or _EXTENSIONS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(
            f"cannot tell the format of {path.name} from its extension; rename it to "
            f"{'/'.join(_EXTENSIONS)} or set data.format to csv, json or parquet"
        )
    if fmt in ("csv", "json"):
        _check_utf8(path)
    kwargs: dict[str, Any] = {}
    if fmt == "csv":
        sep = "\t" if path.suffix.lower() == ".tsv" else ","
        header = _csv_header(path, sep)
        kwargs = {
            "sep": sep,
            # every column as text; only an empty cell is missing ("NA", "None" stay words)
            "features": datasets.Features({name: datasets.Value("string") for name in header}),
            "keep_default_na": False,
            "na_values": [""],
        }
    if not _has_rows(path, fmt):
        raise DataError(
            f"{path} has no data rows (an empty split); add examples, or remove the file so a "
            "missing dev/test split is carved out of train (data.dev_fraction, data.test_fraction)"
        )
    try:
        dset = datasets.load_dataset(fmt, data_files={"train": str(path)}, split="train", **kwargs)
    except Exception as err:  # datasets/pandas/pyarrow raise many types for unreadable files
        raise DataError(
            f"could not read {path} as {fmt}: {type(err).__name__}: {err}. Check the file, or "
            "set data.format if the extension is misleading"
        ) from err
    return _table_from_dataset(dset, str(path), label_column)


def _check_utf8(path: Path) -> None:
    """Text data must be UTF-8; say where it is not and how to convert it."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(
            f"{path} is not UTF-8 text: byte 0x{data[err.start]:02x} on line {line} cannot be "
            f"decoded; convert the file, e.g. `iconv -f latin1 -t utf-8 {path.name} > "
            f"{path.stem}.utf8{path.suffix}`, and point data.source at the converted file"
        ) from None


def _has_rows(path: Path, fmt: str) -> bool:
    """Whether the file holds any example (`datasets` fails obscurely on empty files)."""
    if fmt == "csv":
        with open(path, newline="", encoding="utf-8") as f:
            sep = "\t" if path.suffix.lower() == ".tsv" else ","
            rows = csv.reader(f, delimiter=sep)
            return next(rows, None) is not None and any(any(row) for row in rows)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.read_metadata(path).num_rows > 0
    with open(path, encoding="utf-8") as f:
        head = f.read(64).strip()
    return head not in ("", "[]")


def _csv_header(path: Path, sep: str) -> list[str]:
    with open(path, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f, delimiter=sep), None)
    if not header:
        raise DataError(f"{path} is empty; a CSV needs a header row naming its columns")
    dupes = sorted({name for name in header if header.count(name) > 1})
    if dupes:
        raise DataError(f"{path} repeats column name(s) {dupes} in its header; rename them")
    return header


def _table_from_dataset(dset: Any, origin: str, label_column: str | None) -> RawTable:
    import datasets

    columns = {name: dset[name][:] for name in dset.column_names}
    label = dset.features.get(label_column) if label_column else None
    names = list(label.names) if isinstance(label, datasets.ClassLabel) else None
    return RawTable(columns=columns, origin=origin, label_names=names)


def _read_hub(cfg: DataConfig) -> dict[str, RawTable]:
    import datasets

    try:
        dsets = datasets.load_dataset(cfg.source, cfg.hub_config)
    except Exception as err:  # network, auth, unknown name and bad config all land here
        where = (
            "" if Path(cfg.source).exists() else "no local file or directory has that name, and "
        )
        raise DataError(
            f"could not load data.source={cfg.source!r} (data.hub_config={cfg.hub_config!r}): "
            f"{where}loading it from the Hugging Face hub failed with {type(err).__name__}: {err}. "
            "Check the dataset name and config, the network (or the HF_HUB_OFFLINE cache), or "
            "use a local path"
        ) from err
    available = list(dsets.keys())
    tables = {}
    for split in SPLITS:
        if split in cfg.files:
            name = cfg.files[split]
            if name not in available:
                hint = difflib.get_close_matches(name, available, n=1)
                raise DataError(
                    f"data.files.{split}={name!r} is not a split of {cfg.source!r}; it has "
                    f"{available}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                )
        else:
            name = next((s for s in _HUB_SPLITS[split] if s in available), None)
            if name is None:
                continue
        tables[split] = _table_from_dataset(
            dsets[name], f"hub {cfg.source}[{name}]", cfg.label_column
        )
    if "train" not in tables:
        raise DataError(
            f"{cfg.source!r} has no 'train' split (it has {available}); name the training split "
            "with data.files.train"
        )
    return tables


def read_vader_lexicon(path: Path | None = None) -> RawTable:
    """Read the VADER sentiment lexicon as a 3-class word-level dataset.

    Each line is ``token<TAB>mean<TAB>sd<TAB>[ten ratings]``; ratings are integers in [-4, 4].
    Text is the token, intensity the mean rating (on [-4, 4]) and the label is

    * 0 negative: mean <= -1.0
    * 1 neutral:  -1.0 < mean < 1.0
    * 2 positive: mean >= +1.0

    Why a band of 1.0: VADER kept only tokens with a non-zero mean, so splitting on the sign
    alone leaves almost no neutral class, while a mean below 1 in magnitude means the typical
    rater scored the token less than "slightly" positive or negative. The band gives about 43% /
    22% / 34% of the 7,506 tokens. The classes are ordinal in intensity, as `Splits` assumes.
    A token listed twice keeps its last line, as in `vaderSentiment`'s own lookup table.

    Args:
        path: a lexicon file in the same format; None reads the copy shipped inside the
            installed `vaderSentiment` package.

    Returns:
        A RawTable with columns text, label (int 0..2) and intensity (float).

    Raises:
        DataError: the package or file is missing, or a line is malformed.
    """
    if path is None:
        try:
            text = importlib.resources.files("vaderSentiment").joinpath("vader_lexicon.txt")
            content, origin = text.read_text(encoding="utf-8"), str(text)
        except (ModuleNotFoundError, FileNotFoundError) as err:
            raise DataError(
                "data.source=vader_lexicon needs the vaderSentiment package: pip install "
                "vaderSentiment (or point data.source at a lexicon file)"
            ) from err
    else:
        if not path.is_file():
            raise DataError(f"lexicon file {str(path)!r} not found; fix data.source")
        content, origin = path.read_text(encoding="utf-8"), str(path)
    entries: dict[str, float] = {}
    for lineno, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("\t")
        try:
            entries[parts[0]] = float(parts[1])
        except (IndexError, ValueError) as err:
            raise DataError(
                f"{origin} line {lineno} is not 'token<TAB>mean<TAB>...': {line[:60]!r}"
            ) from err
    if not entries:
        raise DataError(f"{origin} holds no lexicon entries")
    means = list(entries.values())
    labels = [0 if m <= -VADER_NEUTRAL_BAND else 2 if m >= VADER_NEUTRAL_BAND else 1 for m in means]
    columns = {"text": list(entries), "label": labels, "intensity": means}
    return RawTable(columns=columns, origin=origin)
