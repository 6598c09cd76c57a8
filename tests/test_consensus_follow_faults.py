"""A peer whose source authority lags still reaches the other authorities' height, on real
node processes.

The network is `FaultNetwork` from `test_consensus_faults`: 4 authorities and 1 peer on
loopback, consensus traffic (streams, block sync, the peer's follow stream and probes)
through a TCP fault proxy, records submitted to the live authorities all along. The peer
streams blocks from one authority, its source, which its status names
(`consensus.source`); each test makes that authority lag while the other three keep
committing:

* cut off from the other authorities through the proxy, both ways, while the peer still
  reaches it: alive, answering, serving a chain that no longer grows;
* paused with SIGSTOP: its connections stay open and nothing comes through them.

Before followers probed the other authorities, the peer stayed at the source's height
until its stream broke: in both cases, indefinitely. Every test is bounded in time; the
fixture stops every process it started (by pid) and the proxy.
"""

from __future__ import annotations

import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pyrsia_node.localnet import fetch_json
from test_consensus_faults import (
    AUTHORITIES,
    FaultNetwork,
    FaultProxy,
    RecordFeeder,
    assert_one_chain,
    wait_until,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

PEER = "peer-0"
# Probe interval + grace + the stream from the new source, with room for a loaded machine.
CATCH_UP_SECONDS = 30


class PairProxy(FaultProxy):
    """A `FaultProxy` that can also cut single (caller, target) pairs."""

    def cut(self, pairs: set[tuple[str, str]]) -> None:
        """Close the connections of `pairs` (caller -> target) and refuse new ones."""

        def apply() -> None:
            for route in self._routes:
                if (route.caller, route.target) in pairs:
                    self._blocked.add((route.caller, route.target))
                    for connection in route.connections:
                        connection.transport.abort()

        self._run(apply)


class FollowNetwork(FaultNetwork):
    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.proxy = PairProxy(self.proxy._routes)  # not started yet: the same routes

    def source(self) -> str | None:
        """The authority the peer streams blocks from, by its status."""
        try:
            status = fetch_json(f"{self.net.node(PEER).http_url}/api/v1/status", timeout=2)
        except (OSError, ValueError):
            return None
        consensus = status.get("consensus") or {}
        source: str | None = consensus.get("source")
        return source


@pytest.fixture
def network(tmp_path: Path) -> Iterator[FollowNetwork]:
    running = FollowNetwork(tmp_path / "net")
    try:
        running.start()
        yield running
    finally:
        running.stop()


def source_switches(network: FollowNetwork, reason: str) -> float:
    """The peer's `pyrsia_consensus_follow_source_switches_total{reason=...}`."""
    node = network.net.node(PEER)
    url = f"http://{node.host}:{node.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (
                sample.name == "pyrsia_consensus_follow_source_switches_total"
                and sample.labels.get("reason") == reason
            ):
                return sample.value
    return 0.0


def followed_source(network: FollowNetwork) -> str:
    """The peer's source once the peer follows the chain (height 2 or more)."""
    wait_until(
        lambda: network.height(PEER) >= 2 and network.source() in AUTHORITIES,
        30,
        lambda: f"peer at {network.height(PEER)}, source {network.source()}",
    )
    source = network.source()
    assert source is not None
    return source


def assert_peer_catches_up_without(network: FollowNetwork, source: str) -> None:
    """The authorities other than `source` commit on; the peer reaches their height from
    another source, while `source` stays behind."""
    started = time.monotonic()
    others = tuple(name for name in AUTHORITIES if name != source)
    before = network.heights(others)
    wait_until(
        lambda: all(network.height(n) >= before[n] + 3 for n in others),
        30,
        lambda: f"heights {network.heights(others)} from {before}",
    )
    target = min(network.heights(others).values())
    wait_until(
        lambda: network.height(PEER) >= target,
        CATCH_UP_SECONDS,
        lambda: (
            f"peer at {network.height(PEER)} following {network.source()}, the others at "
            f"{network.heights(others)}; {network.net.log_tail(PEER)}"
        ),
    )
    took = time.monotonic() - started
    print(f"the peer left {source} and reached height {target} {took:.1f} s after the fault")
    assert network.source() in others


def test_a_peer_leaves_a_source_cut_off_from_the_other_authorities(
    network: FollowNetwork,
) -> None:
    with RecordFeeder(network) as feeder:
        source = followed_source(network)
        others = [name for name in AUTHORITIES if name != source]
        feeder.live.discard(source)
        network.proxy.cut({(source, o) for o in others} | {(o, source) for o in others})
        assert_peer_catches_up_without(network, source)
        stalled = network.height(source)
        assert network.height(PEER) > stalled, f"{source} should lag: it is at {stalled}"
        assert source_switches(network, "lag") >= 1
    network.proxy.heal()
    assert_one_chain(network, (*AUTHORITIES, PEER))


def test_a_peer_leaves_a_paused_source(network: FollowNetwork) -> None:
    with RecordFeeder(network) as feeder:
        source = followed_source(network)
        feeder.live.discard(source)
        process = network.net.processes[source]
        process.send_signal(signal.SIGSTOP)
        try:
            assert_peer_catches_up_without(network, source)
        finally:
            process.send_signal(signal.SIGCONT)
    assert_one_chain(network, (*AUTHORITIES, PEER))
