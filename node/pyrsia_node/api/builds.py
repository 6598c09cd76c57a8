"""Admin API for builds, mounted under ``/api/v1/builds``.

``POST /api/v1/builds`` with ``{"package_type": "docker", "image": "NAME:TAG"}`` starts (or
joins) a build on an authority and answers 202 ``{"id": ...}``; ``GET
/api/v1/builds/{id}`` shows its state, asking the authority that owns it (the id names
it). Errors are ``{"error": message}``: 400 for a bad request, 404 for an unknown build,
503 when no authority can be reached.
"""

from __future__ import annotations

import json

from aiohttp import web

from pyrsia_node.api import json_error
from pyrsia_node.build import (
    BuildClient,
    BuildError,
    BuildsUnavailable,
    UnknownBuild,
    image_package_id,
)

PREFIX = "/api/v1/builds"


def routes(client: BuildClient) -> list[web.RouteDef]:
    """The build routes; mount with ``app.add_routes(routes(client))``."""

    async def create(request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return json_error(400, 'expected a JSON body {"package_type":"docker","image":...}')
        if not isinstance(body, dict):
            return json_error(400, "expected a JSON object")
        if body.get("package_type") != "docker":
            return json_error(
                400, f"package_type {body.get('package_type')!r}: only 'docker' is built"
            )
        image = body.get("image")
        if not isinstance(image, str) or not image:
            return json_error(400, "'image' is required, e.g. alpine:3.19")
        try:
            build_id = await client.request(image_package_id(image))
        except BuildsUnavailable as exc:
            return json_error(503, str(exc))
        except BuildError as exc:
            return json_error(400, str(exc))
        return web.json_response({"id": build_id}, status=202)

    async def show(request: web.Request) -> web.Response:
        try:
            status = await client.status(request.match_info["build_id"])
        except UnknownBuild as exc:
            return json_error(404, str(exc))
        except BuildsUnavailable as exc:
            return json_error(503, str(exc))
        except BuildError as exc:
            return json_error(502, str(exc))
        return web.json_response(status.to_dict())

    return [
        web.post(PREFIX, create),
        web.get(f"{PREFIX}/{{build_id}}", show),
    ]
