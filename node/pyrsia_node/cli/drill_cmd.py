"""``pyrsia drill``: keep records coming into a local network and check it stays one chain.

For fault drills by hand on ``pyrsia up``: while it offers attested artifact records to the
authorities (each signed by as many genesis authorities as the attestation threshold asks,
with their keys from the local data directory) and prints every node's height and log size
once a second, kill, pause and restart nodes at will (``pyrsia up`` prints their pids and
restarts exited ones on SIGHUP). When the offering ends it waits for the up nodes to settle
and checks:

* one state: every node that answers has the same height, log size and root;
* one history: every (size, root) any node reported during the drill is a prefix of the
  final log (an RFC 9162 consistency proof from the final log, verified here);
* progress: how many of the records the network accepted it committed (a record admitted
  only by a node killed before it gossiped it is lost with that node's mempool, as a
  client's unacknowledged write would be; the count says so rather than failing).

Exit status 0 when the checks hold, 1 when they do not, 2 when the nodes did not settle.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import secrets
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyrsia_node.attestation import AcquiredImage, Artifact, attest
from pyrsia_node.build import artifact_record
from pyrsia_node.cli.errors import CliError
from pyrsia_node.cli.up_cmd import DEFAULT_DATA_DIR
from pyrsia_node.genesis import Genesis
from pyrsia_node.identity import Identity
from pyrsia_node.localnet import STATE_FILE, fetch_json
from pyrsia_node.merkle import ProofError, verify_consistency

MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "drill", help="offer records to a local network during a fault drill, then check it"
    )
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--rate", type=float, default=20.0, help="records offered per second")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to offer them")
    parser.add_argument(
        "--settle", type=float, default=30.0, help="seconds to wait for the nodes to agree"
    )
    parser.set_defaults(handler=run)


@dataclass(frozen=True, slots=True)
class NodeState:
    """What one node's status said: its name, consensus height, log size and root, and
    how many records wait in its mempool (0 for a node that runs no consensus)."""

    name: str
    height: int
    size: int
    root: str
    pending: int = 0


def disagreement(states: list[NodeState]) -> str | None:
    """Why ``states`` (of the nodes that answered) are not one state, or None."""
    distinct = {(s.height, s.size, s.root) for s in states}
    if len(distinct) <= 1:
        return None
    return "; ".join(
        f"{s.name}: height {s.height}, size {s.size}, root {s.root[:16]}" for s in states
    )


def forks(seen: dict[int, set[str]]) -> list[str]:
    """Log sizes for which the nodes reported more than one root during the drill."""
    return [
        f"size {size}: roots {sorted(r[:16] for r in roots)}"
        for size, roots in sorted(seen.items())
        if len(roots) > 1
    ]


def _status(url: str) -> dict[str, Any] | None:
    try:
        status: dict[str, Any] = fetch_json(f"{url}/api/v1/status", timeout=1.0)
    except (OSError, ValueError, http.client.HTTPException):
        return None
    return status


def _post(url: str, record: bytes) -> bool:
    request = urllib.request.Request(
        f"{url}/api/v1/records",
        data=record,
        headers={"Content-Type": "application/octet-stream"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=2.0) as response:
            return bool(response.status in (200, 202))
    except (OSError, ValueError, http.client.HTTPException):  # refused, timed out, HTTP error
        return False


def _attesters(root: Path, nodes: list[dict[str, Any]], genesis: Genesis) -> list[Identity]:
    keys = []
    for node in nodes:
        key_file = Path(node["data_dir"]) / "keys" / "node.key"
        if node["role"] == "authority" and key_file.exists():
            identity = Identity.from_pem(key_file.read_bytes())
            if genesis.authority(identity.node_id) is not None:
                keys.append(identity)
    if len(keys) < genesis.threshold:
        raise CliError(
            f"{root}: {len(keys)} genesis authority keys found, the attestation threshold "
            f"is {genesis.threshold}"
        )
    return keys[: genesis.threshold]


def run(args: argparse.Namespace) -> int:
    state_path = args.data_dir / STATE_FILE
    if not state_path.exists():
        raise CliError(f"no local network in {args.data_dir}; run 'pyrsia up' first")
    if args.rate <= 0 or args.seconds <= 0:
        raise CliError("--rate and --seconds must be positive")
    nodes = json.loads(state_path.read_text())["nodes"]
    genesis = Genesis.load(args.data_dir / "genesis.json")
    attesters = _attesters(args.data_dir, nodes, genesis)
    urls = {n["name"]: f"http://{n['host']}:{n['http_port']}" for n in nodes}
    authorities = [n["name"] for n in nodes if n["role"] == "authority"]
    run_id = secrets.token_hex(4)
    seen: dict[int, set[str]] = {}

    def poll() -> dict[str, NodeState | None]:
        states: dict[str, NodeState | None] = {}
        for name, url in urls.items():
            status = _status(url)
            if status is None:
                states[name] = None
                continue
            ledger, consensus = status["ledger"], status.get("consensus") or {}
            states[name] = NodeState(
                name,
                ledger["height"],
                ledger["size"],
                ledger["root"],
                int(consensus.get("pending_records", 0)),
            )
            seen.setdefault(ledger["size"], set()).add(ledger["root"])
        return states

    def show(
        elapsed: float, offered: int, accepted: int, states: dict[str, NodeState | None]
    ) -> None:
        cells = [
            f"{name} {'down' if s is None else f'h={s.height} n={s.size}'}"
            for name, s in states.items()
        ]
        print(
            f"{elapsed:5.0f}s offered {offered} accepted {accepted} | {' | '.join(cells)}",
            flush=True,
        )

    initial = {s.size for s in poll().values() if s is not None}
    if not initial:
        raise CliError(
            f"no node of the network in {args.data_dir} answers; is 'pyrsia up' running?"
        )
    start_size = max(initial)
    offered = accepted = 0
    start = time.monotonic()
    next_show = 0.0
    while (elapsed := time.monotonic() - start) < args.seconds:
        due = min(int(elapsed * args.rate) + 1, int(args.seconds * args.rate))
        while offered < due:
            record = _record(run_id, offered, attesters)
            for attempt in range(len(authorities)):  # the next authority when one is down
                if _post(urls[authorities[(offered + attempt) % len(authorities)]], record):
                    accepted += 1
                    break
            offered += 1
        if elapsed >= next_show:
            show(elapsed, offered, accepted, poll())
            next_show += 1.0
        time.sleep(0.05)

    print(f"offering done; waiting up to {args.settle:.0f} s for the nodes to agree", flush=True)
    deadline = time.monotonic() + args.settle
    while True:
        states = poll()
        up = [s for s in states.values() if s is not None]
        settled = bool(up) and disagreement(up) is None
        # Done when every accepted record committed, or when nothing is left to commit: a
        # record accepted only by nodes killed before they passed it on is gone.
        if settled and (up[0].size >= start_size + accepted or not any(s.pending for s in up)):
            break
        if time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    show(time.monotonic() - start, offered, accepted, states)
    if not up:
        print("no node answers")
        return 2
    failures = forks(seen)
    reason = disagreement(up)
    if reason is not None:
        print(f"the nodes that answer do not agree: {reason}")
        return 1 if failures else 2
    final = up[0]
    for size, roots in sorted(seen.items()):
        for root in roots:
            problem = _inconsistent(urls[final.name], size, root, final)
            if problem:
                failures.append(problem)
    committed = final.size - start_size
    print(
        f"one state on {len(up)} of {len(urls)} nodes: height {final.height}, log size "
        f"{final.size}, root {final.root[:16]}; {len(seen)} sizes seen during the drill"
    )
    print(f"records: offered {offered}, accepted {accepted}, committed {committed}")
    for failure in failures:
        print(f"FAILED: {failure}")
    if not failures:
        print("one history: every log any node reported is a prefix of the final log")
    return 1 if failures else 0


def _inconsistent(url: str, size: int, root: str, final: NodeState) -> str | None:
    """Why the log (size, root) is not a prefix of ``final``'s log, or None."""
    if size > final.size:
        return f"a node reported size {size}, more than the final {final.size}"
    try:
        proof = fetch_json(f"{url}/api/v1/log/proof/consistency?from={size}&to={final.size}")
    except (OSError, ValueError) as exc:
        return f"no consistency proof {size} -> {final.size} from {final.name}: {exc}"
    try:
        verify_consistency(
            size,
            final.size,
            [bytes.fromhex(h) for h in proof["proof"]],
            bytes.fromhex(root),
            bytes.fromhex(final.root),
        )
    except (ProofError, ValueError) as exc:
        return f"log size {size} with root {root[:16]} is not a prefix of the final log: {exc}"
    return None


def _record(run_id: str, index: int, attesters: list[Identity]) -> bytes:
    """A fresh artifact record attested by ``attesters``: unique per drill and index."""
    image = AcquiredImage(
        "docker.io",
        f"drill/{run_id}",
        f"r{index}",
        Artifact(f"sha256:{secrets.token_hex(32)}", 1024, MANIFEST),
        (),
        (),
    )
    now = dt.datetime.now(dt.UTC)
    envelopes = [attest(image, "docker.io", now, identity)[1] for identity in attesters]
    return artifact_record(image, envelopes).encode()
