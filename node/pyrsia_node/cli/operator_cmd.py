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
        "--priority",
        type=int,
        default=None,
        help="kopf peering priority; default: random, so replicas never tie (a tie pauses all)",
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
    from pyrsia_operator.kube import Connection, Kube
    from pyrsia_operator.peering import ensure_peering, random_priority

    if args.metrics_port:
        prometheus_client.start_http_server(args.metrics_port)
    namespaces = list(args.namespace)
    priority = random_priority() if args.priority is None else args.priority

    async def operate() -> None:
        if not args.standalone:
            # kopf waits for its peering object and never creates it (pyrsia_operator.peering).
            kube = Kube(Connection.from_environment())
            try:
                for path in await ensure_peering(kube, args.peering, namespaces):
                    print(f"created the kopf peering object {path}", flush=True)
            finally:
                await kube.close()
        await kopf.operator(
            clusterwide=not namespaces,
            namespaces=namespaces,
            standalone=args.standalone,
            peering_name=None if args.standalone else args.peering,
            priority=priority,
            liveness_endpoint=f"http://0.0.0.0:{args.health_port}/healthz",
        )

    asyncio.run(operate())
    return 0
