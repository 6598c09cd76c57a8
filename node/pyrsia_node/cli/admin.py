"""The CLI's client for a node's admin HTTP API: JSON in, JSON out, one-line errors."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from pyrsia_node.cli.errors import CliError

DEFAULT_NODE = "http://127.0.0.1:17800"


def call(
    url: str, body: dict[str, Any] | None = None, *, raw: bytes | None = None, timeout: float = 30
) -> Any:
    """GET ``url`` (or POST ``body`` as JSON, or ``raw`` bytes as
    ``application/octet-stream``) and return the decoded JSON answer.

    An error status becomes a ``CliError`` carrying the node's own ``error`` message; an
    unreachable node becomes one that says how to point the CLI at another.
    """
    headers = {}
    data = raw
    if raw is not None:
        headers["Content-Type"] = "application/octet-stream"
    elif body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        try:
            message = json.load(exc).get("error", exc.reason)
        except (ValueError, AttributeError):
            message = exc.reason
        raise CliError(f"node answered {exc.code}: {message}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        node = url.split("/api/", maxsplit=1)[0]
        raise CliError(
            f"cannot reach the node at {node}: {reason}; is it running? "
            "(pass --node http://HOST:PORT)"
        ) from None
