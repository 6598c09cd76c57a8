"""Choosing providers: scraping /metrics, power of two choices, unreachable last."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from pyrsia_node.metrics import (
    Candidate,
    ScoreScraper,
    ScrapeError,
    choose_providers,
    parse_quality_score,
)

pytestmark = pytest.mark.timeout(30)


def exposition(score: float) -> str:
    registry = CollectorRegistry()
    Gauge("pyrsia_node_quality_score", "Q(x)", registry=registry).set(score)
    return generate_latest(registry).decode()


def test_parse_quality_score_reads_the_gauge() -> None:
    assert parse_quality_score(exposition(2.5)) == 2.5


def test_parse_quality_score_without_the_gauge_fails_clearly() -> None:
    with pytest.raises(ScrapeError, match="no pyrsia_node_quality_score"):
        parse_quality_score("# nothing here\nother_metric 1\n")


@given(
    st.lists(st.one_of(st.none(), st.floats(0, 100)), min_size=1, max_size=12),
    st.integers(0, 2**32),
)
def test_choice_orders_all_candidates_with_unreachable_last(
    scores: list[float | None], seed: int
) -> None:
    candidates = [Candidate(str(i), "", s) for i, s in enumerate(scores)]
    ordered = choose_providers(candidates, random.Random(seed))
    assert sorted(c.key for c in ordered) == sorted(c.key for c in candidates)
    reachable = sum(1 for s in scores if s is not None)
    assert all(c.score is not None for c in ordered[:reachable])
    assert all(c.score is None for c in ordered[reachable:])


def test_worst_provider_is_never_first_but_best_is_not_always_first() -> None:
    candidates = [Candidate(str(i), "", float(i)) for i in range(4)]
    rng = random.Random(7)
    firsts = [choose_providers(candidates, rng)[0].key for _ in range(2000)]
    assert "3" not in firsts
    assert firsts.count("0") > firsts.count("1") > firsts.count("2") > 0


class MetricsServer:
    def __init__(self, score: float) -> None:
        self.score = score
        self.requests = 0

    async def handle(self, _: web.Request) -> web.Response:
        self.requests += 1
        return web.Response(text=exposition(self.score))


StartMetrics = Callable[[float], Awaitable[tuple[MetricsServer, str]]]


@pytest.fixture
async def metrics_servers() -> AsyncIterator[StartMetrics]:
    runners: list[web.AppRunner] = []

    async def start(score: float) -> tuple[MetricsServer, str]:
        server = MetricsServer(score)
        app = web.Application()
        app.add_routes([web.get("/metrics", server.handle)])
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = runner.addresses[0][1]
        return server, f"127.0.0.1:{port}"

    yield start
    for runner in runners:
        await runner.cleanup()


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_scraper_caches_scores_for_the_ttl(
    metrics_servers: StartMetrics,
) -> None:
    server, address = await metrics_servers(1.5)
    clock = FakeClock()
    scraper = ScoreScraper(ttl=2.0, clock=clock)
    try:
        assert await scraper.score(address) == 1.5
        server.score = 9.0
        clock.now = 1.9
        assert await scraper.score(address) == 1.5
        clock.now = 2.1
        assert await scraper.score(address) == 9.0
        assert server.requests == 2
    finally:
        await scraper.close()


async def test_unreachable_candidates_rank_last(
    metrics_servers: StartMetrics, free_port: int
) -> None:
    _, good = await metrics_servers(50.0)
    scraper = ScoreScraper(timeout=0.3)
    try:
        order = await scraper.rank(
            [("dead", f"127.0.0.1:{free_port}"), ("alive", good)], random.Random(1)
        )
    finally:
        await scraper.close()
    assert order == ["alive", "dead"]
