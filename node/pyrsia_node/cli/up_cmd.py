"""``pyrsia up``: run a local network of node processes on loopback until Ctrl-C."""

from __future__ import annotations

import argparse
import signal
import threading
import time
from pathlib import Path
from typing import Any

from pyrsia_node.cli.errors import CliError
from pyrsia_node.cli.genesis_cmd import parse_upstream
from pyrsia_node.localnet import LocalNetwork, LocalNetworkError, Shape

DEFAULT_DATA_DIR = Path(".pyrsia-local")
DOCKER_HUB = "docker.io=https://registry-1.docker.io"


def register(sub: Any) -> None:
    parser = sub.add_parser("up", help="run a local network of nodes on loopback (Ctrl-C stops)")
    parser.add_argument("--authorities", type=int, default=4)
    parser.add_argument("--peers", type=int, default=2)
    parser.add_argument("--base-port", type=int, default=17800)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument(
        "--upstream",
        type=parse_upstream,
        action="append",
        default=[],
        help=f"NAME=URL of a registry authorities fetch from (repeatable; default {DOCKER_HUB})",
    )
    parser.add_argument("--attestation-threshold", type=int, default=None)
    parser.add_argument("--fresh", action="store_true", help="replace an existing network")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for health")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if not args.host.startswith("127.") and args.host not in {"localhost", "::1"}:
        raise CliError(f"--host {args.host}: a local network runs on loopback addresses only")
    stop = threading.Event()

    def on_signal(signum: int, _: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    shape = Shape(
        args.authorities,
        args.peers,
        args.base_port,
        args.host,
        tuple(args.upstream) or (parse_upstream(DOCKER_HUB),),
        args.attestation_threshold,
    )
    try:
        network = LocalNetwork(args.data_dir, shape, fresh=args.fresh)
    except LocalNetworkError as exc:
        raise CliError(str(exc)) from exc
    started = time.monotonic()
    network.start()
    try:
        try:
            statuses = network.wait_connected(args.timeout)
        except LocalNetworkError as exc:
            raise CliError(str(exc)) from exc
        elapsed = time.monotonic() - started
        print(f"pyrsia network {shape.authorities}+{shape.peers} healthy in {elapsed:.1f} s")
        print(f"{'NODE':<14}{'ROLE':<11}{'NODE ID':<18}{'HTTP':<26}{'GRPC':<18}METRICS")
        for node in network.nodes:
            node_id = statuses[node.name]["node_id"][:16]
            print(
                f"{node.name:<14}{node.role:<11}{node_id:<18}{node.http_url:<26}"
                f"{node.grpc_address:<18}{node.metrics_url}"
            )
        mirror = next((n for n in network.nodes if n.role == "peer"), network.nodes[0])
        print(f"image mirror (OCI pull API): {mirror.host}:{mirror.http_port}")
        print(f"data and logs: {network.root}   Ctrl-C stops every node")
        while not stop.is_set():
            for name, process in list(network.processes.items()):
                if process.poll() is not None:
                    print(f"warning: {name} exited with status {process.returncode}", flush=True)
                    network.processes.pop(name)
            stop.wait(0.5)
    finally:
        network.stop()
        print("stopped")
    return 0
