"""Admin API for consensus input, mounted under ``/api/v1/records``.

``POST /api/v1/records`` takes one raw canonical ledger record (``application/octet-stream``)
and offers it to this node's mempool, which gossips it to every authority:

* 202 ``{"record_hash": hex, "status": "admitted"}``: new, pending until a block commits it
  (in the authorities' memory, as a Tendermint mempool holds it: a record whose every
  holder crashes before its block commits is lost, so resubmit what does not commit);
* 200 ``{"record_hash": hex, "status": "already pending"}``: this node holds it already;
* 400 ``{"error": reason}``: refused (not canonical, too large, already in the ledger, the
  mempool is full, a governance record the network's governance key did not sign for this
  chain), the reason saying what to do;
* 409: this node is not an authority, so nothing would propose the record;
* 503: consensus has not started yet; retry.

``?wait=SECONDS`` (up to 60) answers only once the record is committed or the time is up,
as CometBFT's ``broadcast_tx_commit`` does: 200 ``{"record_hash": hex, "status":
"committed", "index": n}`` with the record's index in this node's log, also when the log
held it already (so resubmitting with ``wait`` until it says ``committed`` is how a client
makes sure a record is in); 202 with status ``admitted`` or ``already pending`` when no
block committed it within the wait.

Whether the record's attestations suffice is the mempool's `record_valid` check against
the authorities in force, the same one records gossiped from other authorities pass.
Governance records (ADD/REMOVE of an authority, signed with the network's governance key)
come in here too; a change is in force from the commit of its block and votes two heights
later.
"""

from __future__ import annotations

from aiohttp import web

from pyrsia_node.consensus.mempool import RecordRejected
from pyrsia_node.consensus.service import MAX_SUBMIT_WAIT_SECONDS, ConsensusService
from pyrsia_node.merkle import leaf_hash

PATH = "/api/v1/records"
CONTENT_TYPE = "application/octet-stream"


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def routes(consensus: ConsensusService) -> list[web.RouteDef]:
    """The record submission route; mount with ``app.add_routes(routes(consensus))``."""

    async def submit(request: web.Request) -> web.Response:
        if request.content_type != CONTENT_TYPE:
            return _error(
                400, f"content type {request.content_type!r}: send the record as {CONTENT_TYPE}"
            )
        try:
            wait = float(request.query.get("wait", "0"))
        except ValueError:
            wait = -1.0
        if not 0 <= wait <= MAX_SUBMIT_WAIT_SECONDS:  # also refuses nan
            return _error(400, f"wait: seconds from 0 to {MAX_SUBMIT_WAIT_SECONDS:.0f}")
        if not consensus.started:
            return _error(503, "consensus is starting; retry")
        if not consensus.is_validator():
            return _error(409, "this node is not an authority; submit records to an authority")
        record = await request.read()
        if not record:
            return _error(400, "empty body: send one canonical ledger record")
        (outcome,) = await consensus.submit_all_waiting([record], wait)
        if isinstance(outcome, RecordRejected):
            return _error(400, outcome.reason)
        body: dict[str, object] = {"record_hash": leaf_hash(record).hex(), "status": outcome.status}
        if outcome.index is not None:
            body["index"] = outcome.index
            return web.json_response(body, status=200)
        return web.json_response(body, status=202 if outcome.new or wait else 200)

    return [web.post(PATH, submit)]
