"""``/healthz`` and ``/readyz``: what probes see, and a full disk on real node processes."""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from conftest import free_port_block
from pyrsia_node.api import build_app
from pyrsia_node.attestation import AcquiredImage, Artifact, attest
from pyrsia_node.build import artifact_record
from pyrsia_node.cli import drill_cmd
from pyrsia_node.cli import main as cli_main
from pyrsia_node.identity import Identity
from pyrsia_node.localnet import LocalNetwork, LocalNetworkError, Shape


async def probe(live: tuple[bool, str], ready: tuple[bool, str]) -> list[tuple[int, Any]]:
    app = build_app(lambda: {}, lambda: ready, live=lambda: live)
    async with TestClient(TestServer(app)) as client:
        answers = []
        for path in ("/healthz", "/readyz"):
            response = await client.get(path)
            answers.append((response.status, await response.json()))
        return answers


async def test_a_live_ready_node_answers_200() -> None:
    assert await probe((True, "ok"), (True, "serving")) == [
        (200, {"status": "ok"}),
        (200, {"ready": True, "reason": "serving"}),
    ]


async def test_a_node_that_cannot_go_on_fails_its_liveness_probe_with_the_reason() -> None:
    stopped = "consensus stopped: consensus-core ended: OSError(28, 'No space left on device')"
    healthz, readyz = await probe((False, stopped), (False, stopped))
    assert healthz == (503, {"status": "failing", "reason": stopped})
    assert readyz == (503, {"ready": False, "reason": stopped})


# A full disk, on real node processes --------------------------------------------------

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs the test can grow later (``mount -o remount,size=``); needs root."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("needs root to mount a small tmpfs")
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount_point)],
        check=False,
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    except OSError:
        return 0, None


def make_record(index: int, attester: Identity) -> bytes:
    """An attested record of an image with 50 layers: ~15 KB, so the disk fills fast."""
    layers = tuple(
        Artifact(f"sha256:{index:032x}{layer + 1:032x}", 1000 + layer, LAYER) for layer in range(50)
    )
    image = AcquiredImage(
        "docker.io",
        f"library/full{index}",
        "v1",
        Artifact(f"sha256:{index:032x}{0:032x}", 1000 + index, MANIFEST),
        (),
        layers,
    )
    _, envelope = attest(image, "docker.io", dt.datetime.now(dt.UTC), attester)
    return artifact_record(image, [envelope]).encode()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_full_disk_stops_consensus_loudly_and_a_restart_with_space_recovers(
    small_disk: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    net = LocalNetwork(
        small_disk / "net", Shape(4, 0, free_port_block(50), "127.0.0.1", attestation_threshold=1)
    )
    names = [node.name for node in net.nodes]
    attester = Identity.from_pem(
        (net.node("authority-0").data_dir / "keys" / "node.key").read_bytes()
    )
    urls = {name: net.node(name).http_url for name in names}
    seen: set[tuple[int, str]] = set()  # every (log size, root) any node reported

    def ledgers() -> dict[str, dict[str, Any] | None]:
        result = {}
        for name, url in urls.items():
            status, body = get(f"{url}/api/v1/status")
            result[name] = body["ledger"] if status == 200 else None
            if result[name] is not None:
                seen.add((result[name]["size"], result[name]["root"]))
        return result

    failing = net.failing

    net.start()
    try:
        net.wait_connected(timeout=60)
        counter = itertools.count()
        # Fill the disk: records until a node's liveness probe fails.
        deadline = time.monotonic() + 150
        stopped: dict[str, str] = {}
        while not stopped and time.monotonic() < deadline:
            for name in names:
                with contextlib.suppress(LocalNetworkError, OSError):
                    net.submit_record(name, make_record(next(counter), attester))
            ledgers()
            stopped = failing()
        assert stopped, "the disk never filled up"
        for reason in stopped.values():
            assert "consensus stopped" in reason and (
                "No space left" in reason or "full" in reason
            ), reason
        for name in stopped:
            status, body = get(f"{urls[name]}/readyz")
            assert status == 503 and body["reason"] == stopped[name]
        # `pyrsia status` shows them as failing, with the reason, and exits 1.
        capsys.readouterr()
        nodes = [arg for url in urls.values() for arg in ("--node", url)]
        assert cli_main(["status", *nodes]) == 1
        table = capsys.readouterr().out
        for name in stopped:
            assert f"{name}: consensus stopped: " in table
            assert any(line.startswith(name) and "FAILING" in line for line in table.splitlines())
        assert cli_main(["status", "--format", "json", *nodes]) == 1
        rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
        for name in stopped:
            assert rows[name]["consensus"]["failure"] in stopped[name]
        before = ledgers()
        stalled = max(ledger["height"] for ledger in before.values() if ledger is not None)

        # More space, then restart what stopped: they replay, repair torn tails, catch up.
        subprocess.run(
            ["mount", "-o", "remount,size=256m", str(small_disk)], check=True, timeout=10
        )
        for name in failing():
            net.restart(name)
        net.wait_connected(timeout=60)
        for _ in range(20):
            net.submit_record(names[0], make_record(next(counter), attester))

        def recovered() -> bool:
            now = ledgers()
            states = {json.dumps(v, sort_keys=True) for v in now.values()}
            return (
                not failing()
                and None not in now.values()
                and len(states) == 1
                and all(v is not None and v["height"] > stalled for v in now.values())
            )

        deadline = time.monotonic() + 60
        while not recovered():
            assert time.monotonic() < deadline, f"no recovery: {ledgers()} {failing()}"
            time.sleep(0.5)
        final = ledgers()["authority-0"]
        assert final is not None
        last = drill_cmd.NodeState("authority-0", final["height"], final["size"], final["root"])
        for size, root in sorted(seen):
            problem = drill_cmd._inconsistent(urls["authority-0"], size, root, last)
            assert problem is None, problem
    finally:
        net.stop()
