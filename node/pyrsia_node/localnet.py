"""A local network of node processes on loopback: the engine behind ``pyrsia up``.

Each node runs as its own ``python -m pyrsia_node node`` process with its log in
``<data_dir>/<name>/node.log``. Children get ``--parent-pid`` and set a parent-death signal
(Linux ``PR_SET_PDEATHSIG``), so even if the launcher is SIGKILLed no node outlives it;
``stop`` sends SIGTERM, waits, then SIGKILLs anything left. Tests use ``kill``/``restart``
to inject crashes into a running network.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from pyrsia_node.genesis import LocalNode, Upstream, create_network

_PR_SET_PDEATHSIG = 1
STATE_FILE = "network.json"


class LocalNetworkError(Exception):
    """The local network could not be created, started or reached."""


def die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGTERM this process when its parent dies; exit now if it already has."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent_pid:
        raise SystemExit(f"parent process {parent_pid} is gone; not starting")


def fetch_json(url: str, timeout: float = 2.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


@dataclass(frozen=True, slots=True)
class Shape:
    authorities: int
    peers: int
    base_port: int
    host: str
    upstreams: tuple[Upstream, ...] = ()
    attestation_threshold: int | None = None


class LocalNetwork:
    """Creates (or reuses) a network under ``root`` and runs its nodes as processes."""

    def __init__(self, root: Path, shape: Shape, fresh: bool = False) -> None:
        self.root = root.resolve()
        self.shape = shape
        self.nodes = self._prepare(fresh)
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: dict[str, TextIO] = {}

    def _prepare(self, fresh: bool) -> tuple[LocalNode, ...]:
        state_path = self.root / STATE_FILE
        wanted = {
            "authorities": self.shape.authorities,
            "peers": self.shape.peers,
            "base_port": self.shape.base_port,
            "host": self.shape.host,
            "upstreams": [[u.name, u.url, u.insecure] for u in self.shape.upstreams],
            "attestation_threshold": self.shape.attestation_threshold,
        }
        if state_path.exists() and not fresh:
            state = json.loads(state_path.read_text())
            if state.get("shape") != wanted:
                raise LocalNetworkError(
                    f"{self.root} holds a network of another shape ({state.get('shape')}); "
                    "pass --fresh to replace it or choose another --data-dir"
                )
            return tuple(LocalNode(**{**n, "data_dir": Path(n["data_dir"]),
                                      "config_file": Path(n["config_file"])})
                         for n in state["nodes"])  # fmt: skip
        if self.root.exists() and any(self.root.iterdir()):
            if not fresh and not (self.root / "genesis.json").exists():
                raise LocalNetworkError(f"{self.root} is not empty and holds no pyrsia network")
            _remove_tree(self.root)
        network = create_network(
            self.root,
            authorities=self.shape.authorities,
            peers=self.shape.peers,
            host=self.shape.host,
            base_port=self.shape.base_port,
            upstreams=self.shape.upstreams,
            attestation_threshold=self.shape.attestation_threshold,
        )
        state = {
            "shape": wanted,
            "nodes": [
                {
                    "name": n.name,
                    "role": n.role,
                    "data_dir": str(n.data_dir),
                    "config_file": str(n.config_file),
                    "http_port": n.http_port,
                    "grpc_port": n.grpc_port,
                    "metrics_port": n.metrics_port,
                    "host": n.host,
                }
                for n in network.nodes
            ],
        }
        state_path.write_text(json.dumps(state, indent=2) + "\n")
        return network.nodes

    def node(self, name: str) -> LocalNode:
        for node in self.nodes:
            if node.name == name:
                return node
        raise LocalNetworkError(f"no node named {name!r}")

    def start(self, name: str | None = None) -> None:
        for node in self.nodes if name is None else (self.node(name),):
            log = (node.data_dir / "node.log").open("a")
            self._logs[node.name] = log
            self.processes[node.name] = subprocess.Popen(
                [
                    *(sys.executable, "-m", "pyrsia_node", "node"),
                    *("--config", str(node.config_file), "--parent-pid", str(os.getpid())),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    def kill(self, name: str, sig: signal.Signals = signal.SIGKILL) -> None:
        process = self.processes.pop(name)
        process.send_signal(sig)
        process.wait(timeout=10)
        self._logs.pop(name).close()

    def restart(self, name: str) -> None:
        if name in self.processes:
            self.kill(name, signal.SIGTERM)
        self.start(name)

    def statuses(self) -> dict[str, dict[str, Any] | None]:
        result: dict[str, dict[str, Any] | None] = {}
        for node in self.nodes:
            try:
                result[node.name] = fetch_json(f"{node.http_url}/api/v1/status", timeout=1.0)
            except (OSError, urllib.error.URLError, ValueError):
                result[node.name] = None
        return result

    def wait_connected(self, timeout: float) -> dict[str, dict[str, Any]]:
        """Block until every running node answers and sees every other running node."""
        deadline = time.monotonic() + timeout
        running = set(self.processes)
        missing: list[str] = sorted(running)
        while time.monotonic() < deadline:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise LocalNetworkError(
                        f"{name} exited with status {process.returncode}; last lines of its "
                        f"log:\n{self.log_tail(name)}"
                    )
            statuses = self.statuses()
            missing = []
            for name in sorted(running):
                status = statuses.get(name)
                peers = {p["name"] for p in status["connected_peers"]} if status else set()
                if status is None or not running - {name} <= peers:
                    missing.append(name)
            if not missing:
                return {n: s for n, s in statuses.items() if s is not None}
            time.sleep(0.2)
        raise LocalNetworkError(
            f"not all nodes connected within {timeout:.0f} s: {', '.join(missing)} "
            f"(logs in {self.root}/<node>/node.log)"
        )

    def log_tail(self, name: str, lines: int = 15) -> str:
        path = self.node(name).data_dir / "node.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM every node, wait up to ``timeout``, SIGKILL the rest."""
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for process in self.processes.values():
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()
        for log in self._logs.values():
            log.close()
        self._logs.clear()


def _remove_tree(root: Path) -> None:
    for path in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_dir() and not path.is_symlink():
            path.rmdir()
        else:
            path.unlink()
