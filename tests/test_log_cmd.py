"""Admin API for the log (aiohttp test server) and the inspect-log / verify commands."""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from pyrsia_node import merkle
from pyrsia_node.api.ledger import routes
from pyrsia_node.cli import log_cmd
from pyrsia_node.cli.errors import CliError
from pyrsia_node.genesis import Authority, Genesis
from pyrsia_node.identity import Identity
from pyrsia_node.ledger.bundle import ProofBundle, verify_bundle
from pyrsia_node.ledger.checkpoint import Checkpoint, SignedNote, cosign, origin_for
from pyrsia_node.ledger.log import TransparencyLog
from pyrsia_node.ledger.records import (
    IN_TOTO_PAYLOAD_TYPE,
    Artifact,
    ArtifactRecord,
    DsseEnvelope,
    GovernanceAction,
    GovernanceRecord,
    PackageType,
)

KEY = Identity.generate()


def image_record(i: int) -> bytes:
    tag = "3.19" if i % 2 else "3.20"
    return ArtifactRecord(
        PackageType.DOCKER,
        f"docker.io/library/alpine:{tag}",
        (
            Artifact(f"sha256:{2 * i:064x}", 500 + i, "application/vnd.oci.image.index.v1+json"),
            Artifact(f"sha256:{2 * i + 1:064x}", 3_000_000, "application/vnd.oci.image.layer"),
        ),
        (DsseEnvelope(IN_TOTO_PAYLOAD_TYPE, b"{}", (("node-a", b"s" * 64),)),),
    ).encode()


@pytest.fixture
def ledger(tmp_path: Path) -> TransparencyLog:
    log = TransparencyLog(tmp_path / "ledger")
    log.append([image_record(i) for i in range(10)])
    checkpoint = Checkpoint(origin_for("pyrsia-test"), log.size, log.root())
    log.put_checkpoint(cosign(SignedNote(checkpoint.body(), ()), "authority-0", KEY).format())
    return log


@pytest.fixture
async def client(ledger: TransparencyLog) -> AsyncIterator[TestClient[Any, Any]]:
    app = web.Application()
    app.add_routes(routes(ledger))
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        yield client


async def test_checkpoint_reports_size_root_and_cosigned_note(
    client: TestClient[Any, Any], ledger: TransparencyLog
) -> None:
    body = await (await client.get("/api/v1/log/checkpoint")).json()
    assert body["tree_size"] == 10
    assert body["root"] == ledger.root().hex()
    assert body["checkpoint"].startswith("pyrsia.io/pyrsia-test\n10\n")


async def test_entry_by_index(client: TestClient[Any, Any]) -> None:
    body = await (await client.get("/api/v1/log/entries/3")).json()
    assert body["record_hash"] == merkle.leaf_hash(image_record(3)).hex()
    assert body["decoded"]["package_id"] == "docker.io/library/alpine:3.19"


async def test_inclusion_proof_by_index_and_by_hash_verify(
    client: TestClient[Any, Any], ledger: TransparencyLog
) -> None:
    by_index = await (await client.get("/api/v1/log/proof/inclusion?index=4&size=7")).json()
    record_hash = merkle.leaf_hash(image_record(4)).hex()
    by_hash = await (
        await client.get(f"/api/v1/log/proof/inclusion?hash={record_hash}&size=7")
    ).json()
    assert by_index == by_hash
    merkle.verify_inclusion(
        bytes.fromhex(record_hash),
        4,
        7,
        [bytes.fromhex(h) for h in by_index["proof"]],
        ledger.root(7),
    )


async def test_consistency_proof_verifies(
    client: TestClient[Any, Any], ledger: TransparencyLog
) -> None:
    body = await (await client.get("/api/v1/log/proof/consistency?from=3&to=10")).json()
    merkle.verify_consistency(
        3, 10, [bytes.fromhex(h) for h in body["proof"]], ledger.root(3), ledger.root(10)
    )


async def test_records_by_package_id_latest_first(client: TestClient[Any, Any]) -> None:
    response = await client.get(
        "/api/v1/log/records", params={"package_id": "docker.io/library/alpine:3.19"}
    )
    body = await response.json()
    assert [r["index"] for r in body["records"]] == [9, 7, 5, 3, 1]


@pytest.mark.parametrize(
    ("path", "status", "message"),
    [
        ("/api/v1/log/entries/x", 400, "non-negative integer"),
        ("/api/v1/log/entries/10", 404, "no entry 10"),
        ("/api/v1/log/proof/inclusion", 400, "'index' is required"),
        ("/api/v1/log/proof/inclusion?index=1&size=-2", 400, "size=-2"),
        ("/api/v1/log/proof/inclusion?hash=zz", 400, "64 hex digits"),
        ("/api/v1/log/proof/inclusion?hash=" + "00" * 32, 404, "no record"),
        ("/api/v1/log/proof/inclusion?index=1&hash=" + "00" * 32, 400, "either"),
        ("/api/v1/log/proof/inclusion?index=5&size=5", 404, "not in a tree"),
        ("/api/v1/log/proof/consistency?from=5&to=99", 404, "outside"),
        ("/api/v1/log/records", 400, "package_id"),
        ("/api/v1/log/records?package_id=a&limit=0", 400, "limit"),
    ],
)
async def test_bad_requests_say_what_was_wrong(
    client: TestClient[Any, Any], path: str, status: int, message: str
) -> None:
    response = await client.get(path)
    assert response.status == status
    assert message in (await response.json())["error"]


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    log_cmd.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


async def test_inspect_log_prints_a_table(
    client: TestClient[Any, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    node = str(client.make_url("/"))
    args = parse("inspect-log", "--node", node, "docker", "--image", "alpine:3.19")
    assert await asyncio.to_thread(args.handler, args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["INDEX", "PACKAGE_ID", "ARTIFACTS", "SIZE", "ATTESTATIONS",
                                "RECORD_HASH"]  # fmt: skip
    assert lines[1].split()[:4] == ["9", "docker.io/library/alpine:3.19", "2", "3000509"]
    assert len(lines) == 6


async def test_inspect_log_json_and_csv_with_chosen_fields(
    client: TestClient[Any, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    node = str(client.make_url("/"))
    common = ("inspect-log", "--node", node, "--fields", "index,digests")
    args = parse(*common, "--format", "json", "docker", "--image", "alpine:3.20")
    await asyncio.to_thread(args.handler, args)
    rows = json.loads(capsys.readouterr().out)
    assert rows[0] == {"index": 8, "digests": f"sha256:{16:064x} sha256:{17:064x}"}
    args = parse(*common, "--format", "csv", "docker", "--image", "alpine:3.20")
    await asyncio.to_thread(args.handler, args)
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["index"] for r in table] == ["8", "6", "4", "2", "0"]


def test_inspect_log_rejects_unknown_fields() -> None:
    with pytest.raises(SystemExit):
        parse("inspect-log", "--fields", "nope", "maven", "--gav", "a:b:c")


def test_inspect_log_without_a_node_says_how_to_fix_it() -> None:
    args = parse("inspect-log", "--node", "http://127.0.0.1:9", "maven", "--gav", "g:a:1")
    with pytest.raises(CliError, match="--node"):
        args.handler(args)


def test_inspect_log_rejects_a_bad_coordinate() -> None:
    args = parse("inspect-log", "maven", "--gav", "only:two")
    with pytest.raises(CliError, match="GROUP:ARTIFACT:VERSION"):
        args.handler(args)


def test_verify_accepts_a_good_bundle(
    ledger: TransparencyLog, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bundle.json"
    path.write_bytes(ProofBundle.from_log(ledger, 2, [("authority-0", KEY.public_key)]).to_json())
    args = parse("verify", str(path))
    assert args.handler(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("OK: docker.io/library/alpine:3.20 is entry 2")


def test_verify_says_exactly_what_failed(ledger: TransparencyLog, tmp_path: Path) -> None:
    bundle = ProofBundle.from_log(ledger, 2, [("authority-0", KEY.public_key)])
    doc = json.loads(bundle.to_json())
    doc["index"] = 3
    path = tmp_path / "bundle.json"
    path.write_text(json.dumps(doc))
    args = parse("verify", str(path))
    with pytest.raises(CliError, match="FAILED at inclusion: record is not entry 3"):
        args.handler(args)


def test_verify_reports_a_missing_file(tmp_path: Path) -> None:
    args = parse("verify", str(tmp_path / "missing.json"))
    with pytest.raises(CliError, match="cannot read bundle"):
        args.handler(args)


def genesis_with_members(tmp_path: Path, governance: Identity, keys: list[Identity]) -> Path:
    genesis = Genesis(
        chain_id="pyrsia-test",
        genesis_time="2026-01-01T00:00:00Z",
        governance_public_key=governance.public_key,
        authorities=tuple(
            Authority(f"authority-{i}", k.public_key, f"127.0.0.1:{1000 + i}", "")
            for i, k in enumerate(keys)
        ),
        ca_certificate="",
    )
    path = tmp_path / "genesis.json"
    genesis.save(path)
    return path


def test_verify_with_genesis_replays_governance_and_ignores_the_claimed_list(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """authority-3 joins and authority-0 leaves: the checkpoint is judged by 1, 2, 3."""
    governance, keys = Identity.generate(), [Identity.generate() for _ in range(4)]
    genesis = genesis_with_members(tmp_path, governance, keys[:3])
    changes = [
        GovernanceRecord.create(
            governance, "pyrsia-test", 1, GovernanceAction.ADD, "authority-3",
            keys[3].public_key, "127.0.0.1:1003",
        ),
        GovernanceRecord.create(
            governance, "pyrsia-test", 2, GovernanceAction.REMOVE, "authority-0",
            keys[0].public_key,
        ),
    ]  # fmt: skip
    with TransparencyLog(tmp_path / "ledger") as log:
        log.append([image_record(0), changes[0].encode(), changes[1].encode(), image_record(3)])
        note = SignedNote(Checkpoint(origin_for("pyrsia-test"), 4, log.root()).body(), ())
        for i in (1, 2, 3):
            note = cosign(note, f"authority-{i}", keys[i])
        claimed = [(f"authority-{i}", keys[i].public_key) for i in range(3)]
        bundle = ProofBundle.from_log(log, 3, claimed, note.format())
    path = tmp_path / "bundle.json"
    path.write_bytes(bundle.to_json())
    args = parse("verify", str(path), "--genesis", str(genesis))
    assert args.handler(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (
        "OK: docker.io/library/alpine:3.19 is entry 3 of pyrsia.io/pyrsia-test at size 4, "
        "signed by a quorum of 3 of 3 authorities (in force at that size: the genesis and 2 "
        "governance change(s) proven in the bundle)"
    )
    assert out[1].startswith("note: the bundle's list of authorities differs")
    # The same bundle judged by the genesis set alone would fail: authority-0 is gone.
    doc = json.loads(path.read_text())
    doc["governance"] = []
    path.write_text(json.dumps(doc))
    with pytest.raises(CliError, match="FAILED at checkpoint: QuorumNotReached: 2 of 3"):
        args.handler(args)


async def test_bundle_endpoint_names_the_authorities_in_force_at_the_checkpoint(
    tmp_path: Path,
) -> None:
    """authority-3 joins and authority-0 leaves before the checkpoint (size 4), authority-1
    leaves after it: the bundle names 1, 2, 3, the set that cosigned that checkpoint, not
    the genesis set nor the set in force now."""
    governance, keys = Identity.generate(), [Identity.generate() for _ in range(4)]
    genesis = Genesis.load(genesis_with_members(tmp_path, governance, keys[:3]))
    changes = [
        GovernanceRecord.create(
            governance, "pyrsia-test", 1, GovernanceAction.ADD, "authority-3",
            keys[3].public_key, "127.0.0.1:1003",
        ),
        GovernanceRecord.create(
            governance, "pyrsia-test", 2, GovernanceAction.REMOVE, "authority-0",
            keys[0].public_key,
        ),
        GovernanceRecord.create(
            governance, "pyrsia-test", 3, GovernanceAction.REMOVE, "authority-1",
            keys[1].public_key,
        ),
    ]  # fmt: skip
    with TransparencyLog(tmp_path / "ledger") as log:
        log.append([image_record(0), changes[0].encode(), changes[1].encode(), image_record(3)])
        note = SignedNote(Checkpoint(origin_for("pyrsia-test"), 4, log.root()).body(), ())
        for i in (1, 2, 3):
            note = cosign(note, f"authority-{i}", keys[i])
        log.put_checkpoint(note.format())
        log.append([changes[2].encode(), image_record(5)])
        app = web.Application()
        app.add_routes(routes(log, genesis=genesis))
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            response = await client.get("/api/v1/log/bundle", params={"index": "3"})
            assert response.status == 200
            bundle = ProofBundle.from_json(await response.read())
    assert bundle.authorities == tuple((f"authority-{i}", keys[i].public_key) for i in (1, 2, 3))
    verified = verify_bundle(bundle, genesis=genesis)
    assert verified.claimed_authorities_match is True
    assert verified.index == 3


async def test_bundle_endpoint_without_a_checkpoint_answers_409(tmp_path: Path) -> None:
    governance = Identity.generate()
    genesis = Genesis.load(genesis_with_members(tmp_path, governance, [KEY]))
    with TransparencyLog(tmp_path / "ledger") as log:
        log.append([image_record(0)])
        app = web.Application()
        app.add_routes(routes(log, genesis=genesis))
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            response = await client.get("/api/v1/log/bundle", params={"index": "0"})
            assert response.status == 409
            assert "no cosigned checkpoint" in (await response.json())["error"]
