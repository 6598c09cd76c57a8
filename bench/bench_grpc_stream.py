"""Micro-benchmark: CPU per byte of one gRPC server stream of blob chunks, per side.

Run: .venv/bin/python bench/bench_grpc_stream.py [--size-mib 256] [--repeat 3]
     [--client aio,sync] [--server aio,sync] [--chunk-kib 1024] [--plaintext] [--store]

A server process streams ``--size-mib`` of pre-encoded ``Chunk`` messages (the bytes come
from memory, so the figure is gRPC + TLS + Python, not disk) to a client process over
loopback; both use the node's mutual-TLS credentials (``pyrsia_node.tls``) unless
``--plaintext`` (for attributing cost only; nodes never run that way). Each side reports its
own CPU seconds (``getrusage``) for the stream; one line per (server, client) pair and
repetition, so variants can be compared in the same run. ``--store`` makes the client do
what the downloader does with every chunk: SHA-256 and write into a temporary file.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from pathlib import Path

SELF = Path(__file__).resolve()
REPO = SELF.parent.parent
sys.path[:0] = [str(REPO / "node"), str(REPO / "protos"), str(REPO / "tests")]

METHOD = "/pyrsia.v1.Transfer/Read"


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def credentials(keys: Path) -> tuple[bytes, bytes, bytes]:
    return tuple((keys / name).read_bytes() for name in ("ca.crt", "tls.key", "tls.crt"))  # type: ignore[return-value]


def make_keys(keys: Path) -> None:
    from pyrsia_node.tls import create_ca, issue_node_certificate

    ca = create_ca("bench")
    node = issue_node_certificate(ca, "bench")
    keys.mkdir(parents=True, exist_ok=True)
    (keys / "ca.crt").write_bytes(ca.cert_pem)
    (keys / "tls.key").write_bytes(node.key_pem)
    (keys / "tls.crt").write_bytes(node.cert_pem)


def messages(size: int, chunk: int) -> list[bytes]:
    from pyrsia_node.transfer import encode_chunk

    block = os.urandom(chunk)
    digest = hashlib.sha256(block).digest()
    return [encode_chunk(offset, block, digest) for offset in range(0, size, chunk)]


# ------------------------------------------------------------------------------- servers


def _options(chunk: int) -> list[tuple[str, int]]:
    limit = max(4 << 20, chunk + (1 << 16))
    return [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]


def server(kind: str, port: int, keys: Path | None, size: int, chunk: int) -> None:
    import grpc

    payload = messages(size, chunk)

    def serve_sync(request: bytes, context: object) -> Iterator[bytes]:
        yield from payload[:1] if request else payload

    async def serve_aio(request: bytes, context: object) -> AsyncIterator[bytes]:
        for message in payload[:1] if request else payload:
            yield message

    handler = grpc.unary_stream_rpc_method_handler(
        serve_aio if kind == "aio" else serve_sync,
        request_deserializer=None,
        response_serializer=None,
    )
    generic = grpc.method_handlers_generic_handler("pyrsia.v1.Transfer", {"Read": handler})

    def add_port(srv: grpc.Server | grpc.aio.Server) -> None:
        address = f"127.0.0.1:{port}"
        if keys is None:
            srv.add_insecure_port(address)
        else:
            ca, key, cert = credentials(keys)
            srv.add_secure_port(
                address,
                grpc.ssl_server_credentials(
                    [(key, cert)], root_certificates=ca, require_client_auth=True
                ),
            )

    def report() -> None:
        for line in sys.stdin:
            if line.strip() == "cpu":
                print(json.dumps({"cpu": cpu()}), flush=True)

    print(json.dumps({"ready": True}), flush=True)
    if kind == "sync":
        srv = grpc.server(futures.ThreadPoolExecutor(4), options=_options(chunk))
        srv.add_generic_rpc_handlers((generic,))
        add_port(srv)
        srv.start()
        report()
        srv.stop(0)
    else:

        async def main() -> None:
            srv = grpc.aio.server(options=_options(chunk))
            srv.add_generic_rpc_handlers((generic,))
            add_port(srv)
            await srv.start()
            await asyncio.to_thread(report)
            await srv.stop(0)

        asyncio.run(main())


# ------------------------------------------------------------------------------- clients


class Sink:
    """What the downloader does with each chunk when ``--store`` is on."""

    def __init__(self, store: bool) -> None:
        self.store = store
        self.hasher = hashlib.sha256()
        self.file = tempfile.TemporaryFile() if store else None  # noqa: SIM115 (lives as long as the sink)
        self.received = 0

    def take(self, raw: bytes) -> None:
        from pyrsia_node.transfer import decode_chunk

        chunk = decode_chunk(raw)
        self.received += len(chunk.data)
        if self.file is not None:
            self.hasher.update(chunk.data)
            self.file.write(chunk.data)


def client(kind: str, port: int, keys: Path | None, chunk: int, store: bool) -> dict[str, float]:
    import grpc

    target = f"127.0.0.1:{port}"
    options: list[tuple[str, int | str]] = [*_options(chunk)]
    creds = None
    if keys is not None:
        ca, key, cert = credentials(keys)
        creds = grpc.ssl_channel_credentials(ca, key, cert)
        options.append(("grpc.ssl_target_name_override", "pyrsia-node"))
    sink = Sink(store)
    if kind == "sync":
        channel = (
            grpc.insecure_channel(target, options=options)
            if creds is None
            else grpc.secure_channel(target, creds, options=options)
        )
        read = channel.unary_stream(METHOD, request_serializer=None, response_deserializer=None)
        list(read(b"warm-up", timeout=60))  # connection and TLS handshake outside the figure
        sink = Sink(store)
        start, wall = cpu(), time.perf_counter()
        for raw in read(b"", timeout=600):
            sink.take(raw)
        result = {"cpu": cpu() - start, "wall": time.perf_counter() - wall}
        channel.close()
    else:

        async def main() -> dict[str, float]:
            nonlocal sink
            channel = (
                grpc.aio.insecure_channel(target, options=options)
                if creds is None
                else grpc.aio.secure_channel(target, creds, options=options)
            )
            read = channel.unary_stream(METHOD, request_serializer=None, response_deserializer=None)
            async for _ in read(b"warm-up", timeout=60):
                pass
            sink = Sink(store)
            start, wall = cpu(), time.perf_counter()
            async for raw in read(b"", timeout=600):
                if store:
                    await asyncio.to_thread(sink.take, raw)
                else:
                    sink.take(raw)
            result = {"cpu": cpu() - start, "wall": time.perf_counter() - wall}
            await channel.close()
            return result

        result = asyncio.run(main())
    result["received"] = sink.received
    return result


# ---------------------------------------------------------------------------- controller


def run_pair(
    server_kind: str, client_kind: str, args: argparse.Namespace, keys: Path | None, port: int
) -> dict[str, float]:
    common = ["--chunk-kib", str(args.chunk_kib), "--size-mib", str(args.size_mib)]
    if keys is not None:
        common += ["--keys", str(keys)]
    srv = subprocess.Popen(
        [sys.executable, str(SELF), "--as-server", server_kind, "--port", str(port), *common],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert srv.stdin is not None and srv.stdout is not None
        srv.stdout.readline()
        srv.stdin.write("cpu\n")
        srv.stdin.flush()
        # the server's figure includes the client's warm-up call (one chunk, TLS handshake)
        client_args = [sys.executable, str(SELF), "--as-client", client_kind, "--port", str(port)]
        if args.store:
            client_args.append("--store")
        before = json.loads(srv.stdout.readline())["cpu"]
        out = subprocess.run(
            [*client_args, *common], check=False, capture_output=True, text=True, timeout=900
        )
        mid = json.loads(out.stdout) if out.returncode == 0 else None
        if mid is None:
            raise RuntimeError(out.stderr)
        srv.stdin.write("cpu\n")
        srv.stdin.flush()
        after = json.loads(srv.stdout.readline())["cpu"]
        return {
            "server_cpu": after - before,
            "client_cpu": mid["cpu"],
            "wall": mid["wall"],
        }
    finally:
        srv.kill()
        srv.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--chunk-kib", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--server", default="aio,sync")
    parser.add_argument("--client", default="aio,sync")
    parser.add_argument("--plaintext", action="store_true")
    parser.add_argument("--store", action="store_true")
    parser.add_argument("--as-server", help=argparse.SUPPRESS)
    parser.add_argument("--as-client", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--keys", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    size, chunk = args.size_mib << 20, args.chunk_kib << 10
    if args.as_server or args.as_client:
        from pyrsia_node.transfer import tune_allocator

        tune_allocator()  # as every node does
    if args.as_server:
        server(args.as_server, args.port, args.keys, size, chunk)
        return
    if args.as_client:
        print(json.dumps(client(args.as_client, args.port, args.keys, chunk, args.store)))
        return
    from conftest import free_port_block

    with tempfile.TemporaryDirectory() as tmp:
        keys = None if args.plaintext else Path(tmp) / "keys"
        if keys is not None:
            make_keys(keys)
        pairs = [(s, c) for s in args.server.split(",") for c in args.client.split(",")]
        results: dict[tuple[str, str], list[dict[str, float]]] = {p: [] for p in pairs}
        for _ in range(args.repeat):
            for pair in pairs:  # interleaved, so load changes hit every variant alike
                figures = run_pair(*pair, args, keys, free_port_block(1))
                results[pair].append(figures)
                print(f"{pair}: " + json.dumps({k: round(v, 3) for k, v in figures.items()}))
        mode = "plaintext" if keys is None else "mTLS"
        print(
            f"median of {args.repeat}, {args.size_mib} MiB in {args.chunk_kib} KiB chunks, {mode}"
            f"{', client hashes and writes' if args.store else ''}; load {os.getloadavg()[0]:.1f}"
        )
        for (srv, cli), rows in results.items():
            med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
            print(
                f"server {srv:4} client {cli:4}: server CPU {med['server_cpu']:.3f} s, "
                f"client CPU {med['client_cpu']:.3f} s, wall {med['wall']:.3f} s"
            )


if __name__ == "__main__":
    main()
