"""``pyrsia genesis``: create a network's genesis plus every key and certificate."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pyrsia_node.cli.errors import CliError
from pyrsia_node.genesis import Upstream, create_network


def parse_upstream(text: str) -> Upstream:
    """``NAME=URL`` (``docker.io=https://registry-1.docker.io``); ``+insecure`` allows http."""
    insecure = text.endswith("+insecure")
    text = text.removesuffix("+insecure")
    name, sep, url = text.partition("=")
    if not sep or not name or not url.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected NAME=URL, e.g. docker.io=https://registry-1.docker.io"
        )
    return Upstream(name, url.rstrip("/"), insecure)


def register(sub: Any) -> None:
    parser = sub.add_parser("genesis", help="create a network: genesis, keys, certificates")
    parser.add_argument("--out", type=Path, required=True, help="directory to create")
    parser.add_argument("--authorities", type=int, default=4)
    parser.add_argument("--peers", type=int, default=0)
    parser.add_argument("--chain-id", default="pyrsia-local")
    parser.add_argument("--host", default="127.0.0.1", help="address the nodes advertise")
    parser.add_argument("--base-port", type=int, default=17800)
    parser.add_argument("--upstream", type=parse_upstream, action="append", default=[])
    parser.add_argument("--attestation-threshold", type=int, default=None)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if (args.out / "genesis.json").exists():
        raise CliError(f"{args.out} already holds a genesis; choose an empty directory")
    network = create_network(
        args.out,
        authorities=args.authorities,
        peers=args.peers,
        chain_id=args.chain_id,
        host=args.host,
        base_port=args.base_port,
        upstreams=tuple(args.upstream),
        attestation_threshold=args.attestation_threshold,
    )
    print(f"genesis {network.genesis.genesis_hash[:16]} for chain {network.genesis.chain_id}")
    for node in network.nodes:
        print(f"  {node.name:<14} {node.role:<9} {node.config_file}")
    return 0
