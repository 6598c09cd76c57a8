"""``pyrsia build``: ask the network to build (acquire, attest, commit) an image, and follow
the build's progress, through any node's admin API."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from pyrsia_node.cli.admin import DEFAULT_NODE, call
from pyrsia_node.cli.errors import CliError

POLL_SECONDS = 0.5


def register(sub: Any) -> None:
    build = sub.add_parser("build", help="build an image on the authorities, show builds")
    kinds = build.add_subparsers(dest="build_command", required=True, metavar="COMMAND")
    docker = kinds.add_parser("docker", help="acquire, attest and commit a container image")
    docker.add_argument("--image", required=True, help="NAME[:TAG], e.g. alpine:3.19")
    docker.add_argument("--node", default=DEFAULT_NODE, help="node admin URL")
    docker.set_defaults(handler=run_docker)
    status = kinds.add_parser("status", help="show a build's state")
    status.add_argument("build_id", metavar="ID", help="the id 'pyrsia build docker' printed")
    status.add_argument("--node", default=DEFAULT_NODE, help="node admin URL")
    status.add_argument("--wait", action="store_true", help="follow until done or failed")
    status.add_argument(
        "--timeout", type=float, default=600.0, help="give up waiting after this many seconds"
    )
    status.add_argument("--format", choices=("text", "json"), default="text")
    status.set_defaults(handler=run_status)


def run_docker(args: argparse.Namespace) -> int:
    body = call(
        f"{args.node.rstrip('/')}/api/v1/builds", {"package_type": "docker", "image": args.image}
    )
    print(body["id"])
    return 0


def describe(status: dict[str, Any]) -> str:
    """A build's state as the CLI prints it: one headline, then details."""
    lines = [f"{status['id']}  {status['package_id']}  {status['state']}"]
    if status.get("manifest_digest"):
        lines.append(f"  manifest:     {status['manifest_digest']}")
    if status.get("ledger_index", -1) >= 0:
        lines.append(f"  ledger index: {status['ledger_index']}")
    if status.get("message"):
        lines.append(f"  {status['message']}")
    lines += [f"  mismatch: {m}" for m in status.get("mismatches", [])]
    return "\n".join(lines)


def run_status(args: argparse.Namespace) -> int:
    url = f"{args.node.rstrip('/')}/api/v1/builds/{args.build_id}"
    deadline = time.monotonic() + args.timeout
    shown: tuple[str, str] | None = None
    while True:
        status = call(url)
        finished = status["state"] in ("done", "failed")
        if args.format == "text" and (status["state"], status["message"]) != shown:
            shown = (status["state"], status["message"])
            if args.wait and not finished:
                print(f"{status['state']}: {status['message']}", flush=True)
        if finished or not args.wait:
            break
        if time.monotonic() > deadline:
            raise CliError(f"build {args.build_id} still {status['state']} after {args.timeout:g}s")
        time.sleep(POLL_SECONDS)
    if args.format == "json":
        print(json.dumps(status, indent=2))
    else:
        print(describe(status))
    if status["state"] == "failed":
        print(f"pyrsia: build {args.build_id} failed", file=sys.stderr)
        return 1
    return 0
