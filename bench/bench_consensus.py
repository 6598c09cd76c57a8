"""Consensus throughput and commit latency on loopback.

Starts N authorities as `ConsensusService`s in this one process (one asyncio loop, real
gRPC over 127.0.0.1, real write-ahead fsyncs, real SQLite transparency logs in a temporary
directory), offers records at a fixed rate spread over the authorities, and reports:

* committed records per second (records committed / time from first offer to last commit),
* commit latency p50 and p99 (offer -> commit at the authority that received the record).

Each record is a canonical ledger artifact record carrying one DSSE attestation with an
in-toto statement and an Ed25519 signature, as authorities produce them.

Usage: .venv/bin/python bench/bench_consensus.py --authorities 4 --rate 4000 --seconds 10

All nodes share one Python process (and its GIL), so figures are a lower bound for
separate processes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
from pyrsia_node.consensus import Block, CommitCertificate, ConsensusConfig, Timeouts
from pyrsia_node.consensus.mempool import MempoolLimits
from pyrsia_node.consensus.service import ConsensusService, GrpcTransport, initialize_state
from pyrsia_node.genesis import Authority, Genesis
from pyrsia_node.identity import Identity
from pyrsia_node.ledger import TransparencyLog
from pyrsia_node.ledger.records import (
    IN_TOTO_PAYLOAD_TYPE,
    Artifact,
    ArtifactRecord,
    DsseEnvelope,
    PackageType,
)
from pyrsia_node.merkle import leaf_hash

CHAIN = "pyrsia-bench"


def make_record(index: int, signer: Identity) -> bytes:
    digest = f"sha256:{index:064x}"
    statement = json.dumps(
        {
            "_type": "https://in-toto.io/Statement/v1",
            "subject": [
                {"name": f"docker.io/library/bench{index}", "digest": {"sha256": digest[7:]}}
            ],
            "predicateType": "https://pyrsia.io/acquisition/v1",
            "predicate": {"upstream": "docker.io", "fetched_at": "2026-01-01T00:00:00Z"},
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    envelope = DsseEnvelope(
        IN_TOTO_PAYLOAD_TYPE, statement, (("authority-0", signer.sign(statement)),)
    )
    return ArtifactRecord(
        PackageType.DOCKER,
        f"docker.io/library/bench{index}:v1",
        (Artifact(digest, 1024 + index, "application/vnd.oci.image.manifest.v1+json"),),
        (envelope,),
    ).encode()


async def run(authorities: int, rate: float, seconds: float, root: Path) -> dict[str, float]:
    servers = [grpc.aio.server() for _ in range(authorities)]
    ports = [s.add_insecure_port("127.0.0.1:0") for s in servers]
    identities = [Identity.generate() for _ in range(authorities)]
    genesis = Genesis(
        chain_id=CHAIN,
        genesis_time="2026-01-01T00:00:00Z",
        governance_public_key=Identity.generate().public_key,
        authorities=tuple(
            Authority(f"authority-{i}", identities[i].public_key, f"127.0.0.1:{ports[i]}", "-")
            for i in range(authorities)
        ),
        ca_certificate="",
    )
    offered: dict[bytes, tuple[float, int]] = {}
    latencies: list[float] = []
    committed = 0
    last_commit = 0.0

    def on_commit(node: int):  # type: ignore[no-untyped-def]
        def hook(block: Block, cert: CommitCertificate) -> None:
            nonlocal committed, last_commit
            now = time.perf_counter()
            if node == 0:
                committed += len(block.records)
                last_commit = now
            for record in block.records:
                entry = offered.get(leaf_hash(record))
                if entry is not None and entry[1] == node:
                    latencies.append(now - entry[0])

        return hook

    timeouts = Timeouts(propose=1.0, prevote=1.0, precommit=1.0, delta=0.5, retransmit=1.0)
    services: list[ConsensusService] = []
    ledgers: list[TransparencyLog] = []
    for i in range(authorities):
        directory = root / f"authority-{i}"
        initialize_state(directory / "consensus")
        ledger = TransparencyLog(directory / "ledger")
        transport = GrpcTransport(
            identities[i], CHAIN, grpc.aio.insecure_channel, lambda: int(time.time() * 1000)
        )
        service = ConsensusService(
            identities[i],
            genesis,
            directory / "consensus",
            ledger,
            transport,
            config=ConsensusConfig(CHAIN, timeouts=timeouts, max_block_records=2000),
            mempool_limits=MempoolLimits(),
            on_commit=on_commit(i),
        )
        service.register(servers[i])
        services.append(service)
        ledgers.append(ledger)
    for service, server in zip(services, servers, strict=True):
        await service.start()
        await server.start()

    signer = Identity.generate()
    total = int(rate * seconds)
    records = [make_record(i, signer) for i in range(total)]
    start = time.perf_counter()
    for index, record in enumerate(records):
        due = start + index / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        node = index % authorities
        offered[leaf_hash(record)] = (time.perf_counter(), node)
        services[node].submit(record)
    deadline = time.perf_counter() + 60
    while committed < total and time.perf_counter() < deadline:  # noqa: ASYNC110 (polling a counter)
        await asyncio.sleep(0.05)
    for service, server, ledger in zip(services, servers, ledgers, strict=True):
        await service.stop()
        await server.stop(None)
        ledger.close()
    latencies.sort()
    return {
        "authorities": authorities,
        "offered_per_second": rate,
        "records": total,
        "committed": committed,
        "records_per_second": committed / (last_commit - start) if committed else 0.0,
        "latency_p50_ms": 1000 * statistics.median(latencies) if latencies else float("nan"),
        "latency_p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))]
        if latencies
        else float("nan"),
        "height": services[0].height,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--authorities", type=int, default=4)
    parser.add_argument("--rate", type=float, default=4000, help="records offered per second")
    parser.add_argument("--seconds", type=float, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pyrsia-bench-") as tmp:
        result = asyncio.run(run(args.authorities, args.rate, args.seconds, Path(tmp)))
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
