"""``pyrsia governance``: sign a membership change with the network's governance key and
submit it to an authority.

``add`` names a new authority (its name, Ed25519 public key and the addresses other nodes
reach it at); ``remove`` names a leaving one (name and key). The record is the ledger's
``GovernanceRecord`` signed by the governance key ``pyrsia genesis`` wrote
(``governance.key``); the node admits it to its mempool like any record, the network
commits it, and the change votes from two heights after its block (consensus issue).
The same records are what the Kubernetes operator submits for ``AuthorityNode`` changes.

The chain id is taken from the node the record goes to (``/api/v1/status``) unless given,
so a record signed for one chain is never offered to another by mistake; the sequence is
the current time in milliseconds unless given (each change a distinct record; repeat a
sequence to retry the same change). ``--wait SECONDS`` returns once the change is committed
(printing its log index) and exits with 2 if it was not within that time.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import time
from pathlib import Path
from typing import Any

from pyrsia_node.cli.admin import DEFAULT_NODE, call
from pyrsia_node.cli.errors import CliError
from pyrsia_node.identity import Identity
from pyrsia_node.ledger import GovernanceAction, GovernanceRecord, RecordError

RECORDS = "/api/v1/records"
KINDS = ("grpc", "http", "metrics")


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "governance", help="add or remove an authority (signed with the governance key)"
    )
    actions = parser.add_subparsers(dest="governance_command", required=True, metavar="ACTION")
    for action, text in (
        ("add", "make a node an authority from two heights after the change commits"),
        ("remove", "end a node's authority from two heights after the change commits"),
    ):
        p = actions.add_parser(action, help=text)
        p.add_argument("name", help="the authority's node name, e.g. authority-4")
        key = p.add_mutually_exclusive_group(required=True)
        key.add_argument("--public-key", help="its Ed25519 public key, base64 (as in genesis.json)")
        key.add_argument(
            "--node-key", type=Path, help="read its public key from its private key file (PEM)"
        )
        if action == "add":
            p.add_argument("--grpc-address", required=True, help="HOST:PORT of its gRPC server")
            p.add_argument("--http-address", required=True, help="HOST:PORT of its HTTP API")
            p.add_argument("--metrics-address", default="", help="HOST:PORT of its /metrics")
        p.add_argument(
            "--governance-key",
            type=Path,
            required=True,
            help="the network's governance key (governance.key from 'pyrsia genesis')",
        )
        p.add_argument("--node", default=DEFAULT_NODE, help="admin URL of an authority")
        p.add_argument("--chain-id", help="default: the chain of the node submitted to")
        p.add_argument(
            "--sequence", type=int, help="the change's number; default: now in milliseconds"
        )
        p.add_argument(
            "--wait",
            type=float,
            default=0.0,
            metavar="SECONDS",
            help="wait up to this long (at most 60) for the change to commit; default: return "
            "once an authority admitted it",
        )
        p.set_defaults(handler=run, action=action)


def public_key_of(args: argparse.Namespace) -> bytes:
    if args.node_key is not None:
        return _identity(args.node_key, "node key").public_key
    try:
        key = base64.b64decode(args.public_key, validate=True)
    except (binascii.Error, ValueError):
        raise CliError(f"--public-key {args.public_key!r}: not base64") from None
    if len(key) != 32:
        raise CliError(f"--public-key: {len(key)} bytes; an Ed25519 public key has 32")
    return key


def _identity(path: Path, what: str) -> Identity:
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None
    return Identity.from_pem(pem)


def run(args: argparse.Namespace) -> int:
    node = args.node.rstrip("/")
    governance = _identity(args.governance_key, "governance key")
    public_key = public_key_of(args)
    chain_id = args.chain_id or call(f"{node}/api/v1/status")["chain_id"]
    sequence = args.sequence if args.sequence is not None else time.time_ns() // 1_000_000
    action = GovernanceAction.ADD if args.action == "add" else GovernanceAction.REMOVE
    # `remove` has no address options; `membership` drops addresses of a removal anyway.
    grpc, http, metrics = (getattr(args, f"{kind}_address", "") for kind in KINDS)
    try:
        record = GovernanceRecord.membership(
            governance, chain_id, sequence, action, args.name, public_key, (grpc, http, metrics)
        )
    except RecordError as exc:
        raise CliError(f"cannot build the record: {exc}") from None
    if not 0 <= args.wait <= 60:
        raise CliError("--wait: seconds from 0 to 60")
    url = f"{node}{RECORDS}" + (f"?wait={args.wait:g}" if args.wait else "")
    answer = call(url, raw=record.encode(), timeout=30 + args.wait)
    where = f" at log index {answer['index']}" if answer["status"] == "committed" else ""
    print(
        f"{answer['status']}: {args.action} {args.name} on {chain_id}{where} "
        f"(sequence {sequence}, record {answer['record_hash'][:16]})"
    )
    if args.wait and answer["status"] != "committed":
        print(f"not committed within {args.wait:g} s; it stays pending (resubmit to check)")
        return 2
    return 0
