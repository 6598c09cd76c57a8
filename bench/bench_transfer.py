"""Peer-to-peer distribution benchmark: every figure is a ratio against a reference
measured in the same run, on loopback, in one process (the nodes share one event loop).

Run: .venv/bin/python bench/bench_transfer.py [--size-mib 256] [--append bench/RESULTS.md]

Measured:
- fan-out: 8 peers fetch the same blob at once through whole nodes (mutual TLS, DHT,
  provider choice, authority fallback) vs one peer fetching a blob of the same size;
  and how many copies the upstream served during the fan-out (goal: exactly 1).
- reference for fan-out: 8 plain HTTP downloads at once from one aiohttp server vs one.
- one peer-to-peer download (Downloader from one provider, mutual TLS) vs one plain HTTP
  download of the same file from an aiohttp server; both write through BlobStore.put_stream,
  so both hash and fsync the same bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import grpc
from aiohttp import web

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "node"), str(REPO / "protos"), str(REPO / "tests")]

from conftest import free_port_block  # noqa: E402
from pyrsia_node import config  # noqa: E402
from pyrsia_node.dht import Provider  # noqa: E402
from pyrsia_node.distribution import Distribution, attach  # noqa: E402
from pyrsia_node.genesis import create_network  # noqa: E402
from pyrsia_node.server import Node  # noqa: E402
from pyrsia_node.store import BlobStore  # noqa: E402

PEERS = 8


def make_blob(size: int, seed: int) -> tuple[str, bytes]:
    block = hashlib.sha256(f"bench-{seed}".encode()).digest() * 2048  # 64 KiB
    data = (block * (size // len(block) + 1))[:size]
    data = seed.to_bytes(8, "big") + data[8:]
    return "sha256:" + hashlib.sha256(data).hexdigest(), data


async def start_cluster(root: Path, blobs: dict[str, bytes], upstream: Counter[str]) -> list[Any]:
    network = create_network(root, authorities=1, peers=PEERS, base_port=free_port_block(200))
    real_server = grpc.aio.server
    registering: list[Distribution] = []

    def server_with_distribution(*args: Any, **kwargs: Any) -> grpc.aio.Server:
        server = real_server(*args, **kwargs)
        registering.pop().register(server)
        return server

    grpc.aio.server = server_with_distribution  # stands in for the wiring in Node.start()
    cluster: list[Any] = []
    for spec in network.nodes:
        node = Node(config.load(spec.config_file, environ={}))

        async def origin(digest: str, node: Node = node) -> None:
            upstream[digest] += 1
            await node.store.put_bytes(digest, blobs[digest])

        distribution = attach(node, origin=origin if spec.role == "authority" else None)
        registering.append(distribution)
        await node.start()
        await distribution.start()
        cluster.append((node, distribution))
    grpc.aio.server = real_server
    deadline = time.monotonic() + 20
    while not all(len(d.dht.table) for _, d in cluster):
        if time.monotonic() > deadline:
            raise RuntimeError("nodes did not join the DHT within 20 s")
        await asyncio.sleep(0.1)
    return cluster


async def http_reference(root: Path, digest: str, data: bytes, clients: int) -> float:
    path = root / "http-source.bin"
    await asyncio.to_thread(path.write_bytes, data)

    async def serve(_: web.Request) -> web.FileResponse:
        return web.FileResponse(path)

    app = web.Application()
    app.add_routes([web.get("/blob", serve)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port_block(1)
    await web.TCPSite(runner, "127.0.0.1", port).start()

    async def pull(index: int) -> None:
        store = BlobStore(root / f"http-client-{clients}-{index}")
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/blob") as response,
        ):
            await store.put_stream(digest, response.content.iter_chunked(1 << 20))

    started = time.perf_counter()
    await asyncio.gather(*(pull(i) for i in range(clients)))
    elapsed = time.perf_counter() - started
    await runner.cleanup()
    return elapsed


async def run(size: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="pyrsia-bench-") as tmp:
        root = Path(tmp)
        single, fan, direct = make_blob(size, 1), make_blob(size, 2), make_blob(size, 3)
        blobs = dict([single, fan, direct])
        upstream: Counter[str] = Counter()
        cluster = await start_cluster(root / "net", blobs, upstream)
        authority, peers = cluster[0][1], [d for _, d in cluster[1:]]
        try:
            started = time.perf_counter()
            await peers[0].fetch_blob(single[0])
            one_pull = time.perf_counter() - started

            started = time.perf_counter()
            await asyncio.gather(*(p.fetch_blob(fan[0]) for p in peers))
            fan_out = time.perf_counter() - started
            for peer in peers:
                assert await asyncio.to_thread(peer.node.store.has, fan[0])

            await authority.fetch_blob(direct[0])
            provider = authority.dht.self_info()
            source = Provider(provider.node_id, provider.grpc_address, "", "authority")
            started = time.perf_counter()
            await peers[1].downloader.download(direct[0], [source])
            p2p_one = time.perf_counter() - started
        finally:
            for node, distribution in reversed(cluster):
                await distribution.stop()
                await node.stop()

        http_one = await http_reference(root, direct[0], direct[1], 1)
        http_fan = await http_reference(root, fan[0], fan[1], PEERS)
    return {
        "one_pull_s": one_pull,
        "fan_out_s": fan_out,
        "fan_out_over_one_pull": fan_out / one_pull,
        "upstream_copies_in_fan_out": float(upstream[fan[0]]),
        "http_one_s": http_one,
        "http_fan_out_s": http_fan,
        "http_fan_out_over_one": http_fan / http_one,
        "p2p_one_s": p2p_one,
        "p2p_throughput_over_http": http_one / p2p_one,
    }


def report(size_mib: int, figures: dict[str, float]) -> str:
    command = f".venv/bin/python bench/bench_transfer.py --size-mib {size_mib}"
    return "\n".join(
        [
            f"## Peer-to-peer transfer ({time.strftime('%Y-%m-%d')})",
            "",
            f"Command: `{command}` on {os.cpu_count()} cores, {platform.machine()}, "
            f"Python {platform.python_version()}; all nodes in one process on loopback.",
            "",
            "| figure | ratio | goal | raw |",
            "|---|---|---|---|",
            f"| upstream copies served during the {PEERS}-peer fan-out | "
            f"{figures['upstream_copies_in_fan_out']:.0f} | exactly 1 | |",
            f"| {PEERS}-peer fan-out wall time / one pull | "
            f"{figures['fan_out_over_one_pull']:.2f}x | <= 2x | "
            f"{figures['fan_out_s']:.2f} s / {figures['one_pull_s']:.2f} s |",
            f"| reference: {PEERS} plain HTTP pulls from one source / one | "
            f"{figures['http_fan_out_over_one']:.2f}x | | "
            f"{figures['http_fan_out_s']:.2f} s / {figures['http_one_s']:.2f} s |",
            f"| p2p throughput (1 provider, mTLS gRPC) / plain HTTP (aiohttp) | "
            f"{figures['p2p_throughput_over_http']:.2f}x | >= 0.8x | "
            f"{figures['p2p_one_s']:.2f} s vs {figures['http_one_s']:.2f} s |",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--append", type=Path, help="append the figures to this Markdown file")
    args = parser.parse_args()
    figures = asyncio.run(run(args.size_mib << 20))
    text = report(args.size_mib, figures)
    print(text)
    if args.append is not None:
        with args.append.open("a") as out:
            out.write("\n" + text)


if __name__ == "__main__":
    main()
