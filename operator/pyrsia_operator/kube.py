"""A small async Kubernetes REST client: get, list, apply, patch status, delete.

kopf talks to the API for watching and finalizers; this client does the rest on the same
event loop (aiohttp, no threads). Apply is server-side apply (``application/apply-patch+yaml``
with a field manager), preceded by a read so unchanged objects are not written at all, and
followed by a create when the server answers 404 (servers and emulators that do not create
on apply). Only the kinds the operator manages are known; others raise ``UnknownKindError``.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

FIELD_MANAGER = "pyrsia-operator"
PLURALS: dict[tuple[str, str], str] = {
    ("v1", "Secret"): "secrets",
    ("v1", "ConfigMap"): "configmaps",
    ("v1", "Service"): "services",
    ("v1", "PersistentVolumeClaim"): "persistentvolumeclaims",
    ("apps/v1", "StatefulSet"): "statefulsets",
    ("apps/v1", "DaemonSet"): "daemonsets",
    ("policy/v1", "PodDisruptionBudget"): "poddisruptionbudgets",
    ("networking.k8s.io/v1", "NetworkPolicy"): "networkpolicies",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitors",
    ("pyrsia.io/v1alpha1", "PyrsiaNetwork"): "pyrsianetworks",
    ("pyrsia.io/v1alpha1", "AuthorityNode"): "authoritynodes",
}


class UnknownKindError(KeyError):
    """The operator does not manage this kind."""


class KubeError(RuntimeError):
    """The API server refused a request; carries its status code and message."""

    def __init__(self, status: int, method: str, path: str, message: str) -> None:
        super().__init__(f"{method} {path}: HTTP {status}: {message}")
        self.status = status


@dataclass(frozen=True, slots=True)
class Connection:
    """Where the API server is and how to authenticate to it."""

    server: str
    token: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    verify: bool = True

    @classmethod
    def from_environment(cls) -> Connection:
        """In-cluster service account, else the current kubeconfig context."""
        from kubernetes import client, config

        cfg = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
        except config.ConfigException:
            config.load_kube_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
        auth = cfg.api_key.get("authorization") or cfg.api_key.get("BearerToken")
        token = auth.removeprefix("Bearer ").strip() if auth else None
        return cls(
            server=cfg.host,
            token=token,
            ca_file=cfg.ssl_ca_cert,
            cert_file=cfg.cert_file,
            key_file=cfg.key_file,
            verify=bool(cfg.verify_ssl),
        )


def path_for(api_version: str, kind: str, namespace: str, name: str | None = None) -> str:
    try:
        plural = PLURALS[(api_version, kind)]
    except KeyError:
        raise UnknownKindError(f"{api_version} {kind}") from None
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    path = f"{base}/namespaces/{namespace}/{plural}"
    return f"{path}/{name}" if name is not None else path


def is_subset(wanted: object, actual: object) -> bool:
    """Whether ``actual`` already holds everything in ``wanted`` (servers add defaults)."""
    if isinstance(wanted, Mapping):
        return isinstance(actual, Mapping) and all(
            k in actual and is_subset(v, actual[k]) for k, v in wanted.items()
        )
    if isinstance(wanted, list):
        return (
            isinstance(actual, list)
            and len(wanted) == len(actual)
            and all(is_subset(w, a) for w, a in zip(wanted, actual, strict=True))
        )
    return wanted == actual


def matches_labels(obj: Mapping[str, Any], selector: Mapping[str, str]) -> bool:
    found = (obj.get("metadata") or {}).get("labels") or {}
    return all(found.get(k) == v for k, v in selector.items())


class Kube:
    """Async API client bound to one ``Connection``; close it with ``close()``."""

    def __init__(self, connection: Connection) -> None:
        self._conn = connection
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            ctx: ssl.SSLContext | bool = False
            if self._conn.server.startswith("https"):
                context = ssl.create_default_context(cafile=self._conn.ca_file)
                if self._conn.cert_file and self._conn.key_file:
                    context.load_cert_chain(self._conn.cert_file, self._conn.key_file)
                if not self._conn.verify:
                    context.check_hostname = False
                    context.verify_mode = ssl.CERT_NONE
                ctx = context
            headers = {"Accept": "application/json"}
            if self._conn.token:
                headers["Authorization"] = f"Bearer {self._conn.token}"
            self._session = aiohttp.ClientSession(
                base_url=self._conn.server.rstrip("/") + "/",
                headers=headers,
                connector=aiohttp.TCPConnector(ssl=ctx),
                timeout=aiohttp.ClientTimeout(total=30),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _request(
        self,
        method: str,
        path: str,
        body: object = None,
        content_type: str = "application/json",
        params: Mapping[str, str] | None = None,
    ) -> dict[str, Any] | None:
        """The decoded response, or None for 404 on a read or delete."""
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": content_type} if body is not None else {}
        async with self._client().request(
            method, path.lstrip("/"), data=data, headers=headers, params=params
        ) as resp:
            if resp.status == 404 and method in ("GET", "DELETE"):
                return None
            text = await resp.text()
            if resp.status >= 400:
                try:
                    message = json.loads(text).get("message", text)
                except (ValueError, AttributeError):
                    message = text
                raise KubeError(resp.status, method, path, str(message)[:500])
            result: dict[str, Any] = json.loads(text) if text else {}
            return result

    async def get(
        self, api_version: str, kind: str, namespace: str, name: str
    ) -> dict[str, Any] | None:
        return await self._request("GET", path_for(api_version, kind, namespace, name))

    async def list(
        self, api_version: str, kind: str, namespace: str, labels: Mapping[str, str] | None = None
    ) -> list[dict[str, Any]]:
        params = (
            {"labelSelector": ",".join(f"{k}={v}" for k, v in labels.items())} if labels else None
        )
        found = await self._request("GET", path_for(api_version, kind, namespace), params=params)
        items: list[dict[str, Any]] = (found or {}).get("items") or []
        # Filter here as well: some servers (and the test emulator) ignore labelSelector.
        return [i for i in items if matches_labels(i, labels or {})]

    async def apply(self, obj: Mapping[str, Any]) -> bool:
        """Make the object match ``obj``; True when something was written."""
        meta = obj["metadata"]
        api_version, kind = obj["apiVersion"], obj["kind"]
        existing = await self.get(api_version, kind, meta["namespace"], meta["name"])
        if existing is not None and is_subset(obj, existing):
            return False
        path = path_for(api_version, kind, meta["namespace"], meta["name"])
        if existing is None:
            await self._request(
                "POST", path_for(api_version, kind, meta["namespace"]), body=dict(obj)
            )
            return True
        await self._request(
            "PATCH",
            path,
            body=dict(obj),
            content_type="application/apply-patch+yaml",
            params={"fieldManager": FIELD_MANAGER, "force": "true"},
        )
        return True

    async def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        created = await self._request(
            "POST", path_for(obj["apiVersion"], obj["kind"], meta["namespace"]), body=dict(obj)
        )
        return created or {}

    async def read(self, path: str) -> dict[str, Any] | None:
        """GET an API path (any kind, e.g. kopf's peering objects); None when absent."""
        return await self._request("GET", path)

    async def post(self, collection: str, obj: Mapping[str, Any]) -> dict[str, Any]:
        """POST ``obj`` to the collection path ``collection``; ``KubeError`` on refusal
        (409 when it exists already)."""
        return await self._request("POST", collection, body=dict(obj)) or {}

    async def patch_status(
        self, api_version: str, kind: str, namespace: str, name: str, status: Mapping[str, Any]
    ) -> None:
        await self._request(
            "PATCH",
            path_for(api_version, kind, namespace, name) + "/status",
            body={"status": dict(status)},
            content_type="application/merge-patch+json",
        )

    async def delete(self, api_version: str, kind: str, namespace: str, name: str) -> bool:
        """True when something was deleted, False when it was already gone."""
        gone = await self._request(
            "DELETE",
            path_for(api_version, kind, namespace, name),
            body={"propagationPolicy": "Background"},
        )
        return gone is not None

    async def group_version_served(self, api_version: str) -> bool:
        """Whether the server serves an API group version (e.g. ServiceMonitor's CRD)."""
        return await self._request("GET", f"/apis/{api_version}") is not None
