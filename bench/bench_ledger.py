"""Ledger benchmark: durable append throughput, proof generation and verification times.

Run: .venv/bin/python bench/bench_ledger.py [--entries 1000000] [--batch 3000] [--dir PATH]

1. Append: grow a log to ``--entries`` artifact records (~930 bytes each) in batches of
   ``--batch``, each one durable commit (``TransparencyLog.append``), timing only the
   appends (record encoding is outside the timer). The reference is an in-memory
   ``merkle.MemoryTree`` fed the same leaf hashes in the same run (its first 1M leaves,
   to bound its memory), so the ratio shows what durability, validation and indexing cost.
2. Proofs: at sizes 1k, 10k, 100k, ... up to the log's size, ``--samples`` inclusion
   proofs (random index) and consistency proofs (random first size) are generated from
   the stored log and each verified with the RFC 9162 verifiers; mean and p99 of each.
3. Small appends: 7,000 appends of 10 records back to back (a node appending committed
   blocks), crossing one lookup-index flush: p50 / p99 / max latency of the calls.
4. Single-record appends: the latency of one durable commit of one record.

``--sync-ab`` instead times one-record appends with the data-file syncs concurrent and
sequential, interleaved, on a fresh log.

The append phase prints the p50 / p99 / max latency of the ``append`` calls: the lookup
indexes are written by a background thread, and a flush stalls an append only as long as
one of its slices holds SQLite's write lock.

With ``--dir`` the log lives in PATH and survives the run: a later run with the same
``--entries`` skips the build and only samples proofs (how the 10M figures were taken).
The load average is printed because other work on a shared machine moves these figures.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

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
REFERENCE_LEAVES = 1_000_000
_T = TypeVar("_T")


def record(i: int) -> bytes:
    return ArtifactRecord(
        PackageType.DOCKER,
        f"docker.io/library/pkg{i % 1000}:v{i}",
        (Artifact(f"sha256:{i:064x}", i, "application/vnd.oci.image.manifest.v1+json"),),
        (ENVELOPE,),
    ).encode()


def load() -> str:
    return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg())


def grow(log: TransparencyLog, entries: int, batch: int) -> None:
    if log.size >= entries:
        print(f"log already holds {log.size:,} entries: no build")
        return
    start_size = log.size
    reference = merkle.MemoryTree()
    log_time = ref_time = 0.0
    latencies: list[float] = []
    print(f"append: {start_size:,} -> {entries:,} entries, {load()}", flush=True)
    build_start = time.perf_counter()
    while log.size < entries:
        records = [record(i) for i in range(log.size, min(log.size + batch, entries))]
        start = time.perf_counter()
        log.append(records)
        elapsed = time.perf_counter() - start
        log_time += elapsed
        latencies.append(elapsed)
        if reference.size < REFERENCE_LEAVES:
            start = time.perf_counter()
            for data in records:
                reference.append(merkle.leaf_hash(data))
            ref_time += time.perf_counter() - start
        if log.size % 1_000_000 < batch:
            print(f"  {log.size:>11,} entries, {(log.size - start_size) / log_time:,.0f}/s so far")
    added = log.size - start_size
    wall = time.perf_counter() - build_start
    latencies.sort()
    print(
        f"append: {added / log_time:,.0f} records/s durable in batches of {batch} "
        f"({log_time:.1f} s in append, {wall:.1f} s wall with record encoding)"
    )
    print(
        f"  batch latency p50 {latencies[len(latencies) // 2] * 1e3:.1f} ms, "
        f"p99 {latencies[int(len(latencies) * 0.99)] * 1e3:.1f} ms, "
        f"max {latencies[-1] * 1e3:.0f} ms (append-call latency; lookup indexes are "
        "written by a background thread)"
    )
    if hasattr(log, "wait_for_indexes"):  # absent before the background index writer
        start = time.perf_counter()
        log.wait_for_indexes()
        print(f"  pending lookup-index entries written in {time.perf_counter() - start:.2f} s")
    print(
        f"reference (in-memory MemoryTree, first {reference.size:,} leaves of this run): "
        f"{reference.size / ref_time:,.0f} leaves/s; durable log is "
        f"{(log_time / added) / (ref_time / reference.size):.1f}x slower per entry"
    )
    print(f"  {load()}")


def timed(cases: Sequence[_T], fn: Callable[[_T], object]) -> tuple[float, float]:
    """Mean and p99, in microseconds, of ``fn`` on each case."""
    times = []
    for case in cases:
        start = time.perf_counter()
        fn(case)
        times.append(time.perf_counter() - start)
    times.sort()
    return statistics.fmean(times) * 1e6, times[int(len(times) * 0.99)] * 1e6


def proofs(log: TransparencyLog, samples: int, rng: random.Random) -> None:
    sizes = [s for s in (1_000, 10_000, 100_000, 1_000_000) if s < log.size] + [log.size]
    print(f"proofs ({samples} samples per figure, mean / p99 in us), {load()}")
    for size in sizes:
        proofs_at(log, size, samples, rng)


def proofs_at(log: TransparencyLog, size: int, samples: int, rng: random.Random) -> None:
    root = log.root(size)
    indexes = [rng.randrange(size) for _ in range(samples)]
    firsts = [rng.randrange(1, size) if size > 1 else 1 for _ in range(samples)]
    inclusion: list[tuple[int, list[bytes]]] = []
    consistency: list[tuple[int, list[bytes]]] = []
    gen_incl = timed(indexes, lambda i: inclusion.append((i, log.inclusion_proof(i, size))))
    gen_cons = timed(firsts, lambda s: consistency.append((s, log.consistency_proof(s, size))))
    leaves = {i: log.subtree_hash(0, i) for i in indexes}
    roots = {s: log.root(s) for s in firsts}
    ver_incl = timed(
        inclusion, lambda c: merkle.verify_inclusion(leaves[c[0]], c[0], size, c[1], root)
    )
    ver_cons = timed(
        consistency, lambda c: merkle.verify_consistency(c[0], size, c[1], roots[c[0]], root)
    )
    print(
        f"  size {size:>11,}: inclusion gen {gen_incl[0]:4.0f} / {gen_incl[1]:4.0f}, "
        f"verify {ver_incl[0]:3.0f} / {ver_incl[1]:3.0f}; consistency gen "
        f"{gen_cons[0]:4.0f} / {gen_cons[1]:4.0f}, verify {ver_cons[0]:3.0f} / {ver_cons[1]:3.0f}"
    )


def single_appends(log: TransparencyLog, count: int) -> None:
    latencies = []
    for data in [record(i) for i in range(log.size, log.size + count)]:
        start = time.perf_counter()
        log.append([data])
        latencies.append(time.perf_counter() - start)
    latencies.sort()
    print(
        f"single-record append (one durable commit): median "
        f"{statistics.median(latencies) * 1e3:.2f} ms, mean "
        f"{statistics.fmean(latencies) * 1e3:.2f} ms, p99 "
        f"{latencies[int(len(latencies) * 0.99)] * 1e3:.1f} ms ({count} appends)"
    )


def small_appends(log: TransparencyLog, appends: int, batch: int) -> None:
    """Latency of ``appends`` small appends back to back, ``batch`` records each: a node
    appending committed blocks. 7,000 x 10 records cross one lookup-index flush (every
    65,536 entries), which is where a stall would show."""
    latencies = []
    first = log.size
    for n in range(appends):
        records = [record(i) for i in range(first + n * batch, first + (n + 1) * batch)]
        start = time.perf_counter()
        log.append(records)
        latencies.append(time.perf_counter() - start)
    latencies.sort()
    slow = sum(t > 0.05 for t in latencies)
    print(
        f"{appends:,} appends of {batch} records from size {first:,}: p50 "
        f"{latencies[len(latencies) // 2] * 1e3:.2f} ms, p99 "
        f"{latencies[int(len(latencies) * 0.99)] * 1e3:.1f} ms, "
        f"max {latencies[-1] * 1e3:.0f} ms, {slow} over 50 ms; {load()}"
    )


class _InlineExecutor:
    """Stands in for the log's sync pool: runs each sync at once, one after another."""

    def submit(self, fn: Callable[..., object], *args: object) -> Future[object]:
        future: Future[object] = Future()
        future.set_result(fn(*args))
        return future

    def shutdown(self) -> None:
        pass


def sync_ab(directory: Path, rounds: int = 10, appends: int = 60) -> None:
    """One-record appends to a 1,000-entry log with the three data-file syncs concurrent
    (as the log does) and one after another, in interleaved rounds: median and p90."""
    with TransparencyLog(directory) as log:
        log.append([record(i) for i in range(1000)])
        pool = log._sync_pool
        modes: dict[str, Any] = {"concurrent": pool, "sequential": _InlineExecutor()}
        times: dict[str, list[float]] = {name: [] for name in modes}
        for n in range(rounds):
            for name in sorted(modes, reverse=bool(n % 2)):
                log._sync_pool = modes[name]
                for _ in range(appends):
                    data = record(log.size)
                    start = time.perf_counter()
                    log.append([data])
                    times[name].append(time.perf_counter() - start)
        log._sync_pool = pool
    for name, values in times.items():
        values.sort()
        print(
            f"one-record append, syncs {name}: median {statistics.median(values) * 1e3:.2f} ms, "
            f"p90 {values[int(len(values) * 0.9)] * 1e3:.2f} ms ({len(values)} appends)"
        )
    print(f"  {load()}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=3000)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--dir", type=Path, help="keep the log here (reused by later runs)")
    parser.add_argument(
        "--small-appends",
        type=int,
        default=7000,
        help="appends of 10 records after the build (0: skip; they grow a --dir log)",
    )
    parser.add_argument("--single-appends", type=int, default=200)
    parser.add_argument(
        "--sync-ab", action="store_true", help="only the concurrent vs sequential sync A/B"
    )
    args = parser.parse_args()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        if args.sync_ab:
            sync_ab(Path(tmp))
            return
        directory = args.dir or Path(tmp)
        start = time.perf_counter()
        with TransparencyLog(directory) as log:
            print(f"open: {log.size:,} entries in {time.perf_counter() - start:.2f} s")
            grow(log, args.entries, args.batch)
            proofs(log, args.samples, rng)
            if args.small_appends:
                small_appends(log, args.small_appends, 10)
            if args.dir is None:
                single_appends(log, args.single_appends)


if __name__ == "__main__":
    main()
