"""The LocalCluster harness itself: nodes on their own loopback IPs and ports, a node kill that
Ray really notices (a running task is retried elsewhere), restart, and a stop that leaves
nothing behind."""

from __future__ import annotations

import dataclasses
import io
import shlex
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

from cluster import HEAD_IP, PORT_BASE, WORKER_IPS, LocalCluster
from ensemble import launch

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# runs as a Ray Job: one task starts on worker 2 (soft affinity, so a retry may go elsewhere),
# touches a marker so the test knows when to kill that node, and reports where it finished
JOB = """
import os, pathlib, time, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
ray.init()
marker = pathlib.Path(os.environ["MARKER"])
node = next(n["NodeID"] for n in ray.nodes() if n["NodeManagerAddress"] == "{target}")

@ray.remote(num_cpus=1, max_retries=2)
def work():
    ip = ray.util.get_node_ip_address()
    (marker / ip).touch()
    time.sleep(8 if ip == "{target}" else 0)
    return ip

strategy = NodeAffinitySchedulingStrategy(node, soft=True)
print("RUN_DIR=" + ray.get(work.options(scheduling_strategy=strategy).remote()))
"""


def _listening_ports(procs: list[psutil.Process]) -> set[tuple[str, int]]:
    found = set()
    for proc in procs:
        try:
            conns = proc.net_connections(kind="tcp")
        except psutil.Error:
            continue
        found |= {(c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN}
    return found


def test_nodes_ports_kill_restart_and_stop(tmp_path: Path):
    cluster = LocalCluster(num_workers=2, cpus_per_node=1)
    with cluster:
        assert cluster.alive_node_ips() == sorted([HEAD_IP, *WORKER_IPS])
        assert cluster.address == f"{HEAD_IP}:{PORT_BASE + 1}"
        assert cluster.dashboard_url == f"http://{HEAD_IP}:{PORT_BASE + 2}"

        # every port any node process listens on is inside this cluster's block; no specific
        # non-loopback address (Ray core's gRPC servers do listen on the wildcard address)
        procs = [p for i in range(3) for p in cluster.node_processes(i)]
        ports = _listening_ports(procs)
        assert ports, "found no listening sockets"
        outside = {(ip, port) for ip, port in ports if not PORT_BASE <= port < PORT_BASE + 600}
        assert not outside
        loopback_or_any = ("0.0.0.0", "::", "127.", "::ffff:127.")
        assert all(ip.startswith(loopback_or_any) for ip, _ in ports), ports

        # a job whose task runs on worker 2; killing worker 2 mid-task moves the task to worker 1
        marker = tmp_path / "markers"
        marker.mkdir()
        config = tmp_path / "c.yaml"
        config.write_text("members: {clf: {kind: classifier}}\noutput_dir: /tmp/x\n")
        spec = launch.build_job(config, working_dir=tmp_path, env={"MARKER": str(marker)})
        code = textwrap.dedent(JOB).replace("{target}", WORKER_IPS[1])
        spec = dataclasses.replace(spec, entrypoint=f"python -c {shlex.quote(code)}")
        results = []
        runner = threading.Thread(
            target=lambda: results.append(
                launch.launch(spec, cluster.dashboard_url, out=io.StringIO(),
                              headers=cluster.auth_headers)
            )
        )  # fmt: skip
        runner.start()
        deadline = time.monotonic() + 120
        while not (marker / WORKER_IPS[1]).exists():
            assert time.monotonic() < deadline and runner.is_alive(), "task never started"
            time.sleep(0.2)
        victims = cluster.kill_node(2)
        assert victims and not any(psutil.pid_exists(pid) for pid in victims)
        assert cluster.node_processes(2) == []
        assert cluster.node_processes(1), "killing node 2 touched node 1"
        runner.join(timeout=180)
        assert results and results[0].ok, results
        assert results[0].run_dir == WORKER_IPS[0]  # the retry ran on the surviving worker
        assert cluster.wait_for_nodes(2) == [HEAD_IP, WORKER_IPS[0]]

        cluster.restart_node(2)
        assert cluster.alive_node_ips() == sorted([HEAD_IP, *WORKER_IPS])
        every_pid = [p.pid for i in range(3) for p in cluster.node_processes(i)]
        root = cluster.token_path.parent

    time.sleep(0.5)
    assert not [pid for pid in every_pid if psutil.pid_exists(pid)]
    assert not root.exists()


def test_rejects_bad_layouts():
    with pytest.raises(ValueError, match="worker addresses"):
        LocalCluster(num_workers=3)
    with pytest.raises(ValueError, match="127.0.0.1"):
        LocalCluster(num_workers=1, head_ip="127.0.0.1")
    with pytest.raises(IndexError, match="0 is the head"):
        LocalCluster(num_workers=1).kill_node(5)
