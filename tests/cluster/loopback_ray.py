"""A real multi-process Ray cluster on loopback for the submission / multi-node / fault-tolerance tests.

`ray start --head --block` (plus optional `ray start --address ... --block` worker nodes) as child processes in
their own session, every port chosen free up front (other Ray clusters may share the machine, so nothing
uses Ray's default ports), token authentication on with a per-cluster random token passed through the
environment (never written to ~/.ray). Teardown stops exactly the processes this helper started: each
`ray start` process group, then anything left in those sessions (raylet workers), by pid. Never `ray stop`,
which would take down every Ray on the machine.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

RAY = str(Path(sys.executable).with_name("ray"))
OBJECT_STORE_BYTES = 300 * 1024 * 1024


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _node_ports() -> list[str]:
    om, nm, agent_http, agent_grpc, metrics, rt_env = free_ports(6)
    lo = free_ports(1)[0]
    return [f"--object-manager-port={om}", f"--node-manager-port={nm}",
            f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={rt_env}",
            # workers bind ports in a window of their own (a few ranks + actors per test)
            f"--min-worker-port={lo}", f"--max-worker-port={lo + 40}",
            # a small object store per node: the default (30% of RAM each) on two nodes of one shared machine
            # leaves a driver unable to map torch's libraries ("oneMKL FATAL ERROR: Cannot load libtorch_cpu.so")
            f"--object-store-memory={OBJECT_STORE_BYTES}"]


@dataclass
class LoopbackCluster:
    num_cpus: int = 2
    resources: dict = field(default_factory=dict)  # custom resources of the head node
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="pfr-", dir="/tmp")))
    procs: list = field(default_factory=list)
    gcs_address: str = ""
    dashboard_url: str = ""
    head_env: dict = field(default_factory=dict)  # extra environment of the head node's processes

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for processes of (or clients of) this cluster: token auth on, this cluster's token."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token, "RAY_USAGE_STATS_ENABLED": "0",
                    "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
                    # job entrypoints run `python`: this venv's, as on a cluster whose nodes share one install
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"})
        env.update(extra)
        return env

    def _spawn(self, args: list[str], log_name: str, env: Optional[dict] = None) -> subprocess.Popen:
        log = open(self.root / log_name, "w")
        p = subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats", *args], env=self.env(**(env or {})),
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.root)
        self.procs.append(p)
        return p

    def start(self) -> "LoopbackCluster":
        for attempt in range(3):  # a loaded machine can miss `ray start`'s own startup deadline: try again
            gcs, dash, client = free_ports(3)
            self.gcs_address = f"127.0.0.1:{gcs}"
            self.dashboard_url = f"http://127.0.0.1:{dash}"
            p = self._spawn(["--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
                             f"--num-cpus={self.num_cpus}", f"--resources={json.dumps(self.resources)}",
                             f"--temp-dir={self.root / f'rtmp-h{attempt}'}", *_node_ports()], "head.log", self.head_env)
            try:
                self.wait_for_nodes(1)
                return self
            except RuntimeError:
                if attempt == 2 or p.poll() is None:
                    raise
                self.procs.remove(p)
                _kill_sessions([p.pid])
        raise AssertionError("unreachable")

    def add_node(self, num_cpus: int, resources: Optional[dict] = None, env: Optional[dict] = None
                 ) -> subprocess.Popen:
        """A worker node; `env`: extra environment of its processes (its own scratch, HF_HOME, ...). Returns its
        `ray start` process (its session: `kill_node`)."""
        for attempt in range(3):  # a loaded GCS can miss `ray start`'s 30 s registration deadline: try again
            n = len(self.procs)
            p = self._spawn([f"--address={self.gcs_address}", "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}",
                         f"--resources={json.dumps(resources or {})}",
                         # its own temp dir: nodes sharing one would share runtime_resources/, and one node's
                         # runtime-env cleanup deletes the working dir a job driver on the other runs in
                         f"--temp-dir={self.root / f'rtmp{n}'}", *_node_ports()], f"node{n}.log", env)
            try:
                self.wait_for_nodes(len([q for q in self.procs if q.poll() is None]))
                return p
            except RuntimeError:
                if attempt == 2 or p.poll() is None:
                    raise
                self.procs.remove(p)
                _kill_sessions([p.pid])
        raise AssertionError("unreachable")

    def kill_node(self, proc: subprocess.Popen) -> None:
        """kill -9 a worker node: its `ray start`, raylet and every process of its session (its workers)."""
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        _kill_sessions([proc.pid])

    def wait_for_nodes(self, n: int, timeout: float = 120.0) -> None:
        """Until the dashboard answers and `n` nodes are alive (polled through the Jobs-API-side HTTP)."""
        import urllib.request

        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            for p in self.procs:
                if p.poll() is not None and p.returncode != -signal.SIGKILL:  # (kill_node's are expected)
                    raise RuntimeError(f"ray start exited with {p.returncode}; logs:\n{self.logs()}")
            try:
                req = urllib.request.Request(f"{self.dashboard_url}/nodes?view=summary",
                                             headers={"Authorization": f"Bearer {self.token}"})
                with urllib.request.urlopen(req, timeout=5) as r:
                    body = json.loads(r.read())
                summary = body["data"]["summary"]
                alive = [s for s in summary if s.get("raylet", {}).get("state") == "ALIVE"]
                if len(alive) >= n:
                    return
                last = f"{len(alive)} alive"
            except Exception as e:  # noqa: BLE001 - not up yet
                last = repr(e)
            time.sleep(1.0)
        raise TimeoutError(f"cluster did not reach {n} nodes in {timeout}s ({last}); logs:\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.root.glob("*.log")))

    def stop(self) -> None:
        sessions = [p.pid for p in self.procs]  # start_new_session: pid == sid == pgid
        for p in reversed(self.procs):  # workers first, then the head
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        _kill_sessions(sessions)
        self.procs = []
        shutil.rmtree(self.root, ignore_errors=True)  # session logs, sockets, unpacked job packages


def _kill_sessions(sessions: list[int]) -> None:
    """SIGKILL every process still in one of our sessions (raylet, gcs, workers started under them)."""
    import psutil

    for _ in range(2):
        left = []
        for proc in psutil.process_iter(["pid"]):
            try:
                if os.getsid(proc.pid) in sessions:
                    left.append(proc)
            except (ProcessLookupError, PermissionError, psutil.Error):
                continue
        for proc in left:
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(left, timeout=10)
        if not left:
            return
