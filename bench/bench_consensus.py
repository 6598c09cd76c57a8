"""Consensus throughput and commit latency on loopback.

Two modes, both offering records at a fixed rate spread over the authorities:

* ``--mode processes`` (default): a `LocalNetwork` of N real node processes (as
  ``pyrsia up`` runs them: mutual TLS, record validation against the authorities'
  attestations, fsynced write-ahead state, SQLite transparency logs, checkpoint
  cosigning). Records go in through gRPC ``SubmitRecords`` calls (every 10 ms, or
  ``--submit-every`` seconds, the records due so far, to the node each is assigned to);
  commits are observed through each node's ``GetBlocks(follow=True)`` stream.
* ``--mode inprocess``: N `ConsensusService`s in this one process (one asyncio loop, real
  gRPC without TLS, real fsyncs and logs); a lower bound, all nodes sharing one GIL.

Reported:

* committed records per second (records committed / time from first offer to last commit),
  and in processes mode ``steady_records_per_second``: the records of the blocks committed
  from 2 s after the first offer to the last offer, per second of that window (the offered
  rate when the network keeps up, its capacity when it does not; the first figure also
  counts the start and the backlog drained after the last offer, so it stays below the
  offered rate even for a network that keeps up),
* commit latency p50 and p99 (offer -> commit seen at the authority that admitted the
  record; in processes mode, seen by this process through that node's follow stream),
* the reference: the same records appended straight to a `TransparencyLog`, in batches of
  the run's mean block size, with no consensus, and the ratio against it.

Each record is a canonical ledger artifact record carrying one DSSE attestation with an
in-toto statement and an Ed25519 signature, as authorities produce them.

* memory: each node's resident set before the first offer and after the last commit, and
  its growth per committed record next to the record's own size
  (``rss_growth_bytes_per_record``, ``record_bytes``).
* CPU: the node processes' user + system CPU seconds from the first offer to the last
  commit, per committed record and authority (``cpu_ms_per_record_per_authority``), a
  figure that depends less on how busy the shared machine was than records per second;
  ``node_system_cpu_seconds`` is the kernel's part of it; ``client_cpu_seconds`` is this
  process's own CPU over the same span (it shares the machine with the nodes).

Usage: .venv/bin/python bench/bench_consensus.py --authorities 4 --rate 3000 --seconds 10
(add ``--profile DIR`` to sample every node with py-spy while records are offered).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import grpc
from prometheus_client.parser import text_string_to_metric_families
from pyrsia.v1 import consensus_pb2 as pb
from pyrsia.v1 import consensus_pb2_grpc as pb_grpc
from pyrsia_node import attestation, tls
from pyrsia_node.attestation import AcquiredImage, attest
from pyrsia_node.build import artifact_record
from pyrsia_node.consensus import Block, CommitCertificate, ConsensusConfig, Timeouts
from pyrsia_node.consensus.mempool import MempoolLimits
from pyrsia_node.consensus.metrics import STEPS
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
from pyrsia_node.localnet import LocalNetwork, Shape, fetch_json
from pyrsia_node.merkle import leaf_hash

CHAIN = "pyrsia-bench"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
TICK = 0.01  # default seconds between submission batches in processes mode (--submit-every)


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


def free_port_block(size: int) -> int:
    """The first port of `size` consecutive free loopback ports."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 60000 - size)
        free = True
        for port in range(base, base + size):
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    free = False
                    break
        if free:
            return base
    raise RuntimeError("no block of free loopback ports found")


def attested_records(total: int, attester: Identity) -> list[bytes]:
    """`total` artifact records, each with one attestation by `attester` in the format the
    nodes' record check accepts (`pyrsia_node.build.check_artifact_record`)."""
    now = dt.datetime.now(dt.UTC)
    records = []
    for index in range(total):
        image = AcquiredImage(
            "docker.io",
            f"library/bench{index}",
            "v1",
            attestation.Artifact(f"sha256:{index + 1:064x}", 1024 + index, MANIFEST),
            (),
            (),
        )
        _, envelope = attest(image, "docker.io", now, attester)
        records.append(artifact_record(image, [envelope]).encode())
    return records


def reference_append(records: list[bytes], batch: int, root: Path) -> float:
    """Records per second appended straight to a `TransparencyLog`, `batch` at a time."""
    ledger = TransparencyLog(root / "reference-ledger")
    try:
        start = time.perf_counter()
        for first in range(0, len(records), batch):
            ledger.append(records[first : first + batch])
        return len(records) / (time.perf_counter() - start)
    finally:
        ledger.close()


def fsync_figures(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(seconds)
    if not ordered:
        return {}
    return {
        "count": len(ordered),
        "p50": 1000 * percentile(ordered, 0.5),
        "p99": 1000 * percentile(ordered, 0.99),
        "max": 1000 * ordered[-1],
        "over_100ms": sum(1 for s in ordered if s > 0.1),
    }


def percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[int(fraction * (len(sorted_values) - 1))]


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU seconds `pid` has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def rss_bytes(pid: int) -> int:
    """Resident memory of `pid` (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def start_profilers(net: LocalNetwork, directory: Path) -> list[subprocess.Popen[bytes]]:
    """One `py-spy record` per node (collapsed stacks, GIL holders only) until SIGINT."""
    directory.mkdir(parents=True, exist_ok=True)
    spy = Path(sys.executable).with_name("py-spy")
    return [
        subprocess.Popen(
            [
                *(str(spy), "record", "--format", "raw", "--gil", "--nonblocking"),
                *("--pid", str(process.pid)),
                *("--output", str(directory / f"{name}.txt")),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for name, process in net.processes.items()
    ]


def step_seconds(net: LocalNetwork, names: list[str]) -> dict[str, float]:
    """Seconds the nodes `names` spent in each consensus step so far, summed
    (`pyrsia_consensus_step_seconds` from their metrics endpoints), and under
    ``round_changes`` the rounds they moved on from without a decision
    (`pyrsia_consensus_round_changes_total`), summed too."""
    totals = dict.fromkeys([*STEPS, "round_changes"], 0.0)
    for name in names:
        node = net.node(name)
        url = f"http://{node.host}:{node.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        for family in text_string_to_metric_families(text):
            if family.name == "pyrsia_consensus_step_seconds":
                for sample in family.samples:
                    if sample.name.endswith("_sum"):
                        totals[sample.labels["step"]] += sample.value
            elif family.name == "pyrsia_consensus_round_changes":
                totals["round_changes"] += sum(s.value for s in family.samples)
    return totals


STEADY_AFTER = 2.0  # seconds after the first offer: the start-up blocks are past


class FsyncProbe:
    """Every `every` seconds, in a thread, appends 4 KiB to a file beside the nodes' data
    and fsyncs it, as a node's write-ahead write does, and keeps how long each took: the
    disk's own flush latency during the run, the reference for the nodes' waits on it
    (every vote waits for one; the nodes of a `LocalNetwork` share the disk)."""

    def __init__(self, directory: Path, every: float = 0.02) -> None:
        self._path = directory / "fsync-probe"
        self._every = every
        self._stop = threading.Event()
        self.seconds: list[float] = []
        self._thread = threading.Thread(target=self._run, name="fsync-probe", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        block = os.urandom(4096)
        while not self._stop.wait(self._every):
            started = time.perf_counter()
            fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                os.write(fd, block)
                os.fsync(fd)
            finally:
                os.close(fd)
            self.seconds.append(time.perf_counter() - started)


async def run_processes(
    authorities: int,
    rate: float,
    seconds: float,
    root: Path,
    profile: Path | None = None,
    submit_every: float = TICK,
) -> dict[str, object]:
    net = LocalNetwork(
        root / "net",
        Shape(
            authorities,
            0,
            free_port_block(10 * authorities + 10),
            "127.0.0.1",
            attestation_threshold=1,
        ),
    )
    ca_dir = net.root / "ca"
    ca = tls.KeyPair((ca_dir / "ca.key").read_bytes(), (ca_dir / "ca.crt").read_bytes())
    client = tls.issue_node_certificate(ca, "bench-client")
    credentials = grpc.ssl_channel_credentials(ca.cert_pem, client.key_pem, client.cert_pem)
    options = [
        ("grpc.ssl_target_name_override", tls.TARGET_NAME),
        ("grpc.max_receive_message_length", 64 << 20),
    ]
    attester = Identity.from_pem((net.node("authority-0").data_dir / "keys/node.key").read_bytes())
    total = int(rate * seconds)
    records = attested_records(total, attester)
    names = [f"authority-{i}" for i in range(authorities)]
    offered: dict[bytes, tuple[float, int]] = {}
    latencies: list[float] = []
    intervals: list[float] = []  # between consecutive blocks seen on authority-0's stream
    commits: list[tuple[float, int]] = []  # (when, records) of each block on that stream
    committed = 0
    blocks = 0
    last_commit = 0.0
    net.start()
    try:
        net.wait_connected(timeout=60)
        channels = [
            grpc.aio.secure_channel(net.node(name).grpc_address, credentials, options=options)
            for name in names
        ]
        stubs = [pb_grpc.ConsensusStub(channel) for channel in channels]
        start_height = [0] * authorities
        for i, name in enumerate(names):
            status = fetch_json(f"{net.node(name).http_url}/api/v1/status")
            start_height[i] = status["ledger"]["height"]

        async def follow(node: int) -> None:
            nonlocal committed, blocks, last_commit
            request = pb.GetBlocksRequest(from_height=start_height[node] + 1, follow=True)
            async for item in stubs[node].GetBlocks(request):
                now = time.perf_counter()
                if node == 0:
                    committed += len(item.block.records)
                    blocks += 1
                    if last_commit:
                        intervals.append(now - last_commit)
                    last_commit = now
                    commits.append((now, len(item.block.records)))
                for record in item.block.records:
                    entry = offered.get(record)
                    if entry is not None and entry[1] == node:
                        latencies.append(now - entry[0])

        followers = [asyncio.create_task(follow(i)) for i in range(authorities)]
        await asyncio.sleep(0.5)
        rejected: list[str] = []

        async def submit(node: int, batch: list[bytes]) -> None:
            try:
                response = await stubs[node].SubmitRecords(
                    pb.SubmitRecordsRequest(records=batch), timeout=30
                )
            except grpc.aio.AioRpcError as exc:  # an overloaded node: count, do not retry
                rejected.extend(f"SubmitRecords failed: {exc.code().name}" for _ in batch)
                return
            rejected.extend(r.reason for r in response.results if not r.accepted)

        pids = [net.processes[name].pid for name in names]
        steps_before = step_seconds(net, names)
        cpu_before = [cpu_seconds(pid) for pid in pids]
        rss_before = [rss_bytes(pid) for pid in pids]
        client_before = resource.getrusage(resource.RUSAGE_SELF)
        profilers = [] if profile is None else start_profilers(net, profile)
        probe = FsyncProbe(root)
        probe.start()
        # Every `submit_every` seconds, the records due so far go to their nodes, one
        # SubmitRecords each.
        start = time.perf_counter()
        tasks = []
        sent = 0
        while sent < total:
            await asyncio.sleep(submit_every)
            due = min(total, int((time.perf_counter() - start) * rate) + 1)
            batches: dict[int, list[bytes]] = {}
            now = time.perf_counter()
            for index in range(sent, due):
                node = index % authorities
                offered[records[index]] = (now, node)
                batches.setdefault(node, []).append(records[index])
            sent = due
            tasks += [asyncio.create_task(submit(n, b)) for n, b in batches.items()]
        offered_for = time.perf_counter() - start
        await asyncio.gather(*tasks)
        deadline = time.perf_counter() + 60
        while committed < total - len(rejected) and time.perf_counter() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        probe.stop()
        client_after = resource.getrusage(resource.RUSAGE_SELF)
        steps_after = step_seconds(net, names)
        rss_after = [rss_bytes(pid) for pid in pids]
        client_cpu = (client_after.ru_utime - client_before.ru_utime) + (
            client_after.ru_stime - client_before.ru_stime
        )
        user = system = 0.0
        for pid, (user_before, system_before) in zip(pids, cpu_before, strict=True):
            user_now, system_now = cpu_seconds(pid)
            user += user_now - user_before
            system += system_now - system_before
        for profiler in profilers:
            profiler.send_signal(signal.SIGINT)
        for profiler in profilers:
            profiler.wait(timeout=30)
        for task in followers:
            task.cancel()
        await asyncio.gather(*followers, return_exceptions=True)
        for channel in channels:
            await channel.close(None)
    finally:
        net.stop()
    latencies.sort()
    mean_block = committed / blocks if blocks else 1.0
    reference = reference_append(records, max(1, round(mean_block)), root)
    throughput = committed / (last_commit - start) if committed else 0.0
    # Steady state: the blocks committed from STEADY_AFTER seconds after the first offer to
    # the last offer, per second of that window: the rate the network commits at while
    # records keep coming (the offered rate when it keeps up, its capacity when it does not),
    # without the start-up block or the backlog drained after the offering stopped, which the
    # figure above includes.
    window = [n for when, n in commits if STEADY_AFTER <= when - start <= offered_for]
    steady = sum(window) / (offered_for - STEADY_AFTER) if offered_for > STEADY_AFTER else 0.0
    return {
        "mode": "processes",
        "authorities": authorities,
        "offered_per_second": rate,
        "achieved_offer_per_second": total / offered_for,
        "records": total,
        "rejected": len(rejected),
        "committed": committed,
        "blocks": blocks,
        "mean_block_records": mean_block,
        "records_per_second": throughput,
        "steady_records_per_second": steady,
        "latency_p50_ms": 1000 * percentile(latencies, 0.5),
        "latency_p99_ms": 1000 * percentile(latencies, 0.99),
        "latency_max_ms": 1000 * latencies[-1] if latencies else float("nan"),
        "block_interval_p50_ms": 1000 * percentile(sorted(intervals), 0.5),
        "block_interval_max_ms": 1000 * max(intervals, default=float("nan")),
        "node_cpu_seconds": user + system,
        "node_system_cpu_seconds": system,
        "client_cpu_seconds": client_cpu,
        "cpu_ms_per_record_per_authority": 1000 * (user + system) / authorities / max(committed, 1),
        # Where a height's time goes, per authority (pyrsia_consensus_step_seconds): commit
        # is part of new_height, which also holds the pause before round 0.
        "step_ms_per_height": {
            step: 1000 * (steps_after[step] - steps_before[step]) / authorities / max(blocks, 1)
            for step in STEPS
        },
        # Rounds the authorities moved on from without deciding (each costs its height at
        # least the propose timeout), per authority.
        "round_changes_per_authority": (
            steps_after["round_changes"] - steps_before["round_changes"]
        )
        / authorities,
        "reference_log_append_per_second": reference,
        "ratio_to_reference": throughput / reference,
        # The shared disk's flush latency over the same span (`FsyncProbe`): a vote waits
        # for one fsync, a height for several, so its tail shows in the latency's tail.
        "fsync_probe_ms": fsync_figures(probe.seconds),
        # Memory: what a node's resident set grew by per committed record, against the
        # record's own size (a node that kept every record in memory would be near 1).
        "node_rss_mb_before": statistics.mean(rss_before) / 2**20,
        "node_rss_mb_after": statistics.mean(rss_after) / 2**20,
        "rss_growth_bytes_per_record": (statistics.mean(rss_after) - statistics.mean(rss_before))
        / max(committed, 1),
        "record_bytes": statistics.mean(map(len, records)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("processes", "inprocess"), default="processes")
    parser.add_argument("--authorities", type=int, default=4)
    parser.add_argument("--rate", type=float, default=3000, help="records offered per second")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument(
        "--profile",
        type=Path,
        help="processes mode: py-spy each node while records are offered, into this directory",
    )
    parser.add_argument(
        "--submit-every",
        type=float,
        default=TICK,
        help="processes mode: seconds between SubmitRecords batches (one call per node each)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pyrsia-bench-") as tmp:
        result: dict[str, object]
        if args.mode == "processes":
            result = asyncio.run(
                run_processes(
                    args.authorities,
                    args.rate,
                    args.seconds,
                    Path(tmp),
                    args.profile,
                    args.submit_every,
                )
            )
        else:
            result = dict(asyncio.run(run(args.authorities, args.rate, args.seconds, Path(tmp))))
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
