"""Builds without a network: the record rule consensus applies, the coordinator's decision
with authorities simulated by real signed attestations, ids and status encoding."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from image_catalog import ImageCatalog
from prometheus_client import CollectorRegistry
from pyrsia.v1 import build_pb2
from pyrsia_node.attestation import AcquiredImage, Artifact, Envelope, attest, decide
from pyrsia_node.build import (
    AcquireRefused,
    BuildClient,
    BuildCoordinator,
    BuildError,
    BuildStatus,
    ImageAcquirer,
    InvalidArtifactRecord,
    UnknownBuild,
    artifact_record,
    attestation_threshold,
    authorities_at,
    check_artifact_record,
    image_package_id,
    record_validator,
    registry_builds,
    remote_acquirer,
    settled,
    split_package_id,
)
from pyrsia_node.consensus.mempool import RecordRejected
from pyrsia_node.genesis import Authority, Genesis
from pyrsia_node.identity import Identity
from pyrsia_node.ledger.records import (
    ArtifactRecord,
    GovernanceAction,
    GovernanceRecord,
    PackageType,
    record_hash,
)
from pyrsia_node.registry import BuildRejected, BuildRequest, RepositoryName
from pyrsia_node.store import BlobStore

NOW = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)


def digest(n: int) -> str:
    return f"sha256:{n:064x}"


def image(tag: str = "1.0", layer: int = 3) -> AcquiredImage:
    return AcquiredImage(
        registry="docker.io",
        repository="library/alpine",
        tag=tag,
        root=Artifact(digest(9), 500, "application/vnd.oci.image.index.v1+json"),
        manifests=(
            Artifact(digest(8), 400, "application/vnd.oci.image.manifest.v1+json"),
            Artifact(digest(7), 400, "application/vnd.oci.image.manifest.v1+json"),
        ),
        blobs=(
            Artifact(digest(1), 10, "application/vnd.oci.image.config.v1+json"),
            Artifact(digest(layer), 1000, "application/vnd.oci.image.layer.v1.tar+gzip"),
        ),
    )


@pytest.fixture(scope="module")
def keys() -> list[Identity]:
    return [Identity.generate() for _ in range(4)]


def validators(keys: list[Identity]) -> dict[str, bytes]:
    return {k.node_id: k.public_key for k in keys}


def envelope(key: Identity, seen: AcquiredImage) -> Envelope:
    return attest(seen, "http://upstream.test/v2/", NOW, key)[1]


def test_a_record_attested_by_the_threshold_is_valid(keys: list[Identity]) -> None:
    record = artifact_record(image(), [envelope(k, image()) for k in keys[:3]])
    assert check_artifact_record(record, validators(keys), 3) == image()
    assert record.package_type is PackageType.DOCKER
    assert record.package_id == "docker.io/library/alpine:1.0"
    assert [a.digest for a in record.artifacts] == [digest(n) for n in (9, 7, 8, 1, 3)]
    assert [e.signatures[0][0] for e in record.attestations] == sorted(k.node_id for k in keys[:3])


def test_an_under_attested_record_is_invalid(keys: list[Identity]) -> None:
    record = artifact_record(image(), [envelope(k, image()) for k in keys[:2]])
    with pytest.raises(InvalidArtifactRecord, match="2 matching attestation"):
        check_artifact_record(record, validators(keys), 3)


def test_an_outsiders_attestation_makes_a_record_invalid(keys: list[Identity]) -> None:
    outsider = Identity.generate()
    record = artifact_record(
        image(), [*(envelope(k, image()) for k in keys[:3]), envelope(outsider, image())]
    )
    with pytest.raises(InvalidArtifactRecord, match="not an authority"):
        check_artifact_record(record, validators(keys), 3)


def test_a_dissenting_attestation_inside_a_record_makes_it_invalid(keys: list[Identity]) -> None:
    envelopes = [*(envelope(k, image()) for k in keys[:3]), envelope(keys[3], image(layer=4))]
    with pytest.raises(InvalidArtifactRecord, match="saw"):
        check_artifact_record(artifact_record(image(), envelopes), validators(keys), 3)


def test_a_record_listing_other_artifacts_than_attested_is_invalid(keys: list[Identity]) -> None:
    record = artifact_record(image(), [envelope(k, image()) for k in keys[:3]])
    first = record.artifacts[0]
    assert len(record.artifacts) > 1
    for artifacts in (
        record.artifacts[:-1],
        record.artifacts[::-1],
        (replace(first, size=first.size + 1), *record.artifacts[1:]),
        (replace(first, media_type="application/octet-stream"), *record.artifacts[1:]),
    ):
        forged = replace(record, artifacts=artifacts)
        with pytest.raises(InvalidArtifactRecord, match="artifacts differ"):
            check_artifact_record(forged, validators(keys), 3)
    renamed = replace(record, package_id="docker.io/library/alpine:2.0")
    with pytest.raises(InvalidArtifactRecord, match="attestations are for"):
        check_artifact_record(renamed, validators(keys), 3)


def test_the_validator_admits_governance_and_attested_records_only(keys: list[Identity]) -> None:
    valid = record_validator(lambda: validators(keys), lambda n: 3)
    governance = GovernanceRecord.create(
        Identity.generate(), "chain", 1, GovernanceAction.ADD, "authority-9",
        Identity.generate().public_key, "127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3",
    )  # fmt: skip
    attested = artifact_record(image(), [envelope(k, image()) for k in keys[:3]])
    under = artifact_record(image(), [envelope(k, image()) for k in keys[:2]])
    assert valid(governance.encode())
    assert valid(attested.encode())
    assert not valid(under.encode())
    assert not valid(b"\x01\x01garbage")


def test_the_validator_hands_each_valid_records_image_over(keys: list[Identity]) -> None:
    seen: list[tuple[bytes, AcquiredImage]] = []
    valid = record_validator(
        lambda: validators(keys), lambda n: 3, on_valid=lambda *a: seen.append(a)
    )
    attested = artifact_record(image(), [envelope(k, image()) for k in keys[:3]]).encode()
    under = artifact_record(image(), [envelope(k, image()) for k in keys[:2]]).encode()
    assert valid(attested) and not valid(under)
    assert seen == [(attested, image())]


def test_an_attestation_envelope_with_two_signatures_makes_a_record_invalid(
    keys: list[Identity],
) -> None:
    record = artifact_record(image(), [envelope(k, image()) for k in keys[:3]])
    doubled = replace(
        record.attestations[0],
        signatures=(*record.attestations[0].signatures, (keys[3].node_id, b"\x00" * 64)),
    )
    forged = replace(record, attestations=(doubled, *record.attestations[1:]))
    with pytest.raises(InvalidArtifactRecord, match="expected exactly one"):
        check_artifact_record(forged, validators(keys), 3)


def test_package_ids_are_normalised_and_digests_refused() -> None:
    assert image_package_id("alpine") == "docker.io/library/alpine:latest"
    assert split_package_id("docker.io/test/x:1.0") == ("docker.io", "test/x", "1.0")
    with pytest.raises(BuildError, match="names a digest"):
        image_package_id(f"alpine@{digest(1)}")
    with pytest.raises(BuildError, match="normalised"):
        split_package_id("alpine:1")


def test_build_status_survives_the_wire() -> None:
    status = BuildStatus("ab" * 8 + "-01", "done", "ok", "docker.io/a/b:1", digest(1), 7, ("x",))
    assert BuildStatus.from_pb(status.to_pb()) == status
    assert status.to_dict()["ledger_index"] == 7


Acquire = Callable[[Authority, str], Awaitable[Envelope]]


def authorities(keys: list[Identity]) -> list[Authority]:
    return [
        Authority(f"authority-{i}", k.public_key, f"127.0.0.1:{1000 + i}", "")
        for i, k in enumerate(keys)
    ]


def coordinator(
    keys: list[Identity], acquire: Acquire, ledger: dict[bytes, int], submitted: list[bytes]
) -> BuildCoordinator:
    def submit(record: bytes) -> bool:
        if not record_validator(lambda: validators(keys), lambda n: 3)(record):
            raise RecordRejected("record is not a canonical ledger record")
        submitted.append(record)
        ledger[record_hash(record)] = len(ledger)
        return True

    async def committed_index(key: bytes) -> int | None:
        return ledger.get(key)

    return BuildCoordinator(
        keys[0].node_id,
        lambda: authorities(keys),
        lambda n: 3,
        acquire,
        submit,
        committed_index,
        acquire_timeout=1.0,
        commit_timeout=1.0,
        poll_interval=0.01,
    )


async def finished(builds: BuildCoordinator, build_id: str) -> BuildStatus:
    async with asyncio.timeout(5):
        while True:
            status = builds.status(build_id)
            if status.finished:
                return status
            await asyncio.sleep(0.01)


async def until(check: Callable[[], bool]) -> None:
    async with asyncio.timeout(5):
        while True:
            if check():
                return
            await asyncio.sleep(0.01)


async def test_a_build_commits_what_three_agree_on_and_reports_the_dissent(
    keys: list[Identity],
) -> None:
    by_key = {k.node_id: k for k in keys}

    async def acquire(authority: Authority, package_id: str) -> Envelope:
        seen = image(layer=4) if authority.name == "authority-3" else image()
        return envelope(by_key[authority.node_id], seen)

    ledger: dict[bytes, int] = {}
    submitted: list[bytes] = []
    builds = coordinator(keys, acquire, ledger, submitted)
    status = await finished(builds, builds.request("docker.io/library/alpine:1.0"))
    assert status.state == "done", status.message
    assert status.manifest_digest == digest(9)
    assert status.ledger_index == 0
    [mismatch] = status.mismatches
    assert keys[3].node_id in mismatch
    [record] = submitted
    signers = {e.keyid for e in check_artifact_record_envelopes(record, keys)}
    assert signers == {k.node_id for k in keys[:3]}


def check_artifact_record_envelopes(record: bytes, keys: list[Identity]) -> list[Envelope]:
    decoded = ArtifactRecord.decode(record)
    check_artifact_record(decoded, validators(keys), 3)
    return [Envelope.from_json(e.to_json()) for e in decoded.attestations]


async def test_a_build_without_enough_agreement_fails_with_every_reason(
    keys: list[Identity],
) -> None:
    by_key = {k.node_id: k for k in keys}

    async def acquire(authority: Authority, package_id: str) -> Envelope:
        if authority.name == "authority-1":
            await asyncio.sleep(5)
        if authority.name == "authority-2":
            raise BuildError("registry 'docker.io' is not an upstream")
        return envelope(by_key[authority.node_id], image())

    submitted: list[bytes] = []
    builds = coordinator(keys, acquire, {}, submitted)
    status = await finished(builds, builds.request("docker.io/library/alpine:1.0"))
    assert status.state == "failed"
    assert "2 matching attestation(s), 3 required" in status.message
    assert "authority-1" in status.message and "did not attest within 1s" in status.message
    assert "authority-2" in status.message and "not an upstream" in status.message
    assert len(status.mismatches) == 2
    assert submitted == []


async def test_concurrent_requests_for_one_package_share_one_build(
    keys: list[Identity],
) -> None:
    release = asyncio.Event()
    calls: list[str] = []
    by_key = {k.node_id: k for k in keys}

    async def acquire(authority: Authority, package_id: str) -> Envelope:
        calls.append(authority.name)
        await release.wait()
        return envelope(by_key[authority.node_id], image())

    builds = coordinator(keys, acquire, {}, [])
    first = builds.request("docker.io/library/alpine:1.0")
    assert builds.request("docker.io/library/alpine:1.0") == first
    assert builds.request("docker.io/library/alpine:2.0") != first
    release.set()
    assert (await finished(builds, first)).state == "done"
    await builds.close()
    assert calls.count("authority-0") == 2  # one per package, not per request


def no_network(address: str) -> grpc.aio.Channel:
    pytest.fail(f"the owning authority answers locally, yet {address} was dialled")


async def test_build_ids_name_their_authority(keys: list[Identity]) -> None:
    async def acquire(authority: Authority, package_id: str) -> Envelope:
        raise BuildError("unused")

    builds = coordinator(keys, acquire, {}, [])
    client = BuildClient(lambda: authorities(keys), no_network, builds)
    build_id = await client.request("docker.io/library/alpine:1.0")
    assert build_id.startswith(keys[0].node_id[:16] + "-")
    assert (await client.status(build_id)).package_id == "docker.io/library/alpine:1.0"
    with pytest.raises(UnknownBuild, match="not a build id"):
        await client.status("nonsense")
    with pytest.raises(UnknownBuild, match="no build"):
        await client.status(keys[0].node_id[:16] + "-00")
    await builds.close()


async def test_a_build_commits_at_the_threshold_and_reports_a_late_dissent(
    keys: list[Identity],
) -> None:
    by_key = {k.node_id: k for k in keys}
    release = asyncio.Event()

    async def acquire(authority: Authority, package_id: str) -> Envelope:
        if authority.name == "authority-3":
            await release.wait()
            return envelope(by_key[authority.node_id], image(layer=4))
        return envelope(by_key[authority.node_id], image())

    ledger: dict[bytes, int] = {}
    submitted: list[bytes] = []
    builds = coordinator(keys, acquire, ledger, submitted)
    build_id = builds.request("docker.io/library/alpine:1.0")
    await until(lambda: builds.status(build_id).ledger_index == 0)
    assert len(submitted) == 1
    assert builds.status(build_id).state == "committing"  # authority-3 is still acquiring
    release.set()
    status = await finished(builds, build_id)
    assert status.state == "done", status.message
    [mismatch] = status.mismatches
    assert keys[3].node_id in mismatch
    [record] = submitted
    signers = {e.keyid for e in check_artifact_record_envelopes(record, keys)}
    assert signers == {k.node_id for k in keys[:3]}


def test_a_decision_is_settled_only_when_outstanding_attestations_cannot_change_it(
    keys: list[Identity],
) -> None:
    agree = [envelope(k, image()) for k in keys[:3]]
    dissent = envelope(keys[3], image(layer=4))
    assert settled(decide(agree, validators(keys), 3), outstanding=1)
    assert not settled(decide(agree[:2], validators(keys), 3), outstanding=2)
    # A threshold of one: the first attestation commits nothing while three could outvote it.
    assert not settled(decide(agree[:1], validators(keys), 1), outstanding=3)
    assert not settled(decide([*agree[:2], dissent], validators(keys), 2), outstanding=1)
    assert settled(decide([*agree[:2], dissent], validators(keys), 2), outstanding=0)


class _Builds:
    """A ``BuildClient`` stand-in: one build whose state the test sets."""

    def __init__(self) -> None:
        self.state = BuildStatus("b-1", "acquiring", "", "docker.io/library/alpine:1.0")
        self.ended = asyncio.Event()

    def end(self, state: BuildStatus) -> None:
        self.state = state
        self.ended.set()

    async def request(self, package_id: str) -> str:
        return "b-1"

    async def wait(self, build_id: str) -> BuildStatus:
        await self.ended.wait()
        return self.state


class _Catalog:
    def __init__(self) -> None:
        self.images = ImageCatalog()
        self.size = 0
        self.indexed = asyncio.Condition()

    async def add(self, committed: AcquiredImage) -> None:
        self.images.add(committed)
        self.size += 1
        async with self.indexed:
            self.indexed.notify_all()

    async def resolve(self, name: RepositoryName, reference: str) -> object:
        return await self.images.resolve(name, reference)

    async def wait_indexed(self, index: int) -> None:
        async with self.indexed:
            await self.indexed.wait_for(lambda: self.size > index)


ALPINE = BuildRequest(RepositoryName("docker.io", "library/alpine"), "1.0")


async def test_a_pull_returns_when_its_tag_is_indexed_not_when_the_build_finishes() -> None:
    builds, catalog = _Builds(), _Catalog()
    request_build = registry_builds(builds, catalog)  # type: ignore[arg-type]
    pull = asyncio.create_task(request_build(ALPINE))
    await catalog.add(image(tag="other"))
    await asyncio.sleep(0.05)
    assert not pull.done()
    await catalog.add(image())
    async with asyncio.timeout(2):
        await pull
    assert not builds.state.finished


async def test_a_pull_of_a_failed_build_raises_its_report() -> None:
    builds, catalog = _Builds(), _Catalog()
    pull = asyncio.create_task(registry_builds(builds, catalog)(ALPINE))  # type: ignore[arg-type]
    builds.end(replace(builds.state, state="failed", message="2 of 3 required agree"))
    with pytest.raises(BuildRejected, match="2 of 3 required"):
        async with asyncio.timeout(2):
            await pull


def acquirer(
    key: Identity, keys: list[Identity], now_ms: int, tmp: Path, chain_id: str = "test-chain"
) -> ImageAcquirer:
    async def announce(digest: str) -> None:
        return None

    return ImageAcquirer(
        key,
        BlobStore(tmp),
        {},
        announce,
        registry=CollectorRegistry(),
        chain_id=chain_id,
        authorities=lambda: validators(keys),
        clock_ms=lambda: now_ms,
    )


def test_an_acquire_request_signed_by_an_authority_in_force_is_accepted(
    keys: list[Identity], tmp_path: Path
) -> None:
    request = acquirer(keys[1], keys, 10_000_000, tmp_path).request("docker.io/library/a:1")
    acquirer(keys[2], keys, 10_060_000, tmp_path).check(request)


def test_acquire_requests_from_peers_or_tampered_or_stale_are_refused(
    keys: list[Identity], tmp_path: Path
) -> None:
    outsider = Identity.generate()
    receiver = acquirer(keys[2], keys, 10_000_000, tmp_path)
    from_peer = acquirer(outsider, keys, 10_000_000, tmp_path).request("docker.io/library/a:1")
    with pytest.raises(AcquireRefused, match="not an authority in force"):
        receiver.check(from_peer)
    tampered = acquirer(keys[1], keys, 10_000_000, tmp_path).request("docker.io/library/a:1")
    tampered.package_id = "docker.io/library/b:1"
    with pytest.raises(AcquireRefused, match="bad signature"):
        receiver.check(tampered)
    other_chain = acquirer(keys[1], keys, 10_000_000, tmp_path, chain_id="other-chain")
    with pytest.raises(AcquireRefused, match="bad signature"):
        receiver.check(other_chain.request("docker.io/library/a:1"))
    stale = acquirer(keys[1], keys, 10_000_000 - 6 * 60_000, tmp_path).request(
        "docker.io/library/a:1"
    )
    with pytest.raises(AcquireRefused, match="stale"):
        receiver.check(stale)
    unsigned = build_pb2.AcquireRequest(package_id="docker.io/library/a:1")
    with pytest.raises(AcquireRefused, match="an unnamed caller"):
        receiver.check(unsigned)


# Authorities added by governance -----------------------------------------------------------

GOVERNANCE_KEY = Identity.generate()


def genesis_of(keys: list[Identity]) -> Genesis:
    return Genesis(
        chain_id="chain",
        genesis_time="2026-01-01T00:00:00Z",
        governance_public_key=GOVERNANCE_KEY.public_key,
        authorities=tuple(authorities(keys)),
        ca_certificate="",
    )


def governance(
    sequence: int,
    action: GovernanceAction,
    key: Identity,
    address: str = "",
    signer: Identity = GOVERNANCE_KEY,
) -> bytes:
    return GovernanceRecord.create(
        signer, "chain", sequence, action, f"added-{sequence}", key.public_key, address,
        address and "127.0.0.1:8080",
    ).encode()  # fmt: skip


def test_authorities_added_by_governance_are_asked_at_their_recorded_address(
    keys: list[Identity],
) -> None:
    genesis = genesis_of(keys[:3])
    added, unknown = keys[3], Identity.generate()
    entries = [
        (2, governance(1, GovernanceAction.ADD, added, "10.0.0.4:7000")),
        (5, governance(2, GovernanceAction.REMOVE, keys[1])),
        (7, governance(3, GovernanceAction.ADD, unknown, "10.0.0.9:7000", signer=unknown)),
        (8, governance(4, GovernanceAction.ADD, Identity.generate())),
    ]
    assert authorities_at(genesis, [], 10) == authorities(keys[:3])
    assert [a.name for a in authorities_at(genesis, entries[:1], 10)] == [
        "authority-0", "authority-1", "authority-2", "added-1",
    ]  # fmt: skip
    now = authorities_at(genesis, entries, 10)
    # The removal took authority-1 out; the forged ADD changed nothing; the ADD without an
    # address is in force but cannot be asked.
    assert [(a.name, a.grpc_address) for a in now] == [
        ("authority-0", "127.0.0.1:1000"),
        ("authority-2", "127.0.0.1:1002"),
        ("added-1", "10.0.0.4:7000"),
        ("added-4", ""),
    ]
    assert now[2].public_key == added.public_key
    assert now[2].http_address == "127.0.0.1:8080"


async def test_a_build_asks_the_authorities_in_force_and_counts_against_their_threshold(
    keys: list[Identity],
) -> None:
    genesis = genesis_of(keys[:3])
    by_key = {k.node_id: k for k in keys}
    entries = [(0, governance(1, GovernanceAction.ADD, keys[3], "10.0.0.4:7000"))]
    asked: list[str] = []

    async def acquire(authority: Authority, package_id: str) -> Envelope:
        asked.append(authority.grpc_address)
        if authority.name != "added-1":
            await asyncio.sleep(0.05 * int(authority.name[-1]))  # the added one is first
        return envelope(by_key[authority.node_id], image())

    ledger: dict[bytes, int] = {}
    submitted: list[bytes] = []

    def submit(record: bytes) -> bool:
        submitted.append(record)
        ledger[record_hash(record)] = len(ledger)
        return True

    async def committed_index(key: bytes) -> int | None:
        return ledger.get(key)

    builds = BuildCoordinator(
        keys[0].node_id,
        lambda: authorities_at(genesis, entries, 1),
        lambda n: attestation_threshold(genesis, n),
        acquire,
        submit,
        committed_index,
        acquire_timeout=1.0,
        commit_timeout=1.0,
        poll_interval=0.01,
    )
    build_id = builds.request("docker.io/library/alpine:1.0")
    await asyncio.sleep(0)
    assert builds.status(build_id).message == "4 authorities acquiring, 3 must agree"
    status = await finished(builds, build_id)
    assert status.state == "done", status.message
    assert sorted(asked) == ["10.0.0.4:7000", "127.0.0.1:1000", "127.0.0.1:1001", "127.0.0.1:1002"]
    [record] = submitted
    signers = {e.keyid for e in check_artifact_record_envelopes(record, keys)}
    assert keys[3].node_id in signers and len(signers) == 3


async def test_an_authority_without_a_known_address_is_reported_not_dialled(
    keys: list[Identity], tmp_path: Path
) -> None:
    acquirer = ImageAcquirer(
        keys[0], BlobStore(tmp_path), {}, lambda d: asyncio.sleep(0),
        chain_id="chain", authorities=lambda: validators(keys),
    )  # fmt: skip
    acquire = remote_acquirer(keys[0].node_id, acquirer, no_network, 1.0)
    with pytest.raises(BuildError, match="no gRPC address is known"):
        await acquire(Authority("added-4", keys[1].public_key, "", ""), "docker.io/a/b:1")


async def test_the_build_log_line_gives_each_phase_time(
    keys: list[Identity], caplog: pytest.LogCaptureFixture
) -> None:
    by_key = {k.node_id: k for k in keys}

    async def acquire(authority: Authority, package_id: str) -> Envelope:
        return envelope(by_key[authority.node_id], image())

    builds = coordinator(keys, acquire, {}, [])
    with caplog.at_level("INFO", logger="pyrsia_node.build"):
        status = await finished(builds, builds.request("docker.io/library/alpine:1.0"))
        await builds.close()
    assert status.state == "done"
    [line] = [r.getMessage() for r in caplog.records if "done in" in r.getMessage()]
    for phase in ("authority-0 answered", "authority-3 answered", "submitted", "commit seen"):
        assert phase in line, line
