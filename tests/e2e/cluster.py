"""A real multi-node Ray cluster on one machine, for end-to-end tests.

`LocalCluster` runs `ray start` once for a head node and once per worker node, each on its own
loopback address (127.0.0.6 head, 127.0.0.7 / 127.0.0.8 workers), with its own `--temp-dir` and
its own port block inside 26000-26999, so it never meets another Ray instance on the machine.
Token authentication is on (`RAY_AUTH_MODE=token`) with a fresh token written under the cluster's
temp dir; `env` holds what a client (`ensemble launch`, `ray job submit`) needs to talk to it.

Every node is started in a new session (`setsid`), and Ray keeps all of a node's processes
(raylet, GCS, agents, workers) in that session; job entrypoints start their own session but stay
descendants of the node's job supervisor. So "all processes of node i" = the session plus its
descendants, which is what `kill_node` SIGKILLs and `stop` terminates. Plain `ray stop` is never
used: it kills every Ray process on the machine, other people's included.

Example::

    with LocalCluster(num_workers=2, cpus_per_node=2) as cluster:
        client = JobSubmissionClient(cluster.dashboard_url, headers=cluster.auth_headers)
        ...
        cluster.kill_node(1)       # SIGKILL worker 1 (127.0.0.7) and everything it runs
        cluster.wait_for_nodes(2)  # head + worker 2 left
        cluster.restart_node(1)
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
import requests

logger = logging.getLogger(__name__)

HEAD_IP = "127.0.0.6"
WORKER_IPS = ("127.0.0.7", "127.0.0.8")
PORT_BASE = 26000
PORT_BLOCK = 200  # node k owns ports PORT_BASE + k*PORT_BLOCK ... + PORT_BLOCK - 1
_TEMP_PREFIX = "/tmp/enscl-"  # every LocalCluster's temp dir; short: Ray's socket paths
# env vars of the caller that would point our nodes at another cluster or token
_SCRUBBED_ENV = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


# ports as offsets inside a node's block: `ray start --<flag>=<base + offset>`
HEAD_PORTS = {"port": 1, "dashboard-port": 2, "ray-client-server-port": 3}  # GCS, Jobs API
NODE_PORTS = {
    "node-manager-port": 10,
    "object-manager-port": 11,
    "dashboard-agent-listen-port": 12,
    "dashboard-agent-grpc-port": 13,
    "runtime-env-agent-port": 14,
    "metrics-export-port": 15,
}
# the head's Prometheus endpoints, which default to fixed ports shared by every Ray
HEAD_METRICS_ENV = {"AUTOSCALER_METRIC_PORT": 4, "DASHBOARD_METRIC_PORT": 5}
WORKER_PORTS = (100, PORT_BLOCK - 1)  # --min/max-worker-port: one port per worker process


@dataclass
class _Node:
    index: int  # 0 = head
    ip: str
    base: int  # first port of the node's block
    temp_dir: Path = Path("/nonexistent")  # set by LocalCluster.start
    session: int | None = None  # session id (= pid of the `ray start` that created it)

    @property
    def is_head(self) -> bool:
        return self.index == 0

    def fixed_ports(self) -> dict[str, int]:
        """`ray start` port flag -> port, for this node."""
        table = {**HEAD_PORTS, **NODE_PORTS} if self.is_head else NODE_PORTS
        return {flag: self.base + offset for flag, offset in table.items()}


class LocalCluster:
    """A head and `num_workers` worker nodes started with `ray start`, on loopback only.

    Args:
        num_workers: worker nodes besides the head (at most len(worker_ips)).
        cpus_per_node: logical CPUs of each worker node (may exceed the physical cores).
        head_cpus: logical CPUs of the head; 0 keeps tasks and Train workers off the head, so
            killing a worker node really takes work away.
        object_store_mb: object store size per node.
        head_ip / worker_ips / port_base: where the nodes live; ports stay inside
            [port_base, port_base + (1 + num_workers) * 200).
        startup_timeout_s: how long to wait for each node to register.

    Node indices: 0 is the head, 1..num_workers are the workers in `worker_ips` order.
    """

    def __init__(
        self,
        num_workers: int = 2,
        cpus_per_node: int = 2,
        *,
        head_cpus: int = 0,
        object_store_mb: int = 300,
        head_ip: str = HEAD_IP,
        worker_ips: tuple[str, ...] = WORKER_IPS,
        port_base: int = PORT_BASE,
        startup_timeout_s: float = 120.0,
    ) -> None:
        if not 0 <= num_workers <= len(worker_ips):
            raise ValueError(
                f"num_workers={num_workers}: this harness has {len(worker_ips)} worker "
                f"addresses {worker_ips}; pass more worker_ips or fewer workers"
            )
        for ip in (head_ip, *worker_ips):
            if not ip.startswith("127.") or ip == "127.0.0.1":
                raise ValueError(
                    f"{ip} is not a 127.0.0.2-254 loopback address; Ray swaps 127.0.0.1 for the "
                    "machine's network interface, so use e.g. 127.0.0.6"
                )
        self.num_workers = num_workers
        self.cpus_per_node = cpus_per_node
        self.head_cpus = head_cpus
        self.object_store_mb = object_store_mb
        self.startup_timeout_s = startup_timeout_s
        ips = (head_ip, *worker_ips[:num_workers])
        self.nodes = [_Node(k, ip, port_base + k * PORT_BLOCK) for k, ip in enumerate(ips)]
        self._root = Path("/nonexistent")  # a fresh temp dir per start()
        self._token = secrets.token_hex(32)
        self._started = False

    # ---------------------------------------------------------------- addresses and client env
    @property
    def head(self) -> _Node:
        return self.nodes[0]

    @property
    def address(self) -> str:
        """GCS address `host:port`, for `ray start --address` / `ray.init(address=...)`."""
        return f"{self.head.ip}:{self.head.base + HEAD_PORTS['port']}"

    @property
    def dashboard_url(self) -> str:
        """Dashboard / Jobs API URL, for `JobSubmissionClient` and `ensemble launch`."""
        return f"http://{self.head.ip}:{self.head.base + HEAD_PORTS['dashboard-port']}"

    @property
    def token_path(self) -> Path:
        """The file holding the cluster's auth token (RAY_AUTH_TOKEN_PATH)."""
        return self._root / "auth_token"

    @property
    def env(self) -> dict[str, str]:
        """Env vars a client process needs (token auth) on top of its own environment."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path)}

    @property
    def auth_headers(self) -> dict[str, str]:
        """HTTP headers that authenticate a request to the dashboard / Jobs API."""
        return {"Authorization": f"Bearer {self._token}"}

    def client_environ(self) -> dict[str, str]:
        """A full environment for a client subprocess (this process's, scrubbed, plus `env`)."""
        environ = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
        return {**environ, **self.env}

    # ------------------------------------------------------------------------ life cycle
    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start the head, then every worker; returns once all nodes are registered."""
        if self._started:
            raise RuntimeError("this LocalCluster is already started")
        self._check_ports_free()
        self._root = Path(tempfile.mkdtemp(prefix=Path(_TEMP_PREFIX).name, dir="/tmp"))
        for node in self.nodes:
            node.temp_dir = self._root / f"n{node.index}"
        self.token_path.write_text(self._token)
        self.token_path.chmod(0o600)
        self._started = True
        atexit.register(self.stop)
        try:
            self._start_node(self.head)
            self._wait_dashboard()
            for node in self.nodes[1:]:
                self._start_node(node)
            self.wait_for_nodes(len(self.nodes))
        except BaseException:
            self.stop(keep_temp=True)
            logger.error("local cluster failed to start; its logs stay in %s", self._root)
            raise
        logger.info("local cluster up: %s (%d nodes)", self.address, len(self.nodes))

    def stop(self, timeout_s: float = 5.0, keep_temp: bool = False) -> None:
        """Terminate every node (workers first), SIGKILL what is left, delete the temp dir
        (with its logs) unless `keep_temp`."""
        if not self._started:
            return
        for node in reversed(self.nodes):
            self._end_node(node, grace_s=timeout_s)
        self._started = False
        atexit.unregister(self.stop)
        if not keep_temp:
            shutil.rmtree(self._root, ignore_errors=True)

    def kill_node(self, index: int) -> list[int]:
        """SIGKILL every process of node `index` (0 = head): raylet, agents, workers, jobs.

        Returns:
            The pids that were killed.
        """
        pids = self._end_node(self._node(index), grace_s=0)
        logger.info("killed node %d (%s): %d processes", index, self.nodes[index].ip, len(pids))
        return pids

    def restart_node(self, index: int) -> None:
        """Start worker node `index` again (after `kill_node`) and wait until it registers."""
        node = self._node(index)
        if node.is_head:
            raise ValueError("the head cannot rejoin its own cluster; start a new LocalCluster")
        if self.node_processes(index):
            raise RuntimeError(f"node {index} is still running; kill_node({index}) first")
        self._start_node(node)
        self._wait_for(lambda: node.ip in self.alive_node_ips(), f"node {index} to rejoin")

    # ---------------------------------------------------------------------- inspection
    def node_processes(self, index: int) -> list[psutil.Process]:
        """All live processes of node `index`: its session and their descendants."""
        session = self._node(index).session
        if session is None:
            return []
        found: dict[int, psutil.Process] = {}
        for proc in psutil.process_iter():
            if _session_of(proc) == session:
                found[proc.pid] = proc
                with contextlib.suppress(psutil.NoSuchProcess):
                    found.update((c.pid, c) for c in proc.children(recursive=True))
        return list(found.values())

    def alive_node_ips(self) -> list[str]:
        """IPs of the nodes the GCS reports ALIVE (via the dashboard's state API)."""
        resp = requests.get(
            f"{self.dashboard_url}/api/v0/nodes",
            params={"limit": 100, "detail": "false"},
            headers=self.auth_headers,
            timeout=10,
        )
        resp.raise_for_status()
        rows = resp.json()["data"]["result"]["result"]
        return sorted(r["node_ip"] for r in rows if r["state"] == "ALIVE")

    def wait_for_nodes(self, count: int, timeout_s: float | None = None) -> list[str]:
        """Wait until exactly `count` nodes are ALIVE; returns their IPs."""
        ips: list[str] = []

        def ready() -> bool:
            nonlocal ips
            ips = self.alive_node_ips()
            return len(ips) == count

        try:
            self._wait_for(ready, f"{count} alive nodes", timeout_s)
        except TimeoutError as err:
            raise TimeoutError(f"{err} (alive: {ips})") from None
        return ips

    def log_dir(self, index: int) -> Path:
        """The `logs/` folder of node `index`'s current session."""
        return self._node(index).temp_dir / "session_latest" / "logs"

    # ------------------------------------------------------------------------ internals
    def _node(self, index: int) -> _Node:
        if not 0 <= index < len(self.nodes):
            raise IndexError(
                f"node {index} does not exist: 0 is the head, 1..{self.num_workers} the workers"
            )
        return self.nodes[index]

    def _node_env(self) -> dict[str, str]:
        env = {**self.client_environ(), "RAY_USAGE_STATS_ENABLED": "0"}
        env.update((k, str(self.head.base + off)) for k, off in HEAD_METRICS_ENV.items())
        return env

    def _start_args(self, node: _Node) -> list[str]:
        low, high = (node.base + offset for offset in WORKER_PORTS)
        cpus = self.head_cpus if node.is_head else self.cpus_per_node
        args = [
            *(f"--{flag}={port}" for flag, port in node.fixed_ports().items()),
            f"--node-ip-address={node.ip}",
            f"--temp-dir={node.temp_dir}",
            f"--num-cpus={cpus}",
            "--num-gpus=0",
            f"--object-store-memory={self.object_store_mb * 1024**2}",
            f"--min-worker-port={low}",
            f"--max-worker-port={high}",
            "--disable-usage-stats",
        ]
        if node.is_head:
            return ["--head", f"--dashboard-host={node.ip}", *args]
        return [f"--address={self.address}", *args]

    def _start_node(self, node: _Node, attempts: int = 3) -> None:
        """`ray start` one node, tolerant of a loaded machine.

        `ray start` gives the raylet a fixed 30 s to register with the GCS and exits 1 when it
        misses that, leaving the processes running; on a busy machine they often register a bit
        later. So a failed `ray start` counts only if the node is not ALIVE within
        `startup_timeout_s` either. The raylet itself aborts when its dashboard agent takes more
        than ~15 s to import and report its ports (seen at load averages of 40+ on 2 cores);
        then, and after a late registration that never came, the node gets a clean new try.
        """
        node.temp_dir.mkdir(parents=True, exist_ok=True)
        log = node.temp_dir.parent / f"start-n{node.index}.log"
        cmd = [_ray_executable(), "start", *self._start_args(node)]
        for attempt in range(1, attempts + 1):
            with open(log, "ab") as out:
                # a new session per node: everything `ray start` spawns stays in it
                proc = subprocess.Popen(
                    cmd,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=self._node_env(),
                    start_new_session=True,
                )
                node.session = proc.pid
                try:
                    rc = proc.wait(timeout=self.startup_timeout_s)
                except subprocess.TimeoutExpired:
                    rc = None
            if rc == 0 or self._registers_late(node):
                return
            logger.warning("`ray start` of node %d failed (attempt %d)", node.index, attempt)
            self._end_node(node, grace_s=0)
        raylet = self.log_dir(node.index) / "raylet.out"
        raise RuntimeError(
            f"`ray start` of node {node.index} ({node.ip}) failed (rc={rc}); its output:\n"
            f"{_tail(log)}\n{raylet}:\n{_tail(raylet)}"
        )

    def _registers_late(self, node: _Node) -> bool:
        if not any(_name(p) == "raylet" for p in self.node_processes(node.index)):
            return False  # it crashed (raylet.out says why); only a new try can help
        try:
            self._wait_for(lambda: node.ip in self.alive_node_ips(), f"node {node.index}")
        except TimeoutError:
            return False
        logger.warning("node %d registered after `ray start` gave up on it", node.index)
        return True

    def _end_node(self, node: _Node, grace_s: float) -> list[int]:
        """SIGTERM the node's processes (when grace_s > 0), then SIGKILL what is left."""
        ended: list[int] = []
        if grace_s > 0:
            procs = self.node_processes(node.index)
            for proc in procs:
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.terminate()
            psutil.wait_procs(procs, timeout=grace_s)
            ended += [p.pid for p in procs]
        ended += kill_until_gone(lambda: self.node_processes(node.index), timeout_s=5)
        node.session = None
        return sorted(set(ended))

    def _wait_dashboard(self) -> None:
        url = f"{self.dashboard_url}/api/gcs_healthz"
        self._wait_for(lambda: requests.get(url, timeout=2).ok, f"the dashboard at {url}")

    def _wait_for(
        self, check: Callable[[], bool], what: str, timeout_s: float | None = None
    ) -> None:
        deadline = time.monotonic() + (timeout_s or self.startup_timeout_s)
        while True:
            try:
                if check():
                    return
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what}; logs under {self._root}")
            time.sleep(0.5)

    def _check_ports_free(self) -> None:
        busy = []
        for node in self.nodes:
            ports = list(node.fixed_ports().values())
            if node.is_head:
                ports += [node.base + offset for offset in HEAD_METRICS_ENV.values()]
            for port in ports:
                with socket.socket() as sock:
                    # as servers do: TIME_WAIT leftovers of a previous cluster don't count
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    try:
                        sock.bind((node.ip, port))
                    except OSError:
                        busy.append(f"{node.ip}:{port}")
        if busy:
            raise RuntimeError(
                f"ports {busy} are in use: another LocalCluster (maybe left by a crashed test) "
                "holds them; `python -c 'import cluster; cluster.kill_stale_clusters()'` in "
                "tests/e2e ends leftovers (never `ray stop`: it ends every Ray on the machine)"
            )


def kill_stale_clusters() -> list[int]:
    """SIGKILL the nodes of LocalClusters whose test process died without stopping them.

    Finds them by their temp dirs (/tmp/enscl-*) in the command lines of Ray's processes, kills
    those processes' whole sessions (nothing else on the machine) and deletes the temp dirs.

    Returns:
        The pids killed.
    """
    sessions, roots = set(), set()
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(ProcessLookupError, psutil.Error):
            found = re.findall(rf"{_TEMP_PREFIX}\w+", " ".join(proc.info["cmdline"] or ()))
            if found:
                sessions.add(os.getsid(proc.pid))
                roots.update(found)
    sessions.discard(os.getsid(0))  # never our own session
    victims: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter():
        if _session_of(proc) in sessions:  # with descendants: job entrypoints have own sessions
            victims[proc.pid] = proc
            with contextlib.suppress(psutil.NoSuchProcess):
                victims.update((c.pid, c) for c in proc.children(recursive=True))
    for proc in victims.values():
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(list(victims.values()), timeout=10)
    for root in roots:
        shutil.rmtree(root, ignore_errors=True)
    return sorted(victims)


def kill_until_gone(
    find: Callable[[], list[psutil.Process]], timeout_s: float, attempts: int = 5
) -> list[int]:
    """SIGKILL what `find()` returns, again and again until it finds nothing (a raylet can fork a
    worker between a scan and its death); returns the pids killed."""
    killed: list[int] = []
    for _ in range(attempts):
        procs = find()
        if not procs:
            break
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(procs, timeout=timeout_s)
        killed += [p.pid for p in procs]
    return killed


def session_processes(sid: int) -> list[psutil.Process]:
    """Every process of session `sid`."""
    return [proc for proc in psutil.process_iter() if _session_of(proc) == sid]


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError as err:
        return f"(unreadable: {err})"


def _name(proc: psutil.Process) -> str:
    try:
        return proc.name()
    except psutil.Error:
        return ""


def _session_of(proc: psutil.Process) -> int | None:
    try:
        return os.getsid(proc.pid)
    except (ProcessLookupError, PermissionError):
        return None


def _ray_executable() -> str:
    """The `ray` script of this interpreter's environment."""
    beside = Path(sys.executable).with_name("ray")
    found = str(beside) if beside.exists() else shutil.which("ray")
    if not found:
        raise RuntimeError("the `ray` command is not installed; pip install 'ray[default]'")
    return found
