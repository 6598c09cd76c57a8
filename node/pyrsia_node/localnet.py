"""A local network of node processes on loopback: the engine behind ``pyrsia up``.

Each node runs as its own ``python -m pyrsia_node node`` process with its log in
``<data_dir>/<name>/node.log``. Children get ``--parent-pid`` and set a parent-death signal
(Linux ``PR_SET_PDEATHSIG``), so even if the launcher is SIGKILLed no node outlives it;
``stop`` sends SIGTERM, waits, then SIGKILLs anything left. Tests use ``kill``/``restart``
to inject crashes into a running network; ``reap`` and ``start(name)`` let ``pyrsia up``
start again the nodes someone else killed.

Membership changes go through the running network as they do in a cluster: ``add_authority``
prepares an authority outside the genesis (a fresh key and a certificate of the network
CA), ``membership_record`` signs the governance record that adds or removes a node with the
network's governance key, and ``submit_record`` hands it to an authority's admin API.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
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

import yaml

from pyrsia_node import tls
from pyrsia_node.genesis import Genesis, LocalNode, Upstream, create_network
from pyrsia_node.identity import KEY_FILE, Identity
from pyrsia_node.ledger.records import GovernanceAction, GovernanceRecord

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

    def _shape_state(self) -> dict[str, Any]:
        return {
            "authorities": self.shape.authorities,
            "peers": self.shape.peers,
            "base_port": self.shape.base_port,
            "host": self.shape.host,
            "upstreams": [[u.name, u.url, u.insecure] for u in self.shape.upstreams],
            "attestation_threshold": self.shape.attestation_threshold,
        }

    def _prepare(self, fresh: bool) -> tuple[LocalNode, ...]:
        state_path = self.root / STATE_FILE
        wanted = self._shape_state()
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
        self._save_state(network.nodes)
        return network.nodes

    def _save_state(self, nodes: tuple[LocalNode, ...]) -> None:
        state = {
            "shape": self._shape_state(),
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
                for n in nodes
            ],
        }
        (self.root / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")

    def add_authority(self, name: str) -> LocalNode:
        """Prepare one more authority, outside the genesis, and return it (not started):
        a fresh key whose write-ahead state says it never signed, a certificate of the
        network CA, and the first authority's settings with its own name, data dir and the
        ports of the next node slot, bootstrapping from the genesis authorities. Started,
        it follows the chain; it takes part once a governance ADD for its key commits
        (``membership_record``, ``submit_record``)."""
        # consensus pulls in grpc: import it here, so `pyrsia --help` stays fast
        from pyrsia_node.consensus.service import initialize_state

        if any(n.name == name for n in self.nodes):
            raise LocalNetworkError(f"a node named {name!r} exists already")
        port = self.shape.base_port + 10 * len(self.nodes)
        if port + 2 > 65535:
            raise LocalNetworkError(f"no ports left above {self.shape.base_port} for {name}")
        host = self.shape.host
        data_dir = self.root / name
        Identity.generate().save(data_dir / KEY_FILE)
        initialize_state(data_dir / "consensus")
        ca_dir = self.root / "ca"
        ca = tls.KeyPair((ca_dir / "ca.key").read_bytes(), (ca_dir / "ca.crt").read_bytes())
        tls.save_key_pair(data_dir / "keys", tls.issue_node_certificate(ca, name, (host,)))
        node = LocalNode(
            name, "authority", data_dir, data_dir / "node.yaml", port, port + 1, port + 2, host
        )
        template = next(n for n in self.nodes if n.role == "authority")
        settings = yaml.safe_load(template.config_file.read_text())
        settings.update(
            data_dir=str(data_dir),
            name=name,
            http_port=node.http_port,
            grpc_port=node.grpc_port,
            metrics_port=node.metrics_port,
            bootstrap=[a.grpc_address for a in self._genesis().authorities],
        )
        node.config_file.write_text(yaml.safe_dump(settings, sort_keys=False))
        self.nodes = (*self.nodes, node)
        self._save_state(self.nodes)
        return node

    def membership_record(self, action: GovernanceAction, name: str) -> bytes:
        """A governance record, signed with the network's governance key, that adds node
        ``name`` (with its addresses, so the authorities learn where to reach it) or removes
        it. Its sequence is the time in milliseconds, so every change is a new record."""
        node = self.node(name)
        key = Identity.from_pem((node.data_dir / KEY_FILE).read_bytes()).public_key
        governance = Identity.from_pem((self.root / "governance.key").read_bytes())
        chain_id = self._genesis().chain_id
        sequence = time.time_ns() // 1_000_000
        addresses = (
            node.grpc_address,
            f"{node.host}:{node.http_port}",
            f"{node.host}:{node.metrics_port}",
        )
        return GovernanceRecord.membership(
            governance, chain_id, sequence, action, name, key, addresses
        ).encode()

    def submit_record(self, name: str, record: bytes) -> dict[str, Any]:
        """Offer ``record`` to node ``name``'s admin API (``POST /api/v1/records``); its
        answer. A refusal raises ``LocalNetworkError`` with the node's reason."""
        request = urllib.request.Request(
            f"{self.node(name).http_url}/api/v1/records",
            data=record,
            headers={"Content-Type": "application/octet-stream"},
        )
        try:
            with urllib.request.urlopen(request, timeout=5.0) as response:
                answer: dict[str, Any] = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise LocalNetworkError(
                f"{name} refused the record ({exc.code}): {exc.read().decode(errors='replace')}"
            ) from None
        return answer

    def _genesis(self) -> Genesis:
        return Genesis.load(self.root / "genesis.json")

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
                group=self.group_of(node),
            )

    def group_of(self, node: LocalNode) -> int | None:
        """The group id ``node``'s process runs as: None (the launcher's own). Fault tests
        override it to give each node its own, so that packet filters can tell the nodes'
        connections apart on one loopback address."""
        return None

    def kill(self, name: str, sig: signal.Signals = signal.SIGKILL) -> None:
        process = self.processes.pop(name)
        process.send_signal(sig)
        process.wait(timeout=10)
        self._logs.pop(name).close()

    def reap(self) -> dict[str, int]:
        """Forget the nodes whose processes have exited: name -> exit status (negative:
        the signal that ended it), so that ``start(name)`` can run them again."""
        exited = {}
        for name, process in list(self.processes.items()):
            status = process.poll()
            if status is not None:
                exited[name] = status
                del self.processes[name]
                self._logs.pop(name).close()
        return exited

    def restart(self, name: str) -> None:
        if name in self.processes:
            self.kill(name, signal.SIGTERM)
        self.start(name)

    def statuses(self) -> dict[str, dict[str, Any] | None]:
        result: dict[str, dict[str, Any] | None] = {}
        for node in self.nodes:
            try:
                result[node.name] = fetch_json(f"{node.http_url}/api/v1/status", timeout=1.0)
            except (OSError, urllib.error.URLError, http.client.HTTPException, ValueError):
                # HTTPException: e.g. a port not yet listened on that the kernel gave the
                # client as its own source port, so the client read its own request back.
                result[node.name] = None
        return result

    def failing(self) -> dict[str, str]:
        """The running nodes whose ``/healthz`` fails (their consensus stopped): name ->
        the reason they give. A node that does not answer is not listed (see ``reap``)."""
        result = {}
        for name in list(self.processes):
            try:
                fetch_json(f"{self.node(name).http_url}/healthz", timeout=0.5)
            except urllib.error.HTTPError as exc:
                if exc.code == 503:
                    with contextlib.suppress(ValueError):
                        result[name] = str(json.loads(exc.read()).get("reason", "failing"))
            except (OSError, http.client.HTTPException, ValueError):
                pass
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
