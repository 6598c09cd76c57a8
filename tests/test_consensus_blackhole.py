"""Partitions by silent packet loss, on real node processes (issue 4, item 6).

``blackhole_scenario.py`` runs inside a network namespace this test creates (``ip netns``)
and drops every packet between the halves with the kernel's packet filter, so connections
stay open and go quiet, as on a real network (the proxy partitions of
``test_consensus_faults.py`` close them instead). Needs root, ``ip`` and ``iptables``
(CI installs iproute2 and iptables); skipped without them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SCENARIO = Path(__file__).with_name("blackhole_scenario.py")
AUTHORITIES = ("authority-0", "authority-1", "authority-2", "authority-3")


@pytest.fixture
def namespace() -> Iterator[str]:
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("iptables"):
        pytest.skip("needs root, ip and iptables")
    name = f"pyrsia-bh-{uuid.uuid4().hex[:8]}"
    made = subprocess.run(["ip", "netns", "add", name], check=False, capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot create a network namespace: {made.stderr.strip()}")
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def run_scenario(namespace: str, root: Path, split: str) -> tuple[dict[str, Any], str]:
    result = subprocess.run(
        ["ip", "netns", "exec", namespace, sys.executable, str(SCENARIO), str(root), split],
        check=False,
        capture_output=True,
        text=True,
        timeout=280,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    summary = json.dumps(report, indent=1)
    # The filter really cut the sides apart: packets were dropped.
    assert report["dropped_packets"] > 0, summary
    # Once healed, every authority is past every height reached during the split within
    # 10 s, and the drill found one state and one history after it all.
    assert report["healed_in"] is not None and report["healed_in"] <= 10.0, summary
    assert report["drill_rc"] == 0, summary
    assert any(line.startswith("one history") for line in report["drill_tail"]), summary
    return report, summary


def test_silent_2_2_partition_stops_commits_and_heals_within_10_s(
    namespace: str, tmp_path: Path
) -> None:
    report, summary = run_scenario(namespace, tmp_path / "net", "2|2")
    for name in AUTHORITIES:  # no half of two authorities committed during the split
        assert report["split_end"][name] == report["split_start"][name], summary


def test_a_silently_cut_off_authority_does_not_hold_up_the_others(
    namespace: str, tmp_path: Path
) -> None:
    """Its outbound streams go quiet rather than fail: the three others, a quorum, keep
    committing while it stays where it was, and it catches up once the link is back."""
    report, summary = run_scenario(namespace, tmp_path / "net", "1|3")
    assert report["split_end"]["authority-0"] == report["split_start"]["authority-0"], summary
    for name in AUTHORITIES[1:]:
        assert report["split_end"][name] >= report["split_start"][name] + 5, summary
