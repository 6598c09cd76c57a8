"""Admin API for the transparency log, mounted under ``/api/v1/log``.

Read-only: checkpoint, entries, inclusion and consistency proofs, search by package id.
Hashes are lowercase hex, record bytes base64. Bad input answers 400 and a missing entry
404, both as ``{"error": message}``. Every log call runs in a worker thread so the event
loop never blocks on disk IO.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from aiohttp import web

from pyrsia_node.genesis import Genesis
from pyrsia_node.ledger.authorities import authorities_in_force
from pyrsia_node.ledger.bundle import BundleError, ProofBundle
from pyrsia_node.ledger.checkpoint import Checkpoint, SignedNote
from pyrsia_node.ledger.log import EntryNotFound, TransparencyLog
from pyrsia_node.ledger.records import RecordError, decode_record
from pyrsia_node.merkle import leaf_hash

PREFIX = "/api/v1/log"
MAX_RECORDS = 1000
_T = TypeVar("_T")


class _BadRequest(Exception):
    pass


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _int_param(request: web.Request, name: str, default: int | None = None) -> int:
    text = request.match_info.get(name) or request.query.get(name)
    if text is None:
        if default is None:
            raise _BadRequest(f"query parameter {name!r} is required")
        return default
    try:
        value = int(text)
    except ValueError:
        raise _BadRequest(f"{name}={text!r}: expected a non-negative integer") from None
    if value < 0:
        raise _BadRequest(f"{name}={value}: expected a non-negative integer")
    return value


def entry_json(index: int, data: bytes) -> dict[str, Any]:
    """One log entry as the API shows it."""
    body: dict[str, Any] = {
        "index": index,
        "record_hash": leaf_hash(data).hex(),
        "record": base64.b64encode(data).decode(),
    }
    try:
        body["decoded"] = decode_record(data).to_dict()
    except RecordError as exc:  # the log admits only canonical records; say so if not
        body["decode_error"] = str(exc)
    return body


def routes(
    ledger: TransparencyLog,
    authorities: Callable[[], Sequence[tuple[str, bytes]]] | None = None,
    *,
    genesis: Genesis | None = None,
) -> list[web.RouteDef]:
    """The log's routes; mount with ``app.add_routes(routes(ledger, genesis=genesis))``.

    With ``genesis`` the log also hands out offline proof bundles for ``pyrsia verify``,
    ``GET /api/v1/log/bundle?index=N``, whose ``authorities`` are those in force at the
    checkpoint's size (``ledger.authorities``: the genesis set changed by the governance
    records below that size), the set that must have cosigned it. Without a genesis,
    ``authorities`` (the (name, public key) pairs in force now) fills that list instead:
    right only while no governance change came after the checkpoint.
    """

    async def call(fn: Callable[[], _T]) -> _T:
        return await asyncio.to_thread(fn)

    def handler(
        fn: Callable[[web.Request], Any],
    ) -> Callable[[web.Request], Any]:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            try:
                body = await fn(request)
            except _BadRequest as exc:
                return _error(400, str(exc))
            except EntryNotFound as exc:
                return _error(404, str(exc))
            except BundleError as exc:
                return _error(409, str(exc))
            return web.json_response(body)

        return wrapped

    async def checkpoint(_: web.Request) -> dict[str, Any]:
        def read() -> dict[str, Any]:
            return {
                "tree_size": ledger.size,
                "root": ledger.root().hex(),
                "checkpoint": ledger.latest_checkpoint(),
            }

        return await call(read)

    async def entry(request: web.Request) -> dict[str, Any]:
        index = _int_param(request, "index")
        return entry_json(index, await call(lambda: ledger.entry(index)))

    async def inclusion(request: web.Request) -> dict[str, Any]:
        text = request.query.get("hash")
        if text is not None and "index" in request.query:
            raise _BadRequest("give either index or hash, not both")
        record_hash: bytes | None = None
        if text is not None:
            try:
                record_hash = bytes.fromhex(text)
            except ValueError:
                raise _BadRequest(f"hash={text!r}: expected 64 hex digits") from None
            if len(record_hash) != 32:
                raise _BadRequest(f"hash={text!r}: expected 64 hex digits")

        def prove() -> dict[str, Any]:
            index = ledger.index_of(record_hash) if record_hash else _int_param(request, "index")
            size = _int_param(request, "size", ledger.size)
            proof = ledger.inclusion_proof(index, size)
            return {
                "index": index,
                "tree_size": size,
                "record_hash": ledger.subtree_hash(0, index).hex(),
                "root": ledger.root(size).hex(),
                "proof": [h.hex() for h in proof],
            }

        return await call(prove)

    async def consistency(request: web.Request) -> dict[str, Any]:
        size1 = _int_param(request, "from")

        def prove() -> dict[str, Any]:
            size2 = _int_param(request, "to", ledger.size)
            proof = ledger.consistency_proof(size1, size2)
            return {
                "from": size1,
                "to": size2,
                "root1": ledger.root(size1).hex(),
                "root2": ledger.root(size2).hex(),
                "proof": [h.hex() for h in proof],
            }

        return await call(prove)

    async def records(request: web.Request) -> dict[str, Any]:
        package_id = request.query.get("package_id", "")
        if not package_id:
            raise _BadRequest("query parameter 'package_id' is required")
        limit = _int_param(request, "limit", 100)
        if not 1 <= limit <= MAX_RECORDS:
            raise _BadRequest(f"limit={limit}: expected 1..{MAX_RECORDS}")

        def search() -> list[dict[str, Any]]:
            found = ledger.find_package(package_id, limit)
            return [entry_json(i, ledger.entry(i)) for i in found]

        return {"package_id": package_id, "records": await call(search)}

    async def bundle(request: web.Request) -> dict[str, Any]:
        index = _int_param(request, "index")
        claimed = None if genesis is not None or authorities is None else list(authorities())

        def build() -> dict[str, Any]:
            note = ledger.latest_checkpoint()
            if note is None:
                raise BundleError("checkpoint", "the log has no cosigned checkpoint yet")
            if claimed is None:
                assert genesis is not None
                size = Checkpoint.parse(SignedNote.parse(note).body).size
                governance = [(i, ledger.entry(i)) for i in ledger.governance_indexes(size)]
                signers = authorities_in_force(genesis, governance, size).authorities
            else:
                signers = tuple(claimed)
            made = ProofBundle.from_log(ledger, index, signers, note)
            document: dict[str, Any] = json.loads(made.to_json())
            return document

        return await call(build)

    serves_bundles = genesis is not None or authorities is not None
    bundle_routes = [web.get(f"{PREFIX}/bundle", handler(bundle))] if serves_bundles else []
    return [
        *bundle_routes,
        web.get(f"{PREFIX}/checkpoint", handler(checkpoint)),
        web.get(f"{PREFIX}/entries/{{index}}", handler(entry)),
        web.get(f"{PREFIX}/proof/inclusion", handler(inclusion)),
        web.get(f"{PREFIX}/proof/consistency", handler(consistency)),
        web.get(f"{PREFIX}/records", handler(records)),
    ]
