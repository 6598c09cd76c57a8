"""``POST /api/v1/records``: raw canonical records into an authority's mempool."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from pyrsia.v1 import consensus_pb2 as pb
from pyrsia_node.api.consensus import routes
from pyrsia_node.consensus.service import GOSSIP_INTERVAL, ConsensusService, initialize_state
from pyrsia_node.genesis import Authority, Genesis
from pyrsia_node.identity import Identity
from pyrsia_node.ledger import TransparencyLog
from pyrsia_node.ledger.records import (
    IN_TOTO_PAYLOAD_TYPE,
    Artifact,
    ArtifactRecord,
    DsseEnvelope,
    PackageType,
)
from pyrsia_node.merkle import leaf_hash

KEYS = [Identity.generate() for _ in range(5)]  # four authorities and a peer


class Recorder:
    """A transport that only remembers what was broadcast: no other node is running, so
    nothing commits and a submitted record stays pending."""

    def __init__(self) -> None:
        self.sent: list[pb.ConsensusEnvelope] = []

    def set_authorities(self, addresses: Mapping[bytes, str], stream: bool) -> None:
        pass

    def broadcast(self, envelope: pb.ConsensusEnvelope) -> None:
        self.sent.append(envelope)

    async def fetch_blocks(
        self, peer: bytes, from_height: int, limit: int, follow: bool
    ) -> AsyncIterator[pb.CommittedBlock]:
        for item in ():
            yield item

    async def close(self) -> None:
        pass


def record(i: int) -> bytes:
    envelope = DsseEnvelope(IN_TOTO_PAYLOAD_TYPE, b"{}", (("authority-0", b"s" * 64),))
    return ArtifactRecord(
        PackageType.DOCKER,
        f"docker.io/library/api{i}:v1",
        (Artifact(f"sha256:{i:064x}", i, "application/vnd.oci.image.manifest.v1+json"),),
        (envelope,),
    ).encode()


GENESIS = Genesis(
    chain_id="pyrsia-api",
    genesis_time="2026-01-01T00:00:00Z",
    governance_public_key=Identity.generate().public_key,
    authorities=tuple(
        Authority(f"authority-{i}", KEYS[i].public_key, f"127.0.0.1:{i + 1}", "-") for i in range(4)
    ),
    ca_certificate="",
)


async def client_for(tmp_path: Path, identity: Identity) -> tuple[TestClient, Recorder]:
    initialize_state(tmp_path / "consensus")
    transport = Recorder()
    service = ConsensusService(identity, GENESIS, tmp_path / "consensus", None, transport)
    await service.start()
    app = web.Application()
    app.add_routes(routes(service))
    app.on_cleanup.append(lambda _: service.stop())
    client = TestClient(TestServer(app))
    await client.start_server()
    return client, transport


@pytest.fixture
async def authority(tmp_path: Path) -> AsyncIterator[tuple[TestClient, Recorder]]:
    client, transport = await client_for(tmp_path, KEYS[0])
    yield client, transport
    await client.close()


OCTETS = {"Content-Type": "application/octet-stream"}


async def test_a_new_record_is_admitted_and_gossiped(
    authority: tuple[TestClient, Recorder],
) -> None:
    client, transport = authority
    response = await client.post("/api/v1/records", data=record(1), headers=OCTETS)
    assert response.status == 202
    assert await response.json() == {
        "record_hash": leaf_hash(record(1)).hex(),
        "status": "admitted",
    }
    await asyncio.sleep(2 * GOSSIP_INTERVAL)
    gossiped = [r for e in transport.sent if e.HasField("records") for r in e.records.records]
    assert gossiped == [record(1)]


async def test_a_pending_record_is_not_admitted_twice(
    authority: tuple[TestClient, Recorder],
) -> None:
    client, _ = authority
    await client.post("/api/v1/records", data=record(2), headers=OCTETS)
    response = await client.post("/api/v1/records", data=record(2), headers=OCTETS)
    assert response.status == 200
    assert (await response.json())["status"] == "already pending"


async def test_a_record_that_is_not_canonical_is_refused_with_the_reason(
    authority: tuple[TestClient, Recorder],
) -> None:
    client, transport = authority
    response = await client.post("/api/v1/records", data=b"not a record", headers=OCTETS)
    assert response.status == 400
    assert "canonical" in (await response.json())["error"]
    assert transport.sent == []


@pytest.mark.parametrize(
    ("body", "headers", "error"),
    [
        (b"", OCTETS, "empty body"),
        (b"{}", {"Content-Type": "application/json"}, "application/octet-stream"),
    ],
)
async def test_malformed_requests_are_refused(
    authority: tuple[TestClient, Recorder], body: bytes, headers: dict[str, str], error: str
) -> None:
    client, _ = authority
    response = await client.post("/api/v1/records", data=body, headers=headers)
    assert response.status == 400
    assert error in (await response.json())["error"]


async def test_a_peer_refuses_records_it_could_not_propose(tmp_path: Path) -> None:
    client, transport = await client_for(tmp_path, KEYS[4])
    try:
        response = await client.post("/api/v1/records", data=record(3), headers=OCTETS)
        assert response.status == 409
        assert "not an authority" in (await response.json())["error"]
        assert transport.sent == []
    finally:
        await client.close()


# ?wait=SECONDS: answered once the record is committed -------------------------------


@pytest.fixture
async def lone_authority(tmp_path: Path) -> AsyncIterator[TestClient]:
    """An authority alone in its network: it commits what it admits by itself."""
    genesis = Genesis(
        chain_id="pyrsia-api-lone",
        genesis_time="2026-01-01T00:00:00Z",
        governance_public_key=Identity.generate().public_key,
        authorities=(Authority("authority-0", KEYS[0].public_key, "127.0.0.1:1", "-"),),
        ca_certificate="",
    )
    initialize_state(tmp_path / "consensus")
    ledger = TransparencyLog(tmp_path / "ledger")
    service = ConsensusService(KEYS[0], genesis, tmp_path / "consensus", ledger, Recorder())
    await service.start()
    app = web.Application()
    app.add_routes(routes(service))
    client = TestClient(TestServer(app))
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()
        await service.stop()
        ledger.close()


async def test_wait_answers_with_the_log_index_once_committed(lone_authority: TestClient) -> None:
    client = lone_authority
    answers = []
    for i in (5, 6):
        response = await client.post("/api/v1/records?wait=20", data=record(i), headers=OCTETS)
        assert response.status == 200
        answers.append(await response.json())
    assert answers == [
        {"record_hash": leaf_hash(record(5)).hex(), "status": "committed", "index": 0},
        {"record_hash": leaf_hash(record(6)).hex(), "status": "committed", "index": 1},
    ]
    # Resubmitted: refused without wait, as before; with wait, its index again.
    response = await client.post("/api/v1/records", data=record(5), headers=OCTETS)
    assert response.status == 400
    assert "already in the ledger" in (await response.json())["error"]
    response = await client.post("/api/v1/records?wait=1", data=record(5), headers=OCTETS)
    assert (response.status, (await response.json())["index"]) == (200, 0)


async def test_wait_ends_with_202_when_nothing_commits_in_time(
    authority: tuple[TestClient, Recorder],
) -> None:
    client, _ = authority  # three of its four authorities are not running: no commits
    started = asyncio.get_running_loop().time()
    response = await client.post("/api/v1/records?wait=0.3", data=record(7), headers=OCTETS)
    assert response.status == 202
    assert (await response.json())["status"] == "admitted"
    assert asyncio.get_running_loop().time() - started >= 0.3
    response = await client.post("/api/v1/records?wait=0.1", data=record(7), headers=OCTETS)
    assert response.status == 202
    assert (await response.json())["status"] == "already pending"


@pytest.mark.parametrize("wait", ["soon", "-1", "61", "nan", "inf"])
async def test_a_wait_that_is_not_seconds_from_0_to_60_is_refused(
    authority: tuple[TestClient, Recorder], wait: str
) -> None:
    client, transport = authority
    response = await client.post(f"/api/v1/records?wait={wait}", data=record(8), headers=OCTETS)
    assert response.status == 400
    assert "wait" in (await response.json())["error"]
    await asyncio.sleep(2 * GOSSIP_INTERVAL)
    assert transport.sent == []  # refused before the record was looked at
