"""Builds: how an image becomes a committed artifact record.

A build runs on the authority that accepted it (``BuildCoordinator``): it asks every
authority of the network, itself included, to acquire and attest the image independently
(gRPC ``Build.Acquire``, each bounded by a timeout), counts the signed attestations with
``attestation.decide`` against the attestation threshold and, when enough authorities saw
identical digests, submits an ``ArtifactRecord`` to consensus and waits until the
transparency log holds it. A build that cannot commit fails with the decision's report:
every dissenting or failing authority is named, nothing is hidden.

On every authority ``ImageAcquirer`` serves ``Acquire``: it fetches the image from the
upstream the genesis names for its registry (or the node's ``upstream_overrides`` URL),
stores every blob, returns its DSSE envelope and announces the blobs. It serves only
requests signed by an authority in force (``check_acquire_request``): builds are
coordinated by authorities, so a peer or an outsider with a network certificate cannot
make authorities pull from upstream.

The coordinator submits the record as soon as the attestations still outstanding could
neither overtake nor tie the leading image (``settled``), so the result is the one waiting
for every authority would give; the late attestations still join the build's report.

``record_validator`` is consensus' record check: an artifact record is valid only when
its attestations verify against the authorities in force and at least the threshold of
them attest exactly the record's artifacts, so a forged or under-attested record never
commits.

"The authorities in force" has one meaning everywhere here: the ledger's set at the log
position in question (``ledger.authorities``). The record check, the threshold and the
Acquire check take it from consensus (``ConsensusService.authorities_in_force``: the set
at the log's size, a governance change included from the commit of its block, two heights
before it votes); a coordinator takes it from its log (``authorities_at``), which is the
same set once the log holds the last committed block.

``BuildClient`` is what any node uses to start builds and read their state, locally on an
authority or over gRPC; a build id starts with the owning authority's node id prefix.

What it must never do: fetch from an upstream on a peer, or commit an image fewer than the
threshold of authorities attested.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import struct
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

import aiohttp
import grpc
from prometheus_client import CollectorRegistry, Counter
from pyrsia.v1 import build_pb2, build_pb2_grpc

from pyrsia_node.acquire import AcquireError, FetchPolicy, UpstreamClient, acquire_image
from pyrsia_node.attestation import (
    AcquiredImage,
    AttestationError,
    Decision,
    Envelope,
    decide,
    unanimous,
)
from pyrsia_node.consensus.mempool import RecordRejected
from pyrsia_node.genesis import Authority, Genesis, Upstream, quorum
from pyrsia_node.identity import Identity, verify_signature
from pyrsia_node.ledger.authorities import authorities_in_force
from pyrsia_node.ledger.records import (
    Artifact,
    ArtifactRecord,
    DsseEnvelope,
    GovernanceAction,
    GovernanceRecord,
    PackageType,
    RecordError,
    decode_record,
    docker_package_id,
    record_hash,
    scan_record,
)
from pyrsia_node.registry import (
    BuildRejected,
    BuildRequest,
    ManifestRef,
    RepositoryName,
    RequestBuild,
)
from pyrsia_node.store import BlobStore

log = logging.getLogger(__name__)

State = Literal["pending", "acquiring", "committing", "done", "failed"]
_STATES: tuple[State, ...] = ("pending", "acquiring", "committing", "done", "failed")
_TO_PB = {name: build_pb2.BuildStatus.State.Value(name.upper()) for name in _STATES}
_FROM_PB = {value: name for name, value in _TO_PB.items()}
ID_PREFIX = 16
MAX_KEPT_BUILDS = 1000
RPC_TIMEOUT = 10.0
UPSTREAM_READ_BUFFER = 4 << 20

ChannelFactory = Callable[[str], grpc.aio.Channel]


class BuildError(Exception):
    """A build request that cannot be served; the message says what to change."""


class UnknownBuild(BuildError):
    """No build with this id is known to the authority that would own it."""


class BuildsUnavailable(BuildError):
    """No authority took the request or the owning authority is unreachable: retry later."""


class InvalidArtifactRecord(Exception):
    """An artifact record whose attestations do not justify it."""


@dataclass(frozen=True, slots=True)
class BuildStatus:
    """What a build is doing or how it ended; ``ledger_index`` is -1 until it is done."""

    build_id: str
    state: State
    message: str
    package_id: str
    manifest_digest: str = ""
    ledger_index: int = -1
    mismatches: tuple[str, ...] = ()

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed")

    def to_pb(self) -> build_pb2.BuildStatus:
        return build_pb2.BuildStatus(
            build_id=self.build_id,
            state=_TO_PB[self.state],
            message=self.message,
            package_id=self.package_id,
            manifest_digest=self.manifest_digest,
            ledger_index=self.ledger_index,
            mismatches=list(self.mismatches),
        )

    @classmethod
    def from_pb(cls, message: build_pb2.BuildStatus) -> BuildStatus:
        state = _FROM_PB.get(message.state)
        if state is None:
            raise BuildError(f"build {message.build_id}: unknown state {message.state}")
        return cls(
            message.build_id,
            state,
            message.message,
            message.package_id,
            message.manifest_digest,
            message.ledger_index,
            tuple(message.mismatches),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.build_id,
            "state": self.state,
            "message": self.message,
            "package_id": self.package_id,
            "manifest_digest": self.manifest_digest,
            "ledger_index": self.ledger_index,
            "mismatches": list(self.mismatches),
        }


# Package ids and records ------------------------------------------------------------------


def image_package_id(image: str) -> str:
    """The docker package id of a ``NAME:TAG`` reference; digests cannot be built."""
    try:
        package_id = docker_package_id(image)
    except RecordError as exc:
        raise BuildError(str(exc)) from None
    if "@" in package_id:
        raise BuildError(
            f"{image!r} names a digest; a build acquires a tag (NAME:TAG), digests are "
            "served once a build of a tag that contains them committed"
        )
    return package_id


def split_package_id(package_id: str) -> tuple[str, str, str]:
    """``registry/repository:tag`` -> (registry, repository, tag), checked."""
    if image_package_id(package_id) != package_id:
        raise BuildError(f"{package_id!r} is not a normalised package id registry/repo:tag")
    name, _, tag = package_id.rpartition(":")
    registry, _, repository = name.partition("/")
    return registry, repository, tag


def attestation_threshold(genesis: Genesis, authorities: int) -> int:
    """Matching attestations an image needs among ``authorities`` authorities in force."""
    return min(genesis.attestation_threshold or quorum(authorities), authorities)


def authorities_at(
    genesis: Genesis, governance: Sequence[tuple[int, bytes]], size: int
) -> list[Authority]:
    """The authorities in force at log ``size`` (``ledger.authorities_in_force`` over the
    ``governance`` entries: (index, record bytes) in log order, all below ``size``), with
    the addresses a coordinator asks them at: the genesis entry's, replaced by the latest
    valid ADD record of the key that carries a gRPC address. Authorities added by
    governance are asked to acquire like genesis ones; the threshold is computed over this
    set. An authority in force whose address is unknown is listed with an empty
    ``grpc_address`` (it cannot be asked; the coordinator reports it as failing)."""
    known = {a.public_key: a for a in genesis.authorities}
    for _, data in governance:
        try:
            record = decode_record(data)
            if not isinstance(record, GovernanceRecord):
                continue
            record.verify(genesis.governance_public_key, genesis.chain_id)
        except RecordError:
            continue  # authorities_in_force refuses it too: it changes nothing
        if record.action is GovernanceAction.ADD and record.grpc_address:
            known[record.public_key] = Authority(
                record.name,
                record.public_key,
                record.grpc_address,
                record.http_address,
                record.metrics_address,
            )
    in_force = authorities_in_force(genesis, governance, size)
    return [known.get(key) or Authority(name, key, "", "") for name, key in in_force.authorities]


def record_artifacts(image: AcquiredImage) -> tuple[Artifact, ...]:
    """The artifacts of a record of ``image`` in canonical order: the root, then platform
    manifests by digest, then blobs by digest, each digest once."""
    return tuple(Artifact(*fields) for fields in _artifact_fields(image))


def _artifact_fields(image: AcquiredImage) -> tuple[tuple[str, int, str], ...]:
    """(digest, size, media type) of ``record_artifacts(image)``, without building (and
    checking again) the record's artifacts: what the record check compares."""
    seen: dict[str, tuple[str, int, str]] = {}
    ordered = (
        image.root,
        *sorted(image.manifests, key=lambda a: a.digest),
        *sorted(image.blobs, key=lambda a: a.digest),
    )
    for a in ordered:
        if a.digest not in seen:
            seen[a.digest] = (a.digest, a.size, a.media_type)
    return tuple(seen.values())


def artifact_record(image: AcquiredImage, envelopes: Iterable[Envelope]) -> ArtifactRecord:
    """The record of ``image`` carrying ``envelopes`` (sorted by signer)."""
    attestations = tuple(
        DsseEnvelope.from_json(e.to_json()) for e in sorted(envelopes, key=lambda e: e.keyid)
    )
    return ArtifactRecord(
        PackageType.DOCKER, image.reference, record_artifacts(image), attestations
    )


def check_artifact_record(
    record: ArtifactRecord, validators: Mapping[str, bytes], threshold: int
) -> AcquiredImage:
    """The image ``record`` commits, or ``InvalidArtifactRecord`` with the reason.

    Every attestation must verify against ``validators`` (node id -> public key) and attest
    the same image; at least ``threshold`` authorities must; the record must list exactly
    that image's artifacts in canonical order under its package id."""
    return _check_attested(
        record.package_type,
        record.package_id,
        [(a.digest, a.size, a.media_type) for a in record.artifacts],
        [(e.payload_type, e.payload, e.signatures) for e in record.attestations],
        validators,
        threshold,
    )


def _check_attested(
    package_type: PackageType,
    package_id: str,
    listed: Sequence[tuple[str, int, str]],
    attestations: Iterable[tuple[str, bytes, tuple[tuple[str, bytes], ...]]],
    validators: Mapping[str, bytes],
    threshold: int,
) -> AcquiredImage:
    """``check_artifact_record`` over the record's fields as ``records.scan_record`` reads
    them: artifacts as (digest, size, media type), attestations as (payload type, payload,
    signatures)."""
    if package_type is not PackageType.DOCKER:
        raise InvalidArtifactRecord(
            f"{package_id}: only docker images are attested by this network"
        )
    envelopes = []
    for payload_type, payload, signatures in attestations:
        # A scanned envelope already holds what Envelope.from_json checks (text payload
        # type and keyids, raw payload and signatures); only the signature count is left.
        if len(signatures) != 1:
            raise InvalidArtifactRecord(
                f"{package_id}: an attestation envelope carries {len(signatures)} "
                "signatures; expected exactly one (one envelope per authority)"
            )
        ((keyid, signature),) = signatures
        envelopes.append(Envelope(payload_type, payload, keyid, signature))
    image = unanimous(envelopes, validators, threshold)
    if image is None:
        raise InvalidArtifactRecord(
            f"{package_id}: {decide(envelopes, validators, threshold).report()}"
        )
    if image.reference != package_id:
        raise InvalidArtifactRecord(f"{package_id}: the attestations are for {image.reference}")
    if _artifact_fields(image) != tuple(listed):
        raise InvalidArtifactRecord(
            f"{package_id}: the artifacts differ from what the authorities attested"
        )
    return image


def record_validator(
    validators: Callable[[], Mapping[str, bytes]],
    threshold: Callable[[int], int],
    on_valid: Callable[[bytes, AcquiredImage], None] | None = None,
) -> Callable[[bytes], bool]:
    """Consensus' record check: canonical records; artifact records only when attested
    (``check_artifact_record`` against ``validators``, the authorities in force, and the
    threshold over their number). Governance records are checked by consensus itself, as
    before. ``on_valid`` receives each valid artifact record with the image it commits (the
    catalog keeps it for when the record commits)."""

    def valid(data: bytes) -> bool:
        try:
            scanned = scan_record(data)
        except RecordError:
            return False
        if scanned is None:  # a governance record
            return True
        current = validators()
        try:
            image = _check_attested(*scanned, current, threshold(len(current)))
        except InvalidArtifactRecord as exc:
            log.warning("refusing artifact record %s: %s", record_hash(data).hex()[:16], exc)
            return False
        if on_valid is not None:
            on_valid(data, image)
        return True

    return valid


# Acquisition on an authority --------------------------------------------------------------

_ACQUIRE_DOMAIN = b"pyrsia/v1/acquire-request"
MAX_REQUEST_SKEW_MS = 5 * 60 * 1000


class AcquireRefused(BuildError):
    """An Acquire request not signed by an authority in force, or not fresh."""


def acquire_signing_bytes(
    chain_id: str, package_id: str, requester: str, timestamp_ms: int
) -> bytes:
    """Canonical bytes an Acquire request's signature covers: domain-separated,
    length-prefixed fields, never the protobuf encoding."""
    parts = (
        _ACQUIRE_DOMAIN,
        chain_id.encode(),
        package_id.encode(),
        requester.encode(),
        struct.pack(">q", timestamp_ms),
    )
    return b"".join(struct.pack(">I", len(p)) + p for p in parts)


def check_acquire_request(
    request: build_pb2.AcquireRequest,
    chain_id: str,
    authorities: Mapping[str, bytes],
    now_ms: int,
) -> None:
    """Raise ``AcquireRefused`` unless an authority in force (node id -> public key in
    ``authorities``) signed ``request`` within ``MAX_REQUEST_SKEW_MS`` of ``now_ms``.

    Only authorities coordinate builds, so only they may make another authority fetch from
    its upstream: a peer or an outsider holding a network certificate cannot."""
    key = authorities.get(request.requester)
    if key is None:
        raise AcquireRefused(
            f"{request.requester[:ID_PREFIX] or 'an unnamed caller'} is not an authority in "
            "force; only authorities coordinating a build may ask for an acquisition"
        )
    signed = acquire_signing_bytes(
        chain_id, request.package_id, request.requester, request.timestamp_ms
    )
    if not verify_signature(key, request.signature, signed):
        raise AcquireRefused(f"bad signature on the acquire request of {request.requester[:16]}")
    if abs(now_ms - request.timestamp_ms) > MAX_REQUEST_SKEW_MS:
        raise AcquireRefused(
            f"the acquire request of {request.requester[:16]} is stale or from the future; "
            "check both clocks"
        )


class ImageAcquirer:
    """Acquires images for this authority; concurrent requests for one package share one
    acquisition. Owns the HTTP session to the upstreams (``close`` it)."""

    def __init__(
        self,
        identity: Identity,
        store: BlobStore,
        upstreams: Mapping[str, Upstream],
        announce: Callable[[str], Awaitable[None]],
        policy: FetchPolicy | None = None,
        registry: CollectorRegistry | None = None,
        *,
        chain_id: str,
        authorities: Callable[[], Mapping[str, bytes]],
        clock_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    ) -> None:
        self._upstream_bytes = Counter(
            "pyrsia_acquire_upstream_bytes",
            "Bytes this authority read from upstream registries",
            registry=registry,
        )
        self._identity = identity
        self._chain_id = chain_id
        self._authorities = authorities
        self._clock_ms = clock_ms
        self._store = store
        self._upstreams = dict(upstreams)
        self._announce = announce
        self._policy = policy
        self._session: aiohttp.ClientSession | None = None
        self._running: dict[str, asyncio.Task[Envelope]] = {}
        self._announcing: set[asyncio.Task[None]] = set()

    def request(self, package_id: str) -> build_pb2.AcquireRequest:
        """An Acquire request for ``package_id`` signed by this authority."""
        now = self._clock_ms()
        requester = self._identity.node_id
        signed = acquire_signing_bytes(self._chain_id, package_id, requester, now)
        return build_pb2.AcquireRequest(
            package_id=package_id,
            requester=requester,
            timestamp_ms=now,
            signature=self._identity.sign(signed),
        )

    def check(self, request: build_pb2.AcquireRequest) -> None:
        """``check_acquire_request`` against the authorities in force now."""
        check_acquire_request(request, self._chain_id, self._authorities(), self._clock_ms())

    async def acquire(self, package_id: str) -> Envelope:
        """Fetch, verify, store and attest ``package_id``, announcing its blobs in the
        background; raises ``BuildError`` or ``AcquireError`` with what went wrong."""
        task = self._running.get(package_id)
        if task is None:
            task = asyncio.create_task(self._acquire(package_id), name=f"acquire {package_id}")
            self._running[package_id] = task
            task.add_done_callback(lambda _: self._running.pop(package_id, None))
        return await asyncio.shield(task)

    async def _acquire(self, package_id: str) -> Envelope:
        registry, repository, tag = split_package_id(package_id)
        upstream = self._upstreams.get(registry)
        if upstream is None:
            known = ", ".join(sorted(self._upstreams)) or "none"
            raise BuildError(
                f"registry {registry!r} is not an upstream of this network (upstreams: {known})"
            )
        if self._session is None:
            # Layers arrive in megabytes: a 4 MiB read buffer (aiohttp's default is 64 KiB)
            # saves ~7% of an acquisition's CPU in pause/resume cycles and small reads.
            self._session = aiohttp.ClientSession(read_bufsize=UPSTREAM_READ_BUFFER)
        client = UpstreamClient(
            upstream, self._session, policy=self._policy, on_bytes=self._upstream_bytes.inc
        )
        acquisition = await acquire_image(client, self._store, repository, tag, self._identity)
        # Announcing takes DHT round trips; the attestation does not wait for them (a peer
        # that finds no provider yet asks the authorities directly).
        task = asyncio.create_task(
            self._announce_all(a.digest for a in acquisition.image.artifacts),
            name=f"announce {package_id}",
        )
        self._announcing.add(task)
        task.add_done_callback(self._announcing.discard)
        return acquisition.envelope

    async def _announce_all(self, digests: Iterable[str]) -> None:
        unique = list(dict.fromkeys(digests))
        results = await asyncio.gather(*(self._announce(d) for d in unique), return_exceptions=True)
        for digest, result in zip(unique, results, strict=True):
            if isinstance(result, grpc.aio.AioRpcError):
                # The periodic republish announces it later; peers also ask authorities.
                log.warning("could not announce %s yet: %s", digest[:19], result.code().name)
            elif isinstance(result, Exception):
                log.error("announcing %s failed", digest[:19], exc_info=result)

    async def close(self) -> None:
        for task in [*self._running.values(), *self._announcing]:
            task.cancel()
        if self._session is not None:
            await self._session.close()
            self._session = None


# Coordination on the authority that owns a build ------------------------------------------


def settled(decision: Decision, outstanding: int) -> bool:
    """True when ``decision`` commits an image that ``outstanding`` more attestations could
    neither overtake nor tie: deciding now gives what waiting for all of them would."""
    if decision.committed is None:
        return False
    leading = len(decision.supporters)
    others: dict[AcquiredImage, int] = {}
    for mismatch in decision.mismatches:
        others[mismatch.saw] = others.get(mismatch.saw, 0) + 1
    runner_up = max(others.values(), default=0)
    return leading > runner_up + outstanding


AcquireFrom = Callable[[Authority, str], Awaitable[Envelope]]


@dataclass(slots=True)
class _Build:
    status: BuildStatus
    task: asyncio.Task[None] | None = None
    started: float = field(default_factory=time.monotonic)
    phases: list[str] = field(default_factory=list)  # "<what> <seconds since started>"

    def mark(self, what: str) -> None:
        self.phases.append(f"{what} {time.monotonic() - self.started:.2f}")


class BuildCoordinator:
    """The builds this authority owns. ``request`` returns at once; the build runs in a
    background task. Call ``close`` on shutdown."""

    def __init__(
        self,
        node_id: str,
        authorities: Callable[[], Sequence[Authority]],
        threshold: Callable[[int], int],
        acquire: AcquireFrom,
        submit: Callable[[bytes], bool],
        committed_index: Callable[[bytes], Awaitable[int | None]],
        *,
        acquire_timeout: float,
        commit_timeout: float,
        poll_interval: float = 0.1,
    ) -> None:
        self.node_id = node_id
        self._authorities = authorities
        self._threshold = threshold
        self._acquire = acquire
        self._submit = submit
        self._committed_index = committed_index
        self.acquire_timeout = acquire_timeout
        self.commit_timeout = commit_timeout
        self.poll_interval = poll_interval
        self._builds: OrderedDict[str, _Build] = OrderedDict()
        self._running: dict[str, str] = {}  # package id -> build id

    def request(self, package_id: str) -> str:
        """Start a build of ``package_id`` (or join the one running); returns its id."""
        split_package_id(package_id)
        running = self._running.get(package_id)
        if running is not None:
            return running
        build_id = f"{self.node_id[:ID_PREFIX]}-{secrets.token_hex(8)}"
        build = _Build(BuildStatus(build_id, "pending", "queued", package_id))
        self._builds[build_id] = build
        self._running[package_id] = build_id
        build.task = asyncio.create_task(self._run(build), name=f"build {package_id}")
        self._forget_old()
        return build_id

    def status(self, build_id: str) -> BuildStatus:
        build = self._builds.get(build_id)
        if build is None:
            raise UnknownBuild(
                f"no build {build_id!r} on authority {self.node_id[:ID_PREFIX]} (builds are "
                "kept in memory; it may have restarted)"
            )
        return build.status

    def _forget_old(self) -> None:
        while len(self._builds) > MAX_KEPT_BUILDS:
            oldest = next(iter(self._builds))
            if not self._builds[oldest].status.finished:
                break
            del self._builds[oldest]

    def _set(self, build: _Build, **changes: Any) -> None:
        build.status = replace(build.status, **changes)

    async def _run(self, build: _Build) -> None:
        package_id = build.status.package_id
        try:
            await self._build(build)
        except Exception as exc:  # a build must end in a state, whatever broke
            log.exception("build %s of %s broke", build.status.build_id, package_id)
            self._set(build, state="failed", message=f"build broke: {exc!r}")
        finally:
            self._running.pop(package_id, None)
        status = build.status
        log.info(
            "build %s of %s %s in %.2f s (%s): %s",
            status.build_id,
            package_id,
            status.state,
            time.monotonic() - build.started,
            ", ".join(build.phases) or "no attestation",
            status.message,
        )

    async def _build(self, build: _Build) -> None:
        package_id = build.status.package_id
        authorities = list(self._authorities())
        threshold = self._threshold(len(authorities))
        validators = {a.node_id: a.public_key for a in authorities}
        self._set(
            build,
            state="acquiring",
            message=f"{len(authorities)} authorities acquiring, {threshold} must agree",
        )
        pending = {
            asyncio.create_task(self._acquire_one(a, package_id), name=f"acquire {a.name}")
            for a in authorities
        }
        envelopes: list[Envelope] = []
        failures: list[str] = []
        committing: asyncio.Task[int | None] | None = None
        index: int | None = None
        try:
            while pending:
                waiting: set[asyncio.Task[Any]] = {*pending}
                if committing is not None and not committing.done():
                    waiting.add(committing)
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if committing in done and (index := committing.result()) is not None:
                    build.mark("commit seen")
                    self._set(
                        build,
                        message=f"committed at ledger index {index}; {len(pending)} "
                        "authorities still acquiring, their attestations join the report",
                        ledger_index=index,
                    )
                for task in done & pending:
                    pending.discard(task)
                    outcome = task.result()
                    build.mark(task.get_name().removeprefix("acquire ") + " answered")
                    if isinstance(outcome, Envelope):
                        envelopes.append(outcome)
                    else:
                        failures.append(outcome)
                decision = decide(envelopes, validators, threshold)
                if committing is None and settled(decision, len(pending)):
                    # The attestations still outstanding cannot change what commits, so the
                    # record goes to consensus now; the rest still count for the report.
                    committing = await self._commit(build, decision, envelopes, failures)
                    if committing is None:
                        return
            decision = decide(envelopes, validators, threshold)
            report = "; ".join([decision.report(), *failures])
            mismatches = (
                *(m.describe() for m in decision.mismatches),
                *failures,
                *(
                    f"attestation by {k} rejected: {why}"
                    for k, why in sorted(decision.rejected.items())
                ),
            )
            if committing is None:
                self._set(build, state="failed", message=report, mismatches=mismatches)
                return
            if index is None:
                index = await committing
                if index is not None:
                    build.mark("commit seen")
        finally:
            for task in pending:
                task.cancel()
            if committing is not None and not committing.done():
                committing.cancel()
        if index is None:
            self._set(
                build,
                state="failed",
                message=f"the record did not commit within {self.commit_timeout:g}s; "
                "is a quorum of authorities running? " + report,
                mismatches=mismatches,
            )
            return
        self._set(build, state="done", message=report, ledger_index=index, mismatches=mismatches)

    async def _commit(
        self, build: _Build, decision: Decision, envelopes: list[Envelope], failures: list[str]
    ) -> asyncio.Task[int | None] | None:
        """Submit the record of ``decision``; a task waiting for its ledger index (None on
        timeout), or None when consensus refused it (the build has failed then)."""
        image = decision.committed
        assert image is not None
        supporters = set(decision.supporters)
        record = artifact_record(image, [e for e in envelopes if e.keyid in supporters])
        data = record.encode()
        self._set(
            build,
            state="committing",
            message=f"{len(supporters)} authorities agree on {image.root.digest}; committing",
            manifest_digest=image.root.digest,
        )
        build.mark("submitted")
        try:
            self._submit(data)
        except RecordRejected as exc:
            report = "; ".join([decision.report(), *failures])
            self._set(
                build, state="failed", message=f"consensus refused the record: {exc}; {report}"
            )
            return None
        return asyncio.create_task(self._wait_committed(record_hash(data)), name="commit wait")

    async def _wait_committed(self, key: bytes) -> int | None:
        deadline = time.monotonic() + self.commit_timeout
        while (index := await self._committed_index(key)) is None:
            if time.monotonic() > deadline:
                return None
            await asyncio.sleep(self.poll_interval)
        return index

    async def _acquire_one(self, authority: Authority, package_id: str) -> Envelope | str:
        who = f"authority {authority.name} ({authority.node_id[:ID_PREFIX]})"
        try:
            return await asyncio.wait_for(
                self._acquire(authority, package_id), self.acquire_timeout
            )
        except TimeoutError:
            return f"{who} did not attest within {self.acquire_timeout:g}s"
        except (AcquireError, BuildError, AttestationError) as exc:
            return f"{who} could not attest: {exc}"
        except grpc.aio.AioRpcError as exc:
            return f"{who} did not answer: {exc.code().name} {exc.details()}"

    async def close(self) -> None:
        tasks = [b.task for b in self._builds.values() if b.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


class AcquireFailed(BuildError):
    """An authority answered Acquire with an error."""


def remote_acquirer(
    node_id: str, local: ImageAcquirer, channel: ChannelFactory, timeout: float
) -> AcquireFrom:
    """``AcquireFrom`` for a coordinator: this authority locally, others over gRPC."""

    async def acquire(authority: Authority, package_id: str) -> Envelope:
        if authority.node_id == node_id:
            return await local.acquire(package_id)
        if not authority.grpc_address:
            raise AcquireFailed(
                "no gRPC address is known for it (neither the genesis nor its governance "
                "ADD record names one)"
            )
        ch = channel(authority.grpc_address)
        try:
            reply = await build_pb2_grpc.BuildStub(ch).Acquire(
                local.request(package_id), timeout=timeout
            )
        finally:
            await ch.close(None)
        if reply.error:
            raise AcquireFailed(reply.error)
        return Envelope.from_json(reply.envelope)

    return acquire


# gRPC service -----------------------------------------------------------------------------


class BuildServicer(build_pb2_grpc.BuildServicer):
    """``Build`` on a node; peers have no acquirer or coordinator and say so."""

    def __init__(
        self, acquirer: ImageAcquirer | None, coordinator: BuildCoordinator | None
    ) -> None:
        self._acquirer = acquirer
        self._coordinator = coordinator

    async def Acquire(  # noqa: N802 (gRPC method name)
        self,
        request: build_pb2.AcquireRequest,
        context: grpc.aio.ServicerContext[build_pb2.AcquireRequest, build_pb2.AcquireResponse],
    ) -> build_pb2.AcquireResponse:
        if self._acquirer is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "only authorities acquire")
            raise AssertionError("abort returns only by raising")
        try:
            self._acquirer.check(request)
        except AcquireRefused as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
            raise
        try:
            envelope = await self._acquirer.acquire(request.package_id)
        except (AcquireError, BuildError, ValueError) as exc:
            return build_pb2.AcquireResponse(error=str(exc))
        return build_pb2.AcquireResponse(envelope=envelope.to_json())

    async def RequestBuild(  # noqa: N802 (gRPC method name)
        self,
        request: build_pb2.RequestBuildRequest,
        context: grpc.aio.ServicerContext[
            build_pb2.RequestBuildRequest, build_pb2.RequestBuildResponse
        ],
    ) -> build_pb2.RequestBuildResponse:
        if self._coordinator is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, "builds run on authorities; ask one"
            )
            raise AssertionError("abort returns only by raising")
        if request.package_type != "docker":
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"package type {request.package_type!r}: only 'docker' is built",
            )
        try:
            build_id = self._coordinator.request(request.package_id)
        except BuildError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise
        return build_pb2.RequestBuildResponse(build_id=build_id)

    async def GetBuild(  # noqa: N802 (gRPC method name)
        self,
        request: build_pb2.GetBuildRequest,
        context: grpc.aio.ServicerContext[build_pb2.GetBuildRequest, build_pb2.BuildStatus],
    ) -> build_pb2.BuildStatus:
        if self._coordinator is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "peers own no builds")
            raise AssertionError("abort returns only by raising")
        try:
            return self._coordinator.status(request.build_id).to_pb()
        except UnknownBuild as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
            raise


# Any node: starting builds and reading their state ----------------------------------------


class BuildClient:
    """Starts builds on an authority and reads their state; on an authority its own
    coordinator takes requests first."""

    def __init__(
        self,
        authorities: Callable[[], Sequence[Authority]],
        channel: ChannelFactory,
        local: BuildCoordinator | None,
        *,
        rpc_timeout: float = RPC_TIMEOUT,
        poll_interval: float = 0.25,
    ) -> None:
        self._authorities = authorities
        self._channel = channel
        self._local = local
        self.rpc_timeout = rpc_timeout
        self.poll_interval = poll_interval

    async def request(self, package_id: str) -> str:
        """A build id for ``package_id``; raises ``BuildError`` when no authority takes it."""
        split_package_id(package_id)
        if self._local is not None:
            return self._local.request(package_id)
        reasons = []
        for authority in self._authorities():
            ch = self._channel(authority.grpc_address)
            try:
                reply = await build_pb2_grpc.BuildStub(ch).RequestBuild(
                    build_pb2.RequestBuildRequest(package_type="docker", package_id=package_id),
                    timeout=self.rpc_timeout,
                )
                return reply.build_id
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    raise BuildError(exc.details() or "invalid build request") from None
                reasons.append(f"{authority.name}: {exc.code().name} {exc.details()}")
            finally:
                await ch.close(None)
        raise BuildsUnavailable(
            f"no authority accepted the build: {'; '.join(reasons) or 'none known'}"
        )

    def _owner(self, build_id: str) -> Authority:
        prefix, sep, rest = build_id.partition("-")
        if sep and rest and len(prefix) == ID_PREFIX:
            for authority in self._authorities():
                if authority.node_id.startswith(prefix):
                    return authority
        raise UnknownBuild(
            f"{build_id!r} is not a build id of this network (ids look like "
            "<authority node id prefix>-<hex>)"
        )

    async def status(self, build_id: str) -> BuildStatus:
        owner = self._owner(build_id)
        if self._local is not None and owner.node_id == self._local.node_id:
            return self._local.status(build_id)
        ch = self._channel(owner.grpc_address)
        try:
            reply = await build_pb2_grpc.BuildStub(ch).GetBuild(
                build_pb2.GetBuildRequest(build_id=build_id), timeout=self.rpc_timeout
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise UnknownBuild(exc.details() or f"no build {build_id!r}") from None
            raise BuildsUnavailable(
                f"authority {owner.name} owning build {build_id} is unreachable: "
                f"{exc.code().name} {exc.details()}"
            ) from None
        finally:
            await ch.close(None)
        return BuildStatus.from_pb(reply)

    async def wait(self, build_id: str) -> BuildStatus:
        """Poll until the build finished (bound it with ``asyncio.wait_for``)."""
        while True:
            status = await self.status(build_id)
            if status.finished:
                return status
            await asyncio.sleep(self.poll_interval)


class FollowedCatalog(Protocol):
    """What ``registry_builds`` needs of the node's catalog (``LedgerCatalog`` has it)."""

    @property
    def size(self) -> int:
        """Log entries indexed so far."""

    async def resolve(self, name: RepositoryName, reference: str) -> ManifestRef | None: ...

    async def wait_indexed(self, index: int) -> None: ...


async def committed_in(catalog: FollowedCatalog, name: RepositoryName, reference: str) -> None:
    """Return once ``catalog`` resolves ``name:reference``; woken by every refresh of the
    catalog (consensus' commit hook), so a commit is seen without polling."""
    while True:
        indexed = catalog.size
        if await catalog.resolve(name, reference) is not None:
            return
        await catalog.wait_indexed(indexed)


def registry_builds(client: BuildClient, catalog: FollowedCatalog) -> RequestBuild:
    """The registry's ``request_build``: build a tag on an authority and return as soon as
    this node's catalog holds the committed tag; a build that fails raises ``BuildRejected``
    with its report (the build's state is polled only to learn of failures)."""

    async def request_build(build: BuildRequest) -> None:
        if build.reference.startswith("sha256:"):
            raise BuildRejected(
                f"{build.name}@{build.reference} is not committed; digests cannot be built, "
                "pull a tag that contains it first"
            )
        try:
            build_id = await client.request(f"{build.name}:{build.reference}")
        except BuildError as exc:
            raise BuildRejected(str(exc)) from exc
        committed = asyncio.create_task(committed_in(catalog, build.name, build.reference))
        outcome = asyncio.create_task(client.wait(build_id))
        try:
            await asyncio.wait({committed, outcome}, return_when=asyncio.FIRST_COMPLETED)
            if committed.done():
                return
            try:
                status = outcome.result()
            except BuildError as exc:
                raise BuildRejected(str(exc)) from exc
            if status.state == "failed":
                raise BuildRejected(status.message)
            await catalog.wait_indexed(status.ledger_index)
            await committed
        finally:
            for task in (committed, outcome):
                task.cancel()

    return request_build
