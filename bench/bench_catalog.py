"""The mirror's catalog over a large transparency log: first indexing, restart, memory.

A log of ``--images`` committed docker records (one attestation each, one distinct image
per record, as the consensus bench commits them) is written once into ``--dir`` (kept for
later runs). Then, in fresh child processes so each starts with an empty heap:

* ``reference``: reading every entry of the log (``TransparencyLog.entries``) and decoding
  each record, the least any index built from the log must do;
* ``cold``: ``LedgerCatalog.refresh`` with no index on disk: every entry decoded, its
  statement parsed and its rows written;
* ``warm``: the same once the index is on disk, i.e. a node's restart.

Each child reports wall and CPU seconds and its resident set before and after. Reported:
the cold indexing against the reference (ratio), the restart against the cold indexing,
and the resident set each leaves behind per image.

Usage: .venv/bin/python bench/bench_catalog.py --images 100000
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path

from pyrsia_node.attestation import AcquiredImage, Artifact, attest
from pyrsia_node.build import artifact_record
from pyrsia_node.catalog import LedgerCatalog
from pyrsia_node.identity import Identity
from pyrsia_node.ledger import TransparencyLog
from pyrsia_node.ledger.records import decode_record

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
BATCH = 5_000


def build_log(directory: Path, images: int) -> None:
    attester = Identity.generate()
    now = dt.datetime.now(dt.UTC)
    with TransparencyLog(directory) as ledger:
        for start in range(ledger.size, images, BATCH):
            records = []
            for index in range(start, min(start + BATCH, images)):
                image = AcquiredImage(
                    "docker.io",
                    f"library/bench{index}",
                    "v1",
                    Artifact(f"sha256:{index + 1:064x}", 1024 + index, MANIFEST),
                    (),
                    (),
                )
                _, envelope = attest(image, "docker.io", now, attester)
                records.append(artifact_record(image, [envelope]).encode())
            ledger.append(records)


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def child(part: str, log_dir: Path, index_path: Path) -> None:
    """One measured part in this (fresh) process; prints its figures as JSON."""
    with TransparencyLog(log_dir) as ledger:
        rss_before = rss_bytes()
        wall, cpu = time.perf_counter(), time.process_time()
        if part == "reference":
            for data in ledger.entries(0, ledger.size):
                decode_record(data)
        else:

            async def index() -> None:
                catalog = LedgerCatalog(ledger, index_path)
                await catalog.refresh()
                await catalog.close()

            asyncio.run(index())
        print(
            json.dumps(
                {
                    "wall_seconds": time.perf_counter() - wall,
                    "cpu_seconds": time.process_time() - cpu,
                    "rss_growth_bytes": rss_bytes() - rss_before,
                    "entries": ledger.size,
                }
            )
        )


def measure(part: str, log_dir: Path, index_path: Path) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", part, str(log_dir), str(index_path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    result: dict[str, float] = json.loads(out)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/pyrsia-bench-catalog"))
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        part, log_dir, index_path = args.child
        child(part, Path(log_dir), Path(index_path))
        return
    log_dir = args.dir / f"log-{args.images}"
    build_log(log_dir, args.images)
    index_path = args.dir / f"catalog-{args.images}.sqlite3"
    for suffix in ("", "-wal", "-shm"):
        index_path.with_name(index_path.name + suffix).unlink(missing_ok=True)
    reference = measure("reference", log_dir, index_path)
    cold = measure("cold", log_dir, index_path)
    warm = measure("warm", log_dir, index_path)
    images = args.images
    print(
        json.dumps(
            {
                "images": images,
                "reference_seconds": reference["wall_seconds"],
                "cold_seconds": cold["wall_seconds"],
                "cold_cpu_seconds": cold["cpu_seconds"],
                "cold_ratio_to_reference": cold["wall_seconds"] / reference["wall_seconds"],
                "warm_seconds": warm["wall_seconds"],
                "warm_ratio_to_cold": warm["wall_seconds"] / cold["wall_seconds"],
                "cold_rss_growth_bytes_per_image": cold["rss_growth_bytes"] / images,
                "warm_rss_growth_bytes_per_image": warm["rss_growth_bytes"] / images,
                "index_bytes_per_image": index_path.stat().st_size / images,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
