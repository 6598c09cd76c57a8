"""``pyrsia inspect-log`` (query a node's log by package) and ``pyrsia verify`` (check an
offline proof bundle with no node running)."""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from pyrsia_node.cli.admin import DEFAULT_NODE, call
from pyrsia_node.cli.errors import CliError

FIELDS = (
    "index",
    "package_type",
    "package_id",
    "artifacts",
    "digests",
    "media_types",
    "size",
    "attestations",
    "signers",
    "record_hash",
)
DEFAULT_FIELDS = ("index", "package_id", "artifacts", "size", "attestations", "record_hash")


def _fields(text: str) -> tuple[str, ...]:
    chosen = tuple(f.strip() for f in text.split(",") if f.strip())
    unknown = [f for f in chosen if f not in FIELDS]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(
            f"unknown field(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(FIELDS)}"
        )
    return chosen


def register(sub: Any) -> None:
    inspect = sub.add_parser("inspect-log", help="list a package's records in a node's log")
    inspect.add_argument("--node", default=DEFAULT_NODE, help="node admin URL")
    inspect.add_argument("--format", choices=("table", "json", "csv"), default="table")
    inspect.add_argument(
        "--fields",
        type=_fields,
        default=DEFAULT_FIELDS,
        help=f"comma-separated, from: {', '.join(FIELDS)}",
    )
    inspect.add_argument("--limit", type=int, default=100)
    kinds = inspect.add_subparsers(dest="package_type", required=True, metavar="TYPE")
    docker = kinds.add_parser("docker", help="a container image")
    docker.add_argument("--image", required=True, help="NAME[:TAG], e.g. alpine:3.19")
    maven = kinds.add_parser("maven", help="a Maven artifact")
    maven.add_argument("--gav", required=True, help="GROUP:ARTIFACT:VERSION")
    inspect.set_defaults(handler=run_inspect)

    verify = sub.add_parser("verify", help="check an offline proof bundle")
    verify.add_argument("bundle", type=Path, help="proof bundle JSON file")
    verify.add_argument(
        "--genesis",
        type=Path,
        help="trust only this network's genesis: the authorities in force at the checkpoint "
        "are replayed from it and the bundle's governance records, not taken from the bundle",
    )
    verify.set_defaults(handler=run_verify)

    bundle = sub.add_parser(
        "bundle", help="save an offline proof bundle for a log entry (for 'pyrsia verify')"
    )
    bundle.add_argument("--node", default=DEFAULT_NODE, help="node admin URL")
    bundle.add_argument("--index", type=int, required=True, help="the entry's index in the log")
    bundle.add_argument("--out", type=Path, required=True, help="file to write the bundle to")
    bundle.set_defaults(handler=run_bundle)


def run_bundle(args: argparse.Namespace) -> int:
    url = f"{args.node.rstrip('/')}/api/v1/log/bundle?index={args.index}"
    document = call(url)
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"bundle for entry {args.index} written to {args.out}")
    return 0


def _package_id(args: argparse.Namespace) -> str:
    from pyrsia_node.ledger.records import RecordError, docker_package_id, maven_package_id

    try:
        if args.package_type == "docker":
            return docker_package_id(args.image)
        return maven_package_id(args.gav)
    except RecordError as exc:
        raise CliError(str(exc)) from None


def row(entry: dict[str, Any]) -> dict[str, Any]:
    """The inspect-log fields of one entry as the admin API returns it."""
    decoded = entry.get("decoded", {})
    artifacts = decoded.get("artifacts", [])
    attestations = decoded.get("attestations", [])
    return {
        "index": entry["index"],
        "package_type": decoded.get("package_type", ""),
        "package_id": decoded.get("package_id", ""),
        "artifacts": len(artifacts),
        "digests": " ".join(a["digest"] for a in artifacts),
        "media_types": " ".join(sorted({a["media_type"] for a in artifacts})),
        "size": sum(a["size"] for a in artifacts),
        "attestations": len(attestations),
        "signers": " ".join(s["keyid"] for env in attestations for s in env["signatures"]),
        "record_hash": entry["record_hash"],
    }


def render(rows: list[dict[str, Any]], fields: tuple[str, ...], fmt: str) -> str:
    chosen = [{f: r[f] for f in fields} for r in rows]
    if fmt == "json":
        return json.dumps(chosen, indent=2) + "\n"
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(fields), lineterminator="\n")
        writer.writeheader()
        writer.writerows(chosen)
        return out.getvalue()
    cells = [[f.upper() for f in fields]] + [[str(r[f]) for f in fields] for r in chosen]
    widths = [max(len(line[i]) for line in cells) for i in range(len(fields))]
    return "".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() + "\n"
        for line in cells
    )


def run_inspect(args: argparse.Namespace) -> int:
    package_id = _package_id(args)
    query = urllib.parse.urlencode({"package_id": package_id, "limit": args.limit})
    body = call(f"{args.node.rstrip('/')}/api/v1/log/records?{query}")
    rows = [row(e) for e in body.get("records", [])]
    if not rows and args.format == "table":
        print(f"no records for {package_id} in the log", file=sys.stderr)
        return 0
    sys.stdout.write(render(rows, args.fields, args.format))
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from pyrsia_node.genesis import Genesis, GenesisError
    from pyrsia_node.ledger.bundle import BundleError, ProofBundle, verify_bundle

    try:
        data = args.bundle.read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read bundle {args.bundle}: {exc.strerror}") from None
    try:
        genesis = None if args.genesis is None else Genesis.load(args.genesis)
    except GenesisError as exc:
        raise CliError(str(exc)) from None
    try:
        verified = verify_bundle(ProofBundle.from_json(data), genesis=genesis)
    except BundleError as exc:
        raise CliError(f"verification FAILED at {exc}") from None
    record = verified.record.to_dict()
    subject = record.get("package_id") or f"governance #{record.get('sequence')}"
    derived = verified.derived
    if derived is None:
        keys = "keys from the bundle (not pinned: pass --genesis)"
    else:
        keys = (
            f"in force at that size: the genesis and {len(derived.applied)} governance "
            "change(s) proven in the bundle"
        )
    print(
        f"OK: {subject} is entry {verified.index} of {verified.checkpoint.origin} at size "
        f"{verified.checkpoint.size}, signed by a quorum of {verified.quorum} of "
        f"{len(verified.authorities)} authorities ({keys})"
    )
    if derived is not None:
        for refused in derived.refused:
            print(f"note: governance entry {refused.index} changes nothing: {refused.reason}")
        if not verified.claimed_authorities_match:
            print(
                "note: the bundle's list of authorities differs from the one in force; "
                "it was not used"
            )
    return 0
