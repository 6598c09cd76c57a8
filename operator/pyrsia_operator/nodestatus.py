"""Reading a node's admin API (``GET /api/v1/status`` and ``/readyz``) for ``.status``.

``NodeStatusSource`` is the seam: handlers receive one through the operator's memo, so tests
plug in a fake while production uses ``HttpNodeStatusSource``. A node that cannot be reached
is reported as such, never as an exception; the operator keeps running either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp


@dataclass(frozen=True, slots=True)
class NodeStatus:
    name: str
    reachable: bool
    ready: bool = False
    node_id: str = ""
    height: int | None = None
    root: str = ""
    connected_peers: int = 0
    message: str = ""

    def to_status(self, role: str) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "name": self.name,
            "role": role,
            "ready": self.ready,
            "connectedPeers": self.connected_peers,
        }
        if self.node_id:
            entry["nodeId"] = self.node_id
        if self.height is not None:
            entry["height"] = self.height
        if self.message:
            entry["message"] = self.message
        return entry


class NodeStatusSource(Protocol):
    async def __call__(self, name: str, base_url: str) -> NodeStatus: ...


def parse_status(name: str, ready: bool, body: object) -> NodeStatus:
    """A ``NodeStatus`` from the JSON of ``GET /api/v1/status`` (tolerating missing parts)."""
    if not isinstance(body, dict):
        return NodeStatus(name, True, ready, message="status is not a JSON object")
    raw_ledger = body.get("ledger")
    ledger: dict[str, Any] = raw_ledger if isinstance(raw_ledger, dict) else {}
    height = ledger.get("height")
    peers = body.get("connected_peers")
    return NodeStatus(
        name=name,
        reachable=True,
        ready=ready,
        node_id=str(body.get("node_id", "")),
        height=height if isinstance(height, int) and not isinstance(height, bool) else None,
        root=str(ledger.get("root", "")),
        connected_peers=len(peers) if isinstance(peers, list) else 0,
    )


class HttpNodeStatusSource:
    """Queries nodes over HTTP with a short timeout; one session for all nodes."""

    def __init__(self, timeout: float = 3.0) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __call__(self, name: str, base_url: str) -> NodeStatus:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        try:
            async with self._session.get(f"{base_url}/readyz") as resp:
                ready = resp.status == 200
            async with self._session.get(f"{base_url}/api/v1/status") as resp:
                if resp.status != 200:
                    return NodeStatus(name, True, ready, message=f"status API: HTTP {resp.status}")
                body = await resp.json()
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            return NodeStatus(name, False, message=f"unreachable: {exc or type(exc).__name__}")
        return parse_status(name, ready, body)
