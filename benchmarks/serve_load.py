"""Serving load test: latency and throughput of members, the ensemble, its sequential baseline,
the cascade, and batching on vs off.

    python benchmarks/serve_load.py RUN_DIR [--concurrency 1 8 32] [--max-seconds 8]
    python benchmarks/serve_load.py --tiny     # tiny random-init members (ensemble/testing.py)

Deploys RUN_DIR on a local Ray (127.0.0.5, HTTP on 127.0.0.1:18452), then for every scenario
switches the running app's settings live (no restarts) and drives it from a separate load
generator process (this script with ``--load``: asyncio + httpx, ``concurrency`` workers, bounded
request count and time, loopback only). Scenarios:

* ``member:<name>``: one member alone (``POST /members/<name>/predict``);
* ``ensemble``: all members in parallel (the default);
* ``sequential``: the same members called one after another;
* ``cascade``: the student first, the ensemble only when the student is unsure; the student
  runs inside the combiner (``cascade-hop``: in its own deployment, one more hop);
* ``ensemble-nobatch`` / ``member:<name>-nobatch``: ``max_batch_size=1``;
* ``ensemble-onepass``: batched, but each batch in one padded forward pass
  (``forward_chunk_size=0``) instead of length-sorted passes of ``--forward-chunk-size``.

Writes ``benchmarks/results/<--name, default serve_load>.{json,md,png}`` with p50/p99/mean
latency and throughput per scenario and concurrency (the PNG: p50 and p99 latency against
concurrency), plus the ratios the issue sets targets for, and the cascade's dev accuracy loss
computed from ``predictions/dev.npz`` with the fitted threshold. Each run also
records the CPU time every process spent per answered request (HTTP proxy, combiner, members,
Ray's own processes, the load generator), read from /proc before and after: on a small machine
that says where the cores went, which latency alone cannot.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PORT = 18452
# the headline ratios: (numerator scenario, denominator scenario, concurrency, statistic)
PAIRS = {
    "parallel_over_sequential_p50_c1": ("ensemble", "sequential", 1, "p50_ms"),
    "batching_throughput_ratio_c32": ("ensemble", "ensemble-nobatch", 32, "throughput_rps"),
    "cascade_over_ensemble_mean_latency_c1": ("cascade", "ensemble", 1, "mean_ms"),
}
TARGETS = {  # ratio -> (target, "<=" or ">=")
    "parallel_over_sequential_p50_c1": (0.7, "<="),
    "batching_throughput_ratio_c32": (3.0, ">="),
    "cascade_over_ensemble_mean_latency_c1": (0.4, "<="),
    "cascade_dev_accuracy_loss_points": (0.5, "<="),
}


# ------------------------------------------------------------------ load generator (subprocess)


async def _load(
    url: str,
    texts: list[str],
    concurrency: int,
    max_requests: int,
    max_seconds: float,
    timeout: float,
) -> dict[str, Any]:
    import httpx

    latencies: list[float] = []
    statuses: dict[str, int] = {}
    answered: dict[str, int] = {}
    counter = iter(range(max_requests))
    deadline = time.perf_counter() + max_seconds

    async def worker(client: httpx.AsyncClient) -> None:
        for i in counter:
            if time.perf_counter() > deadline:
                return
            start = time.perf_counter()
            try:
                r = await client.post(url, json={"text": texts[i % len(texts)]})
                key = str(r.status_code)
            except httpx.HTTPError as err:
                key, r = type(err).__name__, None
            statuses[key] = statuses.get(key, 0) + 1
            if r is not None and r.status_code == 200:
                latencies.append(time.perf_counter() - start)
                body = r.json()
                for p in body.get("predictions", []) if isinstance(body, dict) else []:
                    answered[p["answered_by"]] = answered.get(p["answered_by"], 0) + 1

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    ms = np.array(latencies) * 1000.0
    ok = len(latencies)
    return {
        "concurrency": concurrency,
        "requests": sum(statuses.values()),
        "ok": ok,
        "errors": sum(statuses.values()) - ok,
        "statuses": statuses,
        "elapsed_s": elapsed,
        "throughput_rps": ok / elapsed if elapsed > 0 else 0.0,
        "p50_ms": float(np.percentile(ms, 50)) if ok else None,
        "p99_ms": float(np.percentile(ms, 99)) if ok else None,
        "mean_ms": float(ms.mean()) if ok else None,
        "answered_by": answered,
    }


def _load_main(args: argparse.Namespace) -> int:
    host = urlparse(args.url).hostname or ""
    if not (host == "localhost" or host.startswith("127.")):
        print(f"refusing to load {args.url}: loopback addresses only", file=sys.stderr)
        return 2
    texts = json.loads(Path(args.texts_file).read_text())
    result = asyncio.run(
        _load(
            args.url, texts, args.concurrency[0], args.max_requests, args.max_seconds, args.timeout
        )
    )
    print(json.dumps(result))
    return 0


def run_load(
    url: str,
    texts_file: str,
    concurrency: int,
    max_requests: int,
    max_seconds: float,
    timeout: float = 30.0,
) -> dict[str, Any]:
    """One load run in a separate process (so the client's CPU work is not ours to measure)."""
    cmd = [
        sys.executable,
        __file__,
        "--load",
        "--url",
        url,
        "--texts-file",
        texts_file,
        "--concurrency",
        str(concurrency),
        "--max-requests",
        str(max_requests),
        "--max-seconds",
        str(max_seconds),
        "--timeout",
        str(timeout),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=max_seconds + timeout + 60)
    if out.returncode != 0:
        raise RuntimeError(f"load generator failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------- CPU accounting


def _role(title: str) -> str | None:
    """Which part of the serving stack a process is, from its title (None: not ours)."""
    if "ray::ProxyActor" in title:
        return "proxy"
    if "ray::ServeReplica" in title:
        name = title.split()[0].rsplit(":", 1)[-1]
        return "combiner" if name == "combiner" else f"member:{name.removeprefix('member_')}"
    if "ray::" in title or "raylet" in title or "gcs_server" in title:
        return "ray"  # the controller, raylet, GCS and other Ray processes
    return None


def cpu_seconds() -> dict[str, float]:
    """CPU seconds (user + system) so far of every serving role, plus the load generators."""
    import psutil

    out: dict[str, float] = {}
    for proc in psutil.process_iter(["cmdline", "name"]):
        try:
            role = _role(" ".join(proc.info["cmdline"] or []) or proc.info["name"] or "")
            if role is None:
                continue
            t = proc.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        out[role] = out.get(role, 0.0) + t.user + t.system
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)  # finished load-generator processes
    out["load generator"] = kids.ru_utime + kids.ru_stime
    return out


def cpu_ms_per_request(before: dict[str, float], after: dict[str, float], ok: int
                       ) -> dict[str, float] | None:
    """CPU milliseconds per answered request by role, between two `cpu_seconds` snapshots."""
    if not ok:
        return None
    return {role: 1000.0 * (after[role] - before.get(role, 0.0)) / ok for role in after}


# --------------------------------------------------------------------------------- driver


def _texts(path: Path | None, n: int = 400) -> list[str]:
    csv_path = path or ROOT / ".." / "shared" / "data" / "sst" / "dev.csv"
    if csv_path.is_file():
        with open(csv_path, newline="", encoding="utf-8") as f:
            return [row["text"] for row in csv.DictReader(f)][:n]
    words = "good bad film plot actors boring moving funny slow brilliant".split()
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(words, 12)) for _ in range(n)]


def _biggest(members: dict[str, str]) -> str:
    """The member whose batching the benchmark reports: the teacher, else the first member."""
    return next((n for n, k in members.items() if k == "teacher"), next(iter(members)))


def _scenarios(members: dict[str, str]) -> list[tuple[str, str, dict[str, Any]]]:
    """(name, path, live overrides) in run order."""
    biggest = _biggest(members)
    out = [(f"member:{n}", f"/members/{n}/predict", {}) for n in members]
    out += [
        (f"member:{biggest}-nobatch", f"/members/{biggest}/predict", {"max_batch_size": 1}),
        ("ensemble", "/predict", {}),
        ("ensemble-nobatch", "/predict", {"max_batch_size": 1}),
        ("ensemble-onepass", "/predict", {"forward_chunk_size": 0}),
        ("sequential", "/predict", {"sequential": True}),
    ]
    if "student" in members.values():
        out.append(("cascade", "/predict", {"cascade": True}))
        hop = {"cascade": True, "cascade_student_in_combiner": False}
        out.append(("cascade-hop", "/predict", hop))
    return out


def _batching(url: str) -> dict[str, dict[int, int]]:
    """Histograms from GET /stats: texts per combiner fan-out and per member forward pass."""
    import httpx

    stats = httpx.get(url + "/stats", timeout=30.0).json()
    out = {"combiner": stats["combiner"]["fanout_sizes"]}
    out.update({n: m["batch_sizes"] for n, m in stats["members"].items()})
    return {k: {int(size): n for size, n in v.items()} for k, v in out.items()}


def _mean_batch(before: dict[int, int], after: dict[int, int]) -> float | None:
    new = {k: v - before.get(k, 0) for k, v in after.items()}
    calls = sum(new.values())
    return sum(k * v for k, v in new.items()) / calls if calls else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def ratios(
    results: dict[str, dict[int, dict[str, Any]]],
    paired: dict[str, dict[str, Any]],
    accuracy: dict[str, Any] | None,
) -> dict[str, float | None]:
    """The headline ratios (see TARGETS): the paired medians, else from the main table."""
    out: dict[str, float | None] = {}
    for key, (num, den, c, stat) in PAIRS.items():
        if key in paired:
            out[key] = paired[key]["median"]
        else:
            a, b = (results.get(name, {}).get(c, {}).get(stat) for name in (num, den))
            out[key] = _ratio(a, b)
    out["cascade_dev_accuracy_loss_points"] = (
        None if accuracy is None else 100.0 * accuracy["dev"]["accuracy_loss"]
    )
    return out


def forward_ceiling(
    run_dir: Path, member: str, texts: list[str], batch: int, chunk: int, rounds: int = 3
) -> dict[str, Any]:
    """The most batching can gain from the model alone: one member's forward pass in this
    process (1 thread, no Serve), ms per text one text at a time vs in batches of ``batch``."""
    from ensemble.serving.app import LoadedMember

    forward = LoadedMember(str(run_dir), member, num_threads=1)
    n = min(len(texts), 4 * batch)

    def ms_per_text(size: int, chunk_size: int) -> float:
        best = float("inf")
        for _ in range(rounds):  # best of a few: other processes only ever slow it down
            t0 = time.perf_counter()
            for i in range(0, n, size):
                forward(texts[i : i + size], chunk_size)
            best = min(best, (time.perf_counter() - t0) * 1000 / n)
        return best

    ms_per_text(batch, chunk)  # warm up
    single, batched = ms_per_text(1, 0), ms_per_text(batch, chunk)
    onepass = ms_per_text(batch, 0)
    return {
        "member": member,
        "texts": n,
        "batch": batch,
        "chunk": chunk,
        "ms_per_text_single": single,
        "ms_per_text_batched": batched,
        "ms_per_text_batched_one_pass": onepass,
        "ceiling": single / batched,
    }


def cascade_quality(run_dir: Path, confidence: str = "auto") -> dict[str, Any] | None:
    """Fit the threshold on dev predictions; report dev (in-sample) and test (held-out).

    ``confidence`` is resolved as `ensemble serve` resolves it (``auto``: the measure with the
    larger dev share); ``by_measure`` repeats the fit for every measure, so the table shows what
    each would let the student answer at the same budget.
    """
    from ensemble import combination
    from ensemble.rundir import Manifest
    from ensemble.serving import cascade

    spec = Manifest.load(run_dir).combination()

    def fit(m: str) -> dict[str, Any]:
        threshold, dev = cascade.fit_threshold_from_run(run_dir, spec, measure=m)
        out: dict[str, Any] = {"threshold": threshold, "method": spec.method, "dev": dev}
        try:
            test = cascade.load_predictions(run_dir, "test")
        except FileNotFoundError:
            return out
        ens = combination.combine_outputs(test, spec).probs
        student = cascade.student_of(spec)
        out["test"] = cascade.cascade_accuracy(
            combination.member_probs(spec, student, test[student]), ens, test["labels"].astype(int),
            threshold, m,
        )
        return out

    try:
        _, measure, _ = cascade.fit_cascade_from_run(run_dir, spec, confidence)
        by_measure = {m: fit(m) for m in cascade.CONFIDENCE_MEASURES}
    except (FileNotFoundError, ValueError) as err:
        print(f"no cascade accuracy: {err}", file=sys.stderr)
        return None
    return {**by_measure[measure], "measure": measure, "confidence_setting": confidence,
            "by_measure": by_measure}


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def cpu_markdown(results: dict[str, dict[int, dict[str, Any]]]) -> list[str]:
    """Table lines: CPU ms per answered request by role, for every scenario and concurrency."""
    rows = [(n, c, r["cpu_ms_per_request"]) for n, by_c in results.items()
            for c, r in by_c.items() if r.get("cpu_ms_per_request")]
    if not rows:
        return []
    lines = [
        "",
        "CPU milliseconds per answered request, by process (all Ray processes on the machine "
        "count as `ray`; `members` is every member replica together):",
        "",
        "| scenario | c | proxy | combiner | members | ray | load generator | total |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, c, cpu in rows:
        members = sum(v for k, v in cpu.items() if k.startswith("member:"))
        cells = [cpu.get("proxy"), cpu.get("combiner"), members, cpu.get("ray"),
                 cpu.get("load generator"), sum(cpu.values())]
        lines.append(f"| {name} | {c} | " + " | ".join(_ms(v) for v in cells) + " |")
    return lines


def _markdown(data: dict[str, Any]) -> str:
    lines = [
        "# Serving load test",
        "",
        f"Run dir `{data['run_dir']}` ({data['members']}); {data['machine'].get('cpu_count')} "
        f"CPUs, load average before/after {data['load_before']} / {data['load_after']}; "
        f"{data['settings']}.",
        "",
        "Texts per pass: mean texts per combiner fan-out / per forward pass of the member "
        "(the teacher in ensemble rows), from `GET /stats`.",
        "",
        "| scenario | c | ok | errors | p50 ms | p99 ms | mean ms | req/s | student share "
        "| texts per fan-out / pass |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    biggest = _biggest(data["members"])

    def _member(scenario: str) -> str:  # whose forward passes the row shows
        return scenario.split(":")[1].removesuffix("-nobatch") if ":" in scenario else biggest

    for name, by_c in data["results"].items():
        for c, r in by_c.items():
            total = sum(r["answered_by"].values())
            share = f"{r['answered_by'].get('student', 0) / total:.2f}" if total else "-"
            cells = [
                name,
                c,
                r["ok"],
                r["errors"],
                _ms(r["p50_ms"]),
                _ms(r["p99_ms"]),
                _ms(r["mean_ms"]),
                f"{r['throughput_rps']:.1f}",
                share if name.startswith("cascade") else "-",
                " / ".join(
                    _ms(r.get("mean_batch", {}).get(k)) for k in ("combiner", _member(name))
                ),
            ]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
    lines += cpu_markdown(data["results"])
    lines += [
        "",
        "| ratio | value | target | met | paired A/B values |",
        "|---|---:|---:|:---:|---|",
    ]
    for key, value in data["ratios"].items():
        target, op = TARGETS[key]
        pairs = data["paired"].get(key, {}).get("values") or []
        shown_pairs = ", ".join("-" if v is None else f"{v:.2f}" for v in pairs) or "-"
        met = (
            "-"
            if value is None
            # 1e-9: an accuracy loss of exactly 0.5 points carries float rounding
            else ("yes" if (value <= target + 1e-9 if op == "<=" else value >= target) else "no")
        )
        shown = "-" if value is None else f"{value:.3f}"
        lines.append(f"| {key} | {shown} | {op} {target} | {met} | {shown_pairs} |")
    fc = data.get("forward_ceiling")
    if fc:
        lines += [
            "",
            f"Forward pass alone ({fc['member']}, 1 thread, no Serve, {fc['texts']} texts): "
            f"{fc['ms_per_text_single']:.1f} ms per text one at a time, "
            f"{fc['ms_per_text_batched']:.1f} in batches of {fc['batch']} (length-sorted passes "
            f"of {fc['chunk']}), {fc['ms_per_text_batched_one_pass']:.1f} in one padded pass: "
            f"from the model alone batching gains at most {fc['ceiling']:.2f}x; the rest of "
            "the measured ratio is per-request overhead that batching shares out.",
        ]
    acc = data.get("cascade_accuracy")
    if acc:
        lines += [
            "",
            f"Cascade threshold {acc['threshold']:.4f} on the student's "
            f"{acc.get('measure', 'max_prob')} (fitted on dev, method "
            f"{acc['method']}): dev accuracy {acc['dev']['accuracy']:.4f} vs ensemble "
            f"{acc['dev']['ensemble_accuracy']:.4f}, student answers "
            f"{acc['dev']['student_fraction']:.1%}.",
        ]
        if "test" in acc:
            t = acc["test"]
            lines.append(
                f"Held-out test: accuracy {t['accuracy']:.4f} vs ensemble "
                f"{t['ensemble_accuracy']:.4f} (loss {100 * t['accuracy_loss']:.2f} "
                f"points), student answers {t['student_fraction']:.1%}."
            )
        if acc.get("by_measure"):
            lines += ["", "| confidence | threshold | dev loss pt | dev student share | "
                      "test loss pt | test student share |", "|---|---:|---:|---:|---:|---:|"]
            for m, r in acc["by_measure"].items():
                d, t = r["dev"], r.get("test")
                test_cells = (f"{100 * t['accuracy_loss']:.2f} | {t['student_fraction']:.1%}"
                              if t else "- | -")
                lines.append(f"| {m} | {r['threshold']:.4f} | {100 * d['accuracy_loss']:.2f} | "
                             f"{d['student_fraction']:.1%} | {test_cells} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", nargs="?", type=Path)
    p.add_argument(
        "--tiny",
        action="store_true",
        help="build and serve the tiny random-init run of ensemble/testing.py",
    )
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--max-requests", type=int, default=400, help="per scenario and concurrency")
    p.add_argument("--max-seconds", type=float, default=8.0, help="per scenario and concurrency")
    p.add_argument("--port", type=int, default=PORT)
    p.add_argument("--num-cpus", type=float, default=0.2, help="CPUs per member replica")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--batch-wait-timeout-s", type=float, default=0.01)
    p.add_argument("--forward-chunk-size", type=int, default=8, help="texts per forward pass")
    p.add_argument("--cascade-confidence", choices=("auto", "margin", "max_prob"),
                   default="auto", help="what the cascade's threshold applies to")
    p.add_argument("--texts", type=Path, help="CSV with a text column (default SST dev)")
    p.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--name", default="serve_load", help="results file name (without suffix)")
    p.add_argument("--only", nargs="*", help="run only these scenarios")
    p.add_argument("--repeats", type=int, default=3, help="A/B repeats per headline ratio")
    p.add_argument("--pair-seconds", type=float, default=5.0, help="seconds per A/B side")
    # load-generator mode (internal)
    p.add_argument("--load", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--texts-file", help=argparse.SUPPRESS)
    p.add_argument("--timeout", type=float, default=30.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.load:
        return _load_main(args)
    if args.tiny:
        from ensemble.testing import make_run_dir

        with tempfile.TemporaryDirectory(prefix="serve_load_") as tmp:
            args.run_dir = make_run_dir(Path(tmp) / "tiny-run")
            return _bench(args)
    if args.run_dir is None:
        p.error("RUN_DIR (or --tiny) is required")
    return _bench(args)


def _bench(args: argparse.Namespace) -> int:
    from benchmarks.common import load_average, local_ray, machine, write_results
    from ensemble.rundir import Manifest
    from ensemble.serving import deploy, settings

    run_dir = args.run_dir.resolve()
    manifest = Manifest.load(run_dir)
    members = {n: e.kind for n, e in manifest.members.items()}
    base = {
        "port": args.port,
        "num_cpus": args.num_cpus,
        "max_batch_size": args.max_batch_size,
        "max_ongoing_requests": max(64, args.max_batch_size),
        "batch_wait_timeout_s": args.batch_wait_timeout_s,
        "forward_chunk_size": args.forward_chunk_size,
        "cascade_confidence": args.cascade_confidence,
    }
    texts = _texts(args.texts)
    scenarios = {name: (path, over) for name, path, over in _scenarios(members)}
    results: dict[str, dict[int, dict[str, Any]]] = {}
    paired: dict[str, dict[str, Any]] = {}
    load_before = load_average()
    with (
        local_ray(num_cpus=2, node_ip="127.0.0.5"),
        tempfile.NamedTemporaryFile("w", suffix=".json") as tf,
    ):
        json.dump(texts, tf)
        tf.flush()
        url = deploy.deploy(run_dir, settings.serve_config_for(run_dir, base), timeout_s=600)

        def measure(name: str, c: int, seconds: float, warm: bool) -> dict[str, Any]:
            path, overrides = scenarios[name]
            deploy.update(run_dir, settings.serve_config_for(run_dir, {**base, **overrides}))
            if warm:  # tokenizer caches, routers, first batches
                run_load(url + path, tf.name, 4, 16, 10.0)
            before = _batching(url)
            cpu_before = cpu_seconds()
            result = run_load(url + path, tf.name, c, args.max_requests, seconds)
            cpu_after = cpu_seconds()
            after = _batching(url)
            # mean texts per combiner fan-out and per forward pass of each member
            result["mean_batch"] = {k: _mean_batch(before[k], after[k]) for k in after}
            result["cpu_ms_per_request"] = cpu_ms_per_request(cpu_before, cpu_after, result["ok"])
            return result

        for name in scenarios:
            if args.only and name not in args.only:
                continue
            results[name] = {}
            for i, c in enumerate(args.concurrency):
                r = results[name][c] = measure(name, c, args.max_seconds, warm=i == 0)
                print(
                    f"{name:>24} c={c:<3} p50={r['p50_ms'] or 0:8.1f}ms p99="
                    f"{r['p99_ms'] or 0:8.1f}ms {r['throughput_rps']:7.1f} req/s "
                    f"errors={r['errors']}",
                    flush=True,
                )
        # Each headline ratio again as A/B pairs run back to back, `repeats` times, so slow
        # drifts in the machine's load (other jobs) hit both sides alike; report the median.
        for key, (num, den, c, stat) in PAIRS.items():
            if args.repeats < 1 or num not in scenarios or den not in scenarios:
                continue
            values = []
            for _ in range(args.repeats):
                a = measure(num, c, args.pair_seconds, warm=False)
                b = measure(den, c, args.pair_seconds, warm=False)
                values.append(_ratio(a[stat], b[stat]))
            ok = [v for v in values if v is not None]
            paired[key] = {"values": values, "median": statistics.median(ok) if ok else None}
            print(f"{key}: paired {values}", flush=True)
        from ray import serve

        serve.shutdown()
    ceiling = forward_ceiling(
        run_dir, _biggest(members), texts, args.max_batch_size, args.forward_chunk_size
    )
    accuracy = cascade_quality(run_dir, args.cascade_confidence)
    data = {
        "run_dir": str(run_dir),
        "members": members,
        "machine": machine(),
        "load_before": load_before,
        "load_after": load_average(),
        "settings": {
            **base,
            "max_requests": args.max_requests,
            "max_seconds": args.max_seconds,
            "repeats": args.repeats,
            "pair_seconds": args.pair_seconds,
        },
        "results": results,
        "cascade_accuracy": accuracy,
        "forward_ceiling": ceiling,
        "paired": paired,
        "ratios": ratios(results, paired, accuracy),
        "targets": TARGETS,
    }
    json_path, md_path = write_results(args.name, data, _markdown(data), args.out_dir)
    from ensemble.report import plot_latency

    png = json_path.with_suffix(".png")
    plot_latency(data["results"], png, f"serving latency ({', '.join(data['members'])})")
    print(f"wrote {json_path}, {md_path} and {png}")
    for key, value in data["ratios"].items():
        print(f"{key}: {value if value is None else round(value, 3)} (target {TARGETS[key]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
