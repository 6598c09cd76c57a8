import asyncio
import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pyrsia_node.store import (
    BlobNotFound,
    BlobStore,
    BlobTooLarge,
    DigestMismatch,
    InvalidDigest,
    sha256_digest,
)


def visible_blobs(root: Path) -> list[Path]:
    return [p for p in (root / "sha256").rglob("*") if p.is_file()]


async def chunks_of(data: bytes, size: int = 4096) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]
        await asyncio.sleep(0)


async def test_put_and_read_round_trip(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    data = os.urandom(100_000)
    digest = sha256_digest(data)
    assert await store.put_stream(digest, chunks_of(data)) == len(data)
    assert store.has(digest)
    assert store.size(digest) == len(data)
    assert await store.read(digest) == data


async def test_digest_mismatch_is_rejected_and_leaves_nothing(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    claimed = sha256_digest(b"expected")
    with pytest.raises(DigestMismatch) as caught:
        await store.put_stream(claimed, chunks_of(b"something else"))
    assert caught.value.actual == sha256_digest(b"something else")
    assert not store.has(claimed)
    assert visible_blobs(tmp_path) == []
    assert list((tmp_path / "tmp").iterdir()) == []


async def test_size_limit_discards_the_blob(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    data = b"x" * 10_000
    with pytest.raises(BlobTooLarge):
        await store.put_stream(sha256_digest(data), chunks_of(data), max_size=9_999)
    assert visible_blobs(tmp_path) == []


async def test_a_stream_of_small_pieces_past_several_writeback_steps_round_trips(
    tmp_path: Path,
) -> None:
    """Pieces of odd sizes (as an HTTP body arrives), batched per thread hop and written
    back to disk while the stream runs, give exactly the bytes that were sent."""
    store = BlobStore(tmp_path)
    data = os.urandom(20 * 1024 * 1024 + 12_345)
    digest = sha256_digest(data)
    assert await store.put_stream(digest, chunks_of(data, 65_537)) == len(data)
    assert await store.read(digest) == data
    assert list((tmp_path / "tmp").iterdir()) == []


async def test_verified_is_called_once_the_digest_matched_before_the_blob_is_visible(
    tmp_path: Path,
) -> None:
    store = BlobStore(tmp_path)
    data = os.urandom(300_000)
    digest = sha256_digest(data)
    visible_when_verified: list[bool] = []
    await store.put_stream(
        digest, chunks_of(data), verified=lambda: visible_when_verified.append(store.has(digest))
    )
    assert visible_when_verified == [False]
    assert store.has(digest)


async def test_verified_is_never_called_for_bytes_that_fail_the_digest(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    calls: list[None] = []
    with pytest.raises(DigestMismatch):
        await store.put_stream(
            sha256_digest(b"expected"), chunks_of(b"other"), verified=lambda: calls.append(None)
        )
    assert calls == []
    assert visible_blobs(tmp_path) == []


@pytest.mark.parametrize(
    "digest", ["sha256:../../etc/passwd", "sha256:ABC", "md5:" + "0" * 32, "sha256:" + "g" * 64]
)
def test_invalid_digests_never_name_a_path(tmp_path: Path, digest: str) -> None:
    with pytest.raises(InvalidDigest):
        BlobStore(tmp_path).path(digest)


def test_missing_blob_is_reported(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    with pytest.raises(BlobNotFound):
        store.open(sha256_digest(b"absent"))


def test_verify_on_read_detects_and_drops_corruption(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, verify_on_read=True)
    digest = sha256_digest(b"good bytes")
    store.write_sync(digest, (b"good bytes",))
    store.path(digest).write_bytes(b"bad bytes!")
    with pytest.raises(DigestMismatch):
        store.open(digest)
    assert not store.has(digest)


async def test_concurrent_writers_of_one_digest(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    data = os.urandom(300_000)
    digest = sha256_digest(data)
    sizes = await asyncio.gather(*(store.put_stream(digest, chunks_of(data)) for _ in range(8)))
    assert sizes == [len(data)] * 8
    assert await store.read(digest) == data
    assert visible_blobs(tmp_path) == [store.path(digest)]


def test_concurrent_writer_processes_of_one_digest(tmp_path: Path) -> None:
    data = os.urandom(2_000_000)
    (tmp_path / "payload").write_bytes(data)
    digest = sha256_digest(data)
    script = (
        "import sys; from pathlib import Path; from pyrsia_node.store import BlobStore\n"
        "s = BlobStore(Path(sys.argv[1]) / 'store')\n"
        "d = (Path(sys.argv[1]) / 'payload').read_bytes()\n"
        "s.write_sync(sys.argv[2], [d[i:i + 4096] for i in range(0, len(d), 4096)])\n"
    )
    BlobStore(tmp_path / "store")
    writers = [
        subprocess.Popen([sys.executable, "-c", script, str(tmp_path), digest]) for _ in range(4)
    ]
    assert [w.wait(timeout=60) for w in writers] == [0, 0, 0, 0]
    path = BlobStore.path(BlobStore(tmp_path / "store"), digest)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest[7:]


_SLOW_WRITER = """
import sys, time
from pathlib import Path
from pyrsia_node.store import BlobStore
store = BlobStore(Path(sys.argv[1]))
data = Path(sys.argv[2]).read_bytes()
chunks = [data[i:i + 65536] for i in range(0, len(data), 65536)]
print("ready", flush=True)
class Slow(list):
    def __iter__(self):
        for chunk in chunks:
            time.sleep(0.002)
            yield chunk
store.write_sync(sys.argv[3], Slow())
print("done", flush=True)
"""


def test_writer_killed_mid_write_leaves_no_visible_partial_blob(tmp_path: Path) -> None:
    """SIGKILL a writer at a random moment, 50 times: the blob is either absent or whole."""
    data = os.urandom(4 * 1024 * 1024)
    payload = tmp_path / "payload"
    payload.write_bytes(data)
    digest = sha256_digest(data)
    rng = random.Random(20261121)
    outcomes = {"absent": 0, "complete": 0}
    for attempt in range(50):
        root = tmp_path / f"store-{attempt}"
        writer = subprocess.Popen(
            [sys.executable, "-c", _SLOW_WRITER, str(root), str(payload), digest],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert writer.stdout is not None
        assert writer.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.25))
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=10)
        # Reopening cleans orphans; a visible blob must be complete and correct.
        store = BlobStore(root)
        assert list((root / "tmp").iterdir()) == []
        blobs = visible_blobs(root)
        if blobs:
            assert blobs == [store.path(digest)]
            assert hashlib.sha256(blobs[0].read_bytes()).hexdigest() == digest[7:]
            outcomes["complete"] += 1
        else:
            outcomes["absent"] += 1
    # The kill times span the write, so most kills land mid-write.
    assert outcomes["absent"] > 0
