"""A real Ray cluster of several nodes on this machine, as ``ray start`` makes one: a head that
runs no tasks (zero CPUs) and workers with one CPU each, every process in the tests' environment
(the fault injection, the short lease). A node is killed as a machine dies: its raylet and every
process below it (Ray's workers, the job's submit, its trainer) by SIGKILL at once.

Ray refuses loopback addresses for a cluster of several nodes and binds to this machine's own
address instead; nothing leaves the machine.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from tests.servers import free_port

RAY = Path(sys.executable).with_name("ray")


@dataclass
class Cluster:
    address: str
    temp_dir: Path
    env: dict[str, str]
    nodes: dict[str, int] = field(default_factory=dict)  # node name -> its raylet's pid

    @property
    def workers(self) -> list[str]:
        return [name for name in self.nodes if name != "head"]

    def live_raylets(self) -> dict[int, psutil.Process]:
        found = {}
        for p in psutil.process_iter(["cmdline"]):
            cmd = p.info.get("cmdline") or []
            if cmd and cmd[0].endswith("/raylet") and any(str(self.temp_dir) in a for a in cmd):
                found[p.pid] = p
        return found

    def _started(self, name: str) -> None:
        """The node ``ray start`` just made is the one raylet not known before."""
        (new,) = set(self.live_raylets()) - set(self.nodes.values())
        self.nodes[name] = new

    def raylets(self) -> dict[str, psutil.Process]:
        """Every live raylet of this cluster, by its node's name (the head is ``head``)."""
        live = self.live_raylets()
        return {name: live[pid] for name, pid in self.nodes.items() if pid in live}

    def node_of(self, pid: int) -> str | None:
        """The name of the worker node whose raylet ``pid`` runs under."""
        ancestors = {p.pid for p in psutil.Process(pid).parents()}
        return next((name for name, raylet in self.raylets().items() if raylet.pid in ancestors), None)

    def kill_node(self, name: str) -> list[int]:
        """The node dies as a machine does: its raylet and everything below it, all at once."""
        raylet = self.raylets()[name]
        victims = [raylet, *raylet.children(recursive=True)]
        for p in victims:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGKILL)
        return [p.pid for p in victims]


def _ray(*args: str, env: dict[str, str]) -> None:
    done = subprocess.run([str(RAY), *args], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"ray {' '.join(args)}: exit {done.returncode}\n{done.stdout}{done.stderr}"


@contextlib.contextmanager
def ray_cluster(env: dict[str, str], workers: int = 2) -> Iterator[Cluster]:
    # Ray's sockets live under it: a path short enough for a socket's name (107 bytes)
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    env = {**env, "RAY_USAGE_STATS_ENABLED": "0",
           # a dead node is noticed within seconds, not Ray's default half minute
           "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
           "RAY_health_check_timeout_ms": "1000"}
    port = free_port()
    cluster = Cluster(f"127.0.0.1:{port}", temp_dir, env)
    try:
        _ray("start", "--head", f"--port={port}", "--num-cpus=0", "--node-ip-address=127.0.0.1",
             "--include-dashboard=false", "--disable-usage-stats",
             f"--ray-client-server-port={free_port()}", f"--temp-dir={temp_dir}", env=env)
        cluster._started("head")
        for i in range(workers):
            name = f"worker-{chr(ord('a') + i)}"
            _ray("start", f"--address={cluster.address}", "--num-cpus=1", "--node-ip-address=127.0.0.1",
                 f"--node-name={name}", env=env)
            cluster._started(name)
        cluster.env = {**env, "RAY_ADDRESS": cluster.address}
        yield cluster
    finally:
        _stop(temp_dir, port)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _stop(temp_dir: Path, port: int) -> None:
    """Every process of this cluster (and below them), and nothing of any other Ray on the machine."""
    marks = (str(temp_dir), f":{port}")
    mine = [p for p in psutil.process_iter(["cmdline"]) if p.pid != os.getpid()
            and any(m in a for a in (p.info.get("cmdline") or []) for m in marks)]
    victims = {p.pid: p for p in mine}
    for p in mine:
        with contextlib.suppress(psutil.NoSuchProcess):
            victims.update({c.pid: c for c in p.children(recursive=True)})
    for p in victims.values():
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    psutil.wait_procs(list(victims.values()), timeout=30)
