"""A 2|2 partition by silent packet loss, on real node processes (issue 4, item 6).

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

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SCENARIO = Path(__file__).with_name("blackhole_scenario.py")


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


def test_silent_2_2_partition_stops_commits_and_heals_within_10_s(
    namespace: str, tmp_path: Path
) -> None:
    result = subprocess.run(
        ["ip", "netns", "exec", namespace, sys.executable, str(SCENARIO), str(tmp_path / "net")],
        check=False,
        capture_output=True,
        text=True,
        timeout=280,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    summary = json.dumps(report, indent=1)
    authorities = [f"authority-{i}" for i in range(4)]
    # The filter really cut the halves apart: packets were dropped...
    assert report["dropped_packets"] > 0, summary
    # ...and no half of two authorities committed during the split.
    for name in authorities:
        assert report["split_end"][name] == report["split_start"][name], summary
    # Once healed, every authority commits again within 10 s.
    assert report["healed_in"] is not None and report["healed_in"] <= 10.0, summary
    # The drill found one state and one history after it all, and records went through.
    assert report["drill_rc"] == 0, summary
    assert any(line.startswith("one history") for line in report["drill_tail"]), summary
