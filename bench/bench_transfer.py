"""Peer-to-peer distribution benchmark: every figure is a ratio against a reference
measured in the same run, on loopback, each node in its own process.

Run: .venv/bin/python bench/bench_transfer.py [--size-mib 256] [--repeat 3]
     [--append bench/RESULTS.md] [--profile DIR]

Layout: one authority and 8 peers, each a real ``Node`` (mutual TLS, DHT, provider choice,
consensus running) in its own ``python bench/bench_transfer.py --worker`` process, plus a
plain HTTP file server (aiohttp, sendfile) in its own process. The controller (this
process) drives the workers over their stdin/stdout with one JSON object per line; that
bench-only control channel is the only thing the node does not have itself. The
authority's upstream is an in-memory origin that counts how often it was asked.

Measured:
- one pull: a peer fetches a blob no peer holds (the authority acquires it once from its
  origin, the peer downloads it from the authority).
- fan-out: 8 peers fetch another blob of the same size at once; wall time until all 8
  hold it, and how many copies the origin served (goal: exactly 1).
- reference for fan-out: the same 8 peer processes download one file at once from the
  plain HTTP server vs one of them alone.
- one peer-to-peer download (``Downloader`` from the authority only, mutual TLS) vs one
  plain HTTP download of the same file by the same peer process; both write through
  ``BlobStore.put_stream``, so both hash and fsync the same bytes. Median of ``--repeat``.

``--profile DIR`` runs every process under py-spy (``.venv/bin/py-spy``) and writes one
collapsed-stack profile per process into DIR (profiling slows the run; figures from such a run
are not the ones to report).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

SELF = Path(__file__).resolve()
REPO = SELF.parent.parent
sys.path[:0] = [str(REPO / "node"), str(REPO / "protos"), str(REPO / "tests")]

PEERS = 8
OP_TIMEOUT = 600.0


def make_blob(size: int, seed: int) -> tuple[str, bytes]:
    block = hashlib.sha256(f"bench-{seed}".encode()).digest() * 2048  # 64 KiB
    data = (block * (size // len(block) + 1))[:size]
    data = seed.to_bytes(8, "big") + data[8:]
    return "sha256:" + hashlib.sha256(data).hexdigest(), data


# ---------------------------------------------------------------------------- worker side


async def worker(config_file: Path, size: int, seeds: list[int]) -> None:
    """One node; answers the controller's commands read from stdin, one JSON per line."""
    import aiohttp
    from pyrsia_node import config
    from pyrsia_node.dht import Provider
    from pyrsia_node.server import Node
    from pyrsia_node.store import BlobStore

    node = Node(config.load(config_file, environ={}))
    upstream: Counter[str] = Counter()
    if node.config.role == "authority":
        blobs = dict(make_blob(size, seed) for seed in seeds)

        async def origin(digest: str) -> None:
            upstream[digest] += 1
            await node.store.put_bytes(digest, blobs[digest])

        node.distribution.origin = origin
    await node.start()
    http_store = BlobStore(node.config.data_dir / "http-client")
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def reply(**fields: Any) -> None:
        sys.stdout.write(json.dumps(fields) + "\n")
        sys.stdout.flush()

    reply(ready=True)
    try:
        while line := await reader.readline():
            command = json.loads(line)
            op = command["op"]
            started = time.perf_counter()
            if op == "info":
                info = node.distribution.dht.self_info()
                reply(
                    node_id=info.node_id,
                    grpc_address=info.grpc_address,
                    table=len(node.distribution.dht.table),
                )
                continue
            if op == "fetch":
                await node.distribution.fetch_blob(command["digest"])
            elif op == "download":
                source = Provider(command["node_id"], command["grpc_address"], "", "authority")
                await node.distribution.downloader.download(command["digest"], [source])
            elif op == "http":
                async with (
                    aiohttp.ClientSession() as session,
                    session.get(command["url"]) as response,
                ):
                    response.raise_for_status()
                    await http_store.put_stream(
                        command["digest"], response.content.iter_chunked(1 << 20)
                    )
            elif op == "forget":
                node.store.delete(command["digest"])
                http_store.delete(command["digest"])
            elif op == "cpu":
                usage = resource.getrusage(resource.RUSAGE_SELF)
                busy = node.metrics.registry.get_sample_value("pyrsia_transfer_busy_replies_total")
                reply(user=usage.ru_utime, system=usage.ru_stime, busy=busy)
                continue
            elif op == "upstream":
                reply(copies=upstream[command["digest"]])
                continue
            elif op == "quit":
                break
            reply(seconds=time.perf_counter() - started, has=node.store.has(command["digest"]))
    finally:
        await node.stop()


def http_server(path: Path, port: int) -> None:
    from aiohttp import web

    async def serve(request: web.Request) -> web.FileResponse:
        return web.FileResponse(path / request.match_info["name"])

    app = web.Application()
    app.add_routes([web.get("/{name}", serve)])
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


# ------------------------------------------------------------------------ controller side


class Worker:
    """A worker process and its command pipe; every wait is bounded by ``OP_TIMEOUT``."""

    def __init__(self, name: str, process: asyncio.subprocess.Process) -> None:
        self.name = name
        self.process = process

    async def read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = b""
        while not line.startswith(b"{"):  # skips py-spy's own lines when profiling
            line = await asyncio.wait_for(self.process.stdout.readline(), OP_TIMEOUT)
            if not line:
                raise RuntimeError(f"{self.name} exited; see its log under the run directory")
        result: dict[str, Any] = json.loads(line)
        return result

    async def call(self, **command: Any) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write((json.dumps(command) + "\n").encode())
        await self.process.stdin.drain()
        return await self.read()


def _prefix(profile: Path | None, name: str) -> list[str]:
    if profile is None:
        return []
    spy = str(Path(sys.executable).parent / "py-spy")
    return [spy, "record", "-n", "-r", "50", "-f", "raw", "-o", f"{profile}/{name}.txt", "--"]


def _parent(profile: Path | None) -> list[str]:
    """Children die with the controller, except under py-spy (py-spy is their parent)."""
    return [] if profile is not None else ["--parent-pid", str(os.getpid())]


async def spawn(args: list[str], log: Path, profile: Path | None, name: str) -> Any:
    return await asyncio.create_subprocess_exec(
        *_prefix(profile, name),
        sys.executable,
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=log.open("wb"),
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


async def run(
    size: int, repeat: int, root: Path, profile: Path | None, p2p_only: bool = False
) -> dict[str, float]:
    from conftest import free_port_block
    from pyrsia_node.genesis import create_network

    load_before = os.getloadavg()[0]

    direct_seed, single_seeds, fan_seeds = 1, range(100, 100 + repeat), range(200, 200 + repeat)
    seeds = [direct_seed, *single_seeds, *fan_seeds]
    files = root / "http-files"
    files.mkdir()
    digests = {}
    for seed in seeds:
        digest, data = make_blob(size, seed)
        digests[seed] = digest
        if seed not in single_seeds:
            await asyncio.to_thread((files / digest[7:]).write_bytes, data)
    direct = digests[direct_seed]
    singles = [digests[seed] for seed in single_seeds]
    fans = [digests[seed] for seed in fan_seeds]
    network = create_network(
        root / "net", authorities=1, peers=PEERS, base_port=free_port_block(200)
    )
    http_port = free_port_block(1)
    processes: list[asyncio.subprocess.Process] = []
    try:
        http = await spawn(
            [str(SELF), "--http-server", str(files), "--port", str(http_port), *_parent(profile)],
            root / "http-server.log",
            profile,
            "http-server",
        )
        processes.append(http)
        workers: list[Worker] = []
        for spec in network.nodes:
            process = await spawn(
                [str(SELF), "--worker", str(spec.config_file), "--size-mib", str(size >> 20),
                 "--seeds", ",".join(map(str, seeds)), *_parent(profile)],
                root / f"{spec.name}.log",
                profile,
                spec.name,
            )  # fmt: skip
            processes.append(process)
            workers.append(Worker(spec.name, process))
        for w in workers:
            await w.read()
        deadline = time.monotonic() + 30
        while not all([(await w.call(op="info"))["table"] for w in workers]):
            if time.monotonic() > deadline:
                raise RuntimeError("nodes did not join the DHT within 30 s")
            await asyncio.sleep(0.2)
        authority, peers = workers[0], workers[1:]
        url = f"http://127.0.0.1:{http_port}/"

        rounds: list[dict[str, float]] = []
        source = await authority.call(op="info")
        await authority.call(op="fetch", digest=direct)
        for single, fan in zip(singles, fans, strict=True):
            if p2p_only:
                rounds.append(
                    await one_download(authority, peers[1], direct, source, url, http.pid)
                )
                continue
            rounds.append(
                await one_round(authority, peers, single, fan, direct, source, url, http.pid)
            )
        for w in workers:
            w.process.stdin.write(b'{"op": "quit"}\n')
        await asyncio.wait_for(asyncio.gather(*(w.process.wait() for w in workers)), 30)
    finally:
        for process in processes:
            if process.returncode is None:
                process.terminate() if profile is not None else process.kill()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(process.wait(), 30)
            if process.returncode is None:
                process.kill()
                await process.wait()
    for index, figures in enumerate(rounds):
        print(
            f"round {index}: " + json.dumps({k: round(v, 3) for k, v in figures.items()}),
            file=sys.stderr,
        )
    median = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    if p2p_only:
        return {
            **median,
            "p2p_throughput_over_http": median["http_one_s"] / median["p2p_one_s"],
            "load_before": load_before,
            "load_after": os.getloadavg()[0],
        }
    return {
        **median,
        "fan_out_over_one_pull": median["fan_out_s"] / median["one_pull_s"],
        "http_fan_out_over_one": median["http_fan_out_s"] / median["http_one_s"],
        "p2p_throughput_over_http": median["http_one_s"] / median["p2p_one_s"],
        "p2p_first_s": rounds[0]["p2p_one_s"],
        "upstream_copies_in_fan_out": max(r["upstream_copies_in_fan_out"] for r in rounds),
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
    }


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of a child process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def cpu_seconds(worker: Worker) -> float:
    usage = await worker.call(op="cpu")
    return float(usage["user"] + usage["system"])


async def one_round(
    authority: Worker,
    peers: list[Worker],
    single: str,
    fan: str,
    direct: str,
    source: dict[str, Any],
    url: str,
    http_pid: int,
) -> dict[str, float]:
    """Each figure once, on blobs no peer holds yet; the caller takes medians over rounds."""
    one_pull = (await peers[0].call(op="fetch", digest=single))["seconds"]
    workers = [authority, *peers]
    cpu_before = await asyncio.gather(*(w.call(op="cpu") for w in workers))
    started = time.perf_counter()
    results = await asyncio.gather(*(p.call(op="fetch", digest=fan) for p in peers))
    fan_out = time.perf_counter() - started
    cpu_after = await asyncio.gather(*(w.call(op="cpu") for w in workers))
    assert all(r["has"] for r in results), results
    cpu = [
        a["user"] + a["system"] - b["user"] - b["system"]
        for a, b in zip(cpu_after, cpu_before, strict=True)
    ]
    copies = (await authority.call(op="upstream", digest=fan))["copies"]
    busy = cpu_after[0]["busy"] - cpu_before[0]["busy"]

    started = time.perf_counter()
    await asyncio.gather(*(p.call(op="http", url=url + fan[7:], digest=fan) for p in peers))
    http_fan = time.perf_counter() - started
    await asyncio.gather(*(p.call(op="forget", digest=fan) for p in peers))

    return {
        "one_pull_s": one_pull,
        "fan_out_s": fan_out,
        "fan_out_cpu_authority_s": cpu[0],
        "fan_out_cpu_peers_s": sum(cpu[1:]),
        "upstream_copies_in_fan_out": float(copies),
        "fan_out_busy_replies": busy,
        "http_fan_out_s": http_fan,
        **await one_download(authority, peers[1], direct, source, url, http_pid),
    }


async def one_download(
    authority: Worker, peer: Worker, direct: str, source: dict[str, Any], url: str, http_pid: int
) -> dict[str, float]:
    """One p2p download of ``direct`` from the authority, then one plain HTTP download."""
    download = {"op": "download", "digest": direct, **source}
    before = (await cpu_seconds(authority), await cpu_seconds(peer))
    p2p_one = (await peer.call(**download))["seconds"]
    after = (await cpu_seconds(authority), await cpu_seconds(peer))
    await peer.call(op="forget", digest=direct)
    http_before = (process_cpu(http_pid), await cpu_seconds(peer))
    http_one = (await peer.call(op="http", url=url + direct[7:], digest=direct))["seconds"]
    http_after = (process_cpu(http_pid), await cpu_seconds(peer))
    await peer.call(op="forget", digest=direct)
    return {
        "http_one_s": http_one,
        "p2p_one_s": p2p_one,
        "p2p_cpu_provider_s": after[0] - before[0],
        "p2p_cpu_downloader_s": after[1] - before[1],
        "http_cpu_server_s": http_after[0] - http_before[0],
        "http_cpu_client_s": http_after[1] - http_before[1],
    }


def report(size_mib: int, repeat: int, figures: dict[str, float]) -> str:
    command = f".venv/bin/python bench/bench_transfer.py --size-mib {size_mib} --repeat {repeat}"
    return "\n".join(
        [
            f"## Peer-to-peer transfer ({time.strftime('%Y-%m-%d')})",
            "",
            f"Command: `{command}` on {os.cpu_count()} cores, {platform.machine()}, "
            f"Python {platform.python_version()}; every node and the HTTP server in its own "
            f"process on loopback; figures are medians of {repeat} rounds, each on blobs no "
            f"peer held; 1-minute load average {figures['load_before']:.1f} before, "
            f"{figures['load_after']:.1f} after.",
            "",
            "| figure | ratio | goal | raw |",
            "|---|---|---|---|",
            f"| upstream copies served during the {PEERS}-peer fan-out (most in any round) | "
            f"{figures['upstream_copies_in_fan_out']:.0f} | exactly 1 | |",
            f"| {PEERS}-peer fan-out wall time / one pull | "
            f"{figures['fan_out_over_one_pull']:.2f}x | <= 2x | "
            f"{figures['fan_out_s']:.2f} s / {figures['one_pull_s']:.2f} s |",
            f"| reference: {PEERS} plain HTTP pulls from one source / one | "
            f"{figures['http_fan_out_over_one']:.2f}x | | "
            f"{figures['http_fan_out_s']:.2f} s / {figures['http_one_s']:.2f} s |",
            f"| CPU during the fan-out: authority / all 8 peers | | | "
            f"{figures['fan_out_cpu_authority_s']:.2f} s / "
            f"{figures['fan_out_cpu_peers_s']:.2f} s |",
            "| p2p throughput (1 provider, mTLS gRPC) / plain HTTP (aiohttp) | "
            f"{figures['p2p_throughput_over_http']:.2f}x | >= 0.8x | "
            f"{figures['p2p_one_s']:.2f} s vs {figures['http_one_s']:.2f} s (first p2p round, "
            f"provider's chunk hashes not yet cached: {figures['p2p_first_s']:.2f} s) |",
            "| CPU of that one download: provider / downloader, p2p vs HTTP | | | "
            f"{figures['p2p_cpu_provider_s']:.2f} s / {figures['p2p_cpu_downloader_s']:.2f} s vs "
            f"{figures['http_cpu_server_s']:.2f} s / {figures['http_cpu_client_s']:.2f} s |",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3, help="rounds; figures are medians")
    parser.add_argument("--append", type=Path, help="append the figures to this Markdown file")
    parser.add_argument("--profile", type=Path, help="write py-spy profiles into this directory")
    parser.add_argument("--keep", action="store_true", help="keep the run directory and logs")
    parser.add_argument(
        "--p2p-only",
        action="store_true",
        help="only the one p2p download vs one HTTP download (prints raw figures)",
    )
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--http-server", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--seeds", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None or args.http_server is not None:
        from pyrsia_node.localnet import die_with_parent

        logging.basicConfig(level=logging.WARNING)
        # Under py-spy the parent is py-spy, which the controller ends after the run.
        die_with_parent(args.parent_pid or os.getppid())
        if args.worker is not None:
            seeds = [int(seed) for seed in args.seeds.split(",")]
            asyncio.run(worker(args.worker, args.size_mib << 20, seeds))
        else:
            http_server(args.http_server, args.port)
        return
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="pyrsia-bench-"))
    try:
        figures = asyncio.run(
            run(args.size_mib << 20, args.repeat, root, args.profile, args.p2p_only)
        )
    finally:
        if args.keep:
            print(f"run directory: {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    if args.p2p_only:
        print(json.dumps({k: round(v, 3) for k, v in figures.items()}))
        return
    text = report(args.size_mib, args.repeat, figures)
    print(text)
    if args.append is not None:
        with args.append.open("a") as out:
            out.write("\n" + text)


if __name__ == "__main__":
    main()
