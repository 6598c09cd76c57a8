"""Ledger benchmark: durable batch-append throughput and proof-generation time vs size.

Run: .venv/bin/python bench/bench_ledger.py [--entries 200000] [--batch 3000]
Appends ``--entries`` artifact records in batches of ``--batch`` (one fsync each) to a log
in a temporary directory, then times inclusion and consistency proofs at growing sizes.
The reference is an in-memory ``merkle.MemoryTree`` fed the same leaf hashes in the same
run, so the append ratio shows what durability and indexing cost on this machine.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

from pyrsia_node import merkle
from pyrsia_node.ledger.log import TransparencyLog
from pyrsia_node.ledger.records import (
    IN_TOTO_PAYLOAD_TYPE,
    Artifact,
    ArtifactRecord,
    DsseEnvelope,
    PackageType,
)

ENVELOPE = DsseEnvelope(IN_TOTO_PAYLOAD_TYPE, b"x" * 600, (("a" * 64, b"s" * 64),))


def record(i: int) -> bytes:
    return ArtifactRecord(
        PackageType.DOCKER,
        f"docker.io/library/pkg{i % 1000}:v{i}",
        (Artifact(f"sha256:{i:064x}", i, "application/vnd.oci.image.manifest.v1+json"),),
        (ENVELOPE,),
    ).encode()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--entries", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=3000)
    args = parser.parse_args()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp, TransparencyLog(Path(tmp)) as log:
        reference = merkle.MemoryTree()
        log_time = ref_time = 0.0
        while log.size < args.entries:
            batch = [record(i) for i in range(log.size, log.size + args.batch)]
            start = time.perf_counter()
            log.append(batch)
            log_time += time.perf_counter() - start
            start = time.perf_counter()
            for data in batch:
                reference.append(merkle.leaf_hash(data))
            ref_time += time.perf_counter() - start
        print(f"append: {log.size / log_time:,.0f} records/s durable in batches of {args.batch}")
        print(f"reference (in-memory tree, same leaves): {log.size / ref_time:,.0f} leaves/s")
        print(f"ratio durable/in-memory time: {log_time / ref_time:.1f}x")
        for size in (1000, 10_000, 100_000, log.size):
            if size > log.size:
                continue
            n = 200
            start = time.perf_counter()
            for _ in range(n):
                log.inclusion_proof(rng.randrange(size), size)
            incl = (time.perf_counter() - start) / n
            start = time.perf_counter()
            for _ in range(n):
                log.consistency_proof(rng.randrange(1, size), size)
            cons = (time.perf_counter() - start) / n
            print(
                f"size {size:>9,}: inclusion {incl * 1e6:7.0f} us, consistency {cons * 1e6:7.0f} us"
            )


if __name__ == "__main__":
    main()
