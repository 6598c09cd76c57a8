"""Load metrics and the provider quality score Q(x) = sum(weight * attribute), lower is better.

The pure part is ``quality_score``; ``LoadSampler`` turns psutil's cumulative counters into
rates (its counter source and clock are injectable, so tests control both); ``NodeMetrics``
owns the Prometheus registry the node serves on its metrics port. Metric names follow the
project conventions: prefix ``pyrsia_``, base units, no peer ids or artifact names in labels.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import aiohttp
import psutil
from prometheus_client import (
    CollectorRegistry,
    Gauge,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.parser import text_string_to_metric_families

from pyrsia_node.config import Weights

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Counters:
    """Cumulative machine counters at one instant."""

    packets: int  # packets sent + received over all interfaces
    disk_operations: int  # reads + writes over all disks


@dataclass(frozen=True, slots=True)
class LoadSample:
    cpu_load: float  # 1-minute load average
    network_packets_per_second: float
    disk_operations_per_second: float
    uploads_in_flight: int


def quality_score(sample: LoadSample, weights: Weights) -> float:
    """Q(x): the weighted sum of a node's load attributes. Lower means a better provider."""
    return (
        weights.cpu * sample.cpu_load
        + weights.network * sample.network_packets_per_second
        + weights.disk * sample.disk_operations_per_second
        + weights.uploads * sample.uploads_in_flight
    )


def read_counters() -> Counters:
    net = psutil.net_io_counters()
    disk = psutil.disk_io_counters()
    disk_ops = (disk.read_count + disk.write_count) if disk is not None else 0
    return Counters(packets=net.packets_sent + net.packets_recv, disk_operations=disk_ops)


def read_load_average() -> float:
    return float(psutil.getloadavg()[0])


class LoadSampler:
    """Turns cumulative counters into per-second rates between consecutive samples."""

    def __init__(
        self,
        counters: Callable[[], Counters] = read_counters,
        load_average: Callable[[], float] = read_load_average,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._counters = counters
        self._load_average = load_average
        self._clock = clock
        self._last = counters()
        self._last_time = clock()

    def sample(self, uploads_in_flight: int) -> LoadSample:
        now, current = self._clock(), self._counters()
        elapsed = now - self._last_time
        if elapsed <= 0:
            packets_rate = disk_rate = 0.0
        else:
            # Counters can wrap or reset (interface removed); a negative delta counts as zero.
            packets_rate = max(0, current.packets - self._last.packets) / elapsed
            disk_rate = max(0, current.disk_operations - self._last.disk_operations) / elapsed
        self._last, self._last_time = current, now
        return LoadSample(self._load_average(), packets_rate, disk_rate, uploads_in_flight)


class NodeMetrics:
    """The node's Prometheus registry: process metrics, load gauges, quality score."""

    def __init__(self, weights: Weights, role: str, version: str) -> None:
        self.weights = weights
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        Info("pyrsia_node", "Node build and role", registry=self.registry).info(
            {"version": version, "role": role}
        )
        self.cpu_load = Gauge(
            "pyrsia_node_load_cpu", "1-minute load average of the host", registry=self.registry
        )
        self.network = Gauge(
            "pyrsia_node_load_network_packets_per_second",
            "Packets sent and received per second over all interfaces",
            registry=self.registry,
        )
        self.disk = Gauge(
            "pyrsia_node_load_disk_operations_per_second",
            "Disk read and write operations per second",
            registry=self.registry,
        )
        self.uploads = Gauge(
            "pyrsia_node_load_uploads_in_flight",
            "Blob uploads this node is serving to peers right now",
            registry=self.registry,
        )
        self.score = Gauge(
            "pyrsia_node_quality_score",
            "Q(x) = sum of weight x load attribute; lower is a better provider",
            registry=self.registry,
        )
        self.connected_peers = Gauge(
            "pyrsia_node_connected_peers", "Peers seen alive recently", registry=self.registry
        )

    def record(self, sample: LoadSample) -> float:
        self.cpu_load.set(sample.cpu_load)
        self.network.set(sample.network_packets_per_second)
        self.disk.set(sample.disk_operations_per_second)
        self.uploads.set(sample.uploads_in_flight)
        score = quality_score(sample, self.weights)
        self.score.set(score)
        return score

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


# Provider choice: read candidates' scores from their /metrics, order them for a download.
#
# Power of two choices: each pick samples two remaining candidates at random and takes the
# lower score. The best provider is still favoured, but a crowd of downloaders choosing at
# the same moment from the same (cached) scores spreads over the good ones instead of all
# landing on the single lowest. Unreachable candidates go last, in random order.

QUALITY_SCORE_METRIC = "pyrsia_node_quality_score"


class ScrapeError(Exception):
    """A /metrics page could not be used; the message says why."""


@dataclass(frozen=True, slots=True)
class Candidate:
    """A possible provider and its last known score (None: its /metrics is unreachable)."""

    key: str
    metrics_address: str
    score: float | None


def parse_quality_score(text: str) -> float:
    """The value of ``pyrsia_node_quality_score`` in a Prometheus text exposition."""
    try:
        for family in text_string_to_metric_families(text):
            if family.name == QUALITY_SCORE_METRIC:
                for sample in family.samples:
                    if sample.name == QUALITY_SCORE_METRIC:
                        value = float(sample.value)
                        if not math.isfinite(value):
                            raise ScrapeError(f"{QUALITY_SCORE_METRIC} is {value}")
                        return value
    except ValueError as exc:
        raise ScrapeError(f"unparsable metrics page: {exc}") from exc
    raise ScrapeError(f"no {QUALITY_SCORE_METRIC} on the metrics page")


def choose_providers(candidates: Sequence[Candidate], rng: random.Random) -> list[Candidate]:
    """All candidates in the order to use them: power of two choices, unreachable last."""
    pool = [c for c in candidates if c.score is not None]
    ordered: list[Candidate] = []
    while pool:
        if len(pool) == 1:
            pick = pool[0]
        else:
            first, second = rng.sample(pool, 2)
            assert first.score is not None and second.score is not None
            pick = first if first.score <= second.score else second
        ordered.append(pick)
        pool.remove(pick)
    unreachable = [c for c in candidates if c.score is None]
    rng.shuffle(unreachable)
    return ordered + unreachable


class ScoreScraper:
    """Scrapes candidates' /metrics concurrently with a short timeout and caches each score
    (or its absence) for ``ttl`` seconds, so choosing providers costs at most one round trip.
    """

    def __init__(
        self,
        timeout: float = 0.5,
        ttl: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.timeout = timeout
        self.ttl = ttl
        self._clock = clock
        self._cache: dict[str, tuple[float, float | None]] = {}
        self._session: aiohttp.ClientSession | None = None
        self.scrapes = 0

    async def _fetch(self, address: str) -> float | None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        self.scrapes += 1
        try:
            async with self._session.get(f"http://{address}/metrics") as response:
                if response.status != 200:
                    raise ScrapeError(f"HTTP {response.status}")
                return parse_quality_score(await response.text())
        except (aiohttp.ClientError, TimeoutError, ScrapeError) as exc:
            log.debug("metrics of %s unusable: %s", address, exc)
            return None

    async def score(self, address: str) -> float | None:
        cached = self._cache.get(address)
        now = self._clock()
        if cached is not None and now - cached[0] < self.ttl:
            return cached[1]
        value = await self._fetch(address)
        self._cache[address] = (self._clock(), value)
        return value

    async def rank(self, candidates: Sequence[tuple[str, str]], rng: random.Random) -> list[str]:
        """Keys of ``(key, metrics_address)`` candidates, in the order to use them."""
        scores = await asyncio.gather(*(self.score(address) for _, address in candidates))
        scored = [
            Candidate(key, address, value)
            for (key, address), value in zip(candidates, scores, strict=True)
        ]
        return [c.key for c in choose_providers(scored, rng)]

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
