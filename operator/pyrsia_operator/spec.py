"""Typed, validated views of the ``PyrsiaNetwork`` and ``AuthorityNode`` specs.

The API server applies the CRD defaults and CEL rules; this module applies the same defaults
and the same rules again, because an operator must not trust that the CRD installed in the
cluster is the current one (and the test emulator enforces neither). Every rule raises
``SpecError`` with the message the CRD uses, so users see one wording wherever it is caught.

Nothing here talks to Kubernetes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pyrsia_node.genesis import quorum

DEFAULT_UPSTREAMS: tuple[tuple[str, str], ...] = (("docker.io", "https://registry-1.docker.io"),)
_CHAIN_ID = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,50}[a-z0-9])?$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$")
_HOST_PORT = re.compile(r"^[^:]+:[0-9]{1,5}$")

BFT_MESSAGE = (
    "a BFT quorum needs 1 authority (development, no fault tolerance) or at least 4: n "
    "authorities tolerate f faults only when n >= 3f+1, and with 2 or 3 the quorum "
    "floor(2n/3)+1 equals n, so one failed authority halts the network while adding nothing "
    "over 1"
)
THRESHOLD_MESSAGE = (
    "attestationThreshold cannot exceed the number of authorities: a record needs that many "
    "matching attestations, so it could never commit"
)


class SpecError(ValueError):
    """A custom resource's spec cannot be turned into a working network; says what to change."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"spec.{path}: {message}")
        self.path = path


def bft_tolerable(n: int) -> bool:
    """Whether n authorities form a useful BFT validator set (1, or n >= 4)."""
    return n == 1 or n >= 4


def max_faulty(n: int) -> int:
    """f, the number of authorities that may fail while the rest still reach quorum."""
    return n - quorum(n)


@dataclass(frozen=True, slots=True)
class Storage:
    size: str = "10Gi"
    storage_class: str | None = None


@dataclass(frozen=True, slots=True)
class Upstream:
    name: str
    url: str
    insecure: bool = False


@dataclass(frozen=True, slots=True)
class PeersSpec:
    mode: Literal["StatefulSet", "DaemonSet"] = "StatefulSet"
    replicas: int = 2
    storage: Storage = field(default_factory=Storage)
    resources: Mapping[str, Any] = field(default_factory=dict)
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()


@dataclass(frozen=True, slots=True)
class NetworkSpec:
    """The validated spec of one ``PyrsiaNetwork``."""

    name: str
    namespace: str
    chain_id: str
    image: str
    image_pull_policy: str = "IfNotPresent"
    authority_count: int | None = None
    authority_nodes: tuple[str, ...] = ()
    authority_storage: Storage = field(default_factory=Storage)
    authority_resources: Mapping[str, Any] = field(default_factory=dict)
    peers: PeersSpec = field(default_factory=PeersSpec)
    upstreams: tuple[Upstream, ...] = ()
    attestation_threshold: int | None = None
    weights: Mapping[str, float] = field(default_factory=dict)
    service_monitor: bool = False
    metrics_interval: str = "30s"
    mirror_type: str = "ClusterIP"
    mirror_port: int = 80
    mirror_node_port: int | None = None
    bootstrap_peers: tuple[str, ...] = ()
    pvc_retention: Literal["Retain", "Delete"] = "Retain"

    @property
    def genesis_authority_count(self) -> int:
        return (
            self.authority_count if self.authority_count is not None else len(self.authority_nodes)
        )

    def genesis_authority_names(self) -> tuple[str, ...]:
        """Names of the genesis authorities: operator-named for a count, else the nodes."""
        if self.authority_count is not None:
            return tuple(f"{self.name}-authority-{i}" for i in range(self.authority_count))
        return self.authority_nodes


@dataclass(frozen=True, slots=True)
class ExternalEndpoint:
    host: str
    grpc_port: int = 44000
    http_port: int = 7888


@dataclass(frozen=True, slots=True)
class AuthoritySpec:
    """One authority: from an ``AuthorityNode`` or one of a network's counted authorities."""

    name: str
    network: str
    key_secret: str
    storage: Storage = field(default_factory=Storage)
    resources: Mapping[str, Any] = field(default_factory=dict)
    zone: str | None = None
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()
    external: ExternalEndpoint | None = None
    from_resource: bool = False  # True: an AuthorityNode object owns this authority


def _mapping(path: str, raw: object) -> Mapping[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise SpecError(path, f"expected an object, got {raw!r}")
    return raw


def _int(path: str, raw: object, low: int, high: int) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise SpecError(path, f"expected an integer, got {raw!r}")
    if not low <= raw <= high:
        raise SpecError(path, f"must be between {low} and {high}, got {raw}")
    return raw


def _str(path: str, raw: object, pattern: re.Pattern[str] | None = None) -> str:
    if not isinstance(raw, str) or not raw:
        raise SpecError(path, f"expected a non-empty string, got {raw!r}")
    if pattern is not None and not pattern.match(raw):
        raise SpecError(path, f"{raw!r} does not match {pattern.pattern}")
    return raw


def _enum(path: str, raw: object, allowed: tuple[str, ...]) -> str:
    if raw not in allowed:
        raise SpecError(path, f"expected one of {', '.join(allowed)}, got {raw!r}")
    return str(raw)


def _storage(path: str, raw: object) -> Storage:
    data = _mapping(path, raw)
    size = _str(f"{path}.size", data.get("size", "10Gi"), _QUANTITY)
    storage_class = data.get("storageClassName")
    if storage_class is not None:
        storage_class = _str(f"{path}.storageClassName", storage_class)
    return Storage(size, storage_class)


def _tolerations(path: str, raw: object) -> tuple[Mapping[str, Any], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(t, Mapping) for t in raw):
        raise SpecError(path, "expected a list of tolerations")
    return tuple(raw)


def _string_map(path: str, raw: object) -> Mapping[str, str]:
    data = _mapping(path, raw)
    if not all(isinstance(v, str) for v in data.values()):
        raise SpecError(path, "expected string values")
    return dict(data)


def parse_network(name: str, namespace: str, spec: Mapping[str, Any]) -> NetworkSpec:
    """Validate a ``PyrsiaNetwork`` spec (defaults applied here when absent)."""
    chain_id = _str("chainId", spec.get("chainId"), _CHAIN_ID)
    image = _str("image", spec.get("image"))
    pull = _enum(
        "imagePullPolicy",
        spec.get("imagePullPolicy", "IfNotPresent"),
        ("Always", "IfNotPresent", "Never"),
    )

    auth = _mapping("authorities", spec.get("authorities"))
    if ("count" in auth) == ("nodes" in auth):
        raise SpecError("authorities", "set exactly one of authorities.count and authorities.nodes")
    count: int | None = None
    nodes: tuple[str, ...] = ()
    if "count" in auth:
        count = _int("authorities.count", auth["count"], 1, 100)
        n = count
    else:
        raw_nodes = auth["nodes"]
        if not isinstance(raw_nodes, list):
            raise SpecError("authorities.nodes", "expected a list of AuthorityNode names")
        nodes = tuple(_str("authorities.nodes[]", n, _DNS_LABEL) for n in raw_nodes)
        if len(set(nodes)) != len(nodes):
            raise SpecError("authorities.nodes", "an AuthorityNode is listed twice")
        n = len(nodes)
    if not bft_tolerable(n):
        raise SpecError("authorities", f"{n} authorities: {BFT_MESSAGE}")

    peers_raw = _mapping("peers", spec.get("peers"))
    peers = PeersSpec(
        mode=(
            "DaemonSet"
            if _enum(
                "peers.mode", peers_raw.get("mode", "StatefulSet"), ("StatefulSet", "DaemonSet")
            )
            == "DaemonSet"
            else "StatefulSet"
        ),
        replicas=_int("peers.replicas", peers_raw.get("replicas", 2), 0, 1000),
        storage=_storage("peers.storage", peers_raw.get("storage")),
        resources=_mapping("peers.resources", peers_raw.get("resources")),
        node_selector=_string_map("peers.nodeSelector", peers_raw.get("nodeSelector")),
        tolerations=_tolerations("peers.tolerations", peers_raw.get("tolerations")),
    )

    raw_upstreams = spec.get("upstreams")
    upstreams: list[Upstream] = []
    if raw_upstreams is None:
        upstreams = [Upstream(n, u) for n, u in DEFAULT_UPSTREAMS]
    elif not isinstance(raw_upstreams, list):
        raise SpecError("upstreams", "expected a list of {name, url}")
    else:
        for i, item in enumerate(raw_upstreams):
            data = _mapping(f"upstreams[{i}]", item)
            url = _str(f"upstreams[{i}].url", data.get("url"))
            insecure = bool(data.get("insecure", False))
            if not url.startswith(("http://", "https://")):
                raise SpecError(f"upstreams[{i}].url", f"{url!r} is not an http(s) URL")
            if url.startswith("http://") and not insecure:
                raise SpecError(f"upstreams[{i}]", "an http:// upstream needs insecure=true")
            upstreams.append(
                Upstream(_str(f"upstreams[{i}].name", data.get("name")), url, insecure)
            )
        if len({u.name for u in upstreams}) != len(upstreams):
            raise SpecError("upstreams", "two upstreams share a name")

    threshold = spec.get("attestationThreshold")
    if threshold is not None:
        threshold = _int("attestationThreshold", threshold, 1, 1000)
        if threshold > n:
            raise SpecError("attestationThreshold", f"{threshold} > {n}: {THRESHOLD_MESSAGE}")

    weights: dict[str, float] = {}
    for key, value in _mapping("weights", spec.get("weights")).items():
        if key not in ("cpu", "network", "disk", "uploads"):
            raise SpecError(f"weights.{key}", "expected one of cpu, network, disk, uploads")
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise SpecError(f"weights.{key}", f"expected a number >= 0, got {value!r}")
        weights[key] = float(value)

    metrics = _mapping("metrics", spec.get("metrics"))
    mirror = _mapping("mirror", spec.get("mirror"))
    mirror_type = _enum(
        "mirror.type", mirror.get("type", "ClusterIP"), ("ClusterIP", "NodePort", "LoadBalancer")
    )
    node_port = mirror.get("nodePort")
    if node_port is not None:
        node_port = _int("mirror.nodePort", node_port, 30000, 32767)
        if mirror_type == "ClusterIP":
            raise SpecError("mirror.nodePort", "needs mirror.type NodePort or LoadBalancer")

    bootstrap_raw = spec.get("bootstrapPeers") or []
    if not isinstance(bootstrap_raw, list):
        raise SpecError("bootstrapPeers", "expected a list of host:port")
    bootstrap = tuple(_str("bootstrapPeers[]", b, _HOST_PORT) for b in bootstrap_raw)

    retention = _enum("pvcRetention", spec.get("pvcRetention", "Retain"), ("Retain", "Delete"))
    return NetworkSpec(
        name=name,
        namespace=namespace,
        chain_id=chain_id,
        image=image,
        image_pull_policy=pull,
        authority_count=count,
        authority_nodes=nodes,
        authority_storage=_storage("authorities.storage", auth.get("storage")),
        authority_resources=_mapping("authorities.resources", auth.get("resources")),
        peers=peers,
        upstreams=tuple(upstreams),
        attestation_threshold=threshold,
        weights=weights,
        service_monitor=bool(metrics.get("serviceMonitor", False)),
        metrics_interval=_str("metrics.interval", metrics.get("interval", "30s")),
        mirror_type=mirror_type,
        mirror_port=_int("mirror.port", mirror.get("port", 80), 1, 65535),
        mirror_node_port=node_port,
        bootstrap_peers=bootstrap,
        pvc_retention="Delete" if retention == "Delete" else "Retain",
    )


def check_immutable(old: Mapping[str, Any], new: Mapping[str, Any]) -> None:
    """The transition rules of the CRD: chain id and genesis authorities never change."""
    if old.get("chainId") != new.get("chainId"):
        raise SpecError(
            "chainId",
            "chainId is immutable: every signature and the genesis depend on it; create a new "
            "PyrsiaNetwork for a new chain",
        )
    old_auth = _mapping("authorities", old.get("authorities"))
    new_auth = _mapping("authorities", new.get("authorities"))
    if (old_auth.get("count"), old_auth.get("nodes")) != (
        new_auth.get("count"),
        new_auth.get("nodes"),
    ):
        raise SpecError(
            "authorities",
            "the genesis authorities are immutable; to change membership create or delete "
            "AuthorityNode objects that reference this network",
        )


def counted_authority(network: NetworkSpec, index: int) -> AuthoritySpec:
    """The i-th operator-named authority of a network with ``authorities.count``."""
    name = f"{network.name}-authority-{index}"
    return AuthoritySpec(
        name=name,
        network=network.name,
        key_secret=f"{name}-key",
        storage=network.authority_storage,
        resources=network.authority_resources,
    )


def parse_authority(name: str, spec: Mapping[str, Any]) -> AuthoritySpec:
    """Validate an ``AuthorityNode`` spec."""
    if not _DNS_LABEL.match(name):
        raise SpecError("metadata.name", f"{name!r}: use at most 52 lowercase letters, digits, '-'")
    ref = _mapping("networkRef", spec.get("networkRef"))
    network = _str("networkRef.name", ref.get("name"))
    key = _mapping("keySecret", spec.get("keySecret"))
    key_secret = _str("keySecret.name", key.get("name", f"{name}-key"))
    external: ExternalEndpoint | None = None
    if spec.get("externalEndpoint") is not None:
        ext = _mapping("externalEndpoint", spec.get("externalEndpoint"))
        external = ExternalEndpoint(
            host=_str("externalEndpoint.host", ext.get("host")),
            grpc_port=_int("externalEndpoint.grpcPort", ext.get("grpcPort", 44000), 1, 65535),
            http_port=_int("externalEndpoint.httpPort", ext.get("httpPort", 7888), 1, 65535),
        )
    zone = spec.get("zone")
    return AuthoritySpec(
        name=name,
        network=network,
        key_secret=key_secret,
        storage=_storage("storage", spec.get("storage")),
        resources=_mapping("resources", spec.get("resources")),
        zone=None if zone is None else _str("zone", zone),
        node_selector=_string_map("nodeSelector", spec.get("nodeSelector")),
        tolerations=_tolerations("tolerations", spec.get("tolerations")),
        external=external,
        from_resource=True,
    )
