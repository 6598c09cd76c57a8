"""Pure manifest builders: validated specs and key material in, Kubernetes objects out.

Every function here returns plain dicts ready to apply and never talks to the API server,
reads a clock or draws randomness; the handlers diff and apply what these return. Names:

- ``<net>-authorities`` headless Service over all authority pods (stable DNS for genesis
  addresses), ``<net>-peers`` headless Service over peers, ``<net>-mirror`` the OCI pull
  Service, ``<net>-api`` the authorities' admin API;
- one single-replica StatefulSet per authority (named after it), so the operator can roll
  authorities one at a time; ``<net>-peer`` StatefulSet or DaemonSet for the peers;
- ConfigMaps ``<net>-genesis`` and ``<net>-config``; Secrets ``<net>-ca``,
  ``<net>-governance``, ``<net>-peer-tls``, ``<authority>-key`` and ``<authority>-tls``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml
from pyrsia_node.genesis import Authority, Genesis, Upstream
from pyrsia_node.identity import Identity
from pyrsia_node.tls import KeyPair

from pyrsia_operator import material
from pyrsia_operator.spec import AuthoritySpec, NetworkSpec, max_faulty

GROUP = "pyrsia.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
DATA_DIR = "/var/lib/pyrsia"
CONFIG_DIR = "/etc/pyrsia"
GENESIS_PATH = f"{CONFIG_DIR}/genesis/genesis.json"
HTTP_PORT = 7888
GRPC_PORT = 44000
METRICS_PORT = 9090
RUN_AS = 10001
TEMPLATE_HASH = "pyrsia.io/template-hash"
LABEL_NETWORK = "pyrsia.io/network"
LABEL_ROLE = "pyrsia.io/role"
LABEL_AUTHORITY = "pyrsia.io/authority"
LABEL_METRICS = "pyrsia.io/metrics"


@dataclass(frozen=True, slots=True)
class Owner:
    """The custom resource that owns rendered objects (for ownerReferences)."""

    kind: str
    name: str
    uid: str

    def reference(self) -> dict[str, Any]:
        return {
            "apiVersion": API_VERSION,
            "kind": self.kind,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


def labels(network: NetworkSpec, role: str | None = None) -> dict[str, str]:
    result = {
        "app.kubernetes.io/name": "pyrsia",
        "app.kubernetes.io/instance": network.name,
        "app.kubernetes.io/managed-by": "pyrsia-operator",
        LABEL_NETWORK: network.name,
    }
    if role is not None:
        result["app.kubernetes.io/component"] = role
        result[LABEL_ROLE] = role
    return result


def selector(network: NetworkSpec, role: str) -> dict[str, str]:
    return {LABEL_NETWORK: network.name, LABEL_ROLE: role}


def selector_string(network: NetworkSpec, role: str) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(selector(network, role).items()))


def _meta(
    network: NetworkSpec,
    owner: Owner,
    name: str,
    role: str | None = None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": network.namespace,
        "labels": {**labels(network, role), **(extra or {})},
        "ownerReferences": [owner.reference()],
    }


def authorities_service_name(network: NetworkSpec) -> str:
    return f"{network.name}-authorities"


def authority_pod_host(network: NetworkSpec, authority: AuthoritySpec) -> str:
    """Cluster DNS of an authority's pod (its StatefulSet has exactly one replica)."""
    return f"{authority.name}-0.{authorities_service_name(network)}.{network.namespace}.svc"


def authority_hosts(network: NetworkSpec, authority: AuthoritySpec) -> tuple[str, ...]:
    hosts = [authority_pod_host(network, authority)]
    if authority.external is not None:
        hosts.append(authority.external.host)
    return tuple(hosts)


def genesis_authority(
    network: NetworkSpec, authority: AuthoritySpec, public_key: bytes
) -> Authority:
    """The genesis entry of an authority: its key and the addresses other nodes dial."""
    if authority.external is not None:
        ext = authority.external
        grpc = f"{ext.host}:{ext.grpc_port}"
        http = f"{ext.host}:{ext.http_port}"
    else:
        host = authority_pod_host(network, authority)
        grpc, http = f"{host}:{GRPC_PORT}", f"{host}:{HTTP_PORT}"
    metrics = f"{authority_pod_host(network, authority)}:{METRICS_PORT}"
    return Authority(authority.name, public_key, grpc, http, metrics)


def desired_genesis(
    network: NetworkSpec,
    authorities: Sequence[tuple[AuthoritySpec, bytes]],
    keys: material.NetworkKeys,
    genesis_time: str,
) -> Genesis:
    """The genesis of a new network; rendered once, then read back from its ConfigMap."""
    return Genesis(
        chain_id=network.chain_id,
        genesis_time=genesis_time,
        governance_public_key=keys.governance.public_key,
        authorities=tuple(genesis_authority(network, a, key) for a, key in authorities),
        ca_certificate=keys.ca.cert_pem.decode(),
        upstreams=tuple(Upstream(u.name, u.url, u.insecure) for u in network.upstreams),
        attestation_threshold=network.attestation_threshold,
    )


def genesis_configmap(network: NetworkSpec, owner: Owner, genesis: Genesis) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(network, owner, f"{network.name}-genesis"),
        "data": {"genesis.json": json.dumps(genesis.to_dict(), indent=2, sort_keys=True) + "\n"},
    }


def node_settings(network: NetworkSpec, genesis: Genesis, role: str) -> dict[str, Any]:
    """The node.yaml of one role (keys of ``pyrsia_node.config.NodeConfig``).

    Per-pod values (name, advertised host) come from the environment (``PYRSIA_NAME``,
    ``PYRSIA_ADVERTISE_HOST``), so one file serves every pod of a role.
    """
    settings: dict[str, Any] = {
        "data_dir": DATA_DIR,
        "genesis": GENESIS_PATH,
        "role": role,
        "listen_host": "0.0.0.0",
        "http_port": HTTP_PORT,
        "grpc_port": GRPC_PORT,
        "metrics_port": METRICS_PORT,
        "bootstrap": [a.grpc_address for a in genesis.authorities] + list(network.bootstrap_peers),
    }
    if network.weights:
        settings["weights"] = dict(network.weights)
    return settings


def config_configmap(network: NetworkSpec, owner: Owner, genesis: Genesis) -> dict[str, Any]:
    data = {
        f"{role}.yaml": yaml.safe_dump(node_settings(network, genesis, role), sort_keys=True)
        for role in ("authority", "peer")
    }
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(network, owner, f"{network.name}-config"),
        "data": data,
    }


def _secret(meta: dict[str, Any], values: Mapping[str, bytes]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": meta,
        "data": material.encode_data(values),
    }


def network_secrets(
    network: NetworkSpec, owner: Owner, keys: material.NetworkKeys, peer_tls: KeyPair
) -> list[dict[str, Any]]:
    """The CA and governance key (operator only) and the certificate all peers share."""
    return [
        _secret(
            _meta(network, owner, f"{network.name}-ca"),
            {material.CA_CERT: keys.ca.cert_pem, material.CA_KEY: keys.ca.key_pem},
        ),
        _secret(
            _meta(network, owner, f"{network.name}-governance"),
            {material.GOVERNANCE_KEY: keys.governance.private_pem()},
        ),
        _secret(
            _meta(network, owner, f"{network.name}-peer-tls", "peer"),
            {material.TLS_KEY: peer_tls.key_pem, material.TLS_CERT: peer_tls.cert_pem},
        ),
    ]


def authority_key_secret(
    network: NetworkSpec, owner: Owner, authority: AuthoritySpec, identity: Identity
) -> dict[str, Any]:
    return _secret(
        _meta(network, owner, authority.key_secret, "authority", {LABEL_AUTHORITY: authority.name}),
        {material.NODE_KEY: identity.private_pem()},
    )


def authority_tls_secret(
    network: NetworkSpec, owner: Owner, authority: AuthoritySpec, pair: KeyPair
) -> dict[str, Any]:
    return _secret(
        _meta(
            network,
            owner,
            f"{authority.name}-tls",
            "authority",
            {LABEL_AUTHORITY: authority.name},
        ),
        {material.TLS_KEY: pair.key_pem, material.TLS_CERT: pair.cert_pem},
    )


_CONTAINER_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": RUN_AS,
    "runAsGroup": RUN_AS,
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}
_POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": RUN_AS,
    "runAsGroup": RUN_AS,
    "fsGroup": RUN_AS,
    "seccompProfile": {"type": "RuntimeDefault"},
}


def _container(
    network: NetworkSpec,
    role: str,
    env: list[dict[str, Any]],
    resources: Mapping[str, Any],
    key_mounts: list[dict[str, Any]],
) -> dict[str, Any]:
    return {
        "name": "node",
        "image": network.image,
        "imagePullPolicy": network.image_pull_policy,
        "args": ["node", "--config", f"{CONFIG_DIR}/{role}.yaml"],
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            *env,
        ],
        "ports": [
            {"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"},
            {"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
        ],
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": "http"},
            "periodSeconds": 5,
            "failureThreshold": 3,
        },
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": "http"},
            "initialDelaySeconds": 10,
            "periodSeconds": 10,
            "failureThreshold": 6,
        },
        "resources": dict(resources),
        "securityContext": dict(_CONTAINER_SECURITY),
        "volumeMounts": [
            {"name": "data", "mountPath": DATA_DIR},
            {
                "name": "config",
                "mountPath": f"{CONFIG_DIR}/{role}.yaml",
                "subPath": f"{role}.yaml",
                "readOnly": True,
            },
            {"name": "genesis", "mountPath": f"{CONFIG_DIR}/genesis", "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
            *key_mounts,
        ],
    }


def _key_mount(volume: str, key: str) -> dict[str, Any]:
    # subPath mounts of single files keep <data_dir>/keys/ writable for anything else.
    return {"name": volume, "mountPath": f"{DATA_DIR}/keys/{key}", "subPath": key, "readOnly": True}


def _common_volumes(network: NetworkSpec) -> list[dict[str, Any]]:
    return [
        {"name": "config", "configMap": {"name": f"{network.name}-config"}},
        {"name": "genesis", "configMap": {"name": f"{network.name}-genesis"}},
        {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
    ]


def _pvc_template(network: NetworkSpec, size: str, storage_class: str | None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": size}},
    }
    if storage_class is not None:
        spec["storageClassName"] = storage_class
    # The network label lets the operator find the claims when pvcRetention is Delete.
    return {"metadata": {"name": "data", "labels": {LABEL_NETWORK: network.name}}, "spec": spec}


def template_hash(template: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:16]


def authority_statefulset(
    network: NetworkSpec, owner: Owner, authority: AuthoritySpec
) -> dict[str, Any]:
    """A one-replica StatefulSet for one authority, annotated with its pod template hash."""
    pod_labels = {**labels(network, "authority"), LABEL_AUTHORITY: authority.name}
    advertise = (
        authority.external.host
        if authority.external is not None
        else f"$(POD_NAME).{authorities_service_name(network)}.{network.namespace}.svc"
    )
    env = [
        {"name": "PYRSIA_NAME", "value": authority.name},
        {"name": "PYRSIA_ADVERTISE_HOST", "value": advertise},
    ]
    container = _container(
        network,
        "authority",
        env,
        authority.resources,
        [
            _key_mount("node-key", material.NODE_KEY),
            _key_mount("tls", material.TLS_KEY),
            _key_mount("tls", material.TLS_CERT),
        ],
    )
    pod_spec: dict[str, Any] = {
        "securityContext": dict(_POD_SECURITY),
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 30,
        "containers": [container],
        "volumes": [
            *_common_volumes(network),
            {
                "name": "node-key",
                "secret": {"secretName": authority.key_secret, "defaultMode": 0o400},
            },
            {
                "name": "tls",
                "secret": {"secretName": f"{authority.name}-tls", "defaultMode": 0o400},
            },
        ],
        "affinity": {
            "podAntiAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "weight": 100,
                        "podAffinityTerm": {
                            "topologyKey": "kubernetes.io/hostname",
                            "labelSelector": {"matchLabels": selector(network, "authority")},
                        },
                    }
                ]
            }
        },
    }
    node_selector = dict(authority.node_selector)
    if authority.zone is not None:
        node_selector["topology.kubernetes.io/zone"] = authority.zone
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    if authority.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in authority.tolerations]
    template = {"metadata": {"labels": pod_labels}, "spec": pod_spec}
    meta = _meta(network, owner, authority.name, "authority", {LABEL_AUTHORITY: authority.name})
    meta["annotations"] = {TEMPLATE_HASH: template_hash(template)}
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": meta,
        "spec": {
            "replicas": 1,
            "serviceName": authorities_service_name(network),
            "podManagementPolicy": "Parallel",
            "selector": {
                "matchLabels": {**selector(network, "authority"), LABEL_AUTHORITY: authority.name}
            },
            "template": template,
            "volumeClaimTemplates": [
                _pvc_template(network, authority.storage.size, authority.storage.storage_class)
            ],
            "persistentVolumeClaimRetentionPolicy": _retention(network),
        },
    }


def _retention(network: NetworkSpec) -> dict[str, str]:
    return {"whenDeleted": network.pvc_retention, "whenScaled": "Retain"}


def peer_workload(network: NetworkSpec, owner: Owner) -> dict[str, Any]:
    """Peers as a StatefulSet (own volumes, scalable) or a DaemonSet (one per node)."""
    peers = network.peers
    daemon = peers.mode == "DaemonSet"
    advertise = (
        {"name": "PYRSIA_ADVERTISE_HOST", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
        if daemon
        else {
            "name": "PYRSIA_ADVERTISE_HOST",
            "value": f"$(POD_NAME).{network.name}-peers.{network.namespace}.svc",
        }
    )
    env = [{"name": "PYRSIA_NAME", "value": "$(POD_NAME)"}, advertise]
    container = _container(
        network,
        "peer",
        env,
        peers.resources,
        [_key_mount("tls", material.TLS_KEY), _key_mount("tls", material.TLS_CERT)],
    )
    volumes = [
        *_common_volumes(network),
        {"name": "tls", "secret": {"secretName": f"{network.name}-peer-tls", "defaultMode": 0o400}},
    ]
    if daemon:
        volumes.append({"name": "data", "emptyDir": {"sizeLimit": peers.storage.size}})
    pod_spec: dict[str, Any] = {
        "securityContext": dict(_POD_SECURITY),
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "containers": [container],
        "volumes": volumes,
    }
    if peers.node_selector:
        pod_spec["nodeSelector"] = dict(peers.node_selector)
    if peers.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in peers.tolerations]
    template = {"metadata": {"labels": labels(network, "peer")}, "spec": pod_spec}
    spec: dict[str, Any] = {
        "selector": {"matchLabels": selector(network, "peer")},
        "template": template,
    }
    if daemon:
        spec["updateStrategy"] = {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}
    else:
        spec.update(
            {
                "replicas": peers.replicas,
                "serviceName": f"{network.name}-peers",
                "podManagementPolicy": "Parallel",
                "volumeClaimTemplates": [
                    _pvc_template(network, peers.storage.size, peers.storage.storage_class)
                ],
                "persistentVolumeClaimRetentionPolicy": _retention(network),
            }
        )
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet" if daemon else "StatefulSet",
        "metadata": _meta(network, owner, f"{network.name}-peer", "peer"),
        "spec": spec,
    }


_NODE_PORTS = [
    {"name": "http", "port": HTTP_PORT, "targetPort": "http", "protocol": "TCP"},
    {"name": "grpc", "port": GRPC_PORT, "targetPort": "grpc", "protocol": "TCP"},
    {"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"},
]


def services(network: NetworkSpec, owner: Owner) -> list[dict[str, Any]]:
    """Headless Services for node DNS, the mirror (OCI pull API) and the admin API."""
    result: list[dict[str, Any]] = []
    for role, name in (
        ("authority", f"{network.name}-authorities"),
        ("peer", f"{network.name}-peers"),
    ):
        result.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": _meta(network, owner, name, role, {LABEL_METRICS: "true"}),
                "spec": {
                    "clusterIP": "None",
                    # Nodes must find each other before any of them is ready.
                    "publishNotReadyAddresses": True,
                    "selector": selector(network, role),
                    "ports": [dict(p) for p in _NODE_PORTS],
                },
            }
        )
    mirror_port: dict[str, Any] = {
        "name": "http",
        "port": network.mirror_port,
        "targetPort": "http",
        "protocol": "TCP",
    }
    if network.mirror_node_port is not None:
        mirror_port["nodePort"] = network.mirror_node_port
    result.append(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _meta(network, owner, f"{network.name}-mirror", "peer"),
            "spec": {
                "type": network.mirror_type,
                "selector": selector(network, "peer"),
                "ports": [mirror_port],
            },
        }
    )
    result.append(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _meta(network, owner, f"{network.name}-api", "authority"),
            "spec": {
                "type": "ClusterIP",
                "selector": selector(network, "authority"),
                "ports": [
                    {"name": "http", "port": HTTP_PORT, "targetPort": "http", "protocol": "TCP"}
                ],
            },
        }
    )
    return result


def authority_pdb(network: NetworkSpec, owner: Owner, members: int) -> dict[str, Any]:
    """At most f = n - quorum(n) authorities may be evicted at once."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(network, owner, f"{network.name}-authorities", "authority"),
        "spec": {
            "maxUnavailable": max_faulty(members),
            "selector": {"matchLabels": selector(network, "authority")},
        },
    }


def network_policy(network: NetworkSpec, owner: Owner, cross_cluster: bool) -> dict[str, Any]:
    """gRPC only among this network's pods (or from anywhere when it spans clusters);
    the pull/admin API and metrics from anywhere in the cluster."""
    own_pods = {"podSelector": {"matchLabels": {LABEL_NETWORK: network.name}}}
    open_ports = [{"protocol": "TCP", "port": HTTP_PORT}, {"protocol": "TCP", "port": METRICS_PORT}]
    grpc_rule: dict[str, Any] = {"ports": [{"protocol": "TCP", "port": GRPC_PORT}]}
    if not cross_cluster:
        grpc_rule["from"] = [own_pods]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(network, owner, f"{network.name}-nodes"),
        "spec": {
            "podSelector": {"matchLabels": {LABEL_NETWORK: network.name}},
            "policyTypes": ["Ingress"],
            "ingress": [grpc_rule, {"ports": open_ports}],
        },
    }


def service_monitor(network: NetworkSpec, owner: Owner) -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": _meta(network, owner, network.name),
        "spec": {
            "selector": {"matchLabels": {LABEL_NETWORK: network.name, LABEL_METRICS: "true"}},
            "namespaceSelector": {"matchNames": [network.namespace]},
            "endpoints": [
                {"port": "metrics", "path": "/metrics", "interval": network.metrics_interval}
            ],
        },
    }


@dataclass(frozen=True, slots=True)
class AuthorityMaterial:
    """What one authority's objects need besides its spec."""

    spec: AuthoritySpec
    identity: Identity
    tls: KeyPair
    key_secret_managed: bool  # False: the user supplied the key Secret; never render it


def desired_objects(
    network: NetworkSpec,
    owner: Owner,
    genesis: Genesis,
    keys: material.NetworkKeys,
    peer_tls: KeyPair,
    authorities: Sequence[AuthorityMaterial],
    members: int,
    service_monitor_available: bool,
) -> list[dict[str, Any]]:
    """Every object of a network, authorities' StatefulSets included, in apply order."""
    objects: list[dict[str, Any]] = [
        *network_secrets(network, owner, keys, peer_tls),
        genesis_configmap(network, owner, genesis),
        config_configmap(network, owner, genesis),
        *services(network, owner),
    ]
    for auth in authorities:
        if auth.key_secret_managed:
            objects.append(authority_key_secret(network, owner, auth.spec, auth.identity))
        objects.append(authority_tls_secret(network, owner, auth.spec, auth.tls))
        objects.append(authority_statefulset(network, owner, auth.spec))
    objects.append(peer_workload(network, owner))
    objects.append(authority_pdb(network, owner, members))
    cross_cluster = bool(network.bootstrap_peers) or any(
        a.spec.external is not None for a in authorities
    )
    objects.append(network_policy(network, owner, cross_cluster))
    if network.service_monitor and service_monitor_available:
        objects.append(service_monitor(network, owner))
    return objects
