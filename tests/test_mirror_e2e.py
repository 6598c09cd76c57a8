"""The image mirror end to end, with real parts only.

One network of real node processes (4 authorities, 2 peers, mutual TLS) mirrors Debian's
``docker-registry`` on loopback (genesis upstream ``docker.io``, so one-segment-free names
like ``test/multiarch`` resolve to it) and a fault-injecting proxy in front of it that
flips a byte of one blob (upstream ``tampered.test``). Authority 3 fetches ``docker.io``
through its own ``upstream_overrides`` URL: a proxy that serves another image for
``test/victim``, an upstream that consistently lies to one authority.

Clients are real: skopeo and oras pull through a peer's OCI pull API, the ``pyrsia``
CLI starts and follows builds and reads the log. Every digest is re-hashed and compared
with what was pushed upstream.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import oras.client
import pytest
import yaml
from conftest import free_port_block
from oci_fixtures import (
    TOOL_TIMEOUT,
    OciLayout,
    SeededImage,
    SeededImages,
    UpstreamProxy,
    UpstreamRegistry,
    read_layout_digests,
    require_tool,
    seeded_images,
    upstream_registry,
)
from pyrsia.v1 import build_pb2, build_pb2_grpc, consensus_pb2, consensus_pb2_grpc
from pyrsia_node.attestation import attest, parse_statement
from pyrsia_node.build import acquire_signing_bytes
from pyrsia_node.genesis import Upstream
from pyrsia_node.identity import Identity
from pyrsia_node.ledger.records import Artifact, ArtifactRecord, DsseEnvelope
from pyrsia_node.localnet import LocalNetwork, Shape, fetch_json
from pyrsia_node.tls import TARGET_NAME, NodeTls

__all__ = ["seeded_images", "upstream_registry"]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


class ProxyLoop:
    """Runs ``UpstreamProxy`` instances on an event loop in a thread of their own, so they
    keep answering while the (synchronous) tests block on clients."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.proxies: list[UpstreamProxy] = []

    def start(self, target: str, **options: Any) -> UpstreamProxy:
        proxy = UpstreamProxy(target, **options)
        asyncio.run_coroutine_threadsafe(proxy.start(), self.loop).result(10)
        self.proxies.append(proxy)
        return proxy

    def close(self) -> None:
        for proxy in self.proxies:
            asyncio.run_coroutine_threadsafe(proxy.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@dataclass(frozen=True, slots=True)
class Mirror:
    network: LocalNetwork
    images: SeededImages
    victim: SeededImage
    fragile: SeededImage  # served with a flipped byte by the tampered.test upstream
    liar: str  # node id of the authority whose upstream lies about test/victim

    def http(self, name: str) -> str:
        return self.network.node(name).http_url

    def host(self, name: str) -> str:
        node = self.network.node(name)
        return f"{node.host}:{node.http_port}"


@pytest.fixture(scope="module")
def mirror(
    upstream_registry: UpstreamRegistry,
    seeded_images: SeededImages,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Mirror]:
    require_tool("skopeo")
    layout = OciLayout(tmp_path_factory.mktemp("mirror-layout"))
    victim = push_image(layout, upstream_registry, "test/victim")
    fragile = push_image(layout, upstream_registry, "test/fragile")
    proxies = ProxyLoop()
    network: LocalNetwork | None = None
    try:
        # Only this proxy serves test/fragile's layer, and with one byte flipped.
        [layer] = [b for b in fragile.blobs if b != fragile_config(layout, fragile)]
        tampered = proxies.start(upstream_registry.url, tamper_digest=layer)
        lying = proxies.start(upstream_registry.url, rename=("test/victim", "test/multilayer"))
        shape = Shape(
            authorities=4,
            peers=2,
            base_port=free_port_block(60),
            host="127.0.0.1",
            upstreams=(
                Upstream("docker.io", upstream_registry.url, insecure=True),
                Upstream("tampered.test", tampered.url, insecure=True),
            ),
        )
        network = LocalNetwork(tmp_path_factory.mktemp("mirror") / "net", shape)
        liar = network.node("authority-3")
        settings = yaml.safe_load(liar.config_file.read_text())
        settings["upstream_overrides"] = {"docker.io": lying.url}
        liar.config_file.write_text(yaml.safe_dump(settings))
        network.start()
        network.wait_connected(timeout=40)
        liar_id = network.statuses()["authority-3"]
        assert liar_id is not None
        yield Mirror(network, seeded_images, victim, fragile, liar_id["node_id"])
    finally:
        if network is not None:
            network.stop()
        proxies.close()


def push_image(layout: OciLayout, registry: UpstreamRegistry, repository: str) -> SeededImage:
    """Push a one-layer image of fresh random bytes as ``repository:1.0``."""
    manifest, _ = layout.image([{f"{repository}/file.bin": os.urandom(40_000)}])
    layout.tag(repository, manifest)
    layout.push(registry, repository, f"{repository}:1.0")
    doc = json.loads(layout.read(manifest.digest))
    blobs = tuple(sorted(d["digest"] for d in [doc["config"], *doc["layers"]]))
    return SeededImage(repository, "1.0", manifest, (), blobs)


def fragile_config(layout: OciLayout, image: SeededImage) -> str:
    config: str = json.loads(layout.read(image.root.digest))["config"]["digest"]
    return config


def run(*args: str, timeout: float = TOOL_TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)


def skopeo_pull(host: str, name: str, out: Path) -> subprocess.CompletedProcess[str]:
    return run(
        require_tool("skopeo"),
        "copy",
        "--all",
        "--src-tls-verify=false",
        f"docker://{host}/{name}",
        f"oci:{out}:pulled",
    )


def pyrsia(*args: str) -> subprocess.CompletedProcess[str]:
    return run(sys.executable, "-m", "pyrsia_node", *args, timeout=90)


def post_json(url: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def wait_build(node_url: str, build_id: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status: dict[str, Any] = fetch_json(f"{node_url}/api/v1/builds/{build_id}", timeout=5)
        if status["state"] in ("done", "failed"):
            return status
        time.sleep(0.2)
    pytest.fail(f"build {build_id} did not finish within {timeout} s")


def log_records(node_url: str, package_id: str) -> list[dict[str, Any]]:
    query = urllib.parse.urlencode({"package_id": package_id})
    records: list[dict[str, Any]] = fetch_json(f"{node_url}/api/v1/log/records?{query}", timeout=5)[
        "records"
    ]
    return records


def test_skopeo_pulls_an_unbuilt_multiarch_image_through_a_peer(
    mirror: Mirror, tmp_path: Path
) -> None:
    image = mirror.images.multiarch
    out = tmp_path / "pulled"
    started = time.monotonic()
    result = skopeo_pull(mirror.host("peer-0"), "test/multiarch:1.0", out)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    print(f"cold pull-through of {image.repository}:1.0 (index, 2 platforms): {elapsed:.2f} s")
    index = json.loads((out / "index.json").read_text())
    assert [m["digest"] for m in index["manifests"]] == [image.root.digest]
    hashes = read_layout_digests(out)
    assert all(name == actual for name, actual in hashes.items())
    assert set(hashes) == set(image.digests)
    # Committed before it was served: the peer's own log holds the record.
    [record] = log_records(mirror.http("peer-0"), "docker.io/test/multiarch:1.0")
    artifacts = {a["digest"] for a in record["decoded"]["artifacts"]}
    assert artifacts == set(image.digests)


def test_oras_pulls_every_layer_through_the_other_peer(mirror: Mirror, tmp_path: Path) -> None:
    image = mirror.images.multilayer
    host = mirror.host("peer-1")
    client = oras.client.OrasClient(hostname=host, insecure=True)
    target = f"{host}/test/multilayer:1.0"
    files = client.pull(target=target, outdir=str(tmp_path / "pulled"))
    assert len(files) == 4
    container = client.get_container(target)
    manifest = client.get_manifest(container)
    pulled = {}
    for descriptor in [manifest["config"], *manifest["layers"]]:
        out = tmp_path / "blobs" / descriptor["digest"]
        out.parent.mkdir(parents=True, exist_ok=True)
        client.download_blob(container, descriptor["digest"], str(out))
        pulled[descriptor["digest"]] = read_digest(out)
    assert all(name == actual for name, actual in pulled.items())
    assert set(pulled) == set(image.blobs)


def read_digest(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def test_cli_builds_follows_and_finds_the_record_in_the_log(mirror: Mirror) -> None:
    image = mirror.images.docker_list
    node = mirror.http("peer-1")
    started = pyrsia("build", "docker", "--image", "test/dockerlist:1.0", "--node", node)
    assert started.returncode == 0, started.stderr
    build_id = started.stdout.strip()
    status = pyrsia("build", "status", build_id, "--wait", "--node", node)
    assert status.returncode == 0, status.stdout + status.stderr
    assert "docker.io/test/dockerlist:1.0  done" in status.stdout
    assert image.root.digest in status.stdout
    # A peer follows the chain; give it the commit's block.
    deadline = time.monotonic() + 10
    while not log_records(node, "docker.io/test/dockerlist:1.0"):
        assert time.monotonic() < deadline, "the peer did not receive the committed record"
        time.sleep(0.1)
    shown = pyrsia(
        "inspect-log",
        "--node",
        node,
        "--format",
        "json",
        "--fields",
        "package_id,digests,attestations,signers",
        "docker",
        "--image",
        "test/dockerlist:1.0",
    )
    assert shown.returncode == 0, shown.stderr
    [row] = json.loads(shown.stdout)
    assert row["package_id"] == "docker.io/test/dockerlist:1.0"
    assert set(row["digests"].split()) == set(image.digests)
    assert row["attestations"] >= 3


def test_a_committed_record_verifies_offline_from_a_saved_bundle(
    mirror: Mirror, tmp_path: Path
) -> None:
    """A record's proof bundle, fetched from an authority, verifies with no node involved
    against the genesis authorities; a single flipped bit in the record is caught."""
    node = mirror.http("authority-0")
    started = pyrsia("build", "docker", "--image", "test/multilayer:1.0", "--node", node)
    assert started.returncode == 0, started.stderr
    done = wait_build(node, started.stdout.strip())
    assert done["state"] == "done", done
    # The checkpoint covering the record is cosigned after the block commits.
    deadline = time.monotonic() + 15
    while True:
        saved = pyrsia(
            "bundle", "--node", node, "--index", str(done["ledger_index"]), "--out",
            str(tmp_path / "bundle.json"),
        )  # fmt: skip
        assert saved.returncode == 0, saved.stderr
        bundle = json.loads((tmp_path / "bundle.json").read_text())
        size = int(bundle["checkpoint"].splitlines()[1])
        if size > done["ledger_index"]:
            break
        assert time.monotonic() < deadline, "no checkpoint covers the record yet"
        time.sleep(0.3)
    genesis = str(mirror.network.root / "genesis.json")
    verified = pyrsia("verify", str(tmp_path / "bundle.json"), "--genesis", genesis)
    assert verified.returncode == 0, verified.stderr
    assert "OK: docker.io/test/multilayer:1.0" in verified.stdout
    record = bytearray(base64.b64decode(bundle["record"]))
    record[-1] ^= 1
    bundle["record"] = base64.b64encode(bytes(record)).decode()
    (tmp_path / "tampered.json").write_text(json.dumps(bundle))
    tampered = pyrsia("verify", str(tmp_path / "tampered.json"), "--genesis", genesis)
    assert tampered.returncode == 1
    assert "verification FAILED" in tampered.stderr


def test_an_upstream_serving_wrong_bytes_is_rejected_and_nothing_is_served(
    mirror: Mirror, tmp_path: Path
) -> None:
    name = "tampered.test/test/fragile:1.0"
    result = skopeo_pull(mirror.host("peer-0"), name, tmp_path / "pulled")
    assert result.returncode != 0
    assert "build failed" in result.stderr
    assert "nothing committed: no valid attestation, 3 required" in result.stderr
    assert result.stderr.count("the upstream content is corrupt or tampered with") == 4
    node = mirror.http("peer-1")
    build = post_json(f"{node}/api/v1/builds", {"package_type": "docker", "image": name})
    status = wait_build(node, build["id"])
    assert status["state"] == "failed"
    assert len(status["mismatches"]) == 4
    assert all("corrupt or tampered" in m for m in status["mismatches"]), status["mismatches"]
    assert log_records(node, name) == []
    for blob in mirror.fragile.blobs:
        url = f"{node}/v2/tampered.test/test/fragile/blobs/{blob}"
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url, timeout=10)
        assert err.value.code == 404


def test_an_authority_whose_upstream_lies_is_outvoted_and_reported(
    mirror: Mirror, tmp_path: Path
) -> None:
    victim = mirror.victim
    node = mirror.http("peer-0")
    build = post_json(
        f"{node}/api/v1/builds", {"package_type": "docker", "image": "test/victim:1.0"}
    )
    status = wait_build(node, build["id"])
    assert status["state"] == "done", status
    assert status["manifest_digest"] == victim.root.digest
    [mismatch] = status["mismatches"]
    assert mirror.liar in mismatch
    assert mirror.images.multilayer.root.digest in mismatch
    deadline = time.monotonic() + 10
    while not (records := log_records(node, "docker.io/test/victim:1.0")):
        assert time.monotonic() < deadline, "the peer did not receive the committed record"
        time.sleep(0.1)
    signers = {
        s["keyid"] for env in records[0]["decoded"]["attestations"] for s in env["signatures"]
    }
    assert len(signers) == 3
    assert mirror.liar not in signers
    out = tmp_path / "pulled"
    result = skopeo_pull(mirror.host("peer-0"), "test/victim:1.0", out)
    assert result.returncode == 0, result.stderr
    assert set(read_layout_digests(out)) == set(victim.digests)


def forgeries(committed: ArtifactRecord) -> dict[str, ArtifactRecord]:
    """Records a malicious node could submit, each derived from a committed one."""
    image = parse_statement(committed.attestations[0].payload).image
    outsider = Identity.generate()
    _, outsider_envelope = attest(image, "http://evil.test", dt.datetime.now(dt.UTC), outsider)
    fake = Artifact("sha256:" + "0" * 64, 1, "application/octet-stream")
    return {
        "other artifacts": replace(committed, artifacts=(*committed.artifacts[:-1], fake)),
        "two attestations": replace(committed, attestations=committed.attestations[:2]),
        "an outsider's attestation": replace(
            committed,
            attestations=(
                *committed.attestations[:2],
                DsseEnvelope.from_json(outsider_envelope.to_json()),
            ),
        ),
    }


async def test_forged_and_under_attested_records_never_commit(mirror: Mirror) -> None:
    node = mirror.http("peer-0")
    [entry] = await asyncio.to_thread(log_records, node, "docker.io/test/multiarch:1.0")
    committed = ArtifactRecord.decode(base64.b64decode(entry["record"]))
    assert len(committed.attestations) >= 3
    peer = mirror.network.node("peer-0")
    credentials = NodeTls.load(
        peer.data_dir / "keys", mirror.network.root.joinpath("ca", "ca.crt").read_bytes()
    ).channel_credentials()
    authority = mirror.network.node("authority-0").grpc_address
    options = [("grpc.ssl_target_name_override", TARGET_NAME)]
    async with grpc.aio.secure_channel(authority, credentials, options=options) as channel:
        stub = consensus_pb2_grpc.ConsensusStub(channel)
        for what, forged in forgeries(committed).items():
            reply = await stub.SubmitRecord(
                consensus_pb2.SubmitRecordRequest(record=forged.encode()), timeout=10
            )
            assert not reply.accepted, what
            assert reply.reason, what
    # The admin API an operator submits governance records through refuses them too.
    admin = f"{mirror.http('authority-1')}/api/v1/records"
    for what, forged in forgeries(committed).items():
        request = urllib.request.Request(
            admin, data=forged.encode(), headers={"Content-Type": "application/octet-stream"}
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            await asyncio.to_thread(urllib.request.urlopen, request, timeout=10)
        assert refused.value.code == 400, what
    # Offered straight to consensus, none reaches any log.
    await asyncio.sleep(1.0)
    for name in ("authority-0", "authority-3", "peer-1"):
        records = await asyncio.to_thread(
            log_records, mirror.http(name), "docker.io/test/multiarch:1.0"
        )
        assert [r["record_hash"] for r in records] == [entry["record_hash"]], name


async def test_a_peer_with_a_network_certificate_cannot_make_an_authority_acquire(
    mirror: Mirror,
) -> None:
    peer = mirror.network.node("peer-0")
    credentials = NodeTls.load(
        peer.data_dir / "keys", mirror.network.root.joinpath("ca", "ca.crt").read_bytes()
    ).channel_credentials()
    authority = mirror.network.node("authority-1").grpc_address
    options = [("grpc.ssl_target_name_override", TARGET_NAME)]
    package_id = "docker.io/test/never-built:1.0"
    async with grpc.aio.secure_channel(authority, credentials, options=options) as channel:
        stub = build_pb2_grpc.BuildStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as unsigned:
            await stub.Acquire(build_pb2.AcquireRequest(package_id=package_id), timeout=10)
        assert unsigned.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # Signed by the peer's own node key: a valid signature, but not an authority's.
        peer_key = Identity.from_pem(peer.data_dir.joinpath("keys", "node.key").read_bytes())
        now = int(time.time() * 1000)
        genesis = json.loads(mirror.network.root.joinpath("genesis.json").read_text())
        signed = acquire_signing_bytes(genesis["chain_id"], package_id, peer_key.node_id, now)
        request = build_pb2.AcquireRequest(
            package_id=package_id,
            requester=peer_key.node_id,
            timestamp_ms=now,
            signature=peer_key.sign(signed),
        )
        with pytest.raises(grpc.aio.AioRpcError) as from_peer:
            await stub.Acquire(request, timeout=10)
        assert from_peer.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "not an authority in force" in (from_peer.value.details() or "")
