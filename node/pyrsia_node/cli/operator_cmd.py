"""``pyrsia operator``: run the Kubernetes operator (kopf) in this process."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    parser = sub.add_parser("operator", help="run the Kubernetes operator")
    parser.add_argument(
        "--namespace",
        action="append",
        default=[],
        help="watch only this namespace (repeatable); default: the whole cluster",
    )
    parser.add_argument("--metrics-port", type=int, default=8080, help="/metrics port, 0: off")
    parser.add_argument("--health-port", type=int, default=8081, help="liveness probe port")
    parser.add_argument(
        "--peering",
        default="pyrsia-operator",
        help="kopf peering name: only one replica with the same name acts at a time",
    )
    parser.add_argument(
        "--standalone", action="store_true", help="no peering (a single replica, or testing)"
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import asyncio

    import kopf
    import prometheus_client
    import pyrsia_operator.handlers  # noqa: F401  (registers the handlers)

    if args.metrics_port:
        prometheus_client.start_http_server(args.metrics_port)
    namespaces = list(args.namespace)
    asyncio.run(
        kopf.operator(
            clusterwide=not namespaces,
            namespaces=namespaces,
            standalone=args.standalone,
            peering_name=None if args.standalone else args.peering,
            liveness_endpoint=f"http://0.0.0.0:{args.health_port}/healthz",
        )
    )
    return 0
