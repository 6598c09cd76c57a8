"""Membership changes as signed governance records, submitted to a running authority.

Adding or removing an ``AuthorityNode`` never edits files under running nodes: the operator
signs a membership change with the network's governance key and submits it to an authority's
admin API (``POST /api/v1/governance``); the network commits it like any record and applies
it at height H+2.

Status of the node side: the ledger's ``GovernanceRecord`` and the node's governance
endpoint do not exist yet. ``change_record`` is therefore this module's own encoding
(canonical JSON with a domain-separated signature) and ``HttpGovernanceSubmitter`` reports a
node that does not accept the record as ``GovernanceRejected`` — it never pretends success.
When ``pyrsia_node.ledger`` defines ``GovernanceRecord``, ``change_record`` must build that
type instead; nothing else here changes.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import aiohttp
from pyrsia_node.genesis import Authority
from pyrsia_node.identity import Identity

DOMAIN = b"pyrsia/governance/membership/v1\n"
ENDPOINT = "/api/v1/governance"


class GovernanceRejected(RuntimeError):
    """No authority accepted the record; says which node answered what."""


@dataclass(frozen=True, slots=True)
class MembershipChange:
    action: Literal["add", "remove"]
    chain_id: str
    authority: Authority

    def payload(self) -> dict[str, Any]:
        a = self.authority
        return {
            "action": self.action,
            "chain_id": self.chain_id,
            "authority": {
                "name": a.name,
                "node_id": a.node_id,
                "public_key": base64.b64encode(a.public_key).decode(),
                "grpc_address": a.grpc_address,
                "http_address": a.http_address,
                "metrics_address": a.metrics_address,
            },
        }

    def signing_bytes(self) -> bytes:
        """Domain tag, then canonical JSON (sorted keys, no spaces); the chain id is inside."""
        return DOMAIN + json.dumps(self.payload(), sort_keys=True, separators=(",", ":")).encode()


def change_record(change: MembershipChange, governance: Identity) -> dict[str, Any]:
    """The signed record as submitted: payload, governance public key and signature."""
    return {
        "kind": "membership",
        "payload": change.payload(),
        "governance_public_key": base64.b64encode(governance.public_key).decode(),
        "signature": base64.b64encode(governance.sign(change.signing_bytes())).decode(),
    }


class GovernanceSubmitter(Protocol):
    async def __call__(self, base_url: str, record: dict[str, Any]) -> None: ...


class HttpGovernanceSubmitter:
    """POSTs the record to an authority's admin API; anything but 2xx is a rejection."""

    def __init__(self, timeout: float = 10.0) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    async def __call__(self, base_url: str, record: dict[str, Any]) -> None:
        url = f"{base_url}{ENDPOINT}"
        try:
            async with (
                aiohttp.ClientSession(timeout=self._timeout) as session,
                session.post(url, json=record) as resp,
            ):
                if resp.status // 100 == 2:
                    return
                text = (await resp.text())[:300]
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise GovernanceRejected(f"{url} unreachable: {exc or type(exc).__name__}") from exc
        hint = " (this node version has no governance endpoint yet)" if resp.status == 404 else ""
        raise GovernanceRejected(f"{url} answered HTTP {resp.status}{hint}: {text}")
