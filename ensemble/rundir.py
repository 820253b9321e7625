"""The run directory: atomic writes and the manifest that serving and later runs load.

Layout of a run directory::

    manifest.json           # see `Manifest`; written last, atomically, after every round
    config.yaml             # the resolved RunConfig
    metrics.json            # evaluation of every member and of the ensemble
    rounds.json             # per-round table (dev metrics of members and ensemble)
    members/<name>/export/  # save_pretrained weights (safetensors) + tokenizer
    members/<name>/ray/     # Ray Train storage: DeepSpeed shards of every rank, per round
    plots/*.png

Every file is written to a temporary sibling and renamed into place, so an interrupted run never
leaves a half-written file that a later run would trust.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ensemble.combination import Combination
from ensemble.config import ConfigError

MANIFEST = "manifest.json"
STATE = "state.json"  # a run's progress (rounds, member checkpoints), for resuming
MANIFEST_VERSION = 1


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` via a temp file + fsync + rename (POSIX-atomic), mode 0644."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; run files are for everyone who reads them
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n")


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def atomic_replace_dir(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Move a fully written directory `src` into place at `dst`, replacing any old one.

    The old directory is renamed aside first and deleted only after the new one is in place, so
    at every instant `dst` is either the complete old or the complete new directory.
    """
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    old = dst.with_name(f".{dst.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    if old.exists():
        shutil.rmtree(old)


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@dataclass
class RunState:
    """A run's progress, saved as ``RUN_DIR/state.json`` after every step so a re-run resumes.

    Attributes:
        rounds_completed: rounds every member has finished.
        members: member -> its latest ``checkpoint`` (Ray Train checkpoint path), ``export``
            and whether early stopping ``stopped`` it.
        rounds: each completed round's row of dev metrics (also ``rounds.json``).
        history: member -> its training-loss points over every round.
        round_done: round (as a string) -> member -> True, for a round cut off part-way.
        member_info: member -> what its runner reported (params, stages, speed).
        distill: the ensemble-distillation stage's record (``done``, texts, KL before/after).
        trial_id, saved_by_trial, restored_from_trial, restored_from_round: Tune bookkeeping
            (which trial runs this state and which one's checkpoint PBT restored it from).
    """

    rounds_completed: int = 0
    members: dict[str, dict[str, Any]] = field(default_factory=dict)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    history: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    round_done: dict[str, dict[str, bool]] = field(default_factory=dict)
    member_info: dict[str, dict[str, Any]] = field(default_factory=dict)
    distill: dict[str, Any] | None = None
    trial_id: str | None = None
    saved_by_trial: str | None = None
    restored_from_trial: str | None = None
    restored_from_round: int = 0

    @classmethod
    def load(cls, run_dir: str | os.PathLike) -> RunState:
        """The state saved in ``run_dir`` (a fresh one when there is none yet).

        Raises:
            ConfigError: if the file holds keys this version does not know (the CLI prints it).
        """
        path = Path(run_dir) / STATE
        if not path.is_file():
            return cls()
        data = read_json(path)
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"{path} has unknown keys {unknown}; it was written by another "
                             "version of ensemble: start the run in a new output_dir")
        return cls(**data)

    def save(self, run_dir: str | os.PathLike) -> None:
        atomic_write_json(Path(run_dir) / STATE, asdict(self))


@dataclass
class MemberEntry:
    """What serving needs to load and interpret one member."""

    kind: str  # classifier | regressor | teacher | student
    path: str  # export dir, relative to the run directory
    num_labels: int  # 1 for the regressor
    max_length: int
    metrics: dict[str, Any] = field(default_factory=dict)
    params: int = 0


@dataclass
class Manifest:
    """The one file that describes a finished (or partly finished) run.

    `label_names` index the classes; `class_intensity[c]` is the mean intensity of class c on the
    training data and `intensity_edges` (len C-1) bin an intensity into a class, which is how the
    regressor votes. `combine` is the published `Combination` (method, weights, fitted params);
    given its manifest.json section (a dict), it is read into one and checked against the
    members.
    """

    name: str
    label_names: list[str]
    class_intensity: list[float]
    intensity_edges: list[float]
    intensity_range: list[float]
    members: dict[str, MemberEntry]
    combine: Combination
    rounds_completed: int = 0
    rounds_planned: int = 1
    metrics: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    version: int = MANIFEST_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.combine, Combination):
            self.combine = Combination.from_section(
                self.combine, {n: m.kind for n, m in self.members.items()}, self.label_names,
                self.class_intensity, self.intensity_edges)

    def member_path(self, run_dir: str | os.PathLike, name: str) -> Path:
        return Path(run_dir) / self.members[name].path

    def combination(self, method: str | None = None) -> Combination:
        """The published `Combination`, with ``method`` (e.g. from ``--method``) if given.

        Raises:
            ValueError: if ``method`` does not fit the run (e.g. ``weighted`` without weights).
        """
        spec = self.combine
        return spec if method in (None, spec.method) else replace(spec, method=method)

    def save(self, run_dir: str | os.PathLike) -> None:
        raw = {f.name: getattr(self, f.name) for f in fields(self)}
        raw["members"] = {n: asdict(m) for n, m in self.members.items()}
        raw["combine"] = self.combine.section()
        atomic_write_json(Path(run_dir) / MANIFEST, raw)

    @classmethod
    def load(cls, run_dir: str | os.PathLike) -> Manifest:
        path = Path(run_dir) / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: {run_dir} is not a finished run directory; "
                "run `ensemble train CONFIG` first or pass the run's output_dir"
            )
        raw = read_json(path)
        if raw.get("version") != MANIFEST_VERSION:
            raise ValueError(f"{path} has manifest version {raw.get('version')}, "
                             f"this ensemble reads version {MANIFEST_VERSION}")
        raw["members"] = {k: MemberEntry(**v) for k, v in raw["members"].items()}
        try:
            return cls(**raw)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
