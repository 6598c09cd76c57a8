"""The node's HTTP surface on its HTTP port: health, readiness and the admin API.

``build_app`` takes plain callables rather than the node object, so the API can be tested
with any status source and never reaches into the node's internals. Other areas (ledger,
registry) contribute their own route lists, mounted here by the server.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from aiohttp import web

__all__ = ["build_app", "json_error"]


def json_error(status: int, message: str) -> web.Response:
    """An admin API error: ``{"error": message}`` with the given HTTP status."""
    return web.json_response({"error": message}, status=status)


def build_app(
    status: Callable[[], dict[str, Any]],
    ready: Callable[[], tuple[bool, str]],
    extra_routes: Iterable[web.AbstractRouteDef] = (),
    live: Callable[[], tuple[bool, str]] = lambda: (True, "ok"),
) -> web.Application:
    """``/healthz`` answers 503 with the reason once ``live`` says the node cannot go on
    without a restart (a liveness probe then restarts it); ``/readyz`` 503 while ``ready``
    says it should get no traffic."""

    async def healthz(_: web.Request) -> web.Response:
        is_live, reason = live()
        if is_live:
            return web.json_response({"status": "ok"})
        return web.json_response({"status": "failing", "reason": reason}, status=503)

    async def readyz(_: web.Request) -> web.Response:
        is_ready, reason = ready()
        return web.json_response(
            {"ready": is_ready, "reason": reason}, status=200 if is_ready else 503
        )

    async def get_status(_: web.Request) -> web.Response:
        return web.json_response(status())

    app = web.Application()
    app.add_routes(
        [
            web.get("/healthz", healthz),
            web.get("/readyz", readyz),
            web.get("/api/v1/status", get_status),
            *extra_routes,
        ]
    )
    return app
