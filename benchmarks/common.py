"""Helpers shared by the benchmark scripts: paths, machine facts, a loopback Ray, result files.

Benchmarks are run by hand (`python benchmarks/<name>.py`), never by the test suite. Each one
writes `benchmarks/results/<name>.json` (every number, plus the machine and its load) and
`benchmarks/results/<name>.md` (a table for people).
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DATA = REPO / ".." / "shared" / "data"  # CI clones the repo with shared/ beside it
WORKER_NICENESS = "RAY_worker_niceness"  # Ray's knob; its workers run at nice 15 by default


def sst_dir(root: Path | None = None) -> Path:
    """The SST-5 csv directory (train/dev/test.csv).

    Raises:
        FileNotFoundError: the data is missing; the message says where it was looked for.
    """
    path = (root or DATA / "sst").resolve()
    if not (path / "train.csv").is_file():
        raise FileNotFoundError(
            f"no SST data at {path}; put shared/ beside the repo or pass --data-dir DIR"
        )
    return path


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (what else ran on the machine while measuring)."""
    return [round(x, 2) for x in os.getloadavg()]


def machine() -> dict[str, Any]:
    """Versions and hardware facts that a benchmark number depends on."""
    import deepspeed
    import ray
    import torch
    import transformers

    return {
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "deepspeed": deepspeed.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.cuda.is_available(),
        "git_commit": git_commit(),
    }


def git_commit() -> str | None:
    """HEAD's short hash, with "+dirty" when tracked code differs from it (result files aside)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, check=True, capture_output=True,
                              text=True, timeout=10).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ".",
                      ":(exclude)benchmarks/results")
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}+dirty" if head and changed else head or None


@contextlib.contextmanager
def local_ray(num_cpus: int, node_ip: str = "127.0.0.3",
              worker_niceness: int | None = None) -> Iterator[None]:
    """A local Ray bound to a loopback address (127.0.0.2-254 stays off the network).

    Args:
        num_cpus: CPUs Ray may schedule.
        node_ip: the loopback address Ray binds.
        worker_niceness: nice value of Ray's worker processes. Ray's default is 15, so on a busy
            machine its workers get a small share of the CPU next to a driver at nice 0; pass
            the driver's niceness to compare the two on equal terms.
    """
    import ray

    if ray.is_initialized():
        raise RuntimeError("Ray is already initialised; the benchmark needs its own local Ray")
    old = os.environ.get(WORKER_NICENESS)
    if worker_niceness is not None:
        os.environ[WORKER_NICENESS] = str(worker_niceness)  # read by the raylet it starts
    try:
        ray.init(num_cpus=num_cpus, _node_ip_address=node_ip, include_dashboard=False,
                 log_to_driver=False)
    finally:
        if old is None:
            os.environ.pop(WORKER_NICENESS, None)
        else:
            os.environ[WORKER_NICENESS] = old
    try:
        yield
    finally:
        ray.shutdown()


def niceness() -> int:
    """This process's nice value."""
    return os.getpriority(os.PRIO_PROCESS, 0)


@contextlib.contextmanager
def scratch_dir(prefix: str) -> Iterator[str]:
    """A temporary directory (Ray Train storage, checkpoints) removed afterwards."""
    with tempfile.TemporaryDirectory(prefix=prefix) as d:
        yield d


def single_process_group() -> None:
    """Env for a one-process torch.distributed group on loopback (DeepSpeed outside Ray Train)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    for key, value in env.items():
        os.environ.setdefault(key, value)


def time_method(obj: Any, name: str, sink: dict[str, list[float]], key: str) -> None:
    """Wrap `obj.name` on this instance only, adding each call's wall time to `sink[key][-1]`."""
    fn = getattr(obj, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            sink[key][-1] += time.perf_counter() - t0

    setattr(obj, name, timed)


def summary(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max of repeated measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def write_results(name: str, data: dict[str, Any], markdown: str,
                  directory: Path | None = None) -> tuple[Path, Path]:
    """Write `<name>.json` and `<name>.md` atomically; returns both paths."""
    from ensemble.rundir import atomic_write_json, atomic_write_text

    out = directory or RESULTS
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    atomic_write_json(json_path, data)
    atomic_write_text(md_path, markdown)
    return json_path, md_path


def member_votes(run_dir: Path) -> tuple[dict[str, str], dict[str, Any], dict[str, Any]]:
    """A finished run's stacked member votes on dev and test, as its published combiner sees
    them (classifiers temperature-scaled, the regressor voting through its fitted sharpness).

    Returns:
        ({member: kind} in vote order, {split: (M, N, C) votes}, {split: (N,) labels}).
    """
    import numpy as np

    from ensemble import combine
    from ensemble.rundir import Manifest

    manifest = Manifest.load(run_dir)
    sharpness = manifest.combine.params.get("regressor_sharpness")
    temperatures = manifest.combine.params.get("temperatures")  # None: older runs
    kinds = dict(manifest.combine.members)  # the voting members (not a cascade-only student)
    stacked, labels = {}, {}
    for split in ("dev", "test"):
        with np.load(run_dir / "predictions" / f"{split}.npz") as z:
            outputs = {n: z[n] for n in kinds}
            labels[split] = z["labels"]
        stacked[split] = combine.member_votes(outputs, kinds, manifest.intensity_edges,
                                              len(manifest.label_names), sharpness, temperatures)
    return kinds, stacked, labels


def fitted_on_test(names: list[str], stacked: dict[str, Any], labels: dict[str, Any],
                   label_names: list[str], seed: int, combiner: str = "auto",
                   select_rule: str = "one_se", se: bool = False) -> dict[str, Any]:
    """Every combination method fitted on the dev votes and applied to the test votes; the
    method ``combiner`` picks under ``select_rule``, as `ensemble train` picks it. With ``se``,
    each method also gets the bootstrap SE of its test accuracy over the test texts."""
    from ensemble import combine
    from ensemble.metrics import classification_metrics
    from ensemble.tuning.weights import AUTO, candidates, choose, select

    methods = ("hard_vote", *AUTO)
    _, fitted = choose(stacked["dev"], labels["dev"], methods=methods, seed=seed, rule="best")
    # the choice `ensemble train` makes with this code and the run's settings, from the same fits
    chosen = select({m: fitted[m] for m in candidates(combiner)}, labels["dev"], select_rule,
                    seed=seed)
    out: dict[str, Any] = {"chosen": chosen.method, "select": select_rule, "members": names,
                           "methods": {}}
    for method, fit in fitted.items():
        probs = combine.apply(method, stacked["test"], fit.weights, fit.params)
        m = classification_metrics(labels["test"], probs, label_names)
        out["methods"][method] = {
            "dev": fit.dev_score,
            "out_of_fold": fit.out_of_fold,
            "weights": dict(zip(names, (round(float(w), 4) for w in fit.weights), strict=True)),
            "test_accuracy": m["accuracy"],
            "test_macro_f1": m["macro_f1"],
        }
        if se:
            correct = probs.argmax(axis=1) == labels["test"]
            out["methods"][method]["test_accuracy_se"] = bootstrap_se(correct)
    return out


def bootstrap_se(correct: Any, seed: int = 0, rounds: int = 1000) -> float:
    """SE of an accuracy over resamples of the texts (``correct``: one bool per text)."""
    import numpy as np

    correct = np.asarray(correct, dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, correct.size, size=(rounds, correct.size))
    return float(correct[idx].mean(axis=1).std(ddof=1))


def combiners_on_test(run_dir: Path, seed: int | None = None) -> dict[str, Any]:
    """Every combination method of a finished run, fitted on dev and scored on test.

    Reads the run's `predictions/{dev,test}.npz` (member probabilities; the regressor's
    intensities) and `manifest.json`, fits each method with `ensemble.tuning.weights.choose`
    exactly as `ensemble train` does (learned methods scored out-of-fold on dev, folds drawn with
    the run's `training.seed` unless `seed` is given), and applies each fitted combiner to test.
    Uniform voting (`soft_vote`, `hard_vote`) fits nothing.

    Returns:
        {"chosen": method picked on dev, "select": the run's combiner_select, "methods": {method:
        {"dev": score, "out_of_fold": bool, "weights": {member: w}, "test_accuracy",
        "test_macro_f1"}}}
    """
    from ensemble import config as C
    from ensemble.rundir import Manifest

    training = C.load(run_dir / "config.yaml").training
    kinds, stacked, labels = member_votes(run_dir)
    # the out-of-fold dev scores depend on the folds: the run's own seed picks what it picked
    return fitted_on_test(list(kinds), stacked, labels, Manifest.load(run_dir).label_names,
                          training.seed if seed is None else seed, training.combiner,
                          training.combiner_select)


def combiner_markdown(title: str, table: dict[str, Any]) -> str:
    """A markdown table of `combiners_on_test` output."""
    lines = [
        f"**{title}** (chosen on dev: `{table['chosen']}`"
        + (f", rule {table['select']})" if "select" in table else ")"),
        "",
        "| method | dev score | test acc | test macro-F1 | weights |",
        "|---|---:|---:|---:|---|",
    ]
    for method, r in table["methods"].items():
        weights = ", ".join(f"{n} {w:.2f}" for n, w in r["weights"].items())
        oof = " (out-of-fold)" if r["out_of_fold"] else ""
        lines.append(
            f"| {method} | {r['dev']:.3f}{oof} | {r['test_accuracy']:.3f} | "
            f"{r['test_macro_f1']:.3f} | {weights} |"
        )
    return "\n".join(lines) + "\n"
