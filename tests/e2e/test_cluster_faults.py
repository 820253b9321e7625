"""Fault tolerance end to end: a worker node dies mid-round, the driver dies between rounds.

1. On a real 3-node `LocalCluster` (head without CPUs, two 2-CPU workers), `ensemble launch`
   submits a two-round joint run; once the 2-worker DeepSpeed (ZeRO-2) member has checkpointed
   twice, the worker node hosting its Train workers is SIGKILLed mid-epoch. Ray Train restarts the
   worker group on the surviving node from the last checkpoint and the job completes.
2. A local `ensemble train` is SIGKILLed (driver, Ray and its workers) after round 1 completed and
   a round-2 job has checkpointed; the same command then resumes after round 1 and produces the
   same artifacts as an uninterrupted run. (tests/e2e/test_train.py covers a kill *within* round
   1 and a clean resume; this one kills a multi-round run between its round checkpoints.)

Both runs use tiny random-init members, so the numbers printed (work lost to the kill, restart
latency) measure Ray Train's recovery, not the model.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

# tests/e2e is on sys.path (pytest rootdir-relative import)
from cluster import LocalCluster, kill_until_gone, session_processes
from ensemble.cli import main
from ensemble.rundir import Manifest, read_json

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
# our own addresses and ports, so this can run beside the other LocalCluster tests (26000-26599)
HEAD_IP, WORKER_IPS, PORT_BASE = "127.0.0.9", ("127.0.0.10", "127.0.0.11"), 27000
LOCAL_RAY_IP = "127.0.0.12"  # the killed driver's own local Ray
ROUNDS = 2
EPOCHS = 8
TARGET = "classifier"  # the 2-worker ZeRO-2 member whose node is killed
CONFIG = """\
name: faults
output_dir: {output_dir}
data: {{source: {source}, max_train_samples: 128, max_eval_samples: 64, max_length: 32}}
member_defaults:
  pretrained: false
  arch: {{num_hidden_layers: 2, hidden_size: 32, num_attention_heads: 2, intermediate_size: 64}}
  lr: 1.0e-3
  micro_batch_size: 8
  warmup_ratio: 0.0
  epochs: {epochs}
  cpus_per_worker: 0.5  # after a node is lost, every Train worker still fits on the other
members:
  classifier: {{kind: classifier, num_workers: 2, zero_stage: 2}}  # 8 steps an epoch
  regressor: {{kind: regressor, loss: mse}}  # 16 steps an epoch
training: {{rounds: {rounds}, log_every: 1}}
ray: {{num_cpus: 2, node_ip_address: {ip}}}
"""
WORLD = {"classifier": 2, "regressor": 1}
STEPS_PER_EPOCH = {"classifier": 8, "regressor": 16}  # 128 samples / world / micro batch 8


def _write_config(path: Path, source: Path, output_dir: Path) -> Path:
    path.write_text(
        CONFIG.format(
            output_dir=output_dir, source=source, epochs=EPOCHS, rounds=ROUNDS, ip=LOCAL_RAY_IP
        )
    )
    return path


# --------------------------------------------------------------------------- run directory checks
def _artifacts(run_dir: Path) -> set[str]:
    """The run directory's files (Ray Train storage and TensorBoard event files aside: one per
    process, named by time and host), with the ensemble method's name normalised: which combiner
    wins on dev decides the names of its plots."""
    method = Manifest.load(run_dir).combine.method
    return {
        p.relative_to(run_dir).as_posix().replace(f"_ensemble_{method}", "_ensemble_METHOD")
        for p in run_dir.rglob("*")
        if p.is_file() and p.relative_to(run_dir).parts[0] not in ("ray", "tensorboard")
    }


def _check_finished_run(run_dir: Path) -> dict[str, Any]:
    """A complete run: whole JSON files, all rounds, one contiguous loss curve per member."""
    for path in run_dir.rglob("*.json"):
        if path.relative_to(run_dir).parts[0] != "ray":
            json.loads(path.read_text())  # complete, valid JSON
    manifest = Manifest.load(run_dir)
    assert manifest.rounds_completed == ROUNDS and manifest.rounds_planned == ROUNDS
    assert set(manifest.members) == set(WORLD)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["rounds"] == ROUNDS
    assert {"accuracy", "macro_f1"} <= set(metrics["test"][TARGET])
    state = read_json(run_dir / "state.json")
    assert state["rounds_completed"] == ROUNDS
    assert [row["round"] for row in read_json(run_dir / "rounds.json")] == list(
        range(1, ROUNDS + 1)
    )
    for name, per_epoch in STEPS_PER_EPOCH.items():
        # restored from checkpoints, the history has each step once: steps re-done after a
        # failure are not recorded twice, and no step is missing
        steps = [p["step"] for p in state["history"][name]]
        assert steps == list(range(1, ROUNDS * EPOCHS * per_epoch + 1)), (name, steps)
    return state


def _check_checkpoints(storage: Path) -> int:
    """Every member job of every round left a loadable checkpoint: the HF export plus each
    rank's DeepSpeed files (ZeRO shards live on every rank).

    Returns:
        How many complete checkpoints Ray Train no longer tracks (uploaded by a worker group
        that died before the controller registered them; CheckpointConfig(num_to_keep=1) never
        deletes those).
    """
    runs = sorted(p.name for p in storage.iterdir() if p.is_dir())
    assert runs == sorted(f"{m}-r{r}-finetune" for m in WORLD for r in range(1, ROUNDS + 1))
    untracked = 0
    for run in runs:
        member = run.split("-")[0]
        snapshot = read_json(storage / run / "checkpoint_manager_snapshot.json")
        tracked = [c["checkpoint_dir_name"] for c in snapshot["checkpoint_results"]]
        assert len(tracked) == 1, (run, tracked)  # num_to_keep=1
        found = sorted(p.name for p in (storage / run).glob("checkpoint_*") if p.is_dir())
        assert tracked[0] in found, (run, tracked, found)
        untracked += len(found) - 1
        for name in found:  # the tracked one and any leftover of a killed group are whole
            ckpt = storage / run / name
            hf_config = json.loads((ckpt / "hf" / "config.json").read_text())
            assert hf_config["num_hidden_layers"] == 2
            assert (ckpt / "hf" / "model.safetensors").stat().st_size > 0
            assert (ckpt / "latest").read_text().strip() == "ckpt"
            files = {p.name for p in (ckpt / "ckpt").iterdir()}
            assert "mp_rank_00_model_states.pt" in files, (ckpt, files)
            if member == TARGET:  # ZeRO-2: one optimizer shard per rank
                assert {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(2)} <= files
    return untracked


# ---------------------------------------------------------------------- Ray Train's own log files
def _train_records(cluster: LocalCluster | list[Path], component: str) -> list[dict[str, Any]]:
    """Ray Train's structured (JSON lines) `ray-train-app-<component>-*.log` records of every
    node of `cluster` (or in these `logs/` dirs), oldest first."""
    if isinstance(cluster, LocalCluster):
        cluster = [cluster.log_dir(index) for index in range(len(cluster.nodes))]
    records = []
    for log_dir in cluster:
        for path in (log_dir / "train").glob(f"ray-train-app-{component}-*.log"):
            for line in path.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    if isinstance(record, dict) and "message" in record:
                        records.append(record)
    return sorted(records, key=lambda r: r.get("timestamp_ns", 0))


def _reports(cluster: LocalCluster, run_name: str) -> list[tuple[float, int]]:
    """(time, micro-step) of each checkpoint rank 0 of `run_name` reported."""
    found = []
    for r in _train_records(cluster, "worker"):
        if r.get("run_name") == run_name and r.get("world_rank", 0) == 0:
            match = re.search(r"Reporting training result .*'micro': (\d+)", r["message"])
            if match:
                found.append((r["timestamp_ns"] / 1e9, int(match.group(1))))
    return found


def _registered_micro(run: Path) -> int:
    """The micro-step of the newest checkpoint Ray Train's controller registered for a run
    (0 before the first); a checkpoint a worker reported is registered at the next poll."""
    try:
        snapshot = read_json(run / "checkpoint_manager_snapshot.json")
    except (OSError, ValueError):  # not written yet, or caught mid-write
        return 0
    return max((c["metrics"]["micro"] for c in snapshot["checkpoint_results"]), default=0)


def _group_starts(cluster: LocalCluster, run_name: str) -> list[tuple[float, list[str]]]:
    """(time, worker IPs by rank) of each worker group the controller of `run_name` started."""
    starts = []
    for r in _train_records(cluster, "controller"):
        if r.get("run_name") == run_name and "Started training worker group" in r["message"]:
            starts.append((r["timestamp_ns"] / 1e9, re.findall(r"ip=([\d.]+)", r["message"])))
    return starts


def _wait(predicate, proc: subprocess.Popen, timeout_s: float, what: str, log: Path):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            pytest.fail(f"exited with {proc.returncode} before {what}:\n{_tail(log)}")
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}:\n{_tail(log)}")


def _tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.is_file() else "(no log)"


# ------------------------------------------------------------------ 1. a worker node dies mid-run
@pytest.mark.timeout(2700)
def test_worker_node_killed_mid_round_job_completes(
    sst_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # all three "nodes" share this machine, so each raylet's memory monitor sees every other
    # process on it (other test runs included) and OOM-kills our actors for their memory
    monkeypatch.setenv("RAY_memory_monitor_refresh_ms", "0")
    project = tmp_path / "project"  # what the job uploads: a config and a pyproject.toml
    project.mkdir()
    (project / "pyproject.toml").write_text("[project]\nname = 'faults'\n")
    run_dir, storage = tmp_path / "run", tmp_path / "storage"  # every node sees /tmp
    _write_config(project / "faults.yaml", sst_dir, run_dir)
    log = tmp_path / "launch.log"
    run_name = f"{TARGET}-r1-finetune"
    per_epoch = STEPS_PER_EPOCH[TARGET]
    cluster = LocalCluster(
        num_workers=2,
        cpus_per_node=2,
        head_ip=HEAD_IP,
        worker_ips=WORKER_IPS,
        port_base=PORT_BASE,
        startup_timeout_s=300,
    )
    with cluster, open(log, "w") as out:
        t_submit = time.time()
        proc = subprocess.Popen(
            [sys.executable, "-m", "ensemble.cli", "launch", "faults.yaml",
             "--address", cluster.dashboard_url, "--storage-path", str(storage),
             "--job-id", "faults-node-kill"],
            cwd=project, env=cluster.client_environ(), stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            # kill (mid-epoch, mid-round 1) once Ray Train has registered a second checkpoint
            _wait(lambda: _registered_micro(storage / run_name) >= 2 * per_epoch, proc, 1500,
                  f"two registered checkpoints of {run_name}", log)  # fmt: skip
            starts = _group_starts(cluster, run_name)
            assert len(starts) == 1, starts
            victim_ip = starts[0][1][0]  # the node of rank 0
            registered = _registered_micro(storage / run_name)
            t_kill = time.time()
            killed = cluster.kill_node(1 + WORKER_IPS.index(victim_ip))
            assert killed
            proc.wait(timeout=1500)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        t_done = time.time()
        job_log = log.read_text(errors="replace")
        assert proc.returncode == 0, _tail(log)
        assert job_log.strip().splitlines()[-1] == f"RUN_DIR={run_dir}"
        assert victim_ip not in cluster.alive_node_ips()

        # Ray Train saw the failure, retried, and put the new group on the surviving node
        controller = [r["message"] for r in _train_records(cluster, "controller")
                      if r.get("run_name") == run_name]  # fmt: skip
        assert any("[FailurePolicy] RETRY" in m for m in controller), controller
        starts = _group_starts(cluster, run_name)
        assert len(starts) == 2, starts
        assert victim_ip not in starts[1][1]
        reports = _reports(cluster, run_name)
        resumed = [r["message"] for r in _train_records(cluster, "worker")
                   if r.get("run_name") == run_name and "resuming at" in r["message"]]  # fmt: skip

    # the restored group went on from a checkpoint of the killed one (the last registered, or
    # one reported after it), not from step 0; a report may race the kill by a few ms
    before = [(t, m) for t, m in reports if t < starts[1][0]]
    after = [(t, m) for t, m in reports if t > starts[1][0]]
    resumed_from = after[0][1] - per_epoch
    assert resumed_from in {m for _, m in before} and resumed_from >= registered, reports
    assert after[-1][1] == EPOCHS * per_epoch
    total = EPOCHS * per_epoch
    assert resumed == [
        f"{TARGET} finetune round 1: resuming at micro-step {resumed_from} of {total}"
    ]

    _check_finished_run(run_dir)
    untracked = _check_checkpoints(storage)

    # what the kill cost: the steps trained since the checkpoint it restored, and the restart
    epoch_s = statistics.median(b[0] - a[0] for a, b in itertools.pairwise(before))
    step_s = epoch_s / per_epoch  # checkpoint time included
    t_last, last = before[-1]
    reached = last + min(per_epoch - 1, max(0, int((t_kill - t_last) / step_s)))  # estimate
    redone = reached - resumed_from
    print(
        f"\n[node kill] SIGKILLed node {victim_ip} ({len(killed)} processes) in {run_name} "
        f"(step ~{reached} of {EPOCHS * per_epoch}; last checkpoint reported at step {last}, "
        f"registered by Ray Train at step {registered}); the new group resumed at step "
        f"{resumed_from}: ~{redone} steps re-done (~{redone * step_s:.1f} s of training; an "
        f"epoch of {per_epoch} steps takes {epoch_s:.1f} s); new worker group "
        f"{starts[1][0] - t_kill:.1f} s after the kill, its first checkpoint "
        f"{after[0][0] - t_kill:.1f} s after; {untracked} checkpoint(s) left untracked in "
        f"storage; job wall {t_done - t_submit:.0f} s"
    )


# -------------------------------------------------------------- 2. the driver dies between rounds
def _kill_session(driver: subprocess.Popen) -> None:
    """SIGKILL the driver, then everything it spawned (its own session).

    The driver goes first: once its raylet is gone, Ray's core worker ends the driver itself
    with exit status 0, which is not the crash under test.
    """
    driver.kill()
    driver.wait()
    kill_until_gone(lambda: session_processes(driver.pid), timeout_s=10)


def _ray_runs(run_dir: Path) -> dict[str, dict[str, int]]:
    """Ray Train run name -> {checkpoint file: mtime} under the run's storage."""
    return {
        run.name: {
            str(p.relative_to(run)): p.stat().st_mtime_ns
            for p in run.rglob("*")
            if p.is_file() and "checkpoint_" in str(p.relative_to(run))
        }
        for run in sorted((run_dir / "ray").iterdir())
        if run.is_dir()
    }


@pytest.mark.timeout(2700)
def test_driver_killed_after_round_one_resumes_and_matches_uninterrupted_run(
    ray_local, sst_dir: Path, tmp_path: Path, capsys
) -> None:
    def args(run_dir: Path) -> list[str]:
        config = _write_config(tmp_path / f"{run_dir.name}.yaml", sst_dir, run_dir)
        return ["train", str(config), "--no-progress"]

    reference = tmp_path / "reference"
    t0 = time.time()
    assert main(args(reference)) == 0  # uninterrupted, in this process
    reference_s = time.time() - t0

    run_dir = tmp_path / "killed"
    argv = args(run_dir)
    log = tmp_path / "driver.log"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    with open(log, "w") as out:
        t_start = time.time()
        proc = subprocess.Popen(
            [sys.executable, "-m", "ensemble.cli", *argv], cwd=REPO, env=env, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        state_file = run_dir / "state.json"

        def between_rounds() -> bool:  # round 1 done, a round-2 job has checkpointed
            if not state_file.is_file() or read_json(state_file)["rounds_completed"] < 1:
                return False
            return any(_registered_micro(run) for run in (run_dir / "ray").glob("*-r2-*"))

        try:
            _wait(between_rounds, proc, 1500, "round 1 and a round-2 checkpoint", log)
        finally:
            t_kill = time.time()
            _kill_session(proc)
    assert proc.returncode == -9
    assert not session_processes(proc.pid)  # its Ray went down with it
    killed = read_json(state_file)
    assert killed["rounds_completed"] == 1
    assert not (run_dir / "manifest.json").exists()
    for path in run_dir.glob("*.json"):
        json.loads(path.read_text())  # what the kill left is whole
    round1 = {k: v for k, v in _ray_runs(run_dir).items() if "-r1-" in k}
    done_r2 = killed["round_done"].get("2", {})  # members whose round 2 was recorded
    partial_r2 = {  # round-2 Ray Train runs cut short: run name -> last registered step
        run: micro
        for run in _ray_runs(run_dir)
        if "-r2-" in run
        and run.split("-")[0] not in done_r2
        and (micro := _registered_micro(run_dir / "ray" / run))
    }
    assert partial_r2, "no round-2 job had a registered checkpoint when the driver died"

    capsys.readouterr()
    t0 = time.time()
    assert main(argv) == 0  # the same command again
    resume_s = time.time() - t0
    printed = capsys.readouterr().out
    assert f"resuming {run_dir} after round 1" in printed
    # each interrupted round-2 Ray Train run went on from its checkpoint (same run name and
    # storage), not from the round's first step
    logs = Path(ray_local._private.worker._global_node.get_logs_dir_path())
    resumed = {
        r["run_name"]: int(re.search(r"micro-step (\d+)", r["message"]).group(1))
        for r in _train_records([logs], "worker")
        if r.get("timestamp_ns", 0) / 1e9 > t0 and "resuming at micro-step" in r["message"]
    }
    assert resumed == partial_r2

    state = _check_finished_run(run_dir)
    _check_finished_run(reference)
    assert _artifacts(run_dir) == _artifacts(reference)
    assert sorted(_ray_runs(run_dir)) == sorted(_ray_runs(reference))
    assert Manifest.load(run_dir).members.keys() == Manifest.load(reference).members.keys()
    # round 1 was neither trained again nor re-recorded
    assert {k: v for k, v in _ray_runs(run_dir).items() if "-r1-" in k} == round1
    for name in WORLD:
        assert [p for p in state["history"][name] if p["round"] == 1] == [
            p for p in killed["history"][name] if p["round"] == 1
        ]
    print(
        f"\n[driver kill] killed after round 1, round-2 runs at step {partial_r2}, which the "
        f"re-run resumed at {resumed}; "
        f"uninterrupted run {reference_s:.0f} s; killed run: {t_kill - t_start:.0f} s until "
        f"the kill + {resume_s:.0f} s for the re-run"
    )
