"""The genesis of a network: the one file every node starts from.

``genesis.json`` names the chain, the initial authorities (Ed25519 public keys and
addresses), the governance key that signs membership changes, the upstream registries
authorities fetch from, the attestation threshold and the network CA certificate. It is
canonical JSON (sorted keys, no spaces), so its SHA-256 identifies the network.

Membership after genesis changes only through committed governance records, never by
editing this file under a running node.

``create_network`` writes a genesis plus every key and certificate for N authorities and
M peers; ``pyrsia genesis`` and ``pyrsia up`` both use it.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pyrsia_node import tls
from pyrsia_node.identity import Identity, node_id_for

FORMAT = "pyrsia-genesis/v1"
_CHAIN_ID = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$")


class GenesisError(ValueError):
    """The genesis file is missing, malformed or inconsistent."""


def quorum(n: int) -> int:
    """Votes needed among n authorities: floor(2n/3) + 1 (tolerates floor((n-1)/3) faults)."""
    return (2 * n) // 3 + 1


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(key: str, text: object) -> bytes:
    if not isinstance(text, str):
        raise GenesisError(f"{key}: expected base64 text, got {text!r}")
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise GenesisError(f"{key}: not valid base64: {text!r}") from None


@dataclass(frozen=True, slots=True)
class Authority:
    name: str
    public_key: bytes
    grpc_address: str
    http_address: str
    metrics_address: str = ""

    @property
    def node_id(self) -> str:
        return node_id_for(self.public_key)


@dataclass(frozen=True, slots=True)
class Upstream:
    """An upstream registry authorities fetch from, e.g. ``docker.io`` at its v2 endpoint."""

    name: str
    url: str
    insecure: bool = False


@dataclass(frozen=True, slots=True)
class Genesis:
    chain_id: str
    genesis_time: str
    governance_public_key: bytes
    authorities: tuple[Authority, ...]
    ca_certificate: str
    upstreams: tuple[Upstream, ...] = ()
    attestation_threshold: int | None = None  # None: the quorum of authorities

    def __post_init__(self) -> None:
        if not _CHAIN_ID.match(self.chain_id):
            raise GenesisError(
                f"chain_id {self.chain_id!r}: use 1-63 lowercase letters, digits, '.' or '-'"
            )
        if not self.authorities:
            raise GenesisError("authorities: a network needs at least one authority")
        ids = [a.node_id for a in self.authorities]
        if len(set(ids)) != len(ids):
            raise GenesisError("authorities: the same public key is listed twice")
        names = [a.name for a in self.authorities]
        if len(set(names)) != len(names):
            raise GenesisError("authorities: the same name is listed twice")
        if len(self.governance_public_key) != 32:
            raise GenesisError("governance_public_key: expected a 32-byte Ed25519 key")
        n = len(self.authorities)
        if self.attestation_threshold is not None and not 1 <= self.attestation_threshold <= n:
            raise GenesisError(
                f"attestation_threshold {self.attestation_threshold}: must be between 1 and "
                f"the number of authorities ({n})"
            )

    @property
    def quorum(self) -> int:
        return quorum(len(self.authorities))

    @property
    def threshold(self) -> int:
        return self.attestation_threshold or self.quorum

    def authority(self, node_id: str) -> Authority | None:
        return next((a for a in self.authorities if a.node_id == node_id), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "chain_id": self.chain_id,
            "genesis_time": self.genesis_time,
            "governance_public_key": _b64(self.governance_public_key),
            "attestation_threshold": self.attestation_threshold,
            "authorities": [
                {
                    "name": a.name,
                    "public_key": _b64(a.public_key),
                    "grpc_address": a.grpc_address,
                    "http_address": a.http_address,
                    "metrics_address": a.metrics_address,
                }
                for a in self.authorities
            ],
            "upstreams": [
                {"name": u.name, "url": u.url, "insecure": u.insecure} for u in self.upstreams
            ],
            "ca_certificate": self.ca_certificate,
        }

    def canonical_bytes(self) -> bytes:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()

    @property
    def genesis_hash(self) -> str:
        return hashlib.sha256(self.canonical_bytes()).hexdigest()

    @classmethod
    def from_dict(cls, data: object) -> Genesis:
        if not isinstance(data, dict):
            raise GenesisError("genesis: expected a JSON object")
        if data.get("format") != FORMAT:
            raise GenesisError(f"format: expected {FORMAT!r}, got {data.get('format')!r}")
        try:
            authorities = tuple(
                Authority(
                    name=str(a["name"]),
                    public_key=_unb64(f"authorities[{i}].public_key", a["public_key"]),
                    grpc_address=str(a["grpc_address"]),
                    http_address=str(a["http_address"]),
                    metrics_address=str(a.get("metrics_address", "")),
                )
                for i, a in enumerate(data["authorities"])
            )
            upstreams = tuple(
                Upstream(str(u["name"]), str(u["url"]), bool(u.get("insecure", False)))
                for u in data.get("upstreams", [])
            )
            threshold = data.get("attestation_threshold")
            return cls(
                chain_id=str(data["chain_id"]),
                genesis_time=str(data["genesis_time"]),
                governance_public_key=_unb64(
                    "governance_public_key", data["governance_public_key"]
                ),
                authorities=authorities,
                ca_certificate=str(data["ca_certificate"]),
                upstreams=upstreams,
                attestation_threshold=None if threshold is None else int(threshold),
            )
        except (KeyError, TypeError) as exc:
            raise GenesisError(f"genesis: missing or malformed field {exc}") from exc

    @classmethod
    def load(cls, path: Path) -> Genesis:
        try:
            data = json.loads(path.read_text())
        except OSError as exc:
            raise GenesisError(f"cannot read genesis {path}: {exc.strerror}") from exc
        except json.JSONDecodeError as exc:
            raise GenesisError(f"genesis {path} is not valid JSON: {exc}") from exc
        return cls.from_dict(data)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


@dataclass(frozen=True, slots=True)
class LocalNode:
    """One node of a generated network: its data dir and settings file."""

    name: str
    role: str
    data_dir: Path
    config_file: Path
    http_port: int
    grpc_port: int
    metrics_port: int
    host: str

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    @property
    def grpc_address(self) -> str:
        return f"{self.host}:{self.grpc_port}"


@dataclass(frozen=True, slots=True)
class LocalNetwork:
    root: Path
    genesis: Genesis
    nodes: tuple[LocalNode, ...] = field(default=())


def create_network(
    root: Path,
    authorities: int = 4,
    peers: int = 2,
    chain_id: str = "pyrsia-local",
    host: str = "127.0.0.1",
    base_port: int = 17800,
    upstreams: tuple[Upstream, ...] = (),
    attestation_threshold: int | None = None,
    insecure_plaintext: bool = False,
) -> LocalNetwork:
    """Write a genesis and all keys, certificates and node settings under ``root``.

    Layout: ``root/genesis.json``, ``root/ca/`` (network CA), ``root/governance.key`` and one
    data dir per node (``root/authority-0``, ``root/peer-0``, …) holding ``keys/`` and
    ``node.yaml``. Node i (authorities first) listens on ``base_port + 10*i`` (HTTP), ``+1``
    (gRPC) and ``+2`` (metrics).
    """
    # consensus imports this module; import it here, not at the top, to avoid a cycle
    from pyrsia_node.consensus.service import initialize_state

    if authorities < 1:
        raise GenesisError("a network needs at least one authority")
    if peers < 0:
        raise GenesisError("the number of peers cannot be negative")
    if base_port < 1 or base_port + 10 * (authorities + peers) > 65535:
        raise GenesisError(f"base port {base_port} leaves no room for all nodes' ports")
    root.mkdir(parents=True, exist_ok=True)
    ca = tls.create_ca(chain_id)
    tls.save_key_pair(root / "ca", ca, stem="ca")
    governance = Identity.generate()
    governance.save(root / "governance.key")

    plan = [("authority", f"authority-{i}") for i in range(authorities)]
    plan += [("peer", f"peer-{i}") for i in range(peers)]
    nodes: list[LocalNode] = []
    entries: list[Authority] = []
    for index, (role, name) in enumerate(plan):
        port = base_port + 10 * index
        data_dir = root / name
        identity = Identity.generate()
        identity.save(data_dir / "keys" / "node.key")
        # A fresh key has never signed: say so, so the node may vote from its first start.
        initialize_state(data_dir / "consensus")
        tls.save_key_pair(data_dir / "keys", tls.issue_node_certificate(ca, name, (host,)))
        node = LocalNode(
            name, role, data_dir, data_dir / "node.yaml", port, port + 1, port + 2, host
        )
        nodes.append(node)
        if role == "authority":
            entries.append(
                Authority(
                    name,
                    identity.public_key,
                    f"{host}:{port + 1}",
                    f"{host}:{port}",
                    f"{host}:{port + 2}",
                )
            )

    genesis = Genesis(
        chain_id=chain_id,
        genesis_time=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        governance_public_key=governance.public_key,
        authorities=tuple(entries),
        ca_certificate=ca.cert_pem.decode(),
        upstreams=upstreams,
        attestation_threshold=attestation_threshold,
    )
    genesis.save(root / "genesis.json")
    seeds = [a.grpc_address for a in entries]
    for node in nodes:
        settings = {
            "data_dir": str(node.data_dir),
            "genesis": str(root / "genesis.json"),
            "role": node.role,
            "name": node.name,
            "listen_host": host,
            "advertise_host": host,
            "http_port": node.http_port,
            "grpc_port": node.grpc_port,
            "metrics_port": node.metrics_port,
            "bootstrap": [s for s in seeds if s != node.grpc_address],
            "insecure_plaintext": insecure_plaintext,
        }
        node.config_file.write_text(yaml.safe_dump(settings, sort_keys=False))
    return LocalNetwork(root, genesis, tuple(nodes))
