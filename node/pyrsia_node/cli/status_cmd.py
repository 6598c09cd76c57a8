"""``pyrsia status``: the network as a table, from the nodes' admin API."""

from __future__ import annotations

import argparse
import json
import urllib.error
from pathlib import Path
from typing import Any

from pyrsia_node.cli.errors import CliError
from pyrsia_node.cli.up_cmd import DEFAULT_DATA_DIR
from pyrsia_node.localnet import STATE_FILE, fetch_json


def register(sub: Any) -> None:
    parser = sub.add_parser("status", help="show every node of a network")
    parser.add_argument(
        "--node",
        action="append",
        default=[],
        help="a node's HTTP URL (repeatable); default: the nodes of the local network",
    )
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--format", choices=("table", "json"), default="table")
    parser.set_defaults(handler=run)


def _urls(args: argparse.Namespace) -> list[str]:
    if args.node:
        return [u.rstrip("/") for u in args.node]
    state_path = args.data_dir / STATE_FILE
    if not state_path.exists():
        raise CliError(f"no local network in {args.data_dir}; run 'pyrsia up' or pass --node URL")
    state = json.loads(state_path.read_text())
    return [f"http://{n['host']}:{n['http_port']}" for n in state["nodes"]]


def run(args: argparse.Namespace) -> int:
    rows: list[dict[str, Any]] = []
    for url in _urls(args):
        try:
            status = fetch_json(f"{url}/api/v1/status")
            rows.append({"url": url, "up": True, **status})
        except (OSError, urllib.error.URLError, ValueError) as exc:
            rows.append({"url": url, "up": False, "error": str(exc)})
    # A node that answers but whose consensus has stopped (a write failed) needs a restart.
    failures = {
        row["name"]: row["consensus"]["failure"]
        for row in rows
        if row["up"] and (row.get("consensus") or {}).get("failure")
    }
    if args.format == "json":
        print(json.dumps(rows, indent=2))
    else:
        print(f"{'NODE':<14}{'ROLE':<11}{'UP':<8}{'PEERS':<7}{'HEIGHT':<8}{'NODE ID':<18}URL")
        for row in rows:
            if row["up"]:
                up = "FAILING" if row["name"] in failures else "yes"
                print(
                    f"{row['name']:<14}{row['role']:<11}{up:<8}"
                    f"{len(row['connected_peers']):<7}{row['ledger']['height']:<8}"
                    f"{row['node_id'][:16]:<18}{row['url']}"
                )
            else:
                print(f"{'?':<14}{'?':<11}{'no':<8}{'-':<7}{'-':<8}{'-':<18}{row['url']}")
        for name, failure in failures.items():
            print(f"{name}: consensus stopped: {failure}; restart the node")
    return 0 if all(row["up"] for row in rows) and not failures else 1
