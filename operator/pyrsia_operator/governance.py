"""Membership changes as signed governance records, submitted to a running authority.

Adding or removing an ``AuthorityNode`` never edits files under running nodes: the operator
builds the ledger's ``GovernanceRecord`` (``pyrsia_node.ledger``), signs it with the
network's governance key and submits its canonical bytes to an authority's admin API
(``POST /api/v1/records``); the network commits it like any record and applies it at
height H+2. A node that does not admit the record is reported as ``GovernanceRejected``
with what it answered; success is never assumed.

The record's ``sequence`` makes every membership change distinct (an authority removed and
added again produces new records) while staying stable across retries of one change: it
is the AuthorityNode's creation time (add) or deletion time (remove) in milliseconds.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Literal, Protocol

import aiohttp
from pyrsia_node.genesis import Authority
from pyrsia_node.identity import Identity
from pyrsia_node.ledger import GovernanceAction, GovernanceRecord

ENDPOINT = "/api/v1/records"


class GovernanceRejected(RuntimeError):
    """No authority accepted the record; says which node answered what."""


def sequence_from_timestamp(timestamp: str | None) -> int:
    """Milliseconds since the epoch of a Kubernetes timestamp (``2026-11-21T12:00:00Z``)."""
    if not timestamp:
        return 0
    moment = dt.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    return int(moment.timestamp() * 1000)


@dataclass(frozen=True, slots=True)
class MembershipChange:
    action: Literal["add", "remove"]
    chain_id: str
    authority: Authority
    sequence: int


def change_record(change: MembershipChange, governance: Identity) -> bytes:
    """The canonical bytes of the signed ``GovernanceRecord`` for ``change``."""
    a = change.authority
    action = GovernanceAction.ADD if change.action == "add" else GovernanceAction.REMOVE
    record = GovernanceRecord.membership(
        governance,
        change.chain_id,
        change.sequence,
        action,
        a.name,
        a.public_key,
        (a.grpc_address, a.http_address, a.metrics_address),
    )
    return record.encode()


class GovernanceSubmitter(Protocol):
    async def __call__(self, base_url: str, record: bytes) -> None: ...


class HttpGovernanceSubmitter:
    """POSTs the record to an authority's admin API; anything but 2xx is a rejection."""

    def __init__(self, timeout: float = 10.0) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    async def __call__(self, base_url: str, record: bytes) -> None:
        url = f"{base_url}{ENDPOINT}"
        headers = {"Content-Type": "application/octet-stream"}
        try:
            async with (
                aiohttp.ClientSession(timeout=self._timeout) as session,
                session.post(url, data=record, headers=headers) as resp,
            ):
                if resp.status // 100 == 2:
                    return
                text = (await resp.text())[:300]
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise GovernanceRejected(f"{url} unreachable: {exc or type(exc).__name__}") from exc
        raise GovernanceRejected(f"{url} answered HTTP {resp.status}: {text}")
