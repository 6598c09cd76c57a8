"""Membership changes while the network runs, on real node processes.

A `LocalNetwork` of four authorities commits records; a fifth authority process starts with
a fresh key outside the genesis, following the chain, and a governance ADD for it goes
through an authority's admin API like any record. Committed at height H, the ADD counts at
once for whose requests and attestations count (the ledger's authorities in force) and in
votes from H + 2: the newcomer's precommits appear in commit certificates from H + 2 on,
never before, and it cosigns checkpoints. A governance REMOVE then takes an authority out;
from two heights after it, the network commits with that authority and one more stopped,
which only the four remaining validators' quorum (three) allows.

Records keep flowing throughout (artifact records attested by authority-0, attestation
threshold 1, posted to the admin API), so "commits continue" means records commit. Every
wait is bounded; the fixture stops every process it started (by pid, `LocalNetwork.stop`).
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import itertools
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from conftest import free_port_block
from pyrsia.v1 import build_pb2, build_pb2_grpc
from pyrsia.v1 import consensus_pb2 as pb
from pyrsia.v1 import consensus_pb2_grpc as pb_grpc
from pyrsia_node import tls
from pyrsia_node.attestation import AcquiredImage, Artifact, attest
from pyrsia_node.build import acquire_signing_bytes, artifact_record
from pyrsia_node.cli import main as cli_main
from pyrsia_node.consensus import Block, CommitCertificate
from pyrsia_node.consensus.wire import committed_from_pb
from pyrsia_node.genesis import Genesis
from pyrsia_node.identity import KEY_FILE, Identity, verify_signature
from pyrsia_node.ledger import verify_checkpoint
from pyrsia_node.ledger.checkpoint import CheckpointError, SignedNote, key_id
from pyrsia_node.ledger.records import GovernanceAction
from pyrsia_node.localnet import LocalNetwork, LocalNetworkError, Shape, fetch_json

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

GENESIS_AUTHORITIES = ("authority-0", "authority-1", "authority-2", "authority-3")
NEWCOMER = "authority-4"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"


class GovernedNetwork:
    """The running network, a client for its gRPC API and what the test observes."""

    def __init__(self, root: Path) -> None:
        self.net = LocalNetwork(
            root, Shape(4, 0, free_port_block(60), "127.0.0.1", attestation_threshold=1)
        )
        self.genesis = Genesis.load(self.net.root / "genesis.json")
        ca_dir = self.net.root / "ca"
        ca = tls.KeyPair((ca_dir / "ca.key").read_bytes(), (ca_dir / "ca.crt").read_bytes())
        client = tls.issue_node_certificate(ca, "governance-test-client")
        self._credentials = grpc.ssl_channel_credentials(
            ca.cert_pem, client.key_pem, client.cert_pem
        )
        self._counter = itertools.count()

    def key(self, name: str) -> Identity:
        return Identity.from_pem((self.net.node(name).data_dir / KEY_FILE).read_bytes())

    def _channel(self, name: str) -> grpc.Channel:
        options = [("grpc.ssl_target_name_override", tls.TARGET_NAME)]
        return grpc.secure_channel(self.net.node(name).grpc_address, self._credentials, options)

    # Records ------------------------------------------------------------------------

    def record(self) -> bytes:
        """A new artifact record attested by authority-0 (threshold 1)."""
        index = next(self._counter)
        image = AcquiredImage(
            "docker.io",
            f"library/governed{index}",
            "v1",
            Artifact(f"sha256:{index + 1:064x}", 1000 + index, MANIFEST),
            (),
            (),
        )
        _, envelope = attest(image, "docker.io", dt.datetime.now(dt.UTC), self.key("authority-0"))
        return artifact_record(image, [envelope]).encode()

    # Observation --------------------------------------------------------------------

    def ledger(self, name: str) -> dict[str, object] | None:
        try:
            status = fetch_json(f"{self.net.node(name).http_url}/api/v1/status", timeout=2)
        except (OSError, ValueError):
            return None
        ledger: dict[str, object] = status["ledger"]
        return ledger

    def height(self, name: str) -> int:
        ledger = self.ledger(name)
        return -1 if ledger is None else int(str(ledger["height"]))

    def heights(self, names: tuple[str, ...]) -> dict[str, int]:
        return {name: self.height(name) for name in names}

    def blocks(self, name: str, from_height: int = 1) -> list[tuple[Block, CommitCertificate]]:
        """Every committed block from ``from_height`` on, as ``name`` serves them."""
        found: list[tuple[Block, CommitCertificate]] = []
        with self._channel(name) as channel:
            stub = pb_grpc.ConsensusStub(channel)
            while True:
                page = [
                    committed_from_pb(item)
                    for item in stub.GetBlocks(
                        pb.GetBlocksRequest(
                            from_height=from_height + len(found), limit=256, follow=False
                        ),
                        timeout=10,
                    )
                ]
                found += page
                if len(page) < 256:
                    return found

    def height_of(self, record: bytes) -> int | None:
        """The height of the block holding ``record`` on authority-0, if committed."""
        for block, _ in self.blocks("authority-0"):
            if record in block.records:
                return block.height
        return None

    def checkpoint_note(self, name: str) -> str | None:
        note: str | None = fetch_json(
            f"{self.net.node(name).http_url}/api/v1/log/checkpoint", timeout=2
        )["checkpoint"]
        return note

    def acquire_as(self, target: str, requester: str) -> build_pb2.AcquireResponse:
        """``requester``'s signed Acquire request to ``target`` (raises on refusal)."""
        key = self.key(requester)
        now = int(time.time() * 1000)
        package_id = "docker.io/library/never-built:1"
        signed = acquire_signing_bytes(self.genesis.chain_id, package_id, key.node_id, now)
        request = build_pb2.AcquireRequest(
            package_id=package_id,
            requester=key.node_id,
            timestamp_ms=now,
            signature=key.sign(signed),
        )
        with self._channel(target) as channel:
            response: build_pb2.AcquireResponse = build_pb2_grpc.BuildStub(channel).Acquire(
                request, timeout=10
            )
        return response


class RecordFeeder:
    """Posts a new record every ``interval`` seconds to one of ``targets``, in a thread."""

    def __init__(self, network: GovernedNetwork, targets: tuple[str, ...]) -> None:
        self._network = network
        self._targets = itertools.cycle(targets)
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            with contextlib.suppress(LocalNetworkError, OSError):
                self._network.net.submit_record(next(self._targets), self._network.record())
                self.accepted += 1

    def __enter__(self) -> RecordFeeder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


@pytest.fixture
def network(tmp_path: Path) -> Iterator[GovernedNetwork]:
    running = GovernedNetwork(tmp_path / "net")
    try:
        running.net.start()
        running.net.wait_connected(timeout=60)
        yield running
    finally:
        running.net.stop()


def wait_until(condition: Callable[[], bool], timeout: float, what: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout:.0f} s: {what()}")
        time.sleep(0.1)


def committed_at(network: GovernedNetwork, record: bytes, timeout: float) -> int:
    found: list[int] = []

    def committed() -> bool:
        height = network.height_of(record)
        found[:] = [] if height is None else [height]
        return bool(found)

    wait_until(committed, timeout, lambda: f"heights {network.heights(GENESIS_AUTHORITIES)}")
    return found[0]


def settle(network: GovernedNetwork, names: tuple[str, ...], timeout: float) -> None:
    """With records stopped, every node in ``names`` reaches one (height, size, root)."""

    def same() -> bool:
        ledgers = [network.ledger(name) for name in names]
        return None not in ledgers and len({json.dumps(x, sort_keys=True) for x in ledgers}) == 1

    wait_until(same, timeout, lambda: str({n: network.ledger(n) for n in names}))


def assert_one_chain(network: GovernedNetwork, names: tuple[str, ...]) -> None:
    chains = {name: [b.hash for b, _ in network.blocks(name)] for name in names}
    common = min(len(chain) for chain in chains.values())
    assert common >= 1
    for name, chain in chains.items():
        assert chain[:common] == chains[names[0]][:common], f"{name} diverges from {names[0]}"


def uncosigned(
    network: GovernedNetwork, name: str, in_force: list[tuple[str, bytes]], signer: str
) -> str | None:
    """What is wrong with ``name``'s latest checkpoint, or None when it covers its whole
    log, a quorum of ``in_force`` signed it and ``signer`` among them."""
    note = network.checkpoint_note(name)
    if note is None:
        return f"{name} has no checkpoint"
    try:
        checkpoint = verify_checkpoint(note, in_force, len(in_force) * 2 // 3 + 1)
    except CheckpointError as exc:
        return f"{name}'s checkpoint: {exc}"
    ledger = network.ledger(name)
    if ledger is None or checkpoint.size != ledger["size"]:
        return f"{name}'s checkpoint of size {checkpoint.size} is not of its log {ledger}"
    public_key = dict(in_force)[signer]
    signed = SignedNote.parse(note)
    if not any(
        s.name == signer
        and s.key_id == key_id(signer, public_key)
        and verify_signature(public_key, s.signature, signed.body)
        for s in signed.signatures
    ):
        return f"{signer} did not cosign {name}'s checkpoint of size {checkpoint.size}"
    return None


def wait_cosigned(
    network: GovernedNetwork, name: str, in_force: list[tuple[str, bytes]], signer: str
) -> None:
    wait_until(
        lambda: uncosigned(network, name, in_force, signer) is None,
        20,
        lambda: uncosigned(network, name, in_force, signer) or "",
    )


def test_an_authority_added_and_one_removed_while_the_network_runs(
    network: GovernedNetwork,
) -> None:
    genesis_in_force = [(a.name, a.public_key) for a in network.genesis.authorities]
    with RecordFeeder(network, ("authority-0", "authority-1")) as feeder:
        wait_until(
            lambda: min(network.heights(GENESIS_AUTHORITIES).values()) >= 2,
            30,
            lambda: str(network.heights(GENESIS_AUTHORITIES)),
        )

        # A fifth authority process, outside the genesis: it follows the chain.
        network.net.add_authority(NEWCOMER)
        network.net.start(NEWCOMER)
        newcomer = network.key(NEWCOMER).public_key
        target = network.height("authority-0")
        wait_until(
            lambda: network.height(NEWCOMER) >= target,
            30,
            lambda: f"{NEWCOMER} at {network.height(NEWCOMER)}, authority-0 was at {target}",
        )
        with pytest.raises(grpc.RpcError) as refused:
            network.acquire_as("authority-0", NEWCOMER)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED

        # The ADD goes through the running network like any record.
        addition = network.net.membership_record(GovernanceAction.ADD, NEWCOMER)
        assert network.net.submit_record("authority-1", addition)["status"] == "admitted"
        added_at = committed_at(network, addition, 30)
        # In force at once: authority-0 serves the newcomer's build requests (the
        # acquisition itself fails: this network has no upstream).
        answer = network.acquire_as("authority-0", NEWCOMER)
        assert "not an upstream" in answer.error

        # It votes from H + 2 on: its precommits appear in commit certificates then, and
        # never before.
        def signed_a_certificate() -> bool:
            blocks = network.blocks("authority-0", added_at + 2)
            return any(s.validator == newcomer for _, c in blocks for s in c.signatures)

        wait_until(
            signed_a_certificate,
            60,
            lambda: f"heights {network.heights(('authority-0', NEWCOMER))}",
        )
        early = network.blocks("authority-0")[: added_at + 1]
        assert not any(s.validator == newcomer for _, c in early for s in c.signatures)

        # The other nodes' peer tables accept its authority role now (refused before the ADD).
        def listed_as_authority() -> bool:
            status = fetch_json(f"{network.net.node('authority-0').http_url}/api/v1/status")
            return any(
                p["name"] == NEWCOMER and p["role"] == "authority"
                for p in status["connected_peers"]
            )

        wait_until(listed_as_authority, 30, lambda: f"{NEWCOMER} not an authority peer")
        assert feeder.accepted > 0
    everyone = (*GENESIS_AUTHORITIES, NEWCOMER)
    settle(network, everyone, 30)
    assert_one_chain(network, everyone)
    with_newcomer = [*genesis_in_force, (NEWCOMER, newcomer)]
    wait_cosigned(network, "authority-0", with_newcomer, NEWCOMER)
    wait_cosigned(network, NEWCOMER, with_newcomer, "authority-0")

    # REMOVE authority-3. From two heights after its commit the validators are
    # authority-0, -1, -2 and the newcomer (quorum 3): with authority-3 *and* authority-2
    # stopped, only the newcomer's votes let the network commit.
    removal = network.net.membership_record(GovernanceAction.REMOVE, "authority-3")
    assert network.net.submit_record("authority-0", removal)["status"] == "admitted"
    with RecordFeeder(network, ("authority-0", "authority-1")) as feeder:
        removed_at = committed_at(network, removal, 30)
        with pytest.raises(grpc.RpcError) as refused:
            network.acquire_as("authority-0", "authority-3")
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        survivors = ("authority-0", "authority-1", NEWCOMER)
        wait_until(
            lambda: min(network.heights(survivors).values()) >= removed_at + 2,
            30,
            lambda: f"heights {network.heights(survivors)}, removal at {removed_at}",
        )
        network.net.kill("authority-3")
        network.net.kill("authority-2")
        before = network.heights(survivors)
        accepted = feeder.accepted
        wait_until(
            lambda: all(network.height(n) >= before[n] + 3 for n in survivors),
            60,
            lambda: f"heights {network.heights(survivors)} from {before}",
        )
        assert feeder.accepted > accepted
    settle(network, survivors, 30)
    assert_one_chain(network, survivors)
    later = network.blocks("authority-0", max(before.values()) + 1)
    assert later
    for _, certificate in later:
        signers = {s.validator for s in certificate.signatures}
        assert newcomer in signers and network.key("authority-3").public_key not in signers
    in_force = [(n, k) for n, k in with_newcomer if n != "authority-3"]
    wait_cosigned(network, "authority-0", in_force, NEWCOMER)


def test_the_governance_cli_adds_and_removes_an_authority(
    network: GovernedNetwork, capsys: pytest.CaptureFixture[str]
) -> None:
    """`pyrsia governance add/remove` signs the change with the governance key and submits
    it; the node's refusal of a wrongly signed change reaches the user as the reason."""
    network.net.add_authority(NEWCOMER)
    network.net.start(NEWCOMER)
    newcomer = network.net.node(NEWCOMER)
    admin = network.net.node("authority-1").http_url
    key_file = newcomer.data_dir / KEY_FILE
    add = [
        *("governance", "add", NEWCOMER, "--node-key", str(key_file)),
        *("--grpc-address", newcomer.grpc_address),
        *("--http-address", f"{newcomer.host}:{newcomer.http_port}"),
        *("--metrics-address", f"{newcomer.host}:{newcomer.metrics_port}"),
        "--node",
        admin,
    ]

    def in_force() -> bool:
        try:
            network.acquire_as("authority-0", NEWCOMER)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.PERMISSION_DENIED
            return False
        return True

    # Signed with another key (an authority's node key): the node refuses and says why.
    wrong_key = network.net.node("authority-0").data_dir / KEY_FILE
    assert cli_main([*add, "--governance-key", str(wrong_key)]) == 1
    refusal = capsys.readouterr().err
    assert refusal.startswith("pyrsia: node answered 400: ") and "governance" in refusal
    assert not in_force()

    governance_key = network.net.root / "governance.key"
    assert cli_main([*add, "--governance-key", str(governance_key)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"admitted: add {NEWCOMER} on {network.genesis.chain_id} "), out
    wait_until(in_force, 30, lambda: f"the ADD of {NEWCOMER} not in force")

    public_key = base64.b64encode(network.key(NEWCOMER).public_key).decode()
    remove = ["governance", "remove", NEWCOMER, "--public-key", public_key]
    remove += ["--governance-key", str(governance_key), "--node", admin, "--wait", "30"]
    assert cli_main(remove) == 0
    out = capsys.readouterr().out
    assert out.startswith(
        f"committed: remove {NEWCOMER} on {network.genesis.chain_id} at log index "
    ), out
    wait_until(lambda: not in_force(), 30, lambda: f"the REMOVE of {NEWCOMER} not in force")
