"""``pyrsia up``: run a local network of node processes on loopback until Ctrl-C.

For fault drills by hand: kill -9 (or SIGSTOP, SIGTERM) any node by the pid it prints;
``pyrsia up`` reports each node that exits, and each whose ``/healthz`` fails (its
consensus stopped, e.g. on a full disk), and SIGHUP (``kill -HUP <its pid>``) starts every
exited node again from its data directory, as a restart after a crash would, and restarts
the failing ones.
"""

from __future__ import annotations

import argparse
import contextlib
import os
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
PROBE_SECONDS = 2.0  # how often the running nodes' /healthz is asked


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
    stop, revive = threading.Event(), threading.Event()

    def on_signal(signum: int, _: object) -> None:
        (revive if signum == signal.SIGHUP else stop).set()

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, on_signal)
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
        print(f"{'NODE':<14}{'ROLE':<11}{'PID':<9}{'NODE ID':<18}{'HTTP':<26}{'GRPC':<18}METRICS")
        for node in network.nodes:
            node_id = statuses[node.name]["node_id"][:16]
            pid = network.processes[node.name].pid
            print(
                f"{node.name:<14}{node.role:<11}{pid:<9}{node_id:<18}{node.http_url:<26}"
                f"{node.grpc_address:<18}{node.metrics_url}"
            )
        mirror = next((n for n in network.nodes if n.role == "peer"), network.nodes[0])
        print(f"image mirror (OCI pull API): {mirror.host}:{mirror.http_port}")
        print(f"data and logs: {network.root}   Ctrl-C stops every node", flush=True)
        stopped: list[str] = []
        failing: dict[str, str] = {}  # running, but their consensus stopped (/healthz 503)
        next_probe = 0.0
        while not stop.is_set():
            for name, status in network.reap().items():
                stopped.append(name)
                failing.pop(name, None)
                print(
                    f"warning: {name} exited with status {_describe(status)}; "
                    f"kill -HUP {os.getpid()} starts it again",
                    flush=True,
                )
            if time.monotonic() >= next_probe:
                next_probe = time.monotonic() + PROBE_SECONDS
                now_failing = network.failing()
                for name, reason in now_failing.items():
                    if name not in failing:
                        print(
                            f"warning: {name} is failing ({reason}); "
                            f"kill -HUP {os.getpid()} restarts it",
                            flush=True,
                        )
                failing = now_failing
            if revive.is_set():
                revive.clear()
                for name in failing:
                    network.restart(name)
                    print(f"restarted {name} (pid {network.processes[name].pid})", flush=True)
                failing.clear()
                for name in stopped:
                    network.start(name)
                    print(f"started {name} again (pid {network.processes[name].pid})", flush=True)
                stopped.clear()
            stop.wait(0.5)
    finally:
        network.stop()
        print("stopped")
    return 0


def _describe(status: int) -> str:
    """An exit status as a shell shows it: the signal's name when one ended the process."""
    if status < 0:
        with contextlib.suppress(ValueError):
            return f"{status} ({signal.Signals(-status).name})"
    return str(status)
