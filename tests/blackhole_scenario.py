"""A 2|2 partition by silent packet loss, run inside a network namespace of its own.

Started by ``test_consensus_blackhole.py`` as ``ip netns exec NS python blackhole_scenario.py
ROOT SPLIT`` (``2|2`` or ``1|3``, see ``SPLITS``); prints one JSON object (what it measured)
on its last line of output.

The proxy of ``test_consensus_faults.py`` partitions by closing connections: both ends see
the break at once. A partition on a real network is silent: packets vanish, connections
stay open, TCP retransmits into nothing with growing back-off, and the ends learn of the
heal only when a retransmission or a new connection gets through. This scenario makes that
happen with the kernel's own packet filter, inside a namespace the test created (its
loopback only): each node runs as its own group id, every connection a node opens to a
node of the other half is marked (``CONNMARK``) by the first packet it sends, and during
the split one rule drops every packet of a marked connection, both ways. Nodes in one half
keep talking; the admin API and ``pyrsia drill`` (group 0) are never filtered.

While ``pyrsia drill`` keeps records coming, the scenario splits the nodes into the two
sides of ``SPLITS[SPLIT]``, holds the split, heals it, and reports the heights seen, the
packets dropped, how long after the heal every authority was past the highest height any
reached during the split, and what the drill found (one state, one history).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pyrsia_node.genesis import LocalNode
from pyrsia_node.localnet import LocalNetwork, Shape, fetch_json

BASE_PORT = 21000
FIRST_GROUP = 61000
SPLITS = {
    # Two halves of two authorities: neither has a quorum.
    "2|2": ({"authority-0", "authority-1", "peer-0"}, {"authority-2", "authority-3"}),
    # One authority cut off: the other three (a quorum) go on without it.
    "1|3": ({"authority-0"}, {"authority-1", "authority-2", "authority-3", "peer-0"}),
}
AUTHORITIES = ("authority-0", "authority-1", "authority-2", "authority-3")
GRACE = 3.0  # after the split: a block whose precommits were already out may still commit
SPLIT = 20.0  # seconds the split is held after the grace
HEAL_LIMIT = 30.0  # how long after the heal the scenario waits for commits


class GroupedNetwork(LocalNetwork):
    def group_of(self, node: LocalNode) -> int | None:
        return FIRST_GROUP + [n.name for n in self.nodes].index(node.name)


def iptables(*args: str) -> str:
    return subprocess.run(["iptables", *args], check=True, capture_output=True, text=True).stdout


def mark_cross_connections(net: GroupedNetwork, sides: tuple[set[str], set[str]]) -> None:
    """Every connection a node opens to a gRPC port of the other side gets mark 1."""
    for side, other in (sides, sides[::-1]):
        ports = ",".join(str(net.node(name).grpc_port) for name in sorted(other))
        for name in sorted(side):
            group = net.group_of(net.node(name))
            assert group is not None
            iptables(
                *("-A", "OUTPUT", "-p", "tcp", "-m", "owner", "--gid-owner", str(group)),
                *("-m", "multiport", "--dports", ports),
                *("-j", "CONNMARK", "--set-mark", "1"),
            )


DROP = ("OUTPUT", "-m", "connmark", "--mark", "1", "-j", "DROP")


def dropped_packets() -> int:
    for line in iptables("-L", "OUTPUT", "-v", "-n", "-x").splitlines():
        fields = line.split()
        if len(fields) > 2 and fields[2] == "DROP":
            return int(fields[0])
    return 0


def heights(net: GroupedNetwork) -> dict[str, int]:
    result = {}
    for node in net.nodes:
        try:
            status = fetch_json(f"{node.http_url}/api/v1/status", timeout=2.0)
            result[node.name] = int(status["ledger"]["height"])
        except (OSError, ValueError):
            result[node.name] = -1
    return result


def wait_for(condition: Any, timeout: float) -> float | None:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if condition():
            return time.monotonic() - started
        time.sleep(0.2)
    return None


def main(root: Path, split: str) -> dict[str, Any]:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    net = GroupedNetwork(root, Shape(4, 1, BASE_PORT, "127.0.0.1", attestation_threshold=1))
    drill = None
    try:
        mark_cross_connections(net, SPLITS[split])
        net.start()
        net.wait_connected(timeout=60)
        drill_log = (root / "drill.log").open("w")
        drill = subprocess.Popen(
            [
                *(sys.executable, "-m", "pyrsia_node", "drill", "--data-dir", str(root)),
                *("--rate", "20", "--seconds", str(10 + GRACE + SPLIT + 15), "--settle", "40"),
            ],
            stdout=drill_log,
            stderr=subprocess.STDOUT,
        )
        if wait_for(lambda: min(heights(net).values()) >= 3, 30) is None:
            raise RuntimeError(f"no commits before the split: {heights(net)}")
        before = heights(net)
        iptables("-A", *DROP)
        time.sleep(GRACE)
        split_start = heights(net)
        time.sleep(SPLIT)
        split_end = heights(net)
        dropped = dropped_packets()
        iptables("-D", *DROP)
        stalled = max(split_end[name] for name in AUTHORITIES)
        healed_in = wait_for(
            lambda: all(heights(net)[name] > stalled for name in AUTHORITIES), HEAL_LIMIT
        )
        drill_rc = drill.wait(timeout=120)
        drill_log.close()
        return {
            "before": before,
            "split_start": split_start,
            "split_end": split_end,
            "dropped_packets": dropped,
            "healed_in": healed_in,
            "after": heights(net),
            "drill_rc": drill_rc,
            "drill_tail": (root / "drill.log").read_text().splitlines()[-6:],
        }
    finally:
        if drill is not None and drill.poll() is None:
            drill.kill()
        net.stop()


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("run as root inside a network namespace of its own")
    print(json.dumps(main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "2|2")))
