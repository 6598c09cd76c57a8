"""Image mirror benchmark: our registry vs Debian's docker-registry, in one run.

1. Cached serving: one blob of ``--blob-mib`` (default 1024) random bytes, served by
   ``docker-registry`` (filesystem storage) and by ``pyrsia_node.registry`` (a separate
   process), each downloaded ``--repeat`` times with curl to /dev/null; the ratio is
   docker-registry time / our time (>= 1.0 means we are at least as fast). The node
   process's RSS growth while serving is reported too.
2. Cold pull-through, the real path, for an image with one ``--cold-mib`` (default 200, the
   issue's size) layer: a fresh local network of node processes (4 authorities, 2 peers,
   mutual TLS; ``pyrsia up``'s engine) mirrors the upstream. curl asks a peer for the
   manifest (strict mode: the peer asks an authority to build it; all 4 authorities fetch,
   verify, store and attest it; the record goes to consensus once 3 agree; the peer serves
   the manifest once its catalog indexed the commit), then for the layer (the peer
   downloads it from the authorities over gRPC and streams it to curl meanwhile; the last
   chunk waits for the digest check), vs curl pulling manifest and layer directly from
   the upstream. Medians of ``--cold-repeat`` rounds, each
   on a fresh network. One authority's bare acquisition time is reported for reference.

``--clients curl,skopeo`` adds the same comparisons made by one real client on both sides:
``skopeo copy docker://... oci:DIR`` (ping, manifest, config and layer, each verified and
written to an OCI layout) pulls directly from the upstream and through a peer of its own
fresh network, interleaved with the curl rounds; with the cached part, skopeo also copies
the 1 GiB image from docker-registry and from our registry.

``--keep-logs DIR`` keeps every node's log of every cold round (``DIR/<client>-<round>/``)
and prints each round's figures and the coordinator's build line (phase times since the
build request) to stderr, to find out why a round was slow.

Run from the repository root:
    .venv/bin/python bench/bench_mirror.py [--blob-mib 1024] [--repeat 3] [--cold-mib 200]
        [--cold-repeat 3] [--clients curl,skopeo] [--keep-logs DIR]
Results are printed as a Markdown table with the command (for bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import psutil
from pyrsia_node.acquire import UpstreamClient, acquire_image
from pyrsia_node.attestation import AcquiredImage, Artifact, attest
from pyrsia_node.build import artifact_record
from pyrsia_node.catalog import LedgerCatalog
from pyrsia_node.genesis import Upstream
from pyrsia_node.identity import Identity
from pyrsia_node.ledger import TransparencyLog
from pyrsia_node.localnet import LocalNetwork, Shape
from pyrsia_node.registry import routes
from pyrsia_node.store import BlobStore

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
BIG = "bench/big"  # the cached-serving image
COLD = "bench/cold"  # the pull-through image
CPU_PARTS = ("authorities", "peer-0", "upstream", "client", "all")


class _SkipCached(Exception):
    """--skip-cached: the cold part is done, leave the cached-serving part out."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_http(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server for {url} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{url} did not answer within 30s")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def free_port_block(size: int) -> int:
    for base in range(21000, 60000, 97):
        try:
            for port in range(base, base + size):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise SystemExit("no block of free loopback ports")


def cpu_seconds(processes: dict[str, psutil.Process]) -> dict[str, float]:
    """User + system CPU seconds so far of each process (its threads included)."""
    times = {}
    for name, process in processes.items():
        cpu = process.cpu_times()
        times[name] = cpu.user + cpu.system
    return times


def cpu_parts(before: dict[str, float], after: dict[str, float], client: float) -> dict[str, float]:
    """CPU seconds between two ``cpu_seconds`` snapshots, by party (``CPU_PARTS``)."""
    spent = {name: after[name] - before[name] for name in after}
    return {
        "authorities": sum(t for name, t in spent.items() if name.startswith("authority")),
        "peer-0": spent["peer-0"],
        "upstream": spent["upstream"],
        "client": client,
        "all": sum(spent.values()) + client,
    }


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True, slots=True)
class ColdRound:
    """One cold pull through a fresh network: wall seconds (with curl the manifest and the
    layer request apart; with skopeo the whole copy in ``manifest``) and the CPU seconds
    each party spent from the first request to the last byte."""

    manifest: float
    layer: float
    cpu: dict[str, float]
    layer_cpu: dict[str, float]  # of the layer request alone (curl only)

    @property
    def total(self) -> float:
        return self.manifest + self.layer


def cold_through_network(
    root: Path, upstream: psutil.Process, base: str, layer: str, client: str, keep: Path | None
) -> ColdRound:
    """A cold pull through a peer of a fresh network. ``keep``: copy the node logs there."""
    shape = Shape(4, 2, free_port_block(60), "127.0.0.1", (Upstream("docker.io", base),))
    network = LocalNetwork(root, shape, fresh=True)
    network.start()
    try:
        network.wait_connected(timeout=60)
        peer = network.node("peer-0").http_url
        watched = {name: psutil.Process(p.pid) for name, p in network.processes.items()}
        watched["upstream"] = upstream
        cpu_before, client_before = cpu_seconds(watched), children_cpu()
        if client == "skopeo":
            manifest, blob = skopeo_seconds(peer, COLD, root.parent / "skopeo-out"), 0.0
            cpu_middle, client_middle = cpu_before, client_before
        else:
            manifest = curl_seconds(f"{peer}/v2/{COLD}/manifests/1.0")
            cpu_middle, client_middle = cpu_seconds(watched), children_cpu()
            blob = curl_seconds(f"{peer}/v2/{COLD}/blobs/{layer}")
        cpu_after, client_after = cpu_seconds(watched), children_cpu()
        result = ColdRound(
            manifest,
            blob,
            cpu_parts(cpu_before, cpu_after, client_after - client_before),
            cpu_parts(cpu_middle, cpu_after, client_after - client_middle),
        )
    finally:
        network.stop()
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
            for node in network.nodes:
                log = node.data_dir / "node.log"
                if log.exists():
                    shutil.copyfile(log, keep / f"{node.name}.log")
    return result


def build_lines(logs: Path) -> list[str]:
    """The coordinator's one-line build summaries (phase times) in a kept round."""
    return [
        line.strip()
        for log in sorted(logs.glob("*.log"))
        for line in log.read_text(errors="replace").splitlines()
        if "build " in line and " of docker.io/" in line and " in " in line
    ]


def write_random(path: Path, size: int) -> str:
    hasher = hashlib.sha256()
    with path.open("wb") as out:
        remaining = size
        while remaining:
            chunk = os.urandom(min(remaining, 8 << 20))
            hasher.update(chunk)
            out.write(chunk)
            remaining -= len(chunk)
    return "sha256:" + hasher.hexdigest()


async def file_chunks(path: Path) -> AsyncIterator[bytes]:
    with path.open("rb") as handle:
        while chunk := await asyncio.to_thread(handle.read, 4 << 20):
            yield chunk


async def upload(
    session: aiohttp.ClientSession, base: str, name: str, path: Path, digest: str, size: int
) -> None:
    async with session.post(f"{base}/v2/{name}/blobs/uploads/") as response:
        location = response.headers["Location"]
    if location.startswith("/"):
        location = base + location
    sep = "&" if "?" in location else "?"
    async with session.put(
        f"{location}{sep}digest={digest}",
        data=file_chunks(path),
        headers={
            "Content-Type": "application/octet-stream",
            "Content-Length": str(size),
        },
    ) as response:
        if response.status != 201:
            raise SystemExit(
                f"upload of {digest} failed: {response.status} {await response.text()}"
            )


async def seed_upstream(base: str, work: Path, name: str, size: int) -> tuple[str, str]:
    """Push ``name:1.0`` with one ``size``-byte layer; returns (layer, manifest) digests."""
    layer = work / "layer.bin"
    layer_digest = write_random(layer, size)
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        }
    ).encode()
    config_path = work / "config.json"
    config_path.write_bytes(config)
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
            "layers": [{"mediaType": OCI_LAYER, "digest": layer_digest, "size": size}],
        }
    ).encode()
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await upload(session, base, name, layer, layer_digest, size)
        await upload(session, base, name, config_path, config_digest, len(config))
        async with session.put(
            f"{base}/v2/{name}/manifests/1.0",
            data=manifest,
            headers={"Content-Type": OCI_MANIFEST},
        ) as response:
            if response.status != 201:
                raise SystemExit(f"manifest push failed: {response.status}")
    layer.unlink()
    return layer_digest, "sha256:" + hashlib.sha256(manifest).hexdigest()


def curl_seconds(url: str) -> float:
    accept = f"Accept: {OCI_MANIFEST}"
    result = subprocess.run(
        ["curl", "-sS", "-f", "-H", accept, "-o", "/dev/null", "-w", "%{time_total}", url],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    return float(result.stdout)


def skopeo_seconds(base: str, name: str, out: Path) -> float:
    """Wall seconds of ``skopeo copy docker://<base>/<name>:1.0 oci:<out>`` (plain HTTP);
    the layout is removed afterwards."""
    shutil.rmtree(out, ignore_errors=True)
    host = base.removeprefix("http://")
    start = time.perf_counter()
    result = subprocess.run(
        [
            *("skopeo", "copy", "--quiet", "--src-tls-verify=false"),
            *(f"docker://{host}/{name}:1.0", f"oci:{out}:1.0"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    seconds = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    if result.returncode != 0:
        raise SystemExit(f"skopeo copy from {base} failed: {result.stderr.strip()}")
    return seconds


def serve_node(store_root: str, image_json: str, port: str) -> None:
    """Child process: our registry over a store and one committed image."""
    from aiohttp import web

    doc = json.loads(image_json)
    image = AcquiredImage(
        doc["registry"],
        doc["repository"],
        doc["tag"],
        Artifact(**doc["root"]),
        (),
        tuple(Artifact(**b) for b in doc["blobs"]),
    )
    # The image committed as a node commits it: one attested record in a transparency log,
    # served through the node's ledger-backed catalog.
    index = Path(tempfile.mkdtemp(prefix="bench-mirror-index-"))
    ledger = TransparencyLog(index / "ledger")
    _, envelope = attest(image, "bench", dt.datetime.now(dt.UTC), Identity.generate())
    ledger.append([artifact_record(image, [envelope]).encode()])
    catalog = LedgerCatalog(ledger, index / "catalog.sqlite3")

    async def index_it(_: web.Application) -> None:
        await catalog.refresh()

    app = web.Application()
    app.on_startup.append(index_it)
    app.add_routes(routes(catalog, BlobStore(Path(store_root)), default_registry=image.registry))
    web.run_app(app, host="127.0.0.1", port=int(port), print=None, access_log=None)


def image_json(image: AcquiredImage) -> str:
    def art(a: Artifact) -> dict[str, object]:
        return {"digest": a.digest, "size": a.size, "media_type": a.media_type}

    return json.dumps(
        {
            "registry": image.registry,
            "repository": image.repository,
            "tag": image.tag,
            "root": art(image.root),
            "blobs": [art(b) for b in image.blobs],
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--blob-mib", type=int, default=1024, help="cached-serving blob size")
    parser.add_argument("--repeat", type=int, default=3, help="cached-serving downloads")
    parser.add_argument("--cold-mib", type=int, default=200, help="pull-through layer size")
    parser.add_argument("--cold-repeat", type=int, default=3, help="pull-through rounds")
    parser.add_argument(
        "--skip-cached", action="store_true", help="only the cold pull-through (for iterating)"
    )
    parser.add_argument(
        "--clients",
        default="curl",
        help="comma-separated clients compared on both sides: curl (always), skopeo",
    )
    parser.add_argument(
        "--keep-logs", type=Path, help="keep every cold round's node logs under this directory"
    )
    args = parser.parse_args()
    clients = list(dict.fromkeys(["curl", *args.clients.split(",")]))
    if set(clients) - {"curl", "skopeo"}:
        raise SystemExit(f"--clients {args.clients!r}: only curl and skopeo are known")
    load_before = os.getloadavg()[0]
    for tool in ("docker-registry", *clients):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed; apt-get install it first")
    with tempfile.TemporaryDirectory(prefix="bench-mirror-") as tmp:
        work = Path(tmp)
        port = free_port()
        config = work / "registry.yml"
        config.write_text(
            f"version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n"
            f"    rootdirectory: {work / 'upstream'}\nhttp:\n  addr: 127.0.0.1:{port}\n"
        )
        upstream = subprocess.Popen(
            ["docker-registry", "serve", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        node: subprocess.Popen[bytes] | None = None
        try:
            base = f"http://127.0.0.1:{port}"
            wait_http(base + "/v2/", upstream)
            if not args.skip_cached:
                layer, _ = asyncio.run(seed_upstream(base, work, BIG, args.blob_mib << 20))
            cold_layer_digest, _ = asyncio.run(seed_upstream(base, work, COLD, args.cold_mib << 20))

            async def acquire(name: str, store: Path) -> tuple[AcquiredImage, float]:
                start = time.perf_counter()
                async with aiohttp.ClientSession() as session:
                    client = UpstreamClient(
                        Upstream(f"127.0.0.1:{port}", base, insecure=True), session
                    )
                    acquisition = await acquire_image(
                        client, BlobStore(store), name, "1.0", Identity.generate()
                    )
                return acquisition.image, time.perf_counter() - start

            directs: dict[str, list[float]] = {c: [] for c in clients}
            colds: dict[str, list[ColdRound]] = {c: [] for c in clients}
            upstream_process = psutil.Process(upstream.pid)
            for round_no in range(args.cold_repeat):
                for client in clients:
                    if client == "skopeo":
                        direct = skopeo_seconds(base, COLD, work / "skopeo-out")
                    else:
                        direct = curl_seconds(f"{base}/v2/{COLD}/manifests/1.0") + curl_seconds(
                            f"{base}/v2/{COLD}/blobs/{cold_layer_digest}"
                        )
                    keep = args.keep_logs / f"{client}-{round_no}" if args.keep_logs else None
                    cold = cold_through_network(
                        work / "network", upstream_process, base, cold_layer_digest, client, keep
                    )
                    directs[client].append(direct)
                    colds[client].append(cold)
                    print(
                        f"round {round_no} {client}: direct {direct:.3f} s, through "
                        f"{cold.total:.3f} s ({cold.manifest:.3f} + {cold.layer:.3f}); CPU s "
                        + ", ".join(f"{k} {v:.2f}" for k, v in cold.cpu.items())
                        + (
                            "; layer alone: "
                            + ", ".join(f"{k} {v:.2f}" for k, v in cold.layer_cpu.items())
                            if client == "curl"
                            else ""
                        ),
                        file=sys.stderr,
                    )
                    for line in build_lines(keep) if keep else ():
                        print(f"  {line}", file=sys.stderr)
            _, acquire_seconds = asyncio.run(acquire(COLD, work / "bare"))
            if args.skip_cached:
                raise _SkipCached
            image, _ = asyncio.run(acquire(BIG, work / "node"))

            node_port = free_port()
            node = subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--serve-node",
                    str(work / "node"),
                    image_json(image),
                    str(node_port),
                ],
            )
            node_base = f"http://127.0.0.1:{node_port}"
            wait_http(node_base + "/v2/", node)
            node_proc = psutil.Process(node.pid)
            rss_before = node_proc.memory_info().rss
            curl_seconds(f"{node_base}/v2/{BIG}/blobs/{layer}")

            ours, theirs = [], []
            skopeo_ours: list[float] = []
            skopeo_theirs: list[float] = []
            for _ in range(args.repeat):
                theirs.append(curl_seconds(f"{base}/v2/{BIG}/blobs/{layer}"))
                ours.append(curl_seconds(f"{node_base}/v2/{BIG}/blobs/{layer}"))
                if "skopeo" in clients:
                    skopeo_theirs.append(skopeo_seconds(base, BIG, work / "skopeo-out"))
                    skopeo_ours.append(skopeo_seconds(node_base, BIG, work / "skopeo-out"))
            rss_growth = (node_proc.memory_info().rss - rss_before) / (1 << 20)
        except _SkipCached:
            pass
        finally:
            if node is not None:
                stop(node)
            stop(upstream)

    mib, cold_mib = args.blob_mib, args.cold_mib
    command = (
        f".venv/bin/python bench/bench_mirror.py --blob-mib {mib} --repeat {args.repeat} "
        f"--cold-mib {cold_mib} --cold-repeat {args.cold_repeat}"
        + (" --skip-cached" if args.skip_cached else "")
        + (f" --clients {','.join(clients)}" if clients != ["curl"] else "")
    )
    rows = []
    if not args.skip_cached:
        ours_med, theirs_med = statistics.median(ours), statistics.median(theirs)
        cached_ratio = theirs_med / ours_med
        rows += [
            (
                f"cached {mib} MiB blob, docker-registry (median of {args.repeat})",
                f"{theirs_med:.3f} s ({mib / theirs_med:.0f} MiB/s)",
            ),
            (
                f"cached {mib} MiB blob, pyrsia registry (median of {args.repeat})",
                f"{ours_med:.3f} s ({mib / ours_med:.0f} MiB/s)",
            ),
            (
                "**cached serving speed vs docker-registry** (goal >= 1.0x)",
                f"**{cached_ratio:.2f}x**",
            ),
        ]
        if skopeo_ours:
            s_ours, s_theirs = statistics.median(skopeo_ours), statistics.median(skopeo_theirs)
            rows.append(
                (
                    f"cached {mib} MiB image with skopeo copy to an OCI layout: docker-registry "
                    f"/ pyrsia registry (median of {args.repeat})",
                    f"{s_theirs:.3f} s / {s_ours:.3f} s: **{s_theirs / s_ours:.2f}x**",
                )
            )
        rows.append(
            (
                f"node RSS growth while serving {args.repeat + 1} downloads",
                f"{rss_growth:.1f} MiB (limit 32 MiB)",
            )
        )
    for client in clients:
        totals = [c.total for c in colds[client]]
        cpu_med = {k: statistics.median(c.cpu[k] for c in colds[client]) for k in CPU_PARTS}
        cpu_row = (
            f"{client}: CPU seconds of one cold pull-through, first request to last byte "
            f"(median of {args.cold_repeat})",
            ", ".join(f"{k} {v:.2f}" for k, v in cpu_med.items()),
        )
        direct_med = statistics.median(directs[client])
        cold_ratio = statistics.median(totals) / direct_med
        rounds = "rounds: " + ", ".join(f"{t:.2f}" for t in totals)
        if client == "curl":
            middle = totals.index(statistics.median_low(totals))
            rows += [
                (
                    f"curl: direct cold pull of manifest + {cold_mib} MiB layer from upstream "
                    f"(median of {args.cold_repeat})",
                    f"{direct_med:.3f} s",
                ),
                (
                    f"curl: cold pull through a peer of a fresh 4+2 network (median of "
                    f"{args.cold_repeat}): manifest (build: 4 acquisitions, decision at 3, "
                    "commit, peer indexes) + layer (peer streams it while it downloads it "
                    "from authorities)",
                    f"{statistics.median(totals):.3f} s ({colds[client][middle].manifest:.3f} s "
                    f"+ {colds[client][middle].layer:.3f} s); {rounds}",
                ),
                cpu_row,
                (
                    "**curl: cold pull-through vs direct** (goal <= 1.5x; upstream → "
                    "authorities → consensus → peer → client)",
                    f"**{cold_ratio:.2f}x**",
                ),
            ]
        else:
            rows += [
                (
                    f"skopeo copy to an OCI layout: direct from upstream / through a peer of "
                    f"a fresh 4+2 network (median of {args.cold_repeat})",
                    f"{direct_med:.3f} s / {statistics.median(totals):.3f} s; direct "
                    + ", ".join(f"{t:.2f}" for t in directs[client])
                    + f"; through {', '.join(f'{t:.2f}' for t in totals)}",
                ),
                cpu_row,
                (
                    "**skopeo: cold pull-through vs direct** (goal <= 1.5x)",
                    f"**{cold_ratio:.2f}x**",
                ),
            ]
    rows.append(
        (
            "for reference: one authority's bare acquisition (fetch, verify, store, sign) of "
            "the same image, alone",
            f"{acquire_seconds:.3f} s",
        )
    )
    lines = [
        f"Command: `{command}` ({os.cpu_count()} CPUs, loopback, "
        f"1-min load average at start: {load_before:.1f})",
        "",
        "| figure | value |",
        "|---|---|",
        *(f"| {name} | {value} |" for name, value in rows),
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--serve-node":
        serve_node(*sys.argv[2:])
    else:
        main()
